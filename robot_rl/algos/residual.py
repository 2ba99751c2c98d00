"""Residual off-policy RL on a frozen BC policy (ResFiT, Ankile et al. 2025): TD3-style updates of a small residual
actor, a LayerNorm critic ensemble, n-step returns, and RLPD's symmetric sampling (half demos, half online).

Phases, counted in online transitions (the learner's replay size):
  [0, learning_starts)                      robot runs base + uniform noise; no updates
  [learning_starts, + critic_warmup)        critic-only updates; robot explores with Gaussian noise
  afterwards                                critic every update, actor every `actor_every` updates
Hyper-parameters and the reference's values: configs/algo/residual.yaml and ../shared/reference (ResFiT §1.2-1.3).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from robot_rl.algos.base import ReplayView
from robot_rl.algos.demos import cached_base_actions, load_demos
from robot_rl.algos.ensemble import make_adamw, polyak
from robot_rl.algos.offpolicy import OffPolicy
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


class ResidualTD3(OffPolicy):
    saved = (*OffPolicy.saved, "target_actor")  # resumed with the model, critics and optimisers

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
        )

    def __init__(self, cfg: ResidualConfig, policy_cfg: dict, device: torch.device, run_dir: Path | None = None):
        super().__init__(cfg, policy_cfg, device, run_dir)
        self.base = load_base(cfg.base_checkpoint, cfg.base_device)
        self.obs_keys = residual_obs_keys(self.obs_features, self.base, vars(cfg))

        # demos: cut at success, base-relabelled, as a pool of n-step transitions
        arrays, ends = load_demos(cfg.demos, self.obs_keys, cfg.demo_episodes)
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

        # actor: maximise the ensemble-mean Q of base + residual (features detached: the critic owns them)
        actor_phase = replay.size >= cfg.learning_starts + cfg.critic_warmup
        if actor_phase and self.num_updates % cfg.actor_every == 0:
            residual = self.model.actor(features.detach(), base)
            q_pi = self.critic(features.detach(), (base + residual).clamp(-1, 1)).mean(dim=0)
            actor_loss = -q_pi.mean()
            self.step(self.actor_opt, actor_loss, cfg.grad_clip)
            metrics.update({"actor/loss": actor_loss.item(), "actor/residual_abs": residual.abs().mean().item()})
            polyak(self.model.actor, self.target_actor, cfg.tau)
        polyak(self.critic, self.target_critic, cfg.tau)
        self.num_updates += 1
        metrics["phase"] = 2.0 if actor_phase else 1.0
        return metrics
