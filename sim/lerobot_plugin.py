"""Our robosuite sim robot offered to lerobot as a lerobot `Robot` (type `robot_rl_sim`).

    from lerobot.robots import make_robot_from_config
    import robot_rl.sim.lerobot_plugin  # registers the config
    robot = make_robot_from_config(LeRobotSimRobotConfig(env_name="Lift", camera_names=["agentview"]))

lerobot conventions: flat dicts, one `"<name>": float` per action entry and per entry of each low-dim observation
(vector observations become `"<key>.<i>"`, or `"<key>"` when scalar), images as `"<camera>": (H, W, 3)` uint8.
"""

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from lerobot.robots import Robot as LeRobotBase
from lerobot.robots import RobotConfig

from .robosuite_robot import RobosuiteRobot


@RobotConfig.register_subclass("robot_rl_sim")
@dataclass(kw_only=True)
class LeRobotSimRobotConfig(RobotConfig):
    env_name: str = "Lift"
    robots: list[str] = field(default_factory=lambda: ["Panda"])
    control_freq: float = 20.0
    horizon: int = 200
    # robosuite camera names (not `cameras`: lerobot reserves that field for a dict of CameraConfig)
    camera_names: list[str] = field(default_factory=list)
    camera_height: int = 84
    camera_width: int = 84
    controller: str | None = None
    reward_shaping: bool = False
    # Low-dim observation keys to publish (None: all robosuite low-dim keys except the concatenated
    # `*proprio-state` / `object-state`, which would only duplicate entries).
    observation_keys: list[str] | None = None
    seed: int | None = 0  # seed of the reset done in connect()

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.calibration_dir, str):
            self.calibration_dir = Path(self.calibration_dir)
        if isinstance(self.robots, str):
            self.robots = [self.robots]


# lerobot's `make_device_from_device_class` looks for the device class `LeRobotSimRobot` in the *parent* of the
# config's module (or a sibling named after it); point it at this module so make_robot_from_config finds it.
LeRobotSimRobotConfig.__module__ = f"{__name__}.config"


class LeRobotSimRobot(LeRobotBase):
    """A `RobosuiteRobot` through lerobot's Robot ABC (no calibration; `configure` is a no-op)."""

    config_class = LeRobotSimRobotConfig
    name = "robot_rl_sim"

    def __init__(self, config: LeRobotSimRobotConfig):
        super().__init__(config)
        self.config = config
        self.sim = RobosuiteRobot(
            env_name=config.env_name,
            robots=list(config.robots),
            control_freq=config.control_freq,
            horizon=config.horizon,
            cameras=list(config.camera_names),
            camera_height=config.camera_height,
            camera_width=config.camera_width,
            controller=config.controller,
            reward_shaping=config.reward_shaping,
        )

    # ------------------------------------------------------------------------------------------ features
    @cached_property
    def _obs_layout(self) -> list[tuple[str, str, int | None]]:
        """(lerobot key, our key, index or None for scalars) for every low-dim entry, in order."""
        feats = self.sim.observation_features
        keys = self.config.observation_keys
        if keys is None:
            keys = [k for k, f in feats.items() if not f.is_image and not k.endswith("-state")]
        else:
            unknown = [k for k in keys if k not in feats]
            if unknown:
                raise ValueError(
                    f"observation_keys {unknown} not in {self.config.env_name}'s observations: "
                    f"{', '.join(k for k, f in feats.items() if not f.is_image)}"
                )
        layout = []
        for k in keys:
            n = int(np.prod(feats[k].shape))
            if feats[k].shape == () or feats[k].shape == (1,) and n == 1:
                layout.append((k, k, None))
            else:
                layout += [(f"{k}.{i}", k, i) for i in range(n)]
        return layout

    @property
    def _action_names(self) -> tuple[str, ...]:
        return tuple(self.sim.action_feature.names)

    @property
    def observation_features(self) -> dict:
        feats: dict[str, Any] = {name: float for name, _, _ in self._obs_layout}
        for c in self.config.camera_names:
            feats[c] = (self.config.camera_height, self.config.camera_width, 3)
        return feats

    @property
    def action_features(self) -> dict:
        return {n: float for n in self._action_names}

    # ----------------------------------------------------------------------------------------- lifecycle
    @property
    def is_connected(self) -> bool:
        return self.sim.is_connected

    def connect(self, calibrate: bool = True) -> None:
        if self.is_connected:
            from lerobot.utils.errors import DeviceAlreadyConnectedError

            raise DeviceAlreadyConnectedError(f"{self} already connected")
        self.sim.connect()
        self.sim.reset(seed=self.config.seed)
        self.configure()

    @property
    def is_calibrated(self) -> bool:
        return True

    def calibrate(self) -> None:
        pass

    def configure(self) -> None:
        pass

    def disconnect(self) -> None:
        if not self.is_connected:
            from lerobot.utils.errors import DeviceNotConnectedError

            raise DeviceNotConnectedError(f"{self} is not connected")
        self.sim.disconnect()

    # ------------------------------------------------------------------------------------------------ I/O
    def _check_connected(self) -> None:
        if not self.is_connected:
            from lerobot.utils.errors import DeviceNotConnectedError

            raise DeviceNotConnectedError(f"{self} is not connected")

    def get_observation(self) -> dict[str, Any]:
        self._check_connected()
        obs = self.sim.get_observation()
        out: dict[str, Any] = {}
        for name, key, i in self._obs_layout:
            v = obs[key].reshape(-1)
            out[name] = float(v[0] if i is None else v[i])
        for c in self.config.camera_names:
            out[c] = obs[f"{c}_image"]
        return out

    def send_action(self, action: dict[str, Any]) -> dict[str, Any]:
        self._check_connected()
        names = self._action_names
        missing = [n for n in names if n not in action]
        if missing:
            raise ValueError(f"action is missing {missing}; expected keys {list(names)}")
        vec = np.array([float(action[n]) for n in names], dtype=np.float32)
        sent = self.sim.send_action(vec)
        return {n: float(x) for n, x in zip(names, sent)}

    # sim extras (not part of lerobot's ABC)
    def reset(self, seed: int | None = None) -> dict[str, Any]:
        self._check_connected()
        self.sim.reset(seed=seed)
        return self.get_observation()

    def is_success(self) -> bool:
        return self.sim.is_success()
