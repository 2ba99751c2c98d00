"""gym-hil (lerobot's MuJoCo Panda tasks for human-in-the-loop RL) behind robot_rl's `Robot` interface.

    robot-rl session robot=gym_hil robot.env_name=PandaPickCubeBase-v0

The *Base* environments take the raw 7-D action (end-effector position delta in metres, 3 rotation entries the
env ignores, gripper delta), all in [-1, 1]. Observations: `agent_pos` (joint and end-effector state, 18 floats),
`environment_state` (the block position) and, with `image_obs=True`, `front_image` / `wrist_image` (uint8 HxWx3).
The control loop owns episode length, so the env's own termination (success, block out of bounds) is only
reported: `is_success()` reads the env's `succeed` flag of the last step.

gym-hil builds its MuJoCo renderer when the env is constructed, so it needs an offscreen GL backend even for
state-only observations: `MUJOCO_GL` is set to EGL (or OSMesa) when the user has not chosen one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from robot_rl.interfaces import Feature, Observation, Robot

from .robosuite_robot import select_gl_backend

ACTION_NAMES = ("dx", "dy", "dz", "drx", "dry", "drz", "gripper")
CAMERAS = {"front": "front_image", "wrist": "wrist_image"}


class GymHilRobot(Robot):
    """One gym-hil environment (`gym_hil/<env_name>`), deterministic per reset seed."""

    name = "gym_hil"

    def __init__(
        self,
        env_name: str = "PandaPickCubeBase-v0",
        image_obs: bool = False,
        image_size: int = 128,
        control_dt: float = 0.1,
        reward_type: str = "sparse",
        random_block_position: bool = False,
        seed: int = 0,
    ):
        self.env_name = env_name
        self.env_id = env_name if "/" in env_name else f"gym_hil/{env_name}"
        self.image_obs, self.image_size = bool(image_obs), int(image_size)
        self.kwargs: dict[str, Any] = {
            "control_dt": control_dt,
            "reward_type": reward_type,
            "random_block_position": random_block_position,
            "seed": seed,
        }
        self._check_env_name()  # a bad name fails at construction (a config error), not mid-session
        self.env = None
        self._obs: dict | None = None
        self._succeeded = False
        self._feats: dict[str, Feature] | None = None

    # ------------------------------------------------------------------------------------------------ features
    def _check_env_name(self) -> None:
        select_gl_backend()  # before gym_hil imports mujoco
        try:
            import gym_hil  # noqa: F401  (registers the gym_hil/* ids)
            import gymnasium as gym
        except ImportError as e:
            raise ImportError("robot=gym_hil needs gym-hil: pip install 'robot_rl[gym-hil]' (gym-hil 0.1.14)") from e
        if self.env_id not in gym.registry:
            ids = sorted(k for k in gym.registry if k.startswith("gym_hil/") and k.endswith("Base-v0"))
            raise ValueError(
                f"robot.env_name={self.env_name!r} is not a gym-hil environment; choose one of: "
                f"{', '.join(i.split('/', 1)[1] for i in ids)}"
            )

    def _make_env(self):
        import gymnasium as gym
        from gym_hil.mujoco_gym_env import GymRenderingSpec

        spec = GymRenderingSpec(height=self.image_size, width=self.image_size)
        return gym.make(self.env_id, image_obs=self.image_obs, render_spec=spec, **self.kwargs).unwrapped

    @property
    def observation_features(self) -> dict[str, Feature]:
        if self._feats is None:
            env = self.env if self.env is not None else self._make_env()
            feats: dict[str, Feature] = {}
            for k, space in env.observation_space.spaces.items():
                if k == "pixels":
                    for cam, sub in space.spaces.items():
                        feats[CAMERAS.get(cam, f"{cam}_image")] = Feature(tuple(sub.shape), "uint8")
                else:
                    feats[k] = Feature(tuple(space.shape), "float32")
            if self.env is None:
                env.close()
            self._feats = feats
        return self._feats

    @property
    def action_feature(self) -> Feature:
        return Feature((7,), "float32", ACTION_NAMES, low=np.full(7, -1, np.float32), high=np.ones(7, np.float32))

    # ----------------------------------------------------------------------------------------------- lifecycle
    @property
    def is_connected(self) -> bool:
        return self.env is not None

    def connect(self) -> None:
        if self.env is None:
            self.env = self._make_env()
            self.reset(seed=self.kwargs["seed"])

    def disconnect(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None

    def reset(self, seed: int | None = None) -> Observation:
        if self.env is None:
            raise RuntimeError("gym_hil robot is not connected")
        state = np.random.get_state()  # gym-hil draws random block positions from numpy's global generator
        try:
            if seed is not None:
                np.random.seed(seed)
            self._obs, _ = self.env.reset(seed=seed)
        finally:
            np.random.set_state(state)
        self._succeeded = False
        return self.get_observation()

    # ----------------------------------------------------------------------------------------------------- I/O
    def get_observation(self) -> Observation:
        if self._obs is None:
            raise RuntimeError("gym_hil robot is not connected")
        out: Observation = {}
        for k, v in self._obs.items():
            if k == "pixels":
                for cam, img in v.items():
                    out[CAMERAS.get(cam, f"{cam}_image")] = np.asarray(img, np.uint8)
            else:
                out[k] = np.asarray(v, np.float32).copy()
        return out

    def send_action(self, action: np.ndarray) -> np.ndarray:
        if self.env is None:
            raise RuntimeError("gym_hil robot is not connected")
        a = np.clip(np.asarray(action, np.float32).reshape(-1), -1.0, 1.0)
        if a.shape != (7,):
            raise ValueError(f"gym_hil: action has {a.shape[0]} entries, expected 7 ({', '.join(ACTION_NAMES)})")
        self._obs, _, _, _, info = self.env.step(a)
        self._succeeded = bool(info.get("succeed", False))
        return a

    def is_success(self) -> bool:
        return self._succeeded
