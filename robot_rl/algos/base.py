"""What an algorithm is to the two processes: the learner's update on replay data, and the robot-side policy.

Every algorithm is constructed as `cls(cfg, policy_cfg, device, run_dir)` and registered by name in
`robot_rl/algos/__init__.py`; neither process names an algorithm.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from robot_rl.interfaces import Policy, Robot

# Column of a replay row naming the control process that sent it (an int index): episodes of different robots
# interleave in the replay, and rows link into episodes only within one sender.
SENDER_KEY = "_sender"


class ReplayView(Protocol):
    """The learner's replay as an algorithm may read it: every transition received so far, one row per control
    step, columns named as on the wire (`obs.<k>`, `action`, `reward`, `success`, `episode`, `step`, ...).
    Read-only: do not write into the arrays it returns."""

    size: int  # rows stored so far; columns have exactly this many rows

    def keys(self) -> list[str]:
        """The wire keys stored (SENDER_KEY too is readable through `column`)."""

    def column(self, key: str) -> np.ndarray:
        """All `size` rows of one key."""

    def sample(self, batch_size: int, rng: np.random.Generator, keys: list[str]) -> dict[str, np.ndarray]:
        """`batch_size` rows drawn uniformly (with replacement), the given keys only."""


class Algorithm(abc.ABC):
    """One learning rule. The learner owns data flow, checkpoints and publishing; the algorithm owns the math.

    Learner side, in the learner's main loop: `ready` -> `update` at the configured update-to-data ratio over
    `trainable_transitions`; before each publish `on_publish`, then `policy_state` + `publish_meta` travel to the
    robots; `state_dict`/`load_state_dict` for checkpoints, `robot_policy` for the policy checkpoint.
    Robot side, in the control process: `build_robot_policy` (a class method: no learner state there).
    """

    robot_acts_without_weights = False  # True: the robot policy acts before the first weights (a frozen base)

    def __init__(self, cfg, policy_cfg: dict, device: torch.device, run_dir: Path | None = None):
        """The one constructor signature: the algorithm's config (its dataclass), the session's `policy:` group,
        the training device, and the learner's run directory for caches (None: no cache)."""
        self.cfg, self.policy_cfg, self.device, self.run_dir = cfg, policy_cfg, device, run_dir

    @classmethod
    def check_config(cls, cfg) -> None:
        """Fail before any process starts (missing files, impossible settings); reads no data."""

    @classmethod
    @abc.abstractmethod
    def build_robot_policy(cls, cfg, policy_cfg: dict, robot: Robot, seed: int) -> Policy:
        """The policy the control process runs for this algorithm, before any weights arrive (`policy_cfg` is the
        session's `policy:` group; `seed` seeds its exploration). The learner's `policy_state` loads into it."""

    @abc.abstractmethod
    def ready(self, replay: ReplayView) -> bool:
        """Whether there is enough data to start updating."""

    @abc.abstractmethod
    def update(self, replay: ReplayView, rng: np.random.Generator) -> dict[str, float]:
        """One gradient step; returns scalars to log."""

    @abc.abstractmethod
    def policy_state(self) -> dict:
        """The weights the control process loads (safetensors-able tensors)."""

    @abc.abstractmethod
    def robot_policy(self) -> Policy:
        """The policy exactly as the robot runs it with the current weights (a copy on the CPU, exploration off):
        what a policy checkpoint serialises. Only called once `ready`."""

    def on_publish(self, replay: ReplayView) -> None:
        """Hook before each publish (e.g. refresh normalisation stats from the data)."""

    def trainable_transitions(self, replay: ReplayView) -> int:
        """Transitions that count towards the update budget (updates = UTD x this); warm-up data may not."""
        return replay.size

    def warnings(self) -> list[str]:
        """What the user should hear at the end of the session (the learner's summary and the session's final
        warnings), e.g. a reward signal that stayed empty."""
        return []

    def publish_meta(self, replay: ReplayView) -> dict:
        """Travels with the weights (the robot-side policy's `apply_meta` reads it), e.g. how to explore.
        A change publishes at once."""
        return {}

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """Everything needed to resume (networks and optimiser)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None: ...
