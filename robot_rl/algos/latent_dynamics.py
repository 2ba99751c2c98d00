"""A learned dynamics model in a policy encoder's feature space, for off-policy evaluation (RL-100 §1.6, MOPO/MBPO
style): an ensemble of MLPs, each predicting a Gaussian over (next feature − feature, reward) and a termination
logit from (feature, action chunk). The `num_elites` members with the lowest held-out error are the ones rolled.

Why an ensemble with elites: single models exploit their own errors when a policy is rolled through them; sampling
a random elite per step spreads the rollout over what the members agree on (Chua et al. 2018, MBPO).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robot_rl.algos.ensemble import EnsembleLinear

LOGVAR_MIN, LOGVAR_MAX = -10.0, 1.0  # soft bounds of the predicted log-variance (in standardised units)


@dataclass
class DynamicsConfig:
    """Every setting, its default and meaning: configs/rl100.yaml (`rl100.dynamics`)."""

    members: int
    elites: int
    hidden: list
    lr: float
    steps: int
    batch_size: int
    val_fraction: float


class EnsembleDynamics(nn.Module):
    """(z, a) -> per member: mean and log-variance of [Δz, r] (standardised) and a done logit. Inputs and targets
    are standardised with the training data's statistics (buffers, saved with the weights)."""

    def __init__(self, obs_dim: int, action_dim: int, members: int, elites: int, hidden: list[int]):
        super().__init__()
        self.obs_dim, self.members = obs_dim, members
        out = obs_dim + 1  # Δz and reward
        layers: list[nn.Module] = []
        last = obs_dim + action_dim
        for width in hidden:
            layers += [EnsembleLinear(members, last, width), nn.SiLU()]
            last = width
        self.body = nn.Sequential(*layers)
        self.head = EnsembleLinear(members, last, 2 * out + 1)
        for name, dim in (("in", obs_dim + action_dim), ("out", out)):
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_std", torch.ones(dim))
        self.register_buffer("elite_idx", torch.arange(elites))

    def _forward(self, z: torch.Tensor, a: torch.Tensor):
        x = (torch.cat([z, a], -1) - self.in_mean) / self.in_std
        for layer in self.body:
            x = layer(x) if isinstance(layer, EnsembleLinear) else layer(x)
        h = self.head(x)  # (E, B, 2 * out + 1)
        d = self.obs_dim + 1
        mean, logvar, done_logit = h[..., :d], h[..., d : 2 * d], h[..., -1]
        logvar = LOGVAR_MAX - F.softplus(LOGVAR_MAX - logvar)
        logvar = LOGVAR_MIN + F.softplus(logvar - LOGVAR_MIN)
        return mean, logvar, done_logit

    def loss(self, z, a, z_next, r, done) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian NLL of the standardised targets + BCE of termination, summed over members; also the per-member
        MSE of the mean (for choosing elites)."""
        target = (torch.cat([z_next - z, r[..., None]], -1) - self.out_mean) / self.out_std
        mean, logvar, done_logit = self._forward(z, a)
        nll = (((mean - target) ** 2) * torch.exp(-logvar) + logvar).mean((1, 2))
        bce = F.binary_cross_entropy_with_logits(done_logit, done.expand_as(done_logit), reduction="none").mean(1)
        return (nll + bce).sum(), ((mean - target) ** 2).mean((1, 2)).detach()

    @torch.no_grad()
    def step(self, z: torch.Tensor, a: torch.Tensor, generator: torch.Generator | None = None):
        """One sampled transition per row from a random elite: (next z, reward, done)."""
        mean, logvar, done_logit = self._forward(z, a)
        b = z.shape[0]
        pick = self.elite_idx[torch.randint(len(self.elite_idx), (b,), generator=generator, device="cpu")]
        rows = torch.arange(b)
        mean, std = mean[pick, rows], (0.5 * logvar[pick, rows]).exp()
        noise = torch.randn(mean.shape, generator=generator, device="cpu").to(mean.device)
        out = (mean + std * noise) * self.out_std + self.out_mean
        return z + out[:, :-1], out[:, -1], done_logit[pick, rows] > 0

    def fit(self, data: dict[str, np.ndarray], cfg: DynamicsConfig, seed: int, log=None) -> dict:
        """Train on {obs, action, next_obs, reward, done} (numpy), hold out `val_fraction` of the rows, keep the
        `elites` members with the lowest held-out mean error. Returns the held-out errors."""
        dev = self.in_mean.device
        t = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32, device=dev) for k, v in data.items()}
        n = t["obs"].shape[0]
        rng = np.random.default_rng(seed)
        perm = rng.permutation(n)
        n_val = min(max(int(cfg.val_fraction * n), 1), n - 1)
        val, train = perm[:n_val], perm[n_val:]
        x = torch.cat([t["obs"], t["action"]], -1)[train]
        y = torch.cat([t["next_obs"] - t["obs"], t["reward"][:, None]], -1)[train]
        self.in_mean.copy_(x.mean(0))
        self.in_std.copy_(x.std(0).clamp_min(1e-3))
        self.out_mean.copy_(y.mean(0))
        self.out_std.copy_(y.std(0).clamp_min(1e-3))
        opt = torch.optim.Adam(self.parameters(), lr=cfg.lr)
        for i in range(int(cfg.steps)):
            idx = torch.as_tensor(rng.choice(train, size=(self.members, cfg.batch_size)), device=dev)
            # every member its own bootstrap batch: (E, B, ...) inputs go through the ensemble layers per member
            batch = {k: v[idx] for k, v in t.items()}
            loss, _ = self.loss(batch["obs"], batch["action"], batch["next_obs"], batch["reward"], batch["done"])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"dynamics loss is {loss.item()} at step {i}; lower rl100.dynamics.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if log is not None and (i + 1) % 500 == 0:
                log(i + 1, loss.item())
        with torch.no_grad():
            v = {k: x[torch.as_tensor(val, device=dev)] for k, x in t.items()}
            _, mse = self.loss(v["obs"], v["action"], v["next_obs"], v["reward"], v["done"])
        self.elite_idx.copy_(torch.argsort(mse)[: len(self.elite_idx)])
        return {"val_mse": mse.tolist(), "elites": self.elite_idx.tolist()}
