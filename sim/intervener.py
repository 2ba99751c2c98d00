"""A simulated human for RLIF-style takeover in sim: a scripted expert that watches the policy and takes over.

Who acts and who decides are separate: the wrapped `expert` (any quality preset of sim/experts.py, e.g. "poor")
supplies the takeover actions; the `strategy` decides *when* to take over:

- `deviation` (default; HG-DAgger-like): the policy's action is far from the expert's (rule below).
- `value` (RLIF's value-based intervener, reference Sec. 1.3): a reference critic Q_ref (a SAC/RLIF session
  checkpoint, `critic=<run dir or policy dir>`) compares the policy's action with a reference action (the
  checkpoint's own actor, or the expert's label with `compare_to=expert`); the step is "bad" when
  Q_ref(s, a_pi) < Q_ref(s, a_ref) - (1 - alpha) |Q_ref(s, a_ref)| - delta. A bad step starts a takeover with
  probability `beta` (0.95), a good one with 1 - beta (false alarms, as in the released code). The released code
  tests Q(s, a_pi) < alpha Q(s, a_ref), which assumes Q > 0: with negative values (RLIF's own rewards, or any critic
  of penalties) alpha Q_ref > Q_ref and it fires on actions *better* than the reference. The |Q_ref| form equals
  it for Q_ref > 0 and keeps its meaning (a_pi worse by at least a fraction 1 - alpha) for Q_ref < 0.
- `distance` (the released HG-DAgger sampler's rule): the deviation above `threshold` on a policy step starts a
  k-step takeover with probability `probability` (released: 1 - eps, eps = 0.05 e^{-0.1 iteration}).
- `random` (the released `train_rlif_random_main.py`): each policy step starts a takeover with probability
  `p_start`.

`judge=perfect`: the rule compares with a noiseless copy of the acting expert (a good judge, a poor actor);
`judge=acting` (default) compares with the acting expert's own (noisy) label.

`distance`, `value` and `random` takeovers last `takeover_steps` ticks (k = 4 in the released code); then the policy
acts for at least one tick (the released code may re-grab on the hand-back tick, which merges two takeovers into one
and leaves the policy no step to be blamed for), and the rule decides again from the next tick.

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

import copy
from pathlib import Path
from typing import Callable

import numpy as np

from robot_rl.interfaces import Feature, Observation, Teleop

STRATEGIES = ("deviation", "distance", "value", "random")


def value_says_bad(q_pi: float, q_ref: float, alpha: float, delta: float = 0.0) -> bool:
    """The policy's action is clearly worse than the reference's: Q(s, a_pi) < Q(s, a_ref) - (1-alpha)|Q(s, a_ref)|
    - delta. Sign-safe: for Q_ref > 0 it is the released code's Q(s, a_pi) < alpha Q(s, a_ref)."""
    return q_pi < q_ref - (1.0 - alpha) * abs(q_ref) - delta


class ReferenceCritic:
    """Q_ref from a SAC / RLIF session checkpoint: the policy directory's actor (the reference action, its mean) and
    the critic ensemble's weights in `algo_state.pt` beside it, evaluated as the learner does (features of the
    standardised observation, the action normalised to [-1, 1]); Q = mean over the heads (RLPD's choice)."""

    def __init__(self, policy, critic_state: dict):
        import torch

        self.torch, self.policy, self.model = torch, policy, policy.model
        self.layers = []  # (weight (E, in, out), bias (E, 1, out), is_layer_norm), in order
        names = sorted({k.rsplit(".", 1)[0] for k in critic_state}, key=lambda n: int(n.split(".")[-1]))
        for name in names:
            w, b = critic_state[name + ".weight"].float(), critic_state[name + ".bias"].float()
            self.layers.append((w, b, w.shape[1] == 1 and b.shape == w.shape))

    def q(self, obs: Observation, action: np.ndarray) -> float:
        torch = self.torch
        with torch.no_grad():
            batch = {k: torch.as_tensor(np.asarray(obs[k])).unsqueeze(0) for k in self.model.obs_keys}
            a = self.model.scaler.normalize(torch.as_tensor(np.asarray(action, np.float32)).unsqueeze(0)).clamp(-1, 1)
            x = torch.cat([self.model.featurizer(batch), a], dim=-1)
            x = x.unsqueeze(0).expand(self.layers[0][0].shape[0], -1, -1)
            for i, (w, b, is_ln) in enumerate(self.layers):
                if is_ln:
                    x = torch.relu(torch.nn.functional.layer_norm(x, x.shape[-1:]) * w + b)
                else:
                    x = torch.baddbmm(b, x, w)
                    last = i == len(self.layers) - 1
                    if not last and not self.layers[i + 1][2]:
                        x = torch.relu(x)
            return float(x.mean())

    def __call__(self, obs: Observation, action: np.ndarray, ref_action: np.ndarray | None) -> tuple[float, float]:
        """(Q_ref(s, a_pi), Q_ref(s, a_ref)); a_ref = the checkpoint actor's mean action unless given."""
        if ref_action is None:
            ref_action = self.policy.select_action(obs)
        return self.q(obs, action), self.q(obs, ref_action)


