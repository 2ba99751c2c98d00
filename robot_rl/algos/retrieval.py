"""Behavior retrieval (Du, Nair, Sadigh, Finn; RSS 2023): a few demos of a new task pull the transitions that look
like them out of a large unlabelled "prior" store; a policy then trains on both at 50/50 per batch.

    1. embedder   a β-VAE over one transition x = (s, a) of the prior, trained on the prior only:
                      loss = mean ‖dec(z) − x̃‖²  +  β · KL(q(z | s, a) ‖ N(0, I)),   z ~ q = N(μ(s, a), σ²(s, a))
                  x̃: the normalised low-dim observation ⊕ normalised action ⊕ each camera image average-pooled to
                  recon_image_size²; images are encoded by a conv net trained from scratch (policies/encoders.py)
    2. embedding  e(s, a) = μ(s, a) ⊕ a           (the encoder mean and the raw action, as BR's compute_embeddings)
    3. distance   d(x) = min over target transitions t of ‖e(x) − e(t)‖₂, computed block by block on the device
    4. score      (max d − d) / (max d − min d) over the prior: 1 = the closest prior transition, 0 = the farthest
    5. selection  score ≥ δ (BR: 0.75-0.85), or the top_k, or the top_fraction highest scores, or d ≤ radius,
                  or (rule=target_quantile, the default) d ≤ r_q, a radius calibrated on the target alone:
                      ℓ(t) = min over transitions u of the OTHER target episodes of ‖e(t) − e(u)‖₂  (leave one out)
                      r_q  = the q-quantile of ℓ over the target's transitions
                  "as close to the demos as the demos are to each other": a new demo of the same behaviour would
                  have about a share q of its transitions kept, whatever else the prior holds
    6. training   `robot-rl train train.data=[target,selection] train.weights=[0.5,0.5]` (data/mixture.py)

The caller (robot_rl/commands/retrieve.py) fits `StateActionVAE` with `vae_loss` on the offline training loop,
caches the prior's embeddings next to the store, and writes the selection and its report.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robot_rl.interfaces import OBS_PREFIX, Feature
from robot_rl.policies.encoders import ObsEncoder

RULES = ("threshold", "top_k", "top_fraction", "radius", "target_quantile")
MIN_STD = 1e-2  # normaliser floor: constant observation entries are not blown up


@dataclass
class RetrievalConfig:
    """The algorithm's settings (defaults: configs/retrieve.yaml, `retrieve.embedder` and `retrieve.select`)."""

    latent_dim: int  # BR: 14 low-dim, 128 images
    hidden: list[int]  # encoder MLP widths (the decoder mirrors them); BR: [300, 400]
    kl_weight: float  # β; BR: 1e-4
    recon_image_size: int  # images are reconstructed average-pooled to this many pixels a side
    image: dict  # ObsEncoder settings for the cameras (feature_dim, channels, strides, ...)
    rule: str  # threshold | top_k | top_fraction | radius | target_quantile
    threshold: float  # δ for rule=threshold, on the [0, 1] score
    top_k: int
    top_fraction: float
    radius: float  # rule=radius: the distance d itself (not min-max scaled, so no outlier moves it)
    target_quantile: float  # rule=target_quantile: q of the target's leave-one-episode-out distances
    chunk_size: int  # prior rows per distance block on the device

    @classmethod
    def from_sections(cls, embedder: Mapping, select: Mapping) -> RetrievalConfig:
        merged = {**dict(embedder), **dict(select)}
        v = {f.name: merged.get(f.name) for f in fields(cls)}
        v["hidden"] = [int(h) for h in v["hidden"]]
        v["image"] = dict(v["image"] or {})
        return cls(**v)


# -------------------------------------------------------------------------------------------------- embedder


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-2], sizes[-1]))


