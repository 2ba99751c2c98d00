"""SAC with RLPD's recipe (Ball et al. 2023): the no-base baseline for residual RL — same critic ensemble, n-step
returns and 50/50 demo/online batches as `residual.py`, but the actor outputs the whole action (tanh-Gaussian)
and exploration comes from the entropy bonus with an auto-tuned temperature.

    robot-rl session algo=sac algo.demos=<episode store>
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from robot_rl.algos.base import ReplayView
from robot_rl.algos.demos import load_demos
from robot_rl.algos.ensemble import make_adam, polyak
from robot_rl.algos.offpolicy import OffPolicy
from robot_rl.interfaces import Robot
from robot_rl.policies.sac import SACModel, SACPolicy, default_obs_keys


@dataclass
class SACConfig:
    """Every setting, its default and meaning: configs/algo/sac.yaml (the one place defaults live)."""

    demos: str
    demo_episodes: int | None
    obs_keys: list | None
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
    temperature_lr: float
    init_temperature: float
    target_entropy_per_dim: float
    grad_clip: float
    batch_size: int
    demo_fraction: float
    learning_starts: int
    interventions_to_demos: bool
    min_action_range: float
    min_obs_std: float


class SAC(OffPolicy):
    explore_mode = "sample"  # draw from the tanh-Gaussian (the entropy bonus does the exploring)
    saved = (*OffPolicy.saved, "alpha_opt")  # resumed with the model, critics and optimisers (+ log_alpha below)

    @classmethod
    def build_robot_policy(cls, cfg: SACConfig, policy_cfg: dict, robot: Robot, seed: int) -> SACPolicy:
        """Uniform random actions until the learner's first weights (warm-up), then the actor."""
        feats = robot.observation_features
        model = SACModel(feats, default_obs_keys(feats, vars(cfg)), robot.action_feature.shape[0], vars(cfg))
        return SACPolicy(model, seed=seed)

    def __init__(self, cfg: SACConfig, policy_cfg: dict, device: torch.device, run_dir: Path | None = None):
        super().__init__(cfg, policy_cfg, device, run_dir)
        self.obs_keys = default_obs_keys(self.obs_features, vars(cfg))
        arrays, ends = load_demos(cfg.demos, self.obs_keys, cfg.demo_episodes)
        self._setup_networks(SACModel(self.obs_features, self.obs_keys, self.action_dim, vars(cfg)), arrays, 0.0)
        self.log_alpha = torch.tensor(math.log(cfg.init_temperature), device=device, requires_grad=True)
        self.actor_opt = make_adam(self.model.actor.parameters(), lr=cfg.actor_lr)
        self.critic_opt = make_adam([*self.critic.parameters(), *self.model.featurizer.parameters()], lr=cfg.critic_lr)
        self.alpha_opt = make_adam([self.log_alpha], lr=cfg.temperature_lr)
        self._make_sampler(arrays, ends, ["action"])

    def robot_policy(self) -> SACPolicy:
        policy = SACPolicy(self.robot_model())
        policy.exploration = "none"  # the mean action
        return policy

    def update(self, replay: ReplayView, rng: np.random.Generator) -> dict[str, float]:
        cfg = self.cfg
        b = self.sample(replay, rng)
        obs = {k: b["obs." + k] for k in self.obs_keys}
        nxt = {k: b["next." + k] for k in self.obs_keys}
        action = self.model.scaler.normalize(b["action"]).clamp(-1, 1)
        alpha = self.log_alpha.exp().detach()

        with torch.no_grad():  # y = R_n + gamma^h * (min of 2 random target heads)(s', a' ~ pi) - no entropy backup
            f_next = self.model.featurizer(nxt)
            a_next, _ = self.model.sample(f_next)
            target = (
                b["return"] + b["discount"] * self.target_critic(f_next, a_next, self.target_heads()).min(dim=0).values
            )
        features = self.model.featurizer(obs)
        q = self.critic(features, action)
        critic_loss = F.mse_loss(q, target.expand_as(q), reduction="none").mean(dim=1).sum()
        self.step(self.critic_opt, critic_loss, cfg.grad_clip)

        a_pi, logp = self.model.sample(features.detach())
        actor_loss = (alpha * logp - self.critic(features.detach(), a_pi).mean(dim=0)).mean()
        self.step(self.actor_opt, actor_loss, cfg.grad_clip)
        alpha_loss = -(self.log_alpha * (logp.detach() + cfg.target_entropy_per_dim * self.action_dim)).mean()
        self.step(self.alpha_opt, alpha_loss)

        polyak(self.critic, self.target_critic, cfg.tau)
        self.num_updates += 1
        return {
            "critic/loss": critic_loss.item() / cfg.num_critics,
            "critic/q_mean": q.mean().item(),
            "actor/loss": actor_loss.item(),
            "actor/entropy": -logp.mean().item(),
            "alpha": alpha.item(),
        }

    def state_dict(self) -> dict:
        return {**super().state_dict(), "log_alpha": self.log_alpha.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
