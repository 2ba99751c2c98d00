"""Residual off-policy RL on a frozen BC policy (ResFiT, Ankile et al. 2025): TD3-style updates of a small residual
actor, a LayerNorm critic ensemble, n-step returns, and RLPD's symmetric sampling (half demos, half online).

Phases, counted in online transitions (the learner's replay size):
  [0, learning_starts)                      robot runs base + uniform noise; no updates
  [learning_starts, + critic_warmup)        critic-only updates; robot explores with Gaussian noise
  afterwards                                critic every update, actor every `actor_every` updates

Trust (issue 20: the robot must not get worse than its base while the critic is still wrong). The actor maximises
a lower confidence bound of its advantage over the base, A_h = Q_h(s, b + r) - Q_h(s, b) over the critic heads h:
mean_h A_h - trust_k * std_h A_h, so it moves away from the base only where the heads agree it helps (trust_k = 0:
ResFiT's ensemble mean). The robot executes gate * r. The gate moves by at most `gate_rate` per actor update
towards a ceiling while that bound, averaged over the batch, is positive, and towards 0 otherwise (gate_init 1,
gate_rate 0: off). The ceiling is how well the critic already ranks the demonstrations' states by their known
returns (demos end at success, so G_t = gamma^(T-1-t)): the correlation of Q(s_t, a_t) with G_t over
`calibration_states` demo states, clipped to [0, 1]. A critic still near its random initialisation (it has not yet
propagated the sparse reward) earns no gate, however sure its heads are about their action gradient.
That critic-side gate only delayed the collapse on PickPlaceCan (a calibrated critic, unanimous and wrong), so the
default gate reads the robot's own outcomes instead (`OutcomeGate`, outcome_levels > 0): the gate moves in steps
of 1/outcome_levels, opens a step once at least `outcome_episodes` episodes at the current step succeeded at least
as often as the base's own episodes (gate 0), or earlier once the step is clearly not worse, and closes a step,
restoring the actor that passed there, as soon as the robot's success at a step is significantly below the base's.
Only the robot's noise-free test episodes (every `outcome_test_every`-th) count.
Hyper-parameters and the reference's values: configs/algo/residual.yaml and ../shared/reference (ResFiT §1.2-1.3).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from robot_rl.algos.base import SENDER_KEY, ReplayView
from robot_rl.algos.demos import cached_base_actions, load_demos
from robot_rl.algos.ensemble import make_adamw, polyak
from robot_rl.algos.offpolicy import OffPolicy, to_device
from robot_rl.interfaces import Robot
from robot_rl.policies.checkpoint import WEIGHTS, CheckpointError, find_policy_dir, load_policy
from robot_rl.policies.residual import ResidualModel, ResidualPolicy, residual_obs_keys


@dataclass
class ResidualConfig:
    """Every setting, its default and meaning: configs/algo/residual.yaml (the one place defaults live)."""

    base_checkpoint: str
    demos: str
    demo_episodes: int | None
    obs_keys: list | None
    scale: float
    actor_hidden: list
    critic_hidden: list
    image_encoder: dict
    num_critics: int
    target_heads: int
    gamma: float
    n_step: int
    tau: float
    actor_lr: float
    critic_lr: float
    grad_clip: float
    batch_size: int
    demo_fraction: float
    learning_starts: int
    critic_warmup: int
    actor_every: int
    warmup_noise: float
    explore_std: float
    target_noise: float
    noise_clip: float
    min_action_range: float
    min_obs_std: float
    trust_k: float
    gate_init: float
    gate_rate: float
    calibration_states: int
    outcome_levels: int
    outcome_episodes: int
    outcome_z: float
    outcome_early_episodes: int
    outcome_margin: float
    outcome_test_every: int
    interventions_to_demos: bool
    base_device: str


def load_base(checkpoint: str, device: str = "cpu"):
    """The frozen base policy (eval mode, no gradients)."""
    if not checkpoint:
        raise ValueError("algo.base_checkpoint is required: the BC policy to improve (a `robot-rl train` run dir)")
    base = load_policy(checkpoint, device=device)
    for p in base.parameters():
        p.requires_grad_(False)
    return base


def base_weights_file(checkpoint: str) -> Path:
    """The base's weights file (it keys the cache of relabelled demo actions); model.safetensors in checkpoints
    written by `robot-rl train` before the one checkpoint format."""
    directory = find_policy_dir(checkpoint)
    return directory / WEIGHTS if (directory / WEIGHTS).exists() else directory / "model.safetensors"


def advantage_lcb(adv: torch.Tensor, k: float) -> torch.Tensor:
    """Lower confidence bound over critic heads (dim 0): mean - k * std (0 where all heads agree on 0)."""
    return adv.mean(dim=0) - k * adv.var(dim=0).add(1e-12).sqrt()


def next_gate(gate: float, adv_heads: torch.Tensor, k: float, rate: float, ceiling: float = 1.0) -> float:
    """Move the gate by at most `rate` towards `ceiling` while the heads' batch-mean advantages of the residual over
    the base have a positive lower bound, towards 0 otherwise."""
    goal = ceiling if advantage_lcb(adv_heads, k).item() > 0 else 0.0
    return min(1.0, max(0.0, gate + float(np.clip(goal - gate, -rate, rate))))


def wilson_upper(k: int, n: int, z: float) -> float:
    """One-sided Wilson upper bound of a success rate from k successes in n episodes (1 with no episodes)."""
    if n == 0:
        return 1.0
    p, d = k / n, 1.0 + z * z / n
    return (p + z * z / (2 * n) + z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / d


def wilson_lower(k: int, n: int, z: float) -> float:
    """One-sided Wilson lower bound of a success rate from k successes in n episodes (0 with no episodes)."""
    if n == 0:
        return 0.0
    p, d = k / n, 1.0 + z * z / n
    return (p + z * z / (2 * n) - z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / d


class OutcomeGate:
    """The executed gate in steps of 1/levels, set by the robot's own episodes (issue 20), not by the critic.

    Level 0 runs the base alone: its episodes (warm-up included) are the reference. At a level > 0 the gate closes
    as soon as the level's success is significantly below the reference (one-sided Wilson upper bound at `z` below
    the reference rate) and the learner restores the actor validated at the level below. It opens one step (asked
    only in the actor phase), keeping the actor that passed as that level's snapshot, once the level has either
    `episodes` episodes and a success rate at least the reference's, or (early) at least `early` episodes and a
    one-sided Wilson lower bound at least the reference minus `margin` (a level clearly not worse need not wait for
    `episodes`); in between it stays and keeps counting. Each change starts a new epoch: the robot
    reports the epoch its steps ran under, and only episodes run entirely in the current epoch (without takeover)
    count for it. Episodes end at a `done` row; rows are read once, in order, from the replay's cursor.
    """

    columns = ("episode", "gate_epoch", "success", "done", "intervention", "gate_test")

    def __init__(
        self, levels: int, episodes: int, z: float, tests_only: bool = False, early: int = 0, margin: float = 0.0
    ):
        self.levels, self.episodes, self.z = levels, episodes, z
        self.early, self.margin = early, margin  # early: 0 = off (open only after `episodes`)
        self.tests_only = tests_only  # count only the robot's noise-free test episodes (`gate_test`)
        self.epoch_levels = [0]  # the level of every epoch so far; the current epoch is the last
        self.reference = [0, 0]  # successes, episodes at level 0 (the base)
        self.current = [0, 0]  # successes, episodes in the current epoch
        self.cursor = 0  # replay rows read
        self.pending: dict[int, list[int]] = {}  # sender -> [episode, epoch (-1: mixed), success, took over]
        self.validated: dict[int, dict] = {}  # level -> the actor's state when it passed that level
        self.closes = 0

    @property
    def level(self) -> int:
        return self.epoch_levels[-1]

    @property
    def epoch(self) -> int:
        return len(self.epoch_levels) - 1

    @property
    def gate(self) -> float:
        return self.level / self.levels

    def observe(self, replay: ReplayView) -> None:
        """Count the episodes finished in the rows added since the last call."""
        keys = self.columns if self.tests_only else self.columns[:-1]
        if replay.size <= self.cursor or not set(keys) <= {*replay.keys()}:
            return
        cols = [replay.column(k)[self.cursor : replay.size] for k in (SENDER_KEY, *keys)]
        if not self.tests_only:
            cols.append(np.ones(replay.size - self.cursor, bool))
        self.cursor = replay.size
        for sender, episode, epoch, success, done, took_over, test in zip(*cols):
            took_over = took_over or not test  # an exploring episode, when only tests count: not counted
            ep = self.pending.pop(int(sender), None)
            if ep is None or ep[0] != episode:  # a new episode (an unfinished one, e.g. of a crashed robot, is lost)
                ep = [int(episode), int(epoch), 0, 0]
            ep[1] = ep[1] if ep[1] == epoch else -1
            ep[2], ep[3] = ep[2] | int(success), ep[3] | int(took_over)
            if not done:
                self.pending[int(sender)] = ep
            elif ep[1] >= 0 and not ep[3]:
                self.record(ep[1], bool(ep[2]))

    def record(self, epoch: int, success: bool) -> None:
        if epoch >= len(self.epoch_levels):  # weights newer than this learner's state (it resumed from older)
            return
        if self.epoch_levels[epoch] == 0:
            self.reference = [self.reference[0] + success, self.reference[1] + 1]
        if epoch == self.epoch:
            self.current = [self.current[0] + success, self.current[1] + 1]

    def decide(self) -> str | None:
        """ "close" when the current level is significantly worse than the base, "open" when it passed, else None."""
        (k, n), (k_ref, n_ref) = self.current, self.reference
        ref = k_ref / max(n_ref, 1)
        if self.level > 0 and n > 0 and wilson_upper(k, n, self.z) < ref:
            return "close"
        as_good = self.level == 0 or k * n_ref >= k_ref * n  # at least the base's rate (level 0 is the base)
        passed = n >= self.episodes and as_good
        early = self.level > 0 and 0 < self.early <= n and wilson_lower(k, n, self.z) >= ref - self.margin
        return "open" if self.level < self.levels and (passed or early) else None

    def open(self, snapshot: dict) -> None:
        self.validated[self.level] = snapshot
        self._new_epoch(self.level + 1)

    def close(self) -> dict:
        """Back one level; returns the actor state that passed there."""
        self.closes += 1
        self._new_epoch(self.level - 1)
        return self.validated[self.level]

    def _new_epoch(self, level: int) -> None:
        self.epoch_levels.append(level)
        self.current = [0, 0]

    def state_dict(self) -> dict:
        keys = ("epoch_levels", "reference", "current", "cursor", "pending", "validated", "closes")
        return copy.deepcopy({k: getattr(self, k) for k in keys})

    def load_state_dict(self, state: dict) -> None:
        for k, v in copy.deepcopy(state).items():
            setattr(self, k, v)


def demo_returns(ends: np.ndarray, gamma: float) -> np.ndarray:
    """Discounted return of every demo step: each demo ends at its first success (reward 1, terminal)."""
    lengths = np.diff(np.concatenate([[0], ends]))
    return np.concatenate([gamma ** np.arange(n - 1, -1, -1) for n in lengths]).astype(np.float32)


def correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()).clamp_min(1e-12))


class ResidualTD3(OffPolicy):
    saved = (*OffPolicy.saved, "target_actor", "outcome")  # resumed with the model, critics and optimisers
    robot_acts_without_weights = True  # the frozen base drives from the first tick

    @classmethod
    def check_config(cls, cfg: ResidualConfig) -> None:
        """Fail before any process starts when the base or the demonstrations are missing."""
        if not cfg.base_checkpoint:
            raise ValueError(
                "algo.base_checkpoint is required: the BC policy to improve (a `robot-rl train` run "
                "dir or checkpoint dir)"
            )
        try:
            find_policy_dir(cfg.base_checkpoint)
        except (FileNotFoundError, CheckpointError) as e:
            raise ValueError(f"algo.base_checkpoint: {e}") from None
        if cfg.outcome_levels and cfg.gate_init != 0:
            raise ValueError("algo.outcome_levels > 0 starts the robot at the base (gate 0): set algo.gate_init=0")
        if cfg.outcome_levels < 0 or (cfg.outcome_levels and (cfg.outcome_episodes < 1 or cfg.outcome_z <= 0)):
            raise ValueError("algo: need outcome_levels >= 0 and, when > 0, outcome_episodes >= 1, outcome_z > 0")
        if cfg.outcome_early_episodes < 0 or not 0 <= cfg.outcome_margin < 1:
            raise ValueError("algo: need outcome_early_episodes >= 0 (0 = off) and 0 <= outcome_margin < 1")
        super().check_config(cfg)

    @classmethod
    def build_robot_policy(cls, cfg: ResidualConfig, policy_cfg: dict, robot: Robot, seed: int) -> ResidualPolicy:
        """The frozen base (on the CPU) + a zero residual: the robot runs the base alone until weights arrive."""
        base = load_base(cfg.base_checkpoint, "cpu")
        feats = robot.observation_features
        model = ResidualModel(
            feats, residual_obs_keys(feats, base, vars(cfg)), robot.action_feature.shape[0], vars(cfg)
        )
        return ResidualPolicy(
            base,
            model,
            seed=seed,
            warmup_noise=cfg.warmup_noise,
            explore_std=cfg.explore_std,
            noise_clip=cfg.noise_clip,
            test_every=cfg.outcome_test_every if cfg.outcome_levels else 0,  # test episodes serve the outcome gate
        )

    def __init__(self, cfg: ResidualConfig, policy_cfg: dict, device: torch.device, run_dir: Path | None = None):
        super().__init__(cfg, policy_cfg, device, run_dir)
        self.base = load_base(cfg.base_checkpoint, cfg.base_device)
        self.obs_keys = residual_obs_keys(self.obs_features, self.base, vars(cfg))

        # demos: cut at success, base-relabelled, as a pool of n-step transitions. A sampling base draws from its own
        # seeded generator here, not torch's global RNG: the networks below start the same whether or not the
        # relabelled actions came from the cache
        arrays, ends = load_demos(cfg.demos, self.obs_keys, cfg.demo_episodes)
        if hasattr(self.base, "generator"):
            self.base.generator = torch.Generator().manual_seed(0)
        arrays["base_action"] = cached_base_actions(
            run_dir, cfg.demos, base_weights_file(cfg.base_checkpoint), self.base, arrays, ends, self.obs_keys
        )

        # networks: the residual model travels to the robot; the critic stays here
        self._setup_networks(
            ResidualModel(self.obs_features, self.obs_keys, self.action_dim, vars(cfg)), arrays, cfg.scale
        )
        self.target_actor = copy.deepcopy(self.model.actor).requires_grad_(False)
        self.actor_opt = make_adamw(self.model.actor.parameters(), lr=cfg.actor_lr)
        self.critic_opt = make_adamw([*self.critic.parameters(), *self.model.featurizer.parameters()], lr=cfg.critic_lr)
        self._make_sampler(arrays, ends, ["action", "base_action"])
        self.outcome = OutcomeGate(
            cfg.outcome_levels,
            cfg.outcome_episodes,
            cfg.outcome_z,
            cfg.outcome_test_every > 0,
            cfg.outcome_early_episodes,
            cfg.outcome_margin,
        )
        # a fixed set of demo states with known returns: how far the critic can be trusted (the gate's ceiling)
        pick = np.random.default_rng(0).permutation(len(arrays["action"]))[: cfg.calibration_states]
        self.calibration = {
            k: to_device(torch.as_tensor(arrays[k][pick]), self.device)
            for k in ["action", *("obs." + k for k in self.obs_keys)]
        }
        self.calibration["return"] = to_device(torch.as_tensor(demo_returns(ends, cfg.gamma)[pick]), self.device)

    @torch.no_grad()
    def critic_calibration(self) -> float:
        """Correlation of the heads' mean Q(s, a) with the known return on the fixed demo states (1 if none)."""
        if not len(self.calibration["return"]):
            return 1.0
        c = self.calibration
        f = self.model.featurizer({k: c["obs." + k] for k in self.obs_keys})
        q = self.critic(f, self.model.scaler.normalize(c["action"]).clamp(-1, 1)).mean(dim=0)
        return correlation(q, c["return"])

    def follow_outcomes(self, replay: ReplayView) -> float:
        """The outcome gate's level after the robot's latest episodes. Opening keeps the actor that passed the level;
        closing restores the one that passed the level below (and its target and optimiser), so the residual does
        not keep walking in the direction the robot's outcomes refuted."""
        g, actor = self.outcome, {"actor": self.model.actor, "target": self.target_actor, "opt": self.actor_opt}
        g.observe(replay)
        decision = g.decide()
        if decision == "open":
            g.open({name: copy.deepcopy(part.state_dict()) for name, part in actor.items()})
        elif decision == "close":
            for name, state in g.close().items():
                actor[name].load_state_dict(state)
        for net in (self.model.actor, self.target_actor):
            net.epoch.fill_(g.epoch)
        return g.gate

    def robot_policy(self) -> ResidualPolicy:
        policy = ResidualPolicy(
            self.base,
            self.robot_model(),
            warmup_noise=self.cfg.warmup_noise,
            explore_std=self.cfg.explore_std,
            noise_clip=self.cfg.noise_clip,
        )
        policy.exploration = "none"
        return policy

    # ---------------------------------------------------------------------------------------------- update
    def update(self, replay: ReplayView, rng: np.random.Generator) -> dict[str, float]:
        cfg = self.cfg
        b = self.sample(replay, rng)
        norm = self.model.scaler.normalize
        obs = {k: b["obs." + k] for k in self.obs_keys}
        nxt = {k: b["next." + k] for k in self.obs_keys}
        base, next_base = norm(b["base_action"]).clamp(-1, 1), norm(b["next_base_action"]).clamp(-1, 1)
        action = norm(b["action"]).clamp(-1, 1)

        # critic: y = R_n + gamma^h * min over 2 random target heads of Q'(s_{t+h}, base' + pi'(s_{t+h}) + noise)
        with torch.no_grad():
            f_next = self.model.featurizer(nxt)
            res_next = self.target_actor(f_next, next_base)
            noise = (torch.randn_like(res_next) * cfg.target_noise).clamp(-cfg.noise_clip, cfg.noise_clip)
            a_next = (next_base + res_next + noise).clamp(-1, 1)
            q_next = self.target_critic(f_next, a_next, self.target_heads()).min(dim=0).values
            target = b["return"] + b["discount"] * q_next
        features = self.model.featurizer(obs)  # the encoder (if any) learns from the critic loss only
        q = self.critic(features, action)  # (heads, batch)
        critic_loss = F.mse_loss(q, target.expand_as(q), reduction="none").mean(dim=1).sum()
        self.step(self.critic_opt, critic_loss, cfg.grad_clip)
        metrics = {
            "critic/loss": critic_loss.item() / cfg.num_critics,
            "critic/q_mean": q.mean().item(),
            "critic/q_head_std": q.std(dim=0).mean().item(),
            "critic/q_max": q.max().item(),
            "critic/target_mean": target.mean().item(),
        }

        # actor: maximise the heads' lower bound on the advantage of base + residual over the base alone
        actor_phase = replay.size >= cfg.learning_starts + cfg.critic_warmup
        if actor_phase and self.num_updates % cfg.actor_every == 0:
            f = features.detach()  # the critic owns the features
            residual = self.model.actor.propose(f, base)  # un-gated: what the gate would let through when open
            adv = self.critic(f, (base + residual).clamp(-1, 1)) - self.critic(f, base).detach()  # (heads, batch)
            actor_loss = -advantage_lcb(adv, cfg.trust_k).mean()
            self.step(self.actor_opt, actor_loss, cfg.grad_clip)
            polyak(self.model.actor, self.target_actor, cfg.tau)
            if cfg.outcome_levels:  # the robot's own episodes set the gate (and may restore an earlier actor)
                gate = self.follow_outcomes(replay)
            else:  # the critic's lower bound and calibration set it
                trust = self.critic_calibration() if cfg.gate_rate > 0 else 1.0
                lcb = adv.detach().mean(dim=1)
                gate = next_gate(float(self.model.actor.gate), lcb, cfg.trust_k, cfg.gate_rate, max(0.0, trust))
                metrics["actor/critic_calibration"] = trust
            self.model.actor.gate.fill_(gate)
            self.target_actor.gate.fill_(gate)
            metrics.update(
                {
                    "actor/loss": actor_loss.item(),
                    "actor/residual_abs": residual.abs().mean().item(),
                    "actor/advantage": adv.mean().item(),
                    "actor/advantage_head_std": adv.std(dim=0).mean().item(),
                    "actor/gate": gate,
                    "outcome/level_success": self.outcome.current[0] / max(self.outcome.current[1], 1),
                    "outcome/reference": self.outcome.reference[0] / max(self.outcome.reference[1], 1),
                    "outcome/closes": self.outcome.closes,
                }
            )
        polyak(self.critic, self.target_critic, cfg.tau)
        self.num_updates += 1
        metrics["phase"] = 2.0 if actor_phase else 1.0
        return metrics
