"""The lerobot adapter, exercised for real: our sim robot built by lerobot's own factory, driven through ours."""

import logging
from dataclasses import dataclass

import numpy as np
import pytest
from lerobot.robots import RobotConfig, make_robot_from_config
from lerobot.teleoperators import Teleoperator, TeleoperatorConfig

from robot_rl.hardware.lerobot_adapter import LeRobotRobot, LeRobotTeleop, make_lerobot_robot
from robot_rl.sim.lerobot_plugin import LeRobotSimRobot, LeRobotSimRobotConfig

NAMES = ("dx", "dy", "dz", "dax", "day", "daz", "gripper")


def test_plugin_through_lerobot_factory(tmp_path):
    cfg = RobotConfig.get_choice_class("robot_rl_sim")(env_name="Lift", calibration_dir=tmp_path)
    assert isinstance(cfg, LeRobotSimRobotConfig) and cfg.type == "robot_rl_sim"
    robot = make_robot_from_config(cfg)
    assert isinstance(robot, LeRobotSimRobot)
    assert tuple(robot.action_features) == NAMES and all(v is float for v in robot.action_features.values())
    assert "cube_pos.0" in robot.observation_features
    robot.connect()
    obs = robot.get_observation()
    assert set(obs) == set(robot.observation_features) and all(isinstance(v, float) for v in obs.values())
    sent = robot.send_action({n: 2.0 for n in NAMES})
    assert sent == {n: 1.0 for n in NAMES}  # clipped to the env's bounds
    robot.disconnect()
    assert not robot.is_connected


def test_adapter_drives_lerobot_robot(tmp_path, caplog):
    lr = make_robot_from_config(LeRobotSimRobotConfig(env_name="Lift", calibration_dir=tmp_path, seed=4))
    with caplog.at_level(logging.WARNING):
        robot = LeRobotRobot(lr)
    assert "only catch NaNs" in caplog.text
    feats = robot.observation_features
    assert list(feats) == ["state"]
    assert feats["state"].names == tuple(lr.observation_features)  # names and lerobot's order preserved
    act = robot.action_feature
    assert act.names == NAMES and np.all(np.isinf(act.high))
    with robot:
        obs = robot.get_observation()
        assert obs["state"].dtype == np.float32 and obs["state"].shape == feats["state"].shape
        i = feats["state"].names.index("cube_pos.2")
        assert obs["state"][i] == pytest.approx(lr.get_observation()["cube_pos.2"])
        x0 = obs["state"][feats["state"].names.index("robot0_eef_pos.0")]
        a = np.array([0.5, 0, 0, 0, 0, 0, 3.0], np.float32)
        for _ in range(3):
            sent = robot.send_action(a)
        np.testing.assert_allclose(sent, [0.5, 0, 0, 0, 0, 0, 1.0])  # what lerobot (the sim) says it sent
        x1 = robot.get_observation()["state"][feats["state"].names.index("robot0_eef_pos.0")]
        assert x1 > x0
        assert robot.is_success() is False
        robot.reset(seed=4)
    assert not robot.is_connected


def test_adapter_bounds_and_factory(tmp_path):
    robot = LeRobotRobot(
        make_lerobot_robot("robot_rl_sim", env_name="Lift", calibration_dir=str(tmp_path)),
        action_low={"dx": -0.2},
        action_high=0.3,
    )
    assert robot.action_feature.low[0] == pytest.approx(-0.2) and np.isinf(robot.action_feature.low[1])
    robot.connect()
    np.testing.assert_allclose(robot.send_action(np.full(7, -1.0)), [-0.2, -1, -1, -1, -1, -1, -1])
    robot.disconnect()
    with pytest.raises(ValueError, match="not a registered lerobot robot.*so101_follower"):
        make_lerobot_robot("so101_followr")
    with pytest.raises(ValueError, match="unknown action names"):
        LeRobotRobot(make_lerobot_robot("robot_rl_sim", calibration_dir=tmp_path), action_low={"nope": 0})


def test_adapter_with_camera(tmp_path):
    cfg = LeRobotSimRobotConfig(
        env_name="Lift", camera_names=["agentview"], camera_height=16, camera_width=16, calibration_dir=tmp_path
    )
    robot = LeRobotRobot(make_robot_from_config(cfg), action_low=-1, action_high=1)
    assert robot.observation_features["agentview"].shape == (16, 16, 3)
    with robot:
        img = robot.get_observation()["agentview"]
        assert img.shape == (16, 16, 3) and img.dtype == np.uint8


# --- a minimal lerobot Teleoperator (gym-style features + events, like lerobot's gamepad) -------------------
@TeleoperatorConfig.register_subclass("robot_rl_test_pad")
@dataclass
class FakePadConfig(TeleoperatorConfig):
    fail: bool = False