class StateActionVAE(nn.Module):
    """β-VAE over (observation, action). Batches use store names (`obs.<key>`, `action`), shape (N, ...); images
    uint8 (N, H, W, C). The normaliser lives in buffers, so the weights file is the whole embedder."""

    def __init__(self, obs_features: Mapping[str, Feature], action: Feature, cfg: RetrievalConfig):
        super().__init__()
        self.obs_keys = sorted(obs_features)  # store names
        self.lowdim = {k: int(np.prod(f.shape)) for k, f in obs_features.items() if not f.is_image}
        self.images = {k: tuple(f.shape) for k, f in obs_features.items() if f.is_image}
        self.lowdim_keys, self.image_keys = sorted(self.lowdim), sorted(self.images)
        self.action_dim = int(np.prod(action.shape))
        self.latent_dim, self.r = int(cfg.latent_dim), int(cfg.recon_image_size)
        img = {k: self.images[k] for k in self.image_keys}
        self.obs_encoder = ObsEncoder({k: self.lowdim[k] for k in self.lowdim_keys}, img, **cfg.image)
        n_low = sum(self.lowdim.values())
        recon = n_low + self.action_dim + sum(s[2] * self.r * self.r for s in img.values())
        self.encoder = _mlp([self.obs_encoder.out_dim + self.action_dim, *cfg.hidden, 2 * self.latent_dim])
        self.decoder = _mlp([self.latent_dim, *cfg.hidden[::-1], recon])
        self.register_buffer("obs_mean", torch.zeros(n_low))
        self.register_buffer("obs_std", torch.ones(n_low))
        self.register_buffer("action_mean", torch.zeros(self.action_dim))
        self.register_buffer("action_std", torch.ones(self.action_dim))

    @property
    def embedding_dim(self) -> int:
        return self.latent_dim + self.action_dim

    def fit_normalizer(self, column) -> None:
        """Mean/std of the low-dim observation and the action over the prior; `column(key)` -> (N, ...)."""
        if self.lowdim_keys:
            low = np.concatenate(
                [np.asarray(column(k), np.float64).reshape(-1, self.lowdim[k]) for k in self.lowdim_keys], 1
            )
            self.obs_mean.copy_(torch.as_tensor(low.mean(0)))
            self.obs_std.copy_(torch.as_tensor(np.maximum(low.std(0), MIN_STD)))
        act = np.asarray(column("action"), np.float64).reshape(-1, self.action_dim)
        self.action_mean.copy_(torch.as_tensor(act.mean(0)))
        self.action_std.copy_(torch.as_tensor(np.maximum(act.std(0), MIN_STD)))

    def _inputs(self, batch: Mapping[str, torch.Tensor]) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """Normalised observations for the encoder (lowdim split back per key, images (N, C, H, W) in [-.5, .5]),
        the normalised action, and the reconstruction target x̃."""
        n = batch["action"].shape[0]
        obs: dict[str, torch.Tensor] = {}
        if self.lowdim_keys:
            low = torch.cat([batch[k].reshape(n, -1).float() for k in self.lowdim_keys], 1)
            low = (low - self.obs_mean) / self.obs_std
            obs.update(zip(self.lowdim_keys, low.split([self.lowdim[k] for k in self.lowdim_keys], 1)))
        else:
            low = torch.zeros(n, 0, device=self.obs_mean.device)
        pooled = []
        for k in self.image_keys:
            obs[k] = batch[k].permute(0, 3, 1, 2).float() / 255.0 - 0.5
            pooled.append(F.adaptive_avg_pool2d(obs[k], self.r).reshape(n, -1))
        action = (batch["action"].reshape(n, -1).float() - self.action_mean) / self.action_std
        return obs, action, torch.cat([low, action, *pooled], 1)

    def encode(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> μ, log σ², and the reconstruction target x̃."""
        obs, action, target = self._inputs(batch)
        mu, logvar = self.encoder(torch.cat([self.obs_encoder(obs), action], 1)).chunk(2, dim=1)
        return mu, logvar.clamp(-20.0, 10.0), target


def vae_loss(vae: StateActionVAE, batch: Mapping[str, torch.Tensor], kl_weight: float):
    """Reconstruction + β·KL, BR's objective (robomimic VAE: mean squared error, kl_weight 1e-4)."""
    mu, logvar, target = vae.encode(batch)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    recon = F.mse_loss(vae.decoder(z), target)
    kl = (-0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp())).sum(1).mean()
    return recon + kl_weight * kl, {"recon": recon.item(), "kl": kl.item()}


