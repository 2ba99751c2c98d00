"""Online BC fits the expert's labels, ignores unlabelled steps, and its weights load into the robot-side policy."""

import numpy as np
import torch

from robot_rl.algos import make_algorithm
from robot_rl.interfaces import Feature
from robot_rl.learner.replay_buffer import ReplayBuffer
from robot_rl.policies.mlp import MLPPolicy
from robot_rl.transport import decode_weights, encode_weights

POLICY_CFG = {"type": "mlp", "hidden": [64, 64], "obs_keys": None}


def fill(store, n=2000, seed=0):
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n, 4)).astype(np.float32) * 3 + 10  # un-normalised on purpose
    w = np.array([[0.1, -0.1, 0.05, 0.0], [0.0, 0.1, 0.1, -0.05]], np.float32)
    label = np.tanh((obs - 10) @ w.T).astype(np.float32)
    label[::10] = np.nan  # steps without an expert label
    store.append("robot0", np.arange(n), {"obs.state": obs, "obs.img": np.zeros((n, 4, 4, 3), np.uint8),
                                          "expert_action": label})
    return obs, label


def test_online_bc_fits_labels_and_weights_travel(tmp_path):
    torch.manual_seed(0)
    store = ReplayBuffer(tmp_path / "r.zarr")
    obs, label = fill(store)
    algo = make_algorithm({"name": "online_bc", "lr": 3e-3, "batch_size": 128, "min_transitions": 100},
                          POLICY_CFG, torch.device("cpu"))
    assert algo.ready(store)
    rng = np.random.default_rng(0)
    first = algo.update(store, rng)["bc/loss"]
    for _ in range(300):
        last = algo.update(store, rng)
    assert last["bc/loss"] < 0.2 * first
    assert 0.85 < last["bc/labelled_fraction"] < 0.95

    # the robot side builds its policy from the robot's features and loads what came over the wire
    algo.on_publish(store)
    update = decode_weights(encode_weights(3, algo.policy_state()))
    robot_policy = MLPPolicy.from_features({"state": Feature((4,)), "img": Feature((4, 4, 3), "uint8")},
                                           Feature((2,)), POLICY_CFG["hidden"])
    robot_policy.load_state_dict(update.tensors)
    i = 5
    act = robot_policy.select_action({"state": obs[i], "img": np.zeros((4, 4, 3), np.uint8)})
    np.testing.assert_allclose(act, label[i], atol=0.15)


def test_unknown_algo_and_setting_are_named():
    import pytest

    with pytest.raises(ValueError, match="algo.name='ppo'"):
        make_algorithm({"name": "ppo"}, POLICY_CFG, torch.device("cpu"))
    with pytest.raises(ValueError, match="algo.lrr"):
        make_algorithm({"name": "online_bc", "lrr": 1}, POLICY_CFG, torch.device("cpu"))
