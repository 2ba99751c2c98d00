"""The three small interfaces everything else is built on: Robot, Teleop, Policy.

Modelled on lerobot's Robot/Teleoperator: a device describes its own features, and `send_action` returns
the action actually sent. Observations are flat dicts of numpy arrays; actions are flat float32 vectors whose
entries are named by `action_feature.names` (so a lerobot dict action maps onto it one key per entry).
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field

import numpy as np

Observation = dict[str, np.ndarray]

# A transition on the wire and in the replay stores each observation key `k` as `OBS_PREFIX + k`, beside
# `action`, `expert_action`, `policy_action`, `reward`, ... (see robot_rl/control/process.py).
OBS_PREFIX = "obs."


@dataclass(frozen=True)
class Feature:
    """Shape, dtype and (for vectors) per-entry names and bounds of one observation key or of the action."""

    shape: tuple[int, ...]
    dtype: str = "float32"
    names: tuple[str, ...] | None = None
    low: np.ndarray | None = field(default=None, compare=False)
    high: np.ndarray | None = field(default=None, compare=False)

    @property
    def is_image(self) -> bool:
        return self.dtype == "uint8" and len(self.shape) == 3

    def to_dict(self) -> dict:
        """JSON/msgpack-friendly description (used in run summaries and the wire handshake)."""
        d = {"shape": list(self.shape), "dtype": self.dtype}
        if self.names is not None:
            d["names"] = list(self.names)
        if self.low is not None:
            d["low"] = np.asarray(self.low, dtype=np.float64).tolist()
            d["high"] = np.asarray(self.high, dtype=np.float64).tolist()
        return d


class Robot(abc.ABC):
    """A robot the control process can drive: real hardware or a MuJoCo simulation, same contract."""

    name: str = "robot"

    @property
    @abc.abstractmethod
    def observation_features(self) -> dict[str, Feature]:
        """Keys and shapes of `get_observation()`; callable while disconnected."""

    @property
    @abc.abstractmethod
    def action_feature(self) -> Feature:
        """Shape, names and hard bounds of the action vector `send_action` accepts."""

    @property
    @abc.abstractmethod
    def is_connected(self) -> bool: ...

    @abc.abstractmethod
    def connect(self) -> None: ...

    @abc.abstractmethod
    def disconnect(self) -> None: ...

    @abc.abstractmethod
    def get_observation(self) -> Observation: ...

    @abc.abstractmethod
    def send_action(self, action: np.ndarray) -> np.ndarray:
        """Command the robot; returns the action actually sent (after the device's own clipping)."""

    # Episodic hooks. Simulation implements them for real; on hardware an operator resets the scene and
    # success comes from an operator key or a classifier, so the defaults are deliberately minimal.
    def reset(self, seed: int | None = None) -> Observation:
        """Start a new episode and return its first observation."""
        return self.get_observation()

    def is_success(self) -> bool:
        """Whether the task is solved in the current state (sim: the env's own success check)."""
        return False

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, *exc):
        self.disconnect()


class Teleop(abc.ABC):
    """An action source other than the policy: a human device or a scripted expert.

    `intervening` is the takeover switch: while it is True the control process executes this source's action
    instead of the policy's, and marks the step as an intervention.
    """

    name: str = "teleop"

    @property
    @abc.abstractmethod
    def action_feature(self) -> Feature: ...

    def connect(self) -> None:
        pass

    def disconnect(self) -> None:
        pass

    def reset(self) -> None:
        """Called at every episode start (scripted experts re-plan here)."""

    @abc.abstractmethod
    def get_action(self, observation: Observation) -> np.ndarray:
        """The source's action for this observation (devices may ignore the observation)."""

    @property
    def intervening(self) -> bool:
        return False


class Policy(abc.ABC):
    """Maps observations to an action (A,) or an action chunk (H, A). Weights travel as safetensors.

    Besides acting, a policy tells the control process what it needs around a learner (all with defaults, so a
    plain policy such as MLPPolicy or DiffusionPolicy implements nothing extra):
    - `acts_without_weights`: act from the first tick (a frozen base, random warm-up), or wait for weights;
    - `load_state_dict` may stage weights and apply them at the policy's own boundary (e.g. a chunk);
    - `apply_meta(meta)`: what the learner sent with the weights (e.g. {"exploration": ...});
    - `probe_after_load`: whether one extra `select_action` on a fixed observation after each load is harmless
      (logged as the weights' probe action); not when it would draw exploration noise or advance a chunk;
    - `transition_extras(acted)`: extra arrays sent with every transition (same keys every tick);
    - `eval_modes` / `eval_once` / `evaluating(mode)`: what an evaluation block runs, with exploration off.
    """

    acts_without_weights: bool = False
    probe_after_load: bool = True
    eval_modes: tuple[str, ...] = ("policy",)
    eval_once: tuple[str, ...] = ()  # modes whose result cannot change as the learner trains: first block only

    @abc.abstractmethod
    def reset(self) -> None:
        """Clear per-episode state (e.g. queued action chunks); called at every episode start."""

    @abc.abstractmethod
    def select_action(self, observation: Observation) -> np.ndarray: ...

    @abc.abstractmethod
    def state_dict(self) -> dict: ...

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    def seed_episode(self, seed: int) -> None:
        """Seed any sampling noise for one episode (called before `reset`), so matched evaluations match."""

    def apply_meta(self, meta: dict) -> None:
        """Apply what the learner published with the weights (called right after `load_state_dict`)."""

    def transition_extras(self, acted: bool) -> dict[str, np.ndarray]:
        """Arrays stored with this tick's transition beside the standard keys; `acted` False when
        `select_action` was not called this tick (return the same keys, NaN-filled)."""
        return {}

    @contextlib.contextmanager
    def evaluating(self, mode: str):
        """Within the block: act as evaluation mode `mode` (one of `eval_modes`), exploration off."""
        yield
