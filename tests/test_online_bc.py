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
    store.append(
        "robot0", np.arange(n), {"obs.state": obs, "obs.img": np.zeros((n, 4, 4, 3), np.uint8), "expert_action": label}
    )
    return obs, label


def test_online_bc_fits_labels_and_weights_travel(tmp_path):
    torch.manual_seed(0)
    store = ReplayBuffer(tmp_path / "r.zarr")
    obs, label = fill(store)
    algo = make_algorithm(
        {"name": "online_bc", "lr": 3e-3, "batch_size": 128, "min_transitions": 100}, POLICY_CFG, torch.device("cpu")
    )
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
    robot_policy = MLPPolicy.from_features(
        {"state": Feature((4,)), "img": Feature((4, 4, 3), "uint8")}, Feature((2,)), POLICY_CFG["hidden"]
    )
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


def test_a_registered_algorithm_plugs_into_both_processes_without_touching_them():
    """A new pipeline = one Algorithm class + config: the control process builds, feeds and evaluates its
    robot-side policy through the registry and the Policy interface alone (its methods run here on a stub)."""
    from dataclasses import dataclass
    from types import SimpleNamespace

    import pytest
    from omegaconf import OmegaConf

    from robot_rl.algos import REGISTRY, register
    from robot_rl.algos.base import Algorithm
    from robot_rl.control.process import ControlProcess
    from robot_rl.interfaces import Policy

    @dataclass
    class ConstantConfig:
        offset: float

    class ConstantPolicy(Policy):
        acts_without_weights = True  # acts before the learner's first weights
        probe_after_load = False
        eval_modes = ("policy", "zero")

        def __init__(self, dim: int, offset: float):
            self.bias, self.offset, self.explore = torch.zeros(dim), offset, None

        def reset(self):
            pass

        def select_action(self, observation):
            return (self.bias + self.offset).numpy()

        def state_dict(self):
            return {"bias": self.bias}

        def load_state_dict(self, state):
            self.bias = torch.as_tensor(np.asarray(state["bias"]))

        def apply_meta(self, meta):
            self.explore = meta.get("explore")

        def transition_extras(self, acted):
            return {"offset": np.float32(self.offset if acted else np.nan)}

    class Constant(Algorithm):
        @classmethod
        def build_robot_policy(cls, cfg, policy_cfg, robot, seed):
            return ConstantPolicy(robot.action_feature.shape[0], cfg.offset)

        def ready(self, replay):
            return True

        def update(self, replay, rng):
            return {}

        def policy_state(self):
            return {"bias": torch.ones(2)}

        def robot_policy(self):
            return ConstantPolicy(2, self.cfg.offset)

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    register("test_constant", Constant, ConstantConfig)
    try:
        with pytest.raises(ValueError, match="algo.offset has no value"):
            make_algorithm({"name": "test_constant"}, {}, torch.device("cpu"))
        assert make_algorithm({"name": "test_constant", "offset": 0.5}, {}, torch.device("cpu")).cfg.offset == 0.5

        robot = SimpleNamespace(observation_features={"state": Feature((4,))}, action_feature=Feature((2,)))
        update = SimpleNamespace(version=1, tensors={"bias": torch.ones(2)}, meta={"explore": "more"})
        host = SimpleNamespace(
            cfg=OmegaConf.create({"algo": {"name": "test_constant", "offset": 0.5}, "policy": {"type": "none"}}),
            robot=robot,
            seed=0,
            policy_version=-1,
            weight_updates=[],
            subscriber=SimpleNamespace(latest=lambda: update),
        )
        host.policy = ControlProcess._make_policy(host)
        assert isinstance(host.policy, ConstantPolicy) and host.policy.acts_without_weights
        obs = {"state": np.zeros(4, np.float32)}
        assert host.policy.select_action(obs).tolist() == [0.5, 0.5]
        assert host.policy.transition_extras(acted=True) == {"offset": np.float32(0.5)}
        ControlProcess._take_new_weights(host, obs)  # load, version, learner's meta, no probe
        assert host.policy_version == 1 and host.policy.explore == "more"
        assert host.weight_updates[-1]["probe_action"] is None
        assert host.policy.select_action(obs).tolist() == [1.5, 1.5]
        with host.policy.evaluating("zero"):  # the base class's default: nothing to switch
            assert host.policy.eval_modes == ("policy", "zero") and host.policy.eval_once == ()
    finally:
        del REGISTRY["test_constant"]
