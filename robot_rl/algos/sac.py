"""SAC with RLPD's recipe (Ball et al. 2023): the no-base baseline for residual RL — same critic ensemble, n-step
returns and 50/50 demo/online batches as `residual.py`, but the actor outputs the whole action (tanh-Gaussian)
and exploration comes from the entropy bonus with an auto-tuned temperature.

    robot-rl session algo=sac algo.demos=<episode store>
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robot_rl.algos.base import Algorithm, WarmupPhases
from robot_rl.algos.demos import load_demos
from robot_rl.algos.ensemble import EnsembleQ, make_adam, polyak
from robot_rl.algos.nstep import Pool, RLPDSampler
from robot_rl.data.episode_store import EpisodeStore
from robot_rl.interfaces import OBS_PREFIX, Feature, Observation, Policy
from robot_rl.learner.replay_buffer import ReplayBuffer as ReplayStore  # until algos take a ReplayView
from robot_rl.policies.residual import ActionScaler, Featurizer, fit_to_demos, mlp


@dataclass
class SACConfig:
    demos: str = ""
    demo_episodes: int | None = None
    obs_keys: list | None = None       # null: every 1-D float observation of the demonstrations
    actor_hidden: list = field(default_factory=lambda: [256, 256])
    critic_hidden: list = field(default_factory=lambda: [256, 256])
    image_encoder: dict = field(default_factory=dict)
    num_critics: int = 10
    target_heads: int = 2
    gamma: float = 0.99
    n_step: int = 3
    tau: float = 0.005
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    temperature_lr: float = 3e-4
    init_temperature: float = 0.01     # HIL-SERL / LeRobot docs: a low start keeps demos and takeovers effective
    target_entropy_per_dim: float = -0.5
    grad_clip: float = 1.0
    batch_size: int = 256
    demo_fraction: float = 0.5
    learning_starts: int = 1000
    interventions_to_demos: bool = True
    min_action_range: float = 0.1
    min_obs_std: float = 0.1


class SACModel(nn.Module):
    """What the robot runs: featurizer + tanh-Gaussian actor head + action scaler."""

    def __init__(self, obs_features: Mapping[str, Feature], obs_keys: list[str], action_dim: int, cfg: Mapping):
        super().__init__()
        lowdim = {k: int(np.prod(obs_features[k].shape)) for k in obs_keys if not obs_features[k].is_image}
        images = {k: tuple(obs_features[k].shape) for k in obs_keys if obs_features[k].is_image}
        self.scaler = ActionScaler(action_dim)
        self.featurizer = Featurizer(lowdim, images, dict(cfg.get("image_encoder") or {}))
        self.actor = mlp(self.featurizer.out_dim, list(cfg["actor_hidden"]), 2 * action_dim)
        self.obs_keys = list(obs_keys)
        # what a checkpoint needs to rebuild this module (robot_rl/policies/checkpoint.py)
        self.config = {"obs_keys": list(obs_keys), "action_dim": int(action_dim), "actor_hidden": list(cfg["actor_hidden"]),
                       "image_encoder": dict(cfg.get("image_encoder") or {})}
        self.obs_features = {k: obs_features[k] for k in obs_keys}

    def dist(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.actor(features).chunk(2, dim=-1)
        return mean, log_std.clamp(-5.0, 2.0)

    def sample(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised tanh-Gaussian action in [-1, 1] and its log-probability."""
        mean, log_std = self.dist(features)
        u = mean + log_std.exp() * torch.randn_like(mean)
        a = torch.tanh(u)
        logp = (-0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        logp = logp - (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)  # tanh change of variables
        return a, logp


def default_obs_keys(obs_features: Mapping[str, Feature], cfg: Mapping) -> list[str]:
    return list(cfg.get("obs_keys") or sorted(k for k, f in obs_features.items() if not f.is_image and len(f.shape) == 1))


class SACPolicy(Policy):
    """Control-process side: samples during training (uniform during warm-up), the mean when evaluating."""

    def __init__(self, model: SACModel, seed: int = 0):
        self.model = model.eval()
        self.exploration = "warmup"
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def reset(self) -> None:
        pass

    @torch.no_grad()
    def select_action(self, observation: Observation) -> np.ndarray:
        dim = self.model.scaler.center.shape[0]
        if self.exploration == "warmup":
            a = torch.as_tensor(self.rng.uniform(-1, 1, dim), dtype=torch.float32)
        else:
            obs = {k: torch.as_tensor(np.asarray(observation[k])).unsqueeze(0) for k in self.model.obs_keys}
            mean, log_std = self.model.dist(self.model.featurizer(obs))
            if self.exploration == "none":
                a = torch.tanh(mean[0])
            else:
                a = torch.tanh(mean[0] + log_std[0].exp() * torch.randn(mean.shape[1:], generator=self.gen))
        return self.model.scaler.denormalize(a).numpy().astype(np.float32)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()})


