"""A simulated human for RLIF-style takeover in sim: a scripted expert that watches the policy and takes over.

The control loop calls, every tick and in this order (see `robot_rl.control.takeover.pick_source`)::

    label = teleop.get_action(obs)                 # the expert's action for this observation
    teleop.observe_policy_action(policy_action)    # the policy's proposal for the same observation, or None
    if teleop.intervening: execute label           # else execute the policy's action

Decision rule (all distances in normalised action units, i.e. divided by half the action range, on the arm dims
only by default — the gripper is left out because a policy that closes a step early or late is not "wrong"):

- while the policy drives: deviation = ||policy - label|| over `dims`. After `patience` consecutive steps with
  deviation > `threshold`, the criterion fires; a None proposal (no policy action) fires it at once. When it
  fires, the intervener takes over with probability `probability` (1.0: always; < 1 models a noisy, inattentive
  human; a None proposal is always taken over); if it declines, the count starts again, so it may fire again
  `patience` steps later. The takeover starts on the tick the criterion fires.
- while intervening: it keeps control for at least `min_steps` ticks, and then until the policy's proposal has
  been within `threshold` of the label for `release_patience` consecutive steps (the policy "agrees" with the
  expert again). A None proposal counts as disagreeing, so the loop must keep passing the policy's proposal
  while the expert drives, or the intervener never hands back.

Limitation: the arm-only deviation of an idle policy is small where the expert moves slowly (close to a
waypoint, while grasping), so a policy that stalls there is not caught; pass `dims=range(7)` to include the
gripper command (then a policy that never closes the gripper is), or lower `threshold`.

`reset()` (episode start) clears the takeover state and resets the wrapped expert; the intervener's rng stream
(for `probability`) is kept, like the experts', so successive episodes differ and a fresh intervener with the
same seed replays them. Counters `n_interventions` / `intervention_steps` (this episode) and `deviation` (last
tick) are there for logging.
"""

from __future__ import annotations

import numpy as np

from robot_rl.interfaces import Feature, Observation, Teleop


class SimulatedIntervener(Teleop):
    name = "simulated_intervener"

    def __init__(
        self,
        expert: Teleop,
        threshold: float = 0.5,
        patience: int = 3,
        min_steps: int = 10,
        release_patience: int = 3,
        probability: float = 1.0,
        seed: int | None = None,
        dims: list[int] | tuple[int, ...] | None = None,
    ):
        if threshold < 0:
            raise ValueError(f"threshold={threshold} must be >= 0")
        if patience < 1 or release_patience < 1 or min_steps < 0:
            raise ValueError(
                f"patience={patience} and release_patience={release_patience} must be >= 1, min_steps={min_steps} >= 0"
            )
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability={probability} must be in [0, 1]")
        self.expert = expert
        self.threshold = float(threshold)
        self.patience = int(patience)
        self.min_steps = int(min_steps)
        self.release_patience = int(release_patience)
        self.probability = float(probability)
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        feat = expert.action_feature
        if dims is None:  # every dim that is not a gripper
            names = feat.names or tuple(f"a{i}" for i in range(feat.shape[0]))
            dims = [i for i, n in enumerate(names) if "gripper" not in str(n)]
        self.dims = np.asarray(list(dims), dtype=int)
        n = int(np.prod(feat.shape))
        if feat.low is not None and feat.high is not None:
            half = (np.asarray(feat.high, np.float64) - np.asarray(feat.low, np.float64)).reshape(-1) / 2.0
            half = np.where(np.isfinite(half) & (half > 0), half, 1.0)
        else:
            half = np.ones(n)
        self._scale = half[self.dims]
        self.reset_state()

    # ------------------------------------------------------------------------------------------- Teleop
    @property
    def action_feature(self) -> Feature:
        return self.expert.action_feature

    def connect(self) -> None:
        self.expert.connect()

    def disconnect(self) -> None:
        self.expert.disconnect()

    def reset(self) -> None:
        """Episode start: reset the expert and the takeover state (the rng stream is kept)."""
        self.expert.reset()
        self.reset_state()

    def reset_state(self) -> None:
        self._intervening = False
        self._label: np.ndarray | None = None
        self._bad = 0  # consecutive deviating steps while the policy drives
        self._good = 0  # consecutive agreeing steps while intervening
        self._held = 0  # ticks the current intervention has driven so far (this one included)
        self.deviation = float("nan")
        self.n_interventions = 0
        self.intervention_steps = 0

    def get_action(self, observation: Observation) -> np.ndarray:
        self._label = np.asarray(self.expert.get_action(observation))
        return self._label

    @property
    def intervening(self) -> bool:
        return self._intervening

    # --------------------------------------------------------------------------------------- decision
    def _deviation(self, policy_action: np.ndarray | None) -> float:
        if policy_action is None or self._label is None:
            return float("inf")
        p = np.asarray(policy_action, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(p)):
            return float("inf")
        lab = np.asarray(self._label, dtype=np.float64).reshape(-1)
        return float(np.linalg.norm((p[self.dims] - lab[self.dims]) / self._scale))

    def observe_policy_action(self, action: np.ndarray | None) -> None:
        """Show the policy's proposal for the observation of the last `get_action`; updates `intervening`."""
        dev = self.deviation = self._deviation(action)
        bad = dev > self.threshold
        if self._intervening:
            self._good = 0 if bad else self._good + 1
            if self._held >= self.min_steps and self._good >= self.release_patience:
                self._intervening = False  # hand back: the policy acts this tick
                self._bad = 0
                return
            self._held += 1
            self.intervention_steps += 1
            return
        self._bad = self._bad + 1 if bad else 0
        if action is None or self._bad >= self.patience:
            self._bad = 0
            # no proposal: nothing else could act, so no coin flip
            if action is None or self.probability >= 1.0 or self._rng.random() < self.probability:
                self._intervening = True
                self._held = 1  # this tick is the first one the expert drives
                self._good = 0
                self.n_interventions += 1
                self.intervention_steps += 1

    def __repr__(self) -> str:
        return (
            f"SimulatedIntervener({self.expert.name}, threshold={self.threshold}, patience={self.patience}, "
            f"min_steps={self.min_steps}, release_patience={self.release_patience}, "
            f"probability={self.probability})"
        )