@torch.no_grad()
def embed(vae: StateActionVAE, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """e(s, a) = μ(s, a) ⊕ a (raw action)."""
    mu, _, _ = vae.encode(batch)
    return torch.cat([mu, batch["action"].reshape(mu.shape[0], -1).float()], 1)


@torch.no_grad()
def embed_blocks(
    vae: StateActionVAE, blocks: Iterable[dict[str, np.ndarray]], device: torch.device, batch_size: int
) -> np.ndarray:
    """Embeddings (N, latent + action) of transitions handed over in blocks of arrays (store names)."""
    was = vae.training
    vae.eval()
    out = []
    for block in blocks:
        n = len(block["action"])
        for a in range(0, n, batch_size):
            part = {
                k: torch.as_tensor(np.ascontiguousarray(v[a : a + batch_size])).to(device) for k, v in block.items()
            }
            out.append(embed(vae, part).cpu().numpy())
    vae.train(was)
    return np.concatenate(out) if out else np.zeros((0, vae.embedding_dim), np.float32)


def transition_keys(obs_keys: Iterable[str]) -> list[str]:
    """Store keys the embedder reads: the observation keys (store names) and the action."""
    return [OBS_PREFIX + k if not k.startswith(OBS_PREFIX) else k for k in obs_keys] + ["action"]


# ------------------------------------------------------------------------------------------ scoring, selection


@torch.no_grad()
def nearest_distance(
    prior: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, chunk_size: int, device: torch.device
) -> np.ndarray:
    """d_i = min_j ‖prior_i − target_j‖₂, `chunk_size` prior rows at a time on `device` (memory: chunk × targets),
    so a 1M-row prior never needs a 1M × targets matrix. The nearest j comes from one matmul per block,
    ‖x − t‖² = ‖x‖² − 2 x·t + ‖t‖² (both centred on the target mean to keep the cancellation small); the distance
    to it is then taken directly, ‖x − t_j‖, so a prior row equal to a target row is at exactly 0."""
    t = torch.as_tensor(target, dtype=torch.float32).to(device)
    centre = t.mean(0)
    t = t - centre
    t_sq = (t * t).sum(1)
    prior_t = torch.as_tensor(prior, dtype=torch.float32)
    out = torch.empty(len(prior_t), dtype=torch.float32)
    for a in range(0, len(prior_t), int(chunk_size)):
        x = prior_t[a : a + chunk_size].to(device, non_blocking=True) - centre
        nearest = torch.addmm(t_sq, x, t.T, alpha=-2.0).argmin(1)  # ‖t‖² − 2 x·t; ‖x‖² is the same for every j
        out[a : a + len(x)] = (x - t[nearest]).norm(dim=1).cpu()
    return out.numpy()


def scores_from_distances(d: np.ndarray) -> np.ndarray:
    """Min-max normalised over the prior: 1 at the nearest prior transition, 0 at the farthest (BR)."""
    lo, hi = float(d.min()), float(d.max())
    return np.ones_like(d) if hi - lo <= 0 else ((hi - d) / (hi - lo)).astype(np.float32)


def target_radius(
    target: np.ndarray, episode_ends: np.ndarray, q: float, chunk_size: int, device: torch.device
) -> tuple[float, np.ndarray]:
    """(r_q, ℓ): ℓ(t) = distance of each target transition to the nearest transition of the other target episodes
    (leave one episode out, chunked like the prior's scoring), r_q = their q-quantile. Needs >= 2 episodes."""
    ends = np.asarray(episode_ends, np.int64)
    if len(ends) < 2:
        raise ValueError(f"a radius calibrated on the target needs at least 2 target episodes, got {len(ends)}")
    starts = np.concatenate([[0], ends[:-1]])
    loo = [
        nearest_distance(target[a:b], np.concatenate([target[:a], target[b:]]), chunk_size, device)
        for a, b in zip(starts, ends)
    ]
    loo = np.concatenate(loo)
    return float(np.quantile(loo, q)), loo


def select(
    scores: np.ndarray, distances: np.ndarray, cfg: RetrievalConfig, calibrated_radius: float | None = None
) -> np.ndarray:
    """Indices (ascending) of the kept prior transitions under cfg.rule; may be empty (δ above 1, a small radius).
    rule=target_quantile keeps d <= `calibrated_radius` (from `target_radius`)."""
    if cfg.rule == "threshold":
        return np.flatnonzero(scores >= cfg.threshold)
    if cfg.rule in ("radius", "target_quantile"):
        r = cfg.radius if cfg.rule == "radius" else calibrated_radius
        if r is None:
            raise ValueError("rule=target_quantile needs the radius calibrated on the target (target_radius)")
        return np.flatnonzero(distances <= r)
    k = int(cfg.top_k) if cfg.rule == "top_k" else int(np.ceil(float(cfg.top_fraction) * len(scores)))
    k = min(max(k, 0), len(scores))
    if k == 0:
        return np.zeros(0, np.int64)
    return np.sort(np.argpartition(-scores, k - 1)[:k])


def pca_2d(x: np.ndarray, fit_on: np.ndarray) -> np.ndarray:
    """Project onto the first two principal components of `fit_on` (the pictures' 2-D view)."""
    mean = fit_on.mean(0)
    _, _, vt = np.linalg.svd(fit_on - mean, full_matrices=False)
    return (x - mean) @ vt[:2].T