def load_reference_critic(path: str | Path) -> ReferenceCritic:
    """A SAC / RLIF session run dir (newest weights), its checkpoints dir, or one policy dir with algo_state.pt."""
    import torch

    from robot_rl.policies.checkpoint import find_policy_dir, load_policy

    directory = find_policy_dir(path)
    state_file = directory / "algo_state.pt"
    if not state_file.exists():
        raise ValueError(
            f"critic={path}: {directory} has no algo_state.pt (a critic): give a SAC or RLIF session's run dir"
        )
    state = torch.load(state_file, weights_only=True, map_location="cpu")
    if "critic" not in state:
        raise ValueError(f"critic={path}: {state_file} holds no critic (keys {sorted(state)}); use a SAC/RLIF session")
    policy = load_policy(directory, device="cpu")
    if not hasattr(policy, "model") or not hasattr(policy.model, "featurizer"):
        raise ValueError(f"critic={path}: the policy there is not a SAC actor ({type(policy).__name__})")
    policy.exploration = "none"
    return ReferenceCritic(policy, state["critic"])


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
        strategy: str = "deviation",
        takeover_steps: int = 4,
        p_start: float = 0.5,
        critic: str | Callable | None = None,
        compare_to: str = "reference",
        alpha: float = 0.97,
        beta: float = 0.95,
        delta: float = 0.0,
        judge: str = "acting",
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r}; choose one of: {', '.join(STRATEGIES)}")
        if takeover_steps < 1 or not 0.0 <= p_start <= 1.0 or not 0.0 <= beta <= 1.0 or delta < 0:
            raise ValueError(
                f"need takeover_steps >= 1 (got {takeover_steps}), p_start and beta in [0, 1] (got {p_start}, "
                f"{beta}), delta >= 0 (got {delta})"
            )
        if judge not in ("acting", "perfect"):
            raise ValueError(
                f"judge={judge!r}; choose acting (the acting expert's label) or perfect (a noiseless copy)"
            )
        if compare_to not in ("reference", "expert"):
            raise ValueError(f"compare_to={compare_to!r}; choose reference (the critic's own actor) or expert")
        if strategy == "value" and critic is None:
            raise ValueError(
                "strategy=value needs a reference critic: critic=<a SAC or RLIF session run dir / policy dir with "
                "algo_state.pt> (train one with `robot-rl session algo=sac`)"
            )
        self.strategy, self.takeover_steps, self.p_start = strategy, int(takeover_steps), float(p_start)
        self.alpha, self.beta, self.delta, self.compare_to = float(alpha), float(beta), float(delta), compare_to
        self.critic = load_reference_critic(critic) if isinstance(critic, (str, Path)) else critic
        if threshold < 0:
            raise ValueError(f"threshold={threshold} must be >= 0")
        if patience < 1 or release_patience < 1 or min_steps < 0:
            raise ValueError(
                f"patience={patience} and release_patience={release_patience} must be >= 1, min_steps={min_steps} >= 0"
            )
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability={probability} must be in [0, 1]")
        self.expert = expert
        # who decides when: the acting expert's own label, or a perfect copy of it (the poor expert acts, a good
        # judge watches: RLIF's separation of "when" from "what")
        self.judge = None
        if judge == "perfect":
            self.judge = copy.deepcopy(expert)
            for knob in ("noise_std", "hesitation", "failed_grasp"):
                if hasattr(self.judge, knob):
                    setattr(self.judge, knob, 0.0)
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
        if self.judge is not None:
            self.judge.reset()
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
        """The acting expert's action (executed during a takeover); the judge's, if any, is what the rule compares."""
        self._obs = observation
        action = np.asarray(self.expert.get_action(observation))
        self._label = action if self.judge is None else np.asarray(self.judge.get_action(observation))
        return action

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
        if self.strategy != "deviation":
            self._observe_k_step(action)
            return
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

    def _start_probability(self, action: np.ndarray) -> float:
        """`random`: p_start. `distance`: `probability` if the policy deviates. `value`: beta if Q_ref says the policy's action is clearly worse, else 1 - beta."""
        if self.strategy == "random":
            return self.p_start
        if self.strategy == "distance":
            self.deviation = self._deviation(action)
            return self.probability if self.deviation > self.threshold else 0.0
        q_pi, q_ref = self.critic(
            self._obs, np.asarray(action), None if self.compare_to == "reference" else self._label
        )
        self.deviation = q_ref - q_pi  # the value gap (logging)
        return self.beta if value_says_bad(q_pi, q_ref, self.alpha, self.delta) else 1.0 - self.beta

    def _observe_k_step(self, action: np.ndarray | None) -> None:
        """`distance` / `value` / `random`: a takeover lasts `takeover_steps` ticks, then the policy acts for at least
        one tick (a new takeover may start on the next; each start is counted); between takeovers the rule decides."""
        if self._intervening:
            if self._held < self.takeover_steps:
                self._held += 1
                self.intervention_steps += 1
                return
            self._intervening = False  # k ticks done: the policy acts this tick
            return
        if action is None or self._rng.random() < self._start_probability(action):
            self._intervening = True
            self._held = 1
            self.n_interventions += 1
            self.intervention_steps += 1

    def __repr__(self) -> str:
        if self.strategy == "random":
            return f"SimulatedIntervener({self.expert.name}, random, p_start={self.p_start}, k={self.takeover_steps})"
        if self.strategy == "value":
            return (
                f"SimulatedIntervener({self.expert.name}, value, alpha={self.alpha}, beta={self.beta}, "
                f"delta={self.delta}, k={self.takeover_steps}, compare_to={self.compare_to})"
            )
        return (
            f"SimulatedIntervener({self.expert.name}, threshold={self.threshold}, patience={self.patience}, "
            f"min_steps={self.min_steps}, release_patience={self.release_patience}, "
            f"probability={self.probability})"
        )
