"""gym-hil (lerobot's MuJoCo Panda tasks) as a second sim backend behind our `Robot` interface."""

import importlib.util
import json

import numpy as np
import pytest

from robot_rl.config import ConfigError
from robot_rl.factory import make_robot

from conftest import robot_rl_cli

# find_spec, not importorskip: importing gym_hil imports mujoco, which must come after MUJOCO_GL is chosen
pytestmark = pytest.mark.skipif(importlib.util.find_spec("gym_hil") is None, reason="gym-hil not installed")


def test_gym_hil_robot_features_reset_step():
    robot = make_robot({"type": "gym_hil", "env_name": "PandaPickCubeBase-v0", "task": "t", "safety": {}})
    feats = robot.observation_features  # before connect: from the env's spaces
    assert feats["agent_pos"].shape == (18,) and feats["environment_state"].shape == (3,)
    assert robot.action_feature.shape == (7,) and robot.action_feature.names[-1] == "gripper"
    with robot:
        first = robot.reset(seed=3)
        assert set(first) == set(feats) and first["agent_pos"].dtype == np.float32
        np.testing.assert_allclose(first["environment_state"], [0.5, 0.0, 0.02], atol=1e-3)  # the block
        sent = robot.send_action(np.array([0, 0, -0.02, 0, 0, 0, 3.0]))
        np.testing.assert_allclose(sent, [0, 0, -0.02, 0, 0, 0, 1.0], atol=1e-7)  # clipped to [-1, 1]
        for _ in range(3):
            robot.send_action(np.array([0, 0, -0.02, 0, 0, 0, 0]))
        moved = robot.get_observation()
        assert not np.array_equal(moved["agent_pos"], first["agent_pos"]) and robot.is_success() is False
        again = robot.reset(seed=3)
        assert np.array_equal(again["agent_pos"], first["agent_pos"])  # deterministic per seed
    assert not robot.is_connected
    with pytest.raises(ConfigError, match="not a gym-hil environment.*PandaPickCubeBase-v0"):
        make_robot({"type": "gym_hil", "env_name": "PandaPickCube-v9"})


def test_gym_hil_images():
    robot = make_robot({"type": "gym_hil", "image_obs": True, "image_size": 32})
    with robot:
        obs = robot.get_observation()
    assert obs["front_image"].shape == obs["wrist_image"].shape == (32, 32, 3)
    assert obs["front_image"].dtype == np.uint8 and "environment_state" not in obs


def test_session_on_gym_hil(tmp_path, ports):
    """`robot-rl session robot=gym_hil`: control process and learner over ZMQ; every transition reaches the
    learner's replay with gym-hil's observations (no one acts: the robot holds on the safe action)."""
    out = robot_rl_cli(
        "session",
        "robot=gym_hil",
        "robot.env_name=PandaPickCubeBase-v0",
        "teleop=none",
        "session.episodes=2",
        "session.max_episode_steps=8",
        "session.rate_hz=10",
        "session.expert_episodes=0",
        "device=cpu",
        "tensorboard=false",
        f"session.transitions_port={ports[0]}",
        f"session.weights_port={ports[1]}",
        f"hydra.run.dir={tmp_path}",
        timeout=240,
        threads=1,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["robot"]["type"] == "gym_hil"
    assert summary["transitions"]["sent"] == summary["transitions"]["stored"] == 16
    assert summary["transitions"]["unacknowledged"] == 0
    import warnings

    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        replay = zarr.open_group(str(tmp_path / "learner" / "replay.zarr"), mode="r")
        assert replay["obs.agent_pos"].shape == (16, 18) and replay["obs.environment_state"].shape == (16, 3)
    control = json.loads((tmp_path / "control" / "summary.json").read_text())
    assert control["steps"] == 16 and control["episodes"] == 2
