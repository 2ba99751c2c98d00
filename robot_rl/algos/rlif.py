"""RLIF (Luo et al., ICLR 2024): the operator's takeovers are the only reward; RLPD learns to avoid being taken over.

    robot-rl session algo=rlif algo.demos=<episode store> teleop=sim_intervener      # sim, a scripted operator
    robot-rl session algo=rlif algo.demos=<episode store> teleop=spacemouse robot=... # hardware: hold to take over

The robot runs the learner's SAC actor; whenever the operator (a teleop device while its takeover control is held,
or a simulated intervener in sim) takes over, the control process executes the operator's action and marks the step
`intervention` — as in every session, so the control process knows nothing of RLIF. Here, on the learner side, the
replay is relabelled: -1 on the last policy step before each takeover starts, 0 everywhere else, never terminal
(`robot_rl/reward/intervention.py`). The task's success reward on the wire is ignored for learning (it is only
measured: episodes.jsonl, evaluation blocks). Unlike DAgger the operator is not assumed optimal: the policy learns
*where* it gets taken over, not to copy the operator, so it can end up better than its operator.

The learner is RLPD (Ball et al. 2023) on `algo=sac`'s networks and plumbing — a 10-head LayerNorm critic
ensemble, min over 2 random heads in the TD target, no entropy backup, UTD `updates_per_transition`, symmetric
sampling: half of every batch from prior data (demonstrations, rewards forced to 0 as in the released code), half
online. The losses are SAC's (`update` below); what RLIF changes is what the reward is. Two options for short
budgets (both off in the released code): `bc_init_steps` starts the actor from BC on the prior data, and
`critic_warmup` holds the actor still until the replay has that many rows, so that the critic has learnt what the
start gets taken over for before the actor follows it. `init_policy` starts the actor from a behaviour-cloning MLP
checkpoint (the same start as HG-DAgger from it), and `bc_weight` adds the mean action's squared error on the
batch's prior-data half to the actor loss (off in the released code; a short run from a BC start otherwise follows a
young critic away from it).

Bad input, before the robot moves (`check_config`): no teleop, or one that can never take over (a scripted expert
without `intervener:`, a leader arm that always or never drives). While running: N episodes in a row without a
takeover means an empty reward signal: a warning in the learner's log, `rlif/*` counters in its metrics, and
`reward_signal.json` in the learner's run dir.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from robot_rl.algos.base import SENDER_KEY, ReplayView
from robot_rl.algos.ensemble import polyak
from robot_rl.algos.nstep import Pool, RLPDSampler
from robot_rl.algos.offpolicy import to_device
from robot_rl.algos.sac import SAC, SACConfig
from robot_rl.config import write_json
from robot_rl.policies.checkpoint import CheckpointError, find_policy_dir, load_policy
from robot_rl.policies.mlp import MLPPolicy
from robot_rl.policies.sac import LOG_STD_MAX, LOG_STD_MIN
from robot_rl.reward.intervention import (
    episode_takeovers,
    intervention_rewards,
    learnable_rows,
    rejected_proposal_rows,
)

log = logging.getLogger("robot_rl.algos.rlif")

# Teleops that can take over and hand back, in words (the bad-input message names them).
TAKEOVER_TELEOPS = (
    "teleop=sim_intervener or another teleop.type=scripted with an `intervener:` section (sim: a scripted operator "
    "takes over when the policy goes wrong); teleop=keyboard, teleop=gamepad, teleop=spacemouse (takes over while "
    "a key, stick or the puck is held, hands back on release; keyboard i / gamepad Start latch it); teleop.type="
    "lerobot with lerobot_type=gamepad or keyboard_ee (lerobot's own takeover events)"
)
DEVICE_TELEOPS = ("keyboard", "gamepad", "spacemouse")  # robot_rl.hardware.teleop.DEVICE_KINDS
LEROBOT_TAKEOVER_TELEOPS = ("gamepad", "keyboard_ee")  # lerobot Teleoperators that report IS_INTERVENTION events


@dataclass
class RLIFConfig(SACConfig):
    """SAC/RLPD's settings plus RLIF's; every default and meaning: configs/algo/rlif.yaml."""

    penalty: float
    keep_intervener_steps: bool
    init_policy: str
    bc_init_steps: int
    bc_lr: float
    bc_weight: float
    clip_target: bool
    rejected_fraction: float
    critic_warmup: int
    empty_signal_episodes: int
    teleop: dict | None  # the session's teleop group (interpolated by rlif.yaml), read only by check_config


def takeover_problem(teleop: dict | None) -> str | None:
    """Why this teleop config can never take over from the policy (None: it can)."""
    teleop = teleop or {"type": "none"}
    kind = teleop.get("type") or "none"
    if kind == "none":
        return "teleop=none: nobody can take over, so there is no reward at all"
    if kind == "scripted" and not teleop.get("intervener"):
        return "a scripted expert without an `intervener:` section only labels steps and never takes over"
    if kind == "device" and teleop.get("device") not in DEVICE_TELEOPS:
        return f"teleop device {teleop.get('device')!r} is not one that can take over"
    if kind == "lerobot" and teleop.get("lerobot_type") not in LEROBOT_TAKEOVER_TELEOPS:
        drives = "always drives (intervening: true)" if teleop.get("intervening") else "never takes over"
        return (
            f"lerobot teleop {teleop.get('lerobot_type')!r} reports no takeover events: it {drives}, so there is no "
            "policy step before a takeover to learn from"
        )
    if kind not in ("scripted", "device", "lerobot"):
        return f"teleop.type={kind!r} is not a teleop that can take over"
    return None


class InterventionSampler(RLPDSampler):
    """RLPD batches whose online rewards are the takeover labels (non-terminal); the operator's own steps start
    transitions only with `keep_intervener_steps`. Labels are recomputed from the stored columns whenever the replay
    grew (a row's label depends on the row after it), so a resumed learner gets the same labels."""

    def __init__(self, *args, penalty: float, keep_intervener: bool, track_rejected: bool = False, **kw):
        super().__init__(*args, **kw)
        self.penalty, self.keep_intervener, self.track_rejected = penalty, keep_intervener, track_rejected
        self.labelled_upto = -1
        self.reward = np.zeros(0, np.float32)
        self.starts = np.zeros(0, np.int64)
        self.rejected = np.zeros(0, np.int64)  # takeover-start rows: (state, the policy's refused proposal)

    def label(self, replay: ReplayView) -> None:
        n = replay.size
        if self.labelled_upto == n:
            return
        if self.links.size < n:
            a = self.links.size
            self.links.extend(replay.column(SENDER_KEY)[a:n], replay.column("episode")[a:n], replay.column("step")[a:n])
        intervention, next_idx = replay.column("intervention")[:n], self.links.next_idx[:n]
        self.reward = intervention_rewards(intervention, next_idx, self.penalty)
        self.starts = np.flatnonzero((next_idx >= 0) & learnable_rows(intervention, self.keep_intervener))
        if self.track_rejected:
            self.rejected = rejected_proposal_rows(intervention, next_idx, replay.column("policy_action")[:n])
        self.labelled_upto = n

    def online_pool(self, replay: ReplayView) -> Pool:
        self.label(replay)
        n = replay.size
        return Pool(replay.column, self.reward, np.zeros(n, bool), self.links.next_idx[:n], self.starts)


class RLIF(SAC):
    @classmethod
    def check_config(cls, cfg: RLIFConfig) -> None:
        problem = takeover_problem(cfg.teleop)
        if problem:
            raise ValueError(
                f"algo=rlif learns only from takeovers, and {problem}. Use a teleop that can take over: "
                f"{TAKEOVER_TELEOPS}"
            )
        super().check_config(cfg)
        if cfg.penalty >= 0 or cfg.empty_signal_episodes < 1:
            raise ValueError("algo: need penalty < 0 (a takeover is bad) and empty_signal_episodes >= 1")
        if cfg.init_policy:
            try:
                find_policy_dir(cfg.init_policy)
            except (CheckpointError, FileNotFoundError, ValueError) as e:
                raise ValueError(f"algo.init_policy={cfg.init_policy!r}: not a policy checkpoint ({e})") from None

    def __init__(self, cfg: RLIFConfig, policy_cfg: dict, device: torch.device, run_dir: Path | None = None):
        super().__init__(cfg, policy_cfg, device, run_dir)
        self.signal = {"episodes": 0, "takeovers": 0, "episodes_since_takeover": 0, "empty": False}
        self._signal_rows = 0  # replay rows the signal was last computed over
        if cfg.init_policy:
            self.start_from(load_policy(cfg.init_policy, device="cpu"))
        elif cfg.bc_init_steps:
            self.pretrain_actor(cfg.bc_init_steps, np.random.default_rng(0))

    def _make_sampler(self, demo_arrays: dict, episode_ends: np.ndarray, action_keys: list[str]) -> None:
        """Prior data as RLIF loads it: rewards 0, nothing terminal (task success is not a reward here)."""
        cfg = self.cfg
        demo_arrays = {**demo_arrays, "reward": np.zeros_like(demo_arrays["reward"])}
        demo_arrays["success"] = np.zeros_like(demo_arrays["success"])
        self.demo_arrays = demo_arrays
        self.demos = Pool.from_arrays(demo_arrays, episode_ends)
        self.sampler = InterventionSampler(
            self.demos,
            self.obs_keys,
            action_keys,
            cfg.n_step,
            cfg.gamma,
            cfg.batch_size,
            cfg.demo_fraction,
            cfg.interventions_to_demos,
            penalty=cfg.penalty,
            keep_intervener=cfg.keep_intervener_steps,
            track_rejected=cfg.rejected_fraction > 0,
        )

    # ------------------------------------------------------------------------------------------- learning
    def pretrain_actor(self, steps: int, rng: np.random.Generator) -> float:
        """Start from a BC policy (optional): the mean action regressed onto the prior data's actions (squared error
        at `bc_lr`, as the MLP behaviour-cloning policies are fitted), then the log-std set from the spread around it
        (`_std_from_spread`). The critic starts from scratch either way."""
        keys = ["obs." + k for k in self.obs_keys]
        n = len(self.demo_arrays["action"])
        opt = torch.optim.Adam(self.model.actor.parameters(), lr=self.cfg.bc_lr)
        loss = torch.zeros(())
        for _ in range(steps):
            idx = rng.integers(0, n, self.cfg.batch_size)
            obs = {k[4:]: torch.as_tensor(self.demo_arrays[k][idx], device=self.device) for k in keys}
            act = torch.as_tensor(self.demo_arrays["action"][idx], device=self.device)
            mean, _ = self.model.dist(self.model.featurizer(obs))
            loss = ((torch.tanh(mean) - self.model.scaler.normalize(act).clamp(-1, 1)) ** 2).sum(-1).mean()
            self.step(opt, loss, self.cfg.grad_clip)
        self._std_from_spread()
        log.info("RLIF: actor pre-trained on the prior data for %d steps (mean-action error %.3f)", steps, loss.item())
        return loss.item()

    @torch.no_grad()
    def start_from(self, bc: MLPPolicy) -> None:
        """Start the actor from a behaviour-cloning MLP checkpoint (`init_policy`): its layers become the actor's
        mean, and the observation statistics and action range become the featurizer's and the scaler's, so the
        actor's mean action equals the MLP's action (the same start as an online-BC / HG-DAgger run from it)."""
        if not isinstance(bc, MLPPolicy):
            raise ValueError(f"algo.init_policy: an MLP policy is needed (got {type(bc).__name__})")
        if bc.obs_keys != self.obs_keys or bc.hidden != list(self.cfg.actor_hidden):
            raise ValueError(
                f"algo.init_policy: its observation keys {bc.obs_keys} / hidden {bc.hidden} differ from the actor's "
                f"{self.obs_keys} / {list(self.cfg.actor_hidden)} (set algo.obs_keys / algo.actor_hidden to match)"
            )
        model, a = self.model, self.action_dim
        model.featurizer.obs_mean.copy_(bc.obs_mean)
        model.featurizer.obs_std.copy_(bc.obs_std)
        model.scaler.center.copy_((bc.action_high + bc.action_low) / 2)
        model.scaler.half_range.copy_((bc.action_high - bc.action_low) / 2)
        layers = [i for i, m in enumerate(bc.net) if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm))]
        for i in layers[:-1]:
            model.actor[i].load_state_dict(bc.net[i].state_dict())
        model.actor[layers[-1]].weight[:a].copy_(bc.net[layers[-1]].weight)
        model.actor[layers[-1]].bias[:a].copy_(bc.net[layers[-1]].bias)
        self._std_from_spread()
        log.info("RLIF: actor started from the BC policy %s", getattr(bc, "checkpoint_dir", "(in memory)"))

    @torch.no_grad()
    def _std_from_spread(self) -> None:
        """The BC start's log-std: input-independent, the spread of the prior data's actions around its mean action
        (normalised units; the tanh's slope is ~1 where the arm acts). Not fitted by likelihood together with the
        mean: a Gaussian's NLL discounts the mean's errors wherever its std grows, and the poor demos' noisy arm
        actions were then under-fit. Not measured before the tanh either: a +-1 gripper's atanh made that 1.8,
        a coin flip of the gripper at every sampled step."""
        obs = {k: torch.as_tensor(self.demo_arrays["obs." + k], device=self.device) for k in self.obs_keys}
        act = self.model.scaler.normalize(torch.as_tensor(self.demo_arrays["action"], device=self.device))
        mean, _ = self.model.dist(self.model.featurizer(obs))
        spread = (act.clamp(-1, 1) - torch.tanh(mean)).std(0)
        head, a = self.model.actor[-1], self.action_dim
        head.weight[a:].zero_()
        head.bias[a:].copy_(spread.log().clamp(LOG_STD_MIN, LOG_STD_MAX))

    def warnings(self) -> list[str]:
        if not self.signal.get("empty"):
            return []
        return [
            f"RLIF's reward signal is empty: no takeover in the last {self.signal['episodes_since_takeover']} "
            f"episodes ({self.signal['takeovers']} in all): nothing to learn from unless the operator takes over"
        ]

    def update(self, replay: ReplayView, rng: np.random.Generator) -> dict[str, float]:
        """SAC/RLPD's update on batches whose rewards are the takeover labels (half prior data, half online)."""
        cfg = self.cfg
        b = self.sample(replay, rng)
        obs = {k: b["obs." + k] for k in self.obs_keys}
        nxt = {k: b["next." + k] for k in self.obs_keys}
        action = self.model.scaler.normalize(b["action"]).clamp(-1, 1)
        alpha = self.log_alpha.exp().detach()

        with torch.no_grad():  # y = r + gamma^h * (min of 2 random target heads)(s', a' ~ pi); no entropy backup
            f_next = self.model.featurizer(nxt)
            a_next, _ = self.model.sample(f_next)
            q_next = self.target_critic(f_next, a_next, self.target_heads()).min(dim=0).values
            target = b["return"] + b["discount"] * q_next
            if cfg.clip_target:  # rewards are 0 or the penalty: no return is positive, nor may a target be
                target = target.clamp(max=0.0)
        features = self.model.featurizer(obs)
        q = self.critic(features, action)
        critic_loss = F.mse_loss(q, target.expand_as(q), reduction="none").mean(dim=1).sum()
        rejected = self.sampler.rejected
        if cfg.rejected_fraction and len(rejected):  # optional: Q(s, the proposal the operator refused) -> penalty
            idx = rng.choice(rejected, size=max(1, int(round(cfg.rejected_fraction * cfg.batch_size))))
            obs_r = {k: to_device(torch.as_tensor(replay.column("obs." + k)[idx]), self.device) for k in self.obs_keys}
            proposal = to_device(torch.as_tensor(replay.column("policy_action")[idx]), self.device)
            q_r = self.critic(self.model.featurizer(obs_r), self.model.scaler.normalize(proposal).clamp(-1, 1))
            critic_loss = critic_loss + ((q_r - cfg.penalty) ** 2).mean(dim=1).sum()  # terminal: no bootstrap
        self.step(self.critic_opt, critic_loss, cfg.grad_clip)
        out = {"critic/loss": critic_loss.item() / cfg.num_critics, "critic/q_mean": q.mean().item()}

        if replay.size >= cfg.critic_warmup:  # the actor moves once the critic has seen what gets taken over
            a_pi, logp = self.model.sample(features.detach())
            actor_loss = (alpha * logp - self.critic(features.detach(), a_pi).mean(dim=0)).mean()
            if cfg.bc_weight:  # optional: + the mean action's squared error on the batch's prior-data half
                n_demo = int(round(cfg.batch_size * cfg.demo_fraction))
                mean, _ = self.model.dist(features[:n_demo].detach())
                actor_loss = actor_loss + cfg.bc_weight * ((torch.tanh(mean) - action[:n_demo]) ** 2).sum(-1).mean()
            self.step(self.actor_opt, actor_loss, cfg.grad_clip)
            alpha_loss = -(self.log_alpha * (logp.detach() + cfg.target_entropy_per_dim * self.action_dim)).mean()
            self.step(self.alpha_opt, alpha_loss)
            out.update({"actor/loss": actor_loss.item(), "actor/entropy": -logp.mean().item()})

        polyak(self.critic, self.target_critic, cfg.tau)
        self.num_updates += 1
        return {
            **out,
            "alpha": alpha.item(),
            "rlif/batch_penalties": float((b["return"] < 0).float().mean()),
            "rlif/rejected_rows": float(len(rejected)),
            **{f"rlif/{k}": float(v) for k, v in self.signal.items()},
        }

    # ----------------------------------------------------------------------------------------- the signal
    def publish_meta(self, replay: ReplayView) -> dict:
        self._check_signal(replay)
        return super().publish_meta(replay)

    def _check_signal(self, replay: ReplayView) -> None:
        """Takeovers per episode; `empty_signal_episodes` episodes in a row without one: say so (once per change)."""
        if replay.size == 0 or self._signal_rows == replay.size:
            return
        self._signal_rows = n = replay.size
        self.sampler.label(replay)
        key = replay.column(SENDER_KEY)[:n].astype(np.int64) * (1 << 40) + replay.column("episode")[:n]
        _, per_episode = episode_takeovers(replay.column("intervention")[:n], self.sampler.links.next_idx[:n], key)
        if len(per_episode) == self.signal["episodes"]:
            return
        hit = np.flatnonzero(per_episode)
        since = len(per_episode) - (int(hit[-1]) + 1 if hit.size else 0)
        empty = since >= self.cfg.empty_signal_episodes
        was_empty, self.signal = (
            self.signal["empty"],
            {
                "episodes": len(per_episode),
                "takeovers": int(per_episode.sum()),
                "episodes_since_takeover": since,
                "empty": empty,
            },
        )
        if empty and not was_empty:
            log.warning(
                "RLIF: the reward signal is empty: no takeover in the last %d episodes (%d takeovers in all). %s",
                since,
                self.signal["takeovers"],
                "Is the teleop connected, and its takeover control held when the robot goes wrong?"
                if not hit.size
                else "Fine if the policy now does the task (check its success rate); nothing new to learn from.",
            )
        elif was_empty and not empty:
            log.info("RLIF: a takeover again (%d in all): the reward signal is back", self.signal["takeovers"])
        if self.run_dir is not None:
            write_json(Path(self.run_dir) / "reward_signal.json", {**self.signal, "n": self.cfg.empty_signal_episodes})