class FakePad(Teleoperator):
    config_class = FakePadConfig
    name = "fake_pad"

    def __init__(self, config):
        super().__init__(config)
        self.config, self._on, self.n = config, False, 0

    action_features = {"dtype": "float32", "shape": (3,), "names": {"delta_x": 0, "delta_y": 1, "gripper": 2}}
    feedback_features = {}
    is_calibrated = True

    @property
    def is_connected(self):
        return self._on

    def connect(self, calibrate=True):
        if self.config.fail:
            raise OSError("[Errno 2] could not open port /dev/ttyACM9")
        self._on = True

    def calibrate(self):
        pass

    def configure(self):
        pass

    def get_action(self):
        self.n += 1
        return {"delta_x": 0.1 * self.n, "gripper": 1.0}  # delta_y absent (keyboard-style)

    def get_teleop_events(self):
        from lerobot.teleoperators import TeleopEvents

        return {TeleopEvents.IS_INTERVENTION: self.n % 2 == 1}

    def send_feedback(self, feedback):
        pass

    def disconnect(self):
        self._on = False


def test_teleop_wrapper(tmp_path):
    t = LeRobotTeleop(FakePad(FakePadConfig(calibration_dir=tmp_path)))
    assert t.action_feature.names == ("delta_x", "delta_y", "gripper")
    t.connect()
    np.testing.assert_allclose(t.get_action({}), [0.1, 0.0, 1.0])
    assert t.intervening
    t.get_action({})
    assert not t.intervening
    t.disconnect()
    bad = LeRobotTeleop(FakePad(FakePadConfig(calibration_dir=tmp_path, fail=True)))
    with pytest.raises(ConnectionError, match="could not open.*ttyACM9.*lerobot-find-port"):
        bad.connect()


def test_stale_camera_frames_are_counted_as_dropped():
    """A camera that hands back the same buffer twice (a stalled driver) shows up in `dropped_frames`."""
    import numpy as np

    from robot_rl.hardware.lerobot_adapter import LeRobotRobot

    class FakeCamRobot:
        name = "fake"
        is_connected = True
        observation_features = {"x": float, "cam": (4, 4, 3)}
        action_features = {"a": float}

        def __init__(self):
            self.frames = [np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8), np.ones((4, 4, 3), np.uint8)]
            self.i = 0

        def get_observation(self):
            f = self.frames[min(self.i, 2)]
            self.i += 1
            return {"x": 0.0, "cam": f}

    robot = LeRobotRobot(FakeCamRobot())
    for _ in range(3):
        robot.get_observation()
    assert robot.dropped_frames == 1


def test_depth_maps_stay_millimetres():
    """lerobot 0.6 cameras with `use_depth=True` add `<cam>_depth: (H, W, 1)` uint16 (mm) beside the RGB frame:
    the adapter keeps them as uint16 arrays, not as uint8 images."""

    class FakeDepthRobot:
        name = "fake_depth"
        is_connected = True
        observation_features = {"x.pos": float, "front": (4, 4, 3), "front_depth": (4, 4, 1)}
        action_features = {"x.pos": float}

        def get_observation(self):
            return {
                "x.pos": 1.0,
                "front": np.full((4, 4, 3), 7, np.uint8),
                "front_depth": np.full((4, 4, 1), 1234, np.uint16),
            }

    robot = LeRobotRobot(FakeDepthRobot(), action_low=-1, action_high=1)
    feats = robot.observation_features
    assert feats["front"].dtype == "uint8" and feats["front_depth"].dtype == "uint16"
    assert robot.image_keys == ["front"] and robot.depth_keys == ["front_depth"]
    obs = robot.get_observation()
    assert obs["front_depth"].dtype == np.uint16 and int(obs["front_depth"].max()) == 1234


def test_lerobot_06_registries(tmp_path):
    """Devices registered in lerobot 0.6 (reBot arms are new in 0.6) resolve
    through our factory; a device whose SDK extra is missing says which extra to install."""
    from lerobot.robots import RobotConfig
    from lerobot.teleoperators import TeleoperatorConfig

    from robot_rl.hardware.lerobot_adapter import _build_config, make_lerobot_teleop

    cfg = _build_config(RobotConfig, "robot", "so101_follower", {"port": "/dev/ttyACM0", "id": "arm"})
    assert cfg.port == "/dev/ttyACM0" and cfg.id == "arm"
    robots = set(RobotConfig.get_known_choices())
    assert {"so100_follower", "so101_follower", "koch_follower", "rebot_b601_follower"} <= robots
    _build_config(TeleoperatorConfig, "teleop", "so101_leader", {"port": "/dev/ttyACM1"})
    assert {"so101_leader", "gamepad", "keyboard"} <= set(TeleoperatorConfig.get_known_choices())
    try:
        import scservo_sdk  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"lerobot\[feetech\]"):
            make_lerobot_robot("so101_follower", port="/dev/ttyACM0", id="arm", calibration_dir=tmp_path)
        with pytest.raises(ImportError, match=r"lerobot\[feetech\]"):
            make_lerobot_teleop("so101_leader", port="/dev/ttyACM1", id="arm", calibration_dir=tmp_path)
