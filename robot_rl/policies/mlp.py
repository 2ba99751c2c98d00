"""An MLP policy over low-dimensional observations: the baseline, and the policy the foundation session trains.

Observation normalisation lives in buffers of the module, so that it travels with the weights: the control
process never needs the learner's data to use a new version.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from robot_rl.interfaces import OBS_PREFIX, Feature, Observation, Policy
from robot_rl.sim.registry import is_concatenation

ACTION_MARGIN, MIN_ACTION_MARGIN = 0.05, 1e-2  # fit_normalizer: the data's action range, widened by 5 % (>= 0.01)


def lowdim_keys(features: dict[str, Feature], keys: list[str] | None = None) -> list[str]:
    """The observation keys an MLP reads: the configured ones, or every 1-D float key in a stable order, without
    robosuite's concatenations of other keys (`object-state`, `robot0_proprio-state`: each value once)."""
    if keys:
        missing = [k for k in keys if k not in features]
        if missing:
            raise ValueError(f"policy.obs_keys {missing} are not observations of this robot; it has {sorted(features)}")
        return list(keys)
    return sorted(k for k, f in features.items() if not f.is_image and len(f.shape) == 1 and not is_concatenation(k))


class MLPPolicy(nn.Module, Policy):
    def __init__(self, obs_keys: list[str], obs_dims: list[int], action_dim: int, hidden: list[int]):
        nn.Module.__init__(self)
        self.obs_keys = list(obs_keys)
        self.obs_dims = list(obs_dims)
        self.hidden = list(hidden)
        obs_dim = int(sum(obs_dims))
        layers, last = [], obs_dim
        for width in hidden:
            layers += [nn.Linear(last, width), nn.LayerNorm(width), nn.ReLU()]
            last = width
        layers += [nn.Linear(last, action_dim), nn.Tanh()]  # actions are normalised to [-1, 1]
        self.net = nn.Sequential(*layers)
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        self.register_buffer("action_low", -torch.ones(action_dim))
        self.register_buffer("action_high", torch.ones(action_dim))

    @classmethod
    def from_features(cls, features: dict[str, Feature], action: Feature, hidden: list[int], obs_keys=None):
        keys = lowdim_keys(features, obs_keys)
        policy = cls(keys, [int(features[k].shape[0]) for k in keys], int(action.shape[0]), list(hidden))
        if action.low is not None and np.all(np.isfinite(action.low)) and np.all(np.isfinite(action.high)):
            policy.action_low.copy_(torch.as_tensor(action.low, dtype=torch.float32))
            policy.action_high.copy_(torch.as_tensor(action.high, dtype=torch.float32))
        return policy

    def set_obs_stats(self, mean: np.ndarray, std: np.ndarray, min_std: float = 1e-2) -> None:
        self.obs_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.obs_std.copy_(torch.as_tensor(np.maximum(std, min_std), dtype=torch.float32))

    # --- what offline training needs (the same interface as DiffusionPolicy) ---------------------------------
    @property
    def horizons(self) -> tuple[int, int]:
        """(obs_horizon, action_horizon) of its training windows: one observation -> one action."""
        return 1, 1

    @property
    def store_obs_keys(self) -> list[str]:
        return [OBS_PREFIX + k for k in self.obs_keys]

    def features_dict(self) -> dict:
        return {
            "obs": {k: Feature((d,)).to_dict() for k, d in zip(self.obs_keys, self.obs_dims)},
            "action": Feature((int(self.action_low.shape[0]),)).to_dict(),
        }

    def fit_normalizer(self, data: dict[str, np.ndarray]) -> None:
        """Observation mean/std and the action range (+ACTION_MARGIN) from arrays keyed by robot or store names."""
        flat = self.flatten({k: data[k] if k in data else data[OBS_PREFIX + k] for k in self.obs_keys})
        self.set_obs_stats(flat.mean(0).numpy(), flat.std(0).numpy())
        lo, hi = data["action"].min(0), data["action"].max(0)
        pad = np.maximum(ACTION_MARGIN * (hi - lo), MIN_ACTION_MARGIN)
        self.action_low.copy_(torch.as_tensor(lo - pad))
        self.action_high.copy_(torch.as_tensor(hi + pad))

    def compute_loss(self, batch: dict) -> torch.Tensor:
        """MSE to the window's action (robot units): store-named obs (B, 1, D), `action` (B, 1, A)."""
        device = self.obs_mean.device
        obs = self.flatten({k: batch[OBS_PREFIX + k][:, -1] for k in self.obs_keys}).to(device)
        target = torch.as_tensor(batch["action"][:, 0], device=device).float()
        return ((self(obs) - target) ** 2).mean()

    def flatten(self, obs: dict[str, np.ndarray | torch.Tensor]) -> torch.Tensor:
        parts = [torch.as_tensor(np.asarray(obs[k]) if not torch.is_tensor(obs[k]) else obs[k]) for k in self.obs_keys]
        return torch.cat([p.float().reshape(*p.shape[: p.dim() - 1], -1) for p in parts], dim=-1)

    def forward(self, flat_obs: torch.Tensor) -> torch.Tensor:
        """Flat observation (B, D) -> action in robot units (B, A)."""
        x = (flat_obs - self.obs_mean) / self.obs_std
        unit = self.net(x)
        return self.action_low + (unit + 1.0) * 0.5 * (self.action_high - self.action_low)

    # --- Policy interface ---------------------------------------------------------------------------------
    def reset(self) -> None:
        pass  # stateless

    @torch.no_grad()
    def select_action(self, observation: Observation) -> np.ndarray:
        device = self.obs_mean.device
        x = self.flatten(observation).to(device).unsqueeze(0)
        return self.forward(x)[0].cpu().numpy().astype(np.float32)

    def load_state_dict(self, state, strict: bool = True):  # accepts numpy arrays straight off the wire
        state = {k: torch.as_tensor(v) for k, v in state.items()}
        return nn.Module.load_state_dict(self, state, strict=strict)
