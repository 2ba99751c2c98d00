"""RL-100 (Lei et al. 2025), part 2: online PPO through the denoising chain in a session, with the one-step
student distilled alongside (reference: ../shared/reference/rl100_diffusion_ppo.md §1.8-§1.9; DPPO §2).

Robot side (robot_rl/policies/chain_sampler.py): the diffusion policy samples each chunk with DDIM η = 1 (σ
clipped to [std_min, std_max]) and sends, at the chunk's first step, the chain x_K..x_0, the per-step log-probs
summed over the executed rows, the chunk index and the weights version (`policy_version`) that sampled it.

Learner side, one `update` = one PPO iteration on one on-policy rollout batch:
1. **Wait** (`ready`) until `batch_chunks` chunks sampled by the CURRENT version sit in complete episodes (from
   any number of robots). Chunks of older versions are never trained on (dropped; counted in `batch/stale_dropped`):
   no importance correction, the batch is strictly on-policy.
2. **Chunk MDP**: chunk j of an episode covers its rows until the next chunk starts; R_j = Σ_i γ^i r_i, discount
   γ^L_j (L_j its rows, n_action_steps normally). An episode whose last row is a success ended in a terminal
   state; any other end (the time limit, an operator's stop: `done` without `success`) is a truncation.
3. **GAE** over chunk steps with the value network V (own MLP on the normalised observation window):
       δ_j = R_j + γ^L_j V_{j+1} − V_j,   A_j = δ_j + γ^L_j λ A_{j+1},   R̂_j = A_j + V_j
   V after the last chunk: 0 after a terminal success; V(o_last) after a truncation (the task would go on; the
   window ending at the episode's last stored observation, the replay keeps no observation after it).
4. **PPO** for `epochs` passes over shuffled minibatches, A normalised over the batch; per minibatch
       value:  L_V = mean (V(o) − R̂)²                                          one Adam step
       actor, for each denoising step k (one Adam step each, as RL-100 and part 1):
               r_k = exp(Σ_executed [log π_θ(x_{k−1} | x_k, o) − log π_old(x_{k−1} | x_k, o)])
               A_k = γ_d^(k − 1) A   (DPPO's denoising discount, k = K the noisiest step weighs least; γ_d 1 = off)
               L_k = −mean min(r_k A_k, clip(r_k, 1 − c, 1 + c) A_k)
   gradient-norm clipping, LR decayed linearly over `lr_decay_iterations`, and an epoch loop that stops early once
   the approximate KL (mean (r − 1) − log r) passes `target_kl`. Only the UNet learns (encoder, normaliser frozen).
   The first `critic_warmup_iterations` batches fit V alone.
5. **Distil** (`distill_phase: online`): `distill_steps` steps of the one-step student per iteration on the
   batch's observations: x_T ~ N(0, I), target (`distill_target`) = the current teacher's chunk from x_T, either
   its deterministic DDIM-K chunk (`ddim`, RL-100's distill2mean) or the last element of the deployed η chain
   started at x_T (`chain`: a one-step map regressed on it learns E[x_0 | x_T, o] of the chain the robot runs),
   student = one UNet pass (sample prediction), MSE over the executed rows (robot-rl distill's loss). The student is
   written to `<learner>/student/` at every publish: `robot-rl eval eval.checkpoint=<run>/learner/student`.
Settings and defaults: configs/algo/rl100_online.yaml; docs/rl100_online.md.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robot_rl.algos.base import SENDER_KEY, Algorithm, ReplayView
from robot_rl.algos.ensemble import make_adam
from robot_rl.algos.rl100 import chain_logp, check_teacher
from robot_rl.interfaces import OBS_PREFIX, Robot
from robot_rl.policies.chain_sampler import CHAIN, CHAIN_LOGP, CHAIN_VERSION, ChainSamplerPolicy
from robot_rl.policies.checkpoint import CheckpointError, find_policy_dir, load_policy, write_policy
from robot_rl.policies.diffusion import DiffusionPolicy
from robot_rl.policies.one_step import make_student, one_step_timestep
from robot_rl.policies.residual import mlp


@dataclass
class RL100OnlineConfig:
    """Every setting, its default and meaning: configs/algo/rl100_online.yaml (the one place defaults live)."""

    base_checkpoint: str
    chain_steps: int | None
    eta: float
    std_min: float
    std_max: float | None
    gamma: float
    gae_lambda: float
    batch_chunks: int
    minibatch: int
    epochs: int
    actor_lr: float
    lr_decay_iterations: int | None
    target_kl: float | None
    clip: float
    denoise_gamma: float
    grad_clip: float
    critic_lr: float
    value_hidden: list
    critic_warmup_iterations: int
    distill_phase: str
    distill_steps: int
    distill_batch: int
    distill_lr: float
    distill_init: str
    distill_target: str
    eval_chain: bool
    deploy_sampling: str


def load_teacher(checkpoint: str, device) -> DiffusionPolicy:
    policy = load_policy(checkpoint, device=device)
    check_teacher(policy)
    if policy.image_keys:
        raise ValueError(
            f"algo=rl100_online: the base policy reads cameras {policy.image_keys}; the value network here is an MLP "
            f"on low-dim observations only: train the base on low-dim keys (policy.obs_keys)"
        )
    return policy.eval()


# ------------------------------------------------------------------------------------------- chunk MDP


def gae(
    rewards: np.ndarray, values: np.ndarray, discounts: np.ndarray, lam: float, bootstrap: float = 0.0
) -> np.ndarray:
    """GAE over the chunks of one episode: `discounts[j]` = γ^L_j of chunk j; `bootstrap` = V after the last chunk
    (0 when the episode ended in a terminal state, V(o_last) when the time limit cut it)."""
    adv = np.zeros(len(rewards), np.float64)
    nxt_v, nxt_a = float(bootstrap), 0.0
    for j in reversed(range(len(rewards))):
        delta = rewards[j] + discounts[j] * nxt_v - values[j]
        nxt_a = adv[j] = delta + discounts[j] * lam * nxt_a
        nxt_v = values[j]
    return adv.astype(np.float32)


def episode_keys(replay: ReplayView) -> np.ndarray:
    """One int64 per row naming its episode across robots (sender, episode number)."""
    return (replay.column(SENDER_KEY).astype(np.int64) << 40) | replay.column("episode").astype(np.int64)


def batch_episodes(replay: ReplayView, version: int, batch_chunks: int) -> np.ndarray | None:
    """Episode keys holding the current version's chunks, once `batch_chunks` of them sit in complete episodes
    (their last row is `done`); None before that."""
    if replay.size == 0 or CHAIN_VERSION not in replay.keys():
        return None
    rows = np.flatnonzero(replay.column(CHAIN_VERSION) == version)
    if len(rows) < batch_chunks:
        return None
    keys = episode_keys(replay)
    complete = np.unique(keys[replay.column("done").astype(bool)])
    usable = np.isin(keys[rows], complete)
    return np.unique(keys[rows][usable]) if usable.sum() >= batch_chunks else None


class ValueNet(nn.Module):
    """V(o_{t-To+1..t}): its own encoder, an MLP on the window's low-dim observations, normalised with the
    policy's (frozen) statistics."""

    def __init__(self, policy: DiffusionPolicy, hidden: list[int]):
        super().__init__()
        self.keys, self.normalizer = list(policy.lowdim_keys), copy.deepcopy(policy.normalizer).requires_grad_(False)
        dim = sum(int(np.prod(policy.obs_features[k].shape)) for k in self.keys) * policy.cfg.obs_horizon
        self.net = mlp(dim, list(hidden), 1)

    def forward(self, window: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        for k in self.keys:
            x = window[k].float()
            b, to = x.shape[:2]
            parts.append(self.normalizer.normalize(k, x.reshape(b * to, -1)).reshape(b, -1))
        return self.net(torch.cat(parts, -1)).squeeze(-1)


# ------------------------------------------------------------------------------------------ the student


def write_policy_atomically(directory: Path, policy, provenance: dict) -> None:
    """A policy directory replaced as a whole (tmp dir + rename): a reader never sees half a student."""
    tmp, old = directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    write_policy(tmp, policy, provenance=provenance)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def with_sampler(policy: DiffusionPolicy, cfg: RL100OnlineConfig, steps: int, sampling: str) -> DiffusionPolicy:
    """`policy` with a K-step sampler written into its config, so a checkpoint carries it: `chain` = the robot's
    η chain (eta, std clip), `ddim` = deterministic DDIM (η 0, whatever the base checkpoint carried)."""
    chain = sampling == "chain"
    policy.cfg = dataclasses.replace(
        policy.cfg,
        eta=cfg.eta if chain else 0.0,
        std_min=cfg.std_min if chain else 0.0,
        std_max=cfg.std_max if chain else None,
        num_inference_steps=steps,
    )
    policy.cfg.validate()
    return policy


# ------------------------------------------------------------------------------------------ the algorithm


class RL100Online(Algorithm):
    robot_acts_without_weights = True  # the base samples from the first tick

    @classmethod
    def check_config(cls, cfg: RL100OnlineConfig) -> None:
        """Fail before any process starts: a missing base, impossible batch sizes, an unknown phase."""
        if not cfg.base_checkpoint:
            raise ValueError("algo.base_checkpoint is required: the diffusion policy to fine-tune (a train run dir)")
        try:
            find_policy_dir(cfg.base_checkpoint)
        except (FileNotFoundError, CheckpointError) as e:
            raise ValueError(f"algo.base_checkpoint: {e}") from None
        if cfg.distill_phase not in ("online", "none"):
            raise ValueError(f"algo.distill_phase must be online or none, got {cfg.distill_phase!r}")
        if cfg.distill_init not in ("teacher", "random"):
            raise ValueError(f"algo.distill_init must be teacher or random, got {cfg.distill_init!r}")
        if cfg.deploy_sampling not in ("chain", "ddim"):
            raise ValueError(f"algo.deploy_sampling must be chain or ddim, got {cfg.deploy_sampling!r}")
        if cfg.distill_target not in ("chain", "ddim"):
            raise ValueError(f"algo.distill_target must be chain or ddim, got {cfg.distill_target!r}")
        if not 0 < cfg.denoise_gamma <= 1:
            raise ValueError(
                f"algo.denoise_gamma must be in (0, 1] (1 = no denoising discount), got {cfg.denoise_gamma}"
            )
        if not 1 <= cfg.minibatch <= cfg.batch_chunks:
            raise ValueError(f"algo.minibatch ({cfg.minibatch}) must be in 1..algo.batch_chunks ({cfg.batch_chunks})")

    @classmethod
    def build_robot_policy(cls, cfg: RL100OnlineConfig, policy_cfg: dict, robot: Robot, seed: int):
        """The base diffusion policy (CPU) sampling through the stochastic chain; acts before any weights."""
        teacher = load_teacher(cfg.base_checkpoint, "cpu")
        return ChainSamplerPolicy(
            teacher,
            cfg.chain_steps,
            cfg.eta,
            cfg.std_min,
            cfg.std_max,
            seed=seed,
            deploy_sampling=cfg.deploy_sampling,
            eval_chain=cfg.eval_chain,
        )

    def __init__(self, cfg: RL100OnlineConfig, policy_cfg: dict, device: torch.device, run_dir: Path | None = None):
        super().__init__(cfg, policy_cfg, device, run_dir)
        self.policy = load_teacher(cfg.base_checkpoint, device).requires_grad_(False)
        self.policy.unet.requires_grad_(True)  # the encoder and the normaliser stay frozen
        self.steps = int(cfg.chain_steps or self.policy.cfg.num_inference_steps or self.policy.cfg.num_train_timesteps)
        self.value = ValueNet(self.policy, cfg.value_hidden).to(device)
        self.actor_opt = make_adam(self.policy.unet.parameters(), lr=cfg.actor_lr)
        self.critic_opt = make_adam(self.value.net.parameters(), lr=cfg.critic_lr)
        self.student = self.student_opt = None
        if cfg.distill_phase == "online":
            self.student = make_student(self.policy, cfg.distill_init).eval().requires_grad_(False)
            self.student.unet.requires_grad_(True)
            self.student_opt = make_adam(self.student.unet.parameters(), lr=cfg.distill_lr)
            self.t_student = one_step_timestep(self.student)
        self.iteration = 0  # PPO iterations done = the version the robots must sample with
        self.stale_dropped = 0  # chunks of older versions that arrived and were never trained on
        self.rows_seen = 0  # replay rows looked at by the previous iteration

    # ----------------------------------------------------------------------------------- learner interface
    def ready(self, replay: ReplayView) -> bool:
        return batch_episodes(replay, self.iteration, self.cfg.batch_chunks) is not None

    def publish_meta(self, replay: ReplayView) -> dict:
        return {"policy_version": self.iteration}

    def policy_state(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.policy.state_dict().items()}

    def robot_policy(self) -> DiffusionPolicy:
        """The teacher as deployed, on the CPU, carrying its sampler: `deploy_sampling` chain = the η chain PPO
        trains (eta, std clip, K steps in its config; `predict_chunk` then samples it), ddim = deterministic DDIM."""
        return with_sampler(copy.deepcopy(self.policy).cpu().eval(), self.cfg, self.steps, self.cfg.deploy_sampling)

    def on_publish(self, replay: ReplayView) -> None:
        if self.student is not None and self.run_dir is not None:
            provenance = {"source": "rl100_online", "distilled": True, "teacher_version": self.iteration}
            write_policy_atomically(Path(self.run_dir) / "student", copy.deepcopy(self.student).cpu(), provenance)

    def state_dict(self) -> dict:
        state = {
            "policy": self.policy.state_dict(),
            "value": self.value.state_dict(),
            "actor_opt": self.actor_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "counters": torch.tensor([self.iteration, self.stale_dropped, self.rows_seen]),
        }
        if self.student is not None:
            state.update(student=self.student.state_dict(), student_opt=self.student_opt.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.value.load_state_dict(state["value"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.iteration, self.stale_dropped, self.rows_seen = (int(x) for x in state["counters"])
        if self.student is not None and "student" in state:
            self.student.load_state_dict(state["student"])
            self.student_opt.load_state_dict(state["student_opt"])

    # ------------------------------------------------------------------------------------ the rollout batch
    def rollout(self, replay: ReplayView) -> dict:
        """The current version's chunks of complete episodes as tensors, with GAE advantages and returns."""
        cfg, to = self.cfg, self.policy.cfg.obs_horizon
        wanted = batch_episodes(replay, self.iteration, cfg.batch_chunks)
        keys, version = episode_keys(replay), replay.column(CHAIN_VERSION)
        reward, step = replay.column("reward").astype(np.float64), replay.column("step")
        # never trained on: older versions' chunks that arrived since the last batch, and this version's chunks
        # outside the batch (episodes still running); both are stale once the weights move on
        stale = int((version[self.rows_seen :] < self.iteration).sum())
        obs_cols = {k: replay.column(OBS_PREFIX + k) for k in self.policy.obs_keys}
        windows, chunk_rows, current, rewards, discounts, bounds, successes = [], [], [], [], [], [], []
        # per episode: ended by its success (terminal)? and the window ending at its last row (V(o_last) bootstraps
        # a truncation)
        terminals, last_windows = [], []
        for key in wanted:
            rows = np.flatnonzero(keys == key)
            rows = rows[np.argsort(step[rows], kind="stable")]
            starts = np.flatnonzero(np.isfinite(version[rows]))
            ends = np.append(starts[1:], len(rows))
            first = len(chunk_rows)
            for s, e in zip(starts, ends):
                rewards.append(float((reward[rows[s:e]] * cfg.gamma ** np.arange(e - s)).sum()))
                discounts.append(cfg.gamma ** (e - s))
                windows.append(rows[np.maximum(np.arange(s - to + 1, s + 1), 0)])
                chunk_rows.append(rows[s])
                current.append(version[rows[s]] == self.iteration)
            bounds.append((first, len(chunk_rows)))
            last_windows.append(rows[np.maximum(np.arange(len(rows) - to, len(rows)), 0)])
            successes.append(bool(replay.column("success")[rows].any()))
            terminals.append(bool(replay.column("success")[rows[-1]]))  # ended by its success: terminal
        idx = np.stack(windows)  # (chunks, To) row indices of every chunk's observation window
        window = {k: torch.as_tensor(np.asarray(v[idx]), device=self.device) for k, v in obs_cols.items()}
        last = {
            k: torch.as_tensor(np.asarray(v[np.stack(last_windows)]), device=self.device) for k, v in obs_cols.items()
        }
        with torch.no_grad():
            values, last_values = self.value(window).cpu().numpy(), self.value(last).cpu().numpy()
        adv = np.zeros(len(chunk_rows), np.float32)
        for (a, b), terminal, v_last in zip(bounds, terminals, last_values):
            boot = 0.0 if terminal else float(v_last)
            adv[a:b] = gae(np.array(rewards[a:b]), values[a:b], np.array(discounts[a:b]), cfg.gae_lambda, boot)
        cur = np.flatnonzero(current)
        stale += int((version == self.iteration).sum()) - len(cur)
        rows = np.asarray(chunk_rows)[cur]
        shape = (len(cur), self.steps + 1, self.policy.cfg.action_horizon, self.policy.action_dim)
        self.rows_seen = replay.size
        return {
            "window": {k: v[torch.as_tensor(cur, device=self.device)] for k, v in window.items()},
            "chain": torch.as_tensor(np.asarray(replay.column(CHAIN)[rows]), device=self.device).reshape(shape),
            "old_logp": torch.as_tensor(np.asarray(replay.column(CHAIN_LOGP)[rows]), device=self.device),
            "adv": torch.as_tensor(adv[cur], device=self.device),
            "returns": torch.as_tensor(adv[cur] + values[cur], device=self.device),
            "stats": {
                "batch/chunks": float(len(cur)),
                "batch/episodes": float(len(wanted)),
                "batch/success": float(np.mean(successes)),
                "batch/truncated": float(len(terminals) - sum(terminals)),
                "batch/stale_dropped": float(stale),
                "batch/value_mean": float(values[cur].mean()),
            },
        }

    # ------------------------------------------------------------------------------------------- updates
    def _update_value(self, window: dict, returns: torch.Tensor) -> float:
        loss = F.mse_loss(self.value(window), returns)
        self.critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.value.net.parameters(), self.cfg.grad_clip)
        self.critic_opt.step()
        return loss.item()

    def _update_actor(self, cond: torch.Tensor, chain: torch.Tensor, old: torch.Tensor, adv: torch.Tensor) -> dict:
        """One clipped-PPO Adam step per denoising step k (ratio of chunk-summed log-probs at step k)."""
        c, p, out = self.cfg, self.policy, {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0}
        for k in range(self.steps):
            lp = p.chain_log_prob(cond, chain, self.steps, c.eta, c.std_min, c.std_max, step_index=k)
            log_ratio = chain_logp(p, lp) - old[:, k]
            ratio = log_ratio.exp()
            adv_k = adv * c.denoise_gamma ** (self.steps - 1 - k)  # k = 0 is the noisiest step
            loss = -torch.min(ratio * adv_k, ratio.clamp(1 - c.clip, 1 + c.clip) * adv_k).mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"PPO loss {loss.item()} at iteration {self.iteration}: lower algo.actor_lr")
            self.actor_opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(p.unet.parameters(), c.grad_clip)
            self.actor_opt.step()
            with torch.no_grad():
                out["loss"] += loss.item() / self.steps
                out["clip_frac"] += ((ratio - 1).abs() > c.clip).float().mean().item() / self.steps
                out["kl"] += ((ratio - 1) - log_ratio).mean().item() / self.steps
        return out

    def _update_student(self, cond: torch.Tensor) -> float:
        """Consistency distillation, same noise x_T for teacher and student, executed rows only; the target is the
        teacher's deterministic DDIM chunk or its deployed η chain's last element (`distill_target`)."""
        c, shape = self.cfg, (cond.shape[0], self.policy.cfg.action_horizon, self.policy.action_dim)
        x_t = torch.randn(shape, device=self.device)
        if c.distill_target == "chain":
            with torch.no_grad():
                target = self.policy.sample_chain(cond, self.steps, c.eta, c.std_min, c.std_max, init_noise=x_t)[0][
                    :, -1
                ]
        else:  # deterministic DDIM-K from the same x_T (RL-100's distill2mean)
            with torch.no_grad():
                target = self.policy.denoise(x_t, cond, self.steps)
        pred = self.student.unet(x_t, self.t_student.expand(shape[0]), cond)
        rows = self.policy.executed_rows()
        loss = F.mse_loss(pred[:, rows], target[:, rows])
        self.student_opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.student.unet.parameters(), self.cfg.grad_clip)
        self.student_opt.step()
        return loss.item()

    def update(self, replay: ReplayView, rng: np.random.Generator) -> dict[str, float]:
        """One PPO iteration on the current version's rollout batch (then the student); the version moves on."""
        cfg, t0 = self.cfg, time.perf_counter()
        b = self.rollout(replay)
        self.stale_dropped += int(b["stats"]["batch/stale_dropped"])
        with torch.no_grad():
            cond = self.policy.encode_obs(b["window"])  # frozen encoder: the features do not change
        adv = (b["adv"] - b["adv"].mean()) / (b["adv"].std() + 1e-8)
        decay = 1.0 if not cfg.lr_decay_iterations else max(0.0, 1.0 - self.iteration / cfg.lr_decay_iterations)
        for group in self.actor_opt.param_groups:
            group["lr"] = cfg.actor_lr * decay
        train_actor = self.iteration >= cfg.critic_warmup_iterations
        n, sums, count, epochs_run = len(adv), {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "value": 0.0}, 0, 0
        for _ in range(cfg.epochs):
            epoch_kl, mbs = 0.0, 0
            for idx in np.array_split(rng.permutation(n), max(1, n // cfg.minibatch)):
                i = torch.as_tensor(idx, device=self.device)
                sums["value"] += self._update_value({k: v[i] for k, v in b["window"].items()}, b["returns"][i])
                if train_actor:
                    out = self._update_actor(cond[i], b["chain"][i], b["old_logp"][i], adv[i])
                    for k, v in out.items():
                        sums[k] += v
                    epoch_kl += out["kl"]
                count, mbs = count + 1, mbs + 1
            epochs_run += 1
            if train_actor and cfg.target_kl is not None and epoch_kl / mbs > cfg.target_kl:
                break  # adaptive stop: the policy moved far enough from the one that collected the batch
        metrics = {f"ppo/{k}": v / count for k, v in sums.items() if k != "value"}
        metrics.update({"value/loss": sums["value"] / count, "ppo/epochs": float(epochs_run)})
        metrics.update({"ppo/lr": cfg.actor_lr * decay * train_actor, "ppo/adv_raw_std": b["adv"].std().item()})
        if self.student is not None:
            losses = []
            for _ in range(cfg.distill_steps):
                idx = torch.as_tensor(rng.integers(0, n, min(cfg.distill_batch, n)), device=self.device)
                losses.append(self._update_student(cond[idx]))
            metrics["distill/loss"] = float(np.mean(losses)) if losses else math.nan
        self.iteration += 1
        metrics.update(b["stats"])
        metrics.update({"ppo/iteration": float(self.iteration), "ppo/iteration_s": time.perf_counter() - t0})
        return metrics
