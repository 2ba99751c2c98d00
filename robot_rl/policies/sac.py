"""SAC's robot side: a featurizer + tanh-Gaussian actor (`SACModel`) and the policy the control process runs
(`SACPolicy`). The learner (robot_rl/algos/sac.py) trains the same model; a checkpoint rebuilds it from here."""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robot_rl.interfaces import Feature, Observation, Policy
from robot_rl.policies.residual import ActionScaler, Featurizer, LearnerExploration, mlp
from robot_rl.sim.registry import is_concatenation

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # the actor's log standard deviation is clamped to this range


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
        self.config = {
            "obs_keys": list(obs_keys),
            "action_dim": int(action_dim),
            "actor_hidden": list(cfg["actor_hidden"]),
            "image_encoder": dict(cfg.get("image_encoder") or {}),
        }
        self.obs_features = {k: obs_features[k] for k in obs_keys}

    def dist(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.actor(features).chunk(2, dim=-1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised tanh-Gaussian action in [-1, 1] and its log-probability."""
        mean, log_std = self.dist(features)
        u = mean + log_std.exp() * torch.randn_like(mean)
        a = torch.tanh(u)
        logp = (-0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        logp = logp - (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)  # tanh change of variables
        return a, logp


def default_obs_keys(obs_features: Mapping[str, Feature], cfg: Mapping) -> list[str]:
    """The configured keys, else every 1-D non-image observation."""
    return list(
        cfg.get("obs_keys")
        or sorted(
            k for k, f in obs_features.items() if not f.is_image and len(f.shape) == 1 and not is_concatenation(k)
        )
    )


class SACPolicy(LearnerExploration, Policy):
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