class SAC(WarmupPhases, Algorithm):
    explore_mode = "sample"  # draw from the tanh-Gaussian (the entropy bonus does the exploring)

    @staticmethod
    def check_config(cfg: SACConfig) -> None:
        if not cfg.demos or not (Path(cfg.demos) / "commit.json").exists():
            raise ValueError(f"algo.demos={cfg.demos!r} must be an episode store of demonstrations (`robot-rl record`)")

    def __init__(self, cfg: SACConfig, policy_cfg: dict, device: torch.device, run_dir: Path | None = None):
        self.cfg, self.device = cfg, device
        store = EpisodeStore.open(cfg.demos, "r")
        obs_features = {k[len(OBS_PREFIX):]: f for k, f in store.features.items() if k.startswith(OBS_PREFIX)}
        self.obs_keys = default_obs_keys(obs_features, vars(cfg))
        self.action_dim = int(store.features["action"].shape[0])
        arrays, ends = load_demos(cfg.demos, self.obs_keys, cfg.demo_episodes)
        self.model = SACModel(obs_features, self.obs_keys, self.action_dim, vars(cfg))
        fit_to_demos(self.model, arrays, store.features["action"], 0.0, cfg.min_action_range, cfg.min_obs_std)
        self.model.to(device)
        self.critic = EnsembleQ(cfg.num_critics, self.model.featurizer.out_dim + self.action_dim,
                                list(cfg.critic_hidden)).to(device)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(cfg.init_temperature), device=device, requires_grad=True)
        self.actor_opt = make_adam(self.model.actor.parameters(), lr=cfg.actor_lr)
        self.critic_opt = make_adam([*self.critic.parameters(), *self.model.featurizer.parameters()],
                                           lr=cfg.critic_lr)
        self.alpha_opt = make_adam([self.log_alpha], lr=cfg.temperature_lr)
        self.sampler = RLPDSampler(Pool.from_arrays(arrays, ends), self.obs_keys, ["action"], cfg.n_step,
                                   cfg.gamma, cfg.batch_size, cfg.demo_fraction, cfg.interventions_to_demos)
        self.torch_rng = torch.Generator(device="cpu").manual_seed(0)
        self.num_updates = 0

    def update(self, replay: ReplayStore, rng: np.random.Generator) -> dict[str, float]:
        cfg = self.cfg
        b = {k: torch.as_tensor(v, device=self.device) for k, v in self.sampler.sample(replay, rng).items()}
        obs = {k: b["obs." + k] for k in self.obs_keys}
        nxt = {k: b["next." + k] for k in self.obs_keys}
        action = self.model.scaler.normalize(b["action"]).clamp(-1, 1)
        alpha = self.log_alpha.exp().detach()

        with torch.no_grad():  # y = R_n + gamma^h * (min of 2 random target heads)(s', a' ~ pi) - no entropy backup
            f_next = self.model.featurizer(nxt)
            a_next, _ = self.model.sample(f_next)
            heads = torch.randperm(cfg.num_critics, generator=self.torch_rng)[: cfg.target_heads].to(self.device)
            target = b["return"] + b["discount"] * self.target_critic(f_next, a_next, heads).min(dim=0).values
        features = self.model.featurizer(obs)
        q = self.critic(features, action)
        critic_loss = F.mse_loss(q, target.expand_as(q), reduction="none").mean(dim=1).sum()
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        torch.nn.utils.clip_grad_norm_(self.critic_opt.param_groups[0]["params"], cfg.grad_clip)
        self.critic_opt.step()

        a_pi, logp = self.model.sample(features.detach())
        actor_loss = (alpha * logp - self.critic(features.detach(), a_pi).mean(dim=0)).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.actor.parameters(), cfg.grad_clip)
        self.actor_opt.step()
        alpha_loss = -(self.log_alpha * (logp.detach() + cfg.target_entropy_per_dim * self.action_dim)).mean()
        self.alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_opt.step()

        polyak(self.critic, self.target_critic, cfg.tau)
        self.num_updates += 1
        return {"critic/loss": critic_loss.item() / cfg.num_critics, "critic/q_mean": q.mean().item(),
                "actor/loss": actor_loss.item(), "actor/entropy": -logp.mean().item(), "alpha": alpha.item()}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "critic": self.critic.state_dict(),
                "target_critic": self.target_critic.state_dict(), "log_alpha": self.log_alpha.detach().clone(),
                "actor_opt": self.actor_opt.state_dict(), "critic_opt": self.critic_opt.state_dict(),
                "alpha_opt": self.alpha_opt.state_dict(), "num_updates": torch.tensor(self.num_updates)}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.critic.load_state_dict(state["critic"])
        self.target_critic.load_state_dict(state["target_critic"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.alpha_opt.load_state_dict(state["alpha_opt"])
        self.num_updates = int(state["num_updates"])
