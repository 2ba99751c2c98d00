"""What the learner needs from an algorithm: update on replay, hand out the weights the robot should run."""

from __future__ import annotations

import abc

import numpy as np

from robot_rl.learner.replay_buffer import ReplayBuffer as ReplayStore  # until algos take a ReplayView


class Algorithm(abc.ABC):
    """One learning rule. The learner owns data flow, checkpoints and publishing; the algorithm owns the math."""

    @abc.abstractmethod
    def ready(self, replay: ReplayStore) -> bool:
        """Whether there is enough data to start updating."""

    @abc.abstractmethod
    def update(self, replay: ReplayStore, rng: np.random.Generator) -> dict[str, float]:
        """One gradient step; returns scalars to log."""

    @abc.abstractmethod
    def policy_state(self) -> dict:
        """The weights the control process loads (safetensors-able tensors)."""

    def on_publish(self, replay: ReplayStore) -> None:
        """Hook before each publish (e.g. refresh normalisation stats from the data)."""

    def trainable_transitions(self, replay: ReplayStore) -> int:
        """Transitions that count towards the update budget (updates = UTD x this); warm-up data may not."""
        return replay.size

    def publish_meta(self, replay: ReplayStore) -> dict:
        """Travels with the weights: what the robot should do besides loading them (e.g. how to explore).
        A change publishes at once."""
        return {}

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """Everything needed to resume (networks and optimiser)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None: ...


class WarmupPhases:
    """Off-policy algorithms whose robot explores on its own for `cfg.learning_starts` transitions before any update,
    then as `explore_mode` says; the learner publishes the robot-side `self.model`."""

    explore_mode = "gaussian"

    def ready(self, replay: ReplayStore) -> bool:
        return replay.size >= self.cfg.learning_starts and replay.size > 0

    def trainable_transitions(self, replay: ReplayStore) -> int:
        return max(0, replay.size - self.cfg.learning_starts)

    def exploration(self, replay: ReplayStore) -> str:
        return "warmup" if replay.size < self.cfg.learning_starts else self.explore_mode

    def publish_meta(self, replay: ReplayStore) -> dict:
        return {"exploration": self.exploration(replay)}

    def policy_state(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
