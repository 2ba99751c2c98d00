"""Observation encoders for visuomotor policies, trained from scratch (no pretrained weights, nothing downloaded).

* `RandomShift`: DrQ's augmentation — replicate-pad by `pad` pixels, then crop back to the original size at a
  random integer offset per image (done with one `grid_sample` at exact pixel centres). Active only while the
  module is in training mode (`module.train()`); in eval mode it is the identity.
* `ConvImageEncoder`: a few 3x3 conv layers with GroupNorm + Mish (GroupNorm, not BatchNorm, so EMA weights and
  batch-size-1 inference behave), then a spatial softmax (keypoint x/y expectations, as robomimic/diffusion_policy)
  or global average pooling, then a linear projection to `feature_dim`.
* `ObsEncoder`: one image encoder per camera plus the (already normalised) low-dim vectors concatenated:
  dict of (N, ...) tensors -> (N, out_dim).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _groups(channels: int, n_groups: int) -> int:
    g = min(n_groups, channels)
    while channels % g:
        g -= 1
    return g


def module_key(key: str) -> str:
    """nn.ModuleDict keys may not contain '.'."""
    return key.replace(".", "__dot__")


class RandomShift(nn.Module):
    """(N, C, H, W) -> same shape, shifted by up to +-pad pixels (edges replicated); identity in eval mode."""

    def __init__(self, pad: int = 4):
        super().__init__()
        self.pad = int(pad)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.training or self.pad <= 0:
            return x
        n, _, h, w = x.shape
        p = self.pad
        x = F.pad(x, (p, p, p, p), mode="replicate")
        hp, wp = h + 2 * p, w + 2 * p
        # normalised coordinates of the padded image's pixel centres (align_corners=False), first h / w of them
        ys = torch.linspace(-1.0 + 1.0 / hp, 1.0 - 1.0 / hp, hp, device=x.device, dtype=x.dtype)[:h]
        xs = torch.linspace(-1.0 + 1.0 / wp, 1.0 - 1.0 / wp, wp, device=x.device, dtype=x.dtype)[:w]
        base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
        shift = torch.randint(0, 2 * p + 1, (n, 1, 1, 2), device=x.device, generator=generator).to(x.dtype)
        shift = shift * torch.tensor([2.0 / wp, 2.0 / hp], device=x.device, dtype=x.dtype)
        return F.grid_sample(x, base.unsqueeze(0) + shift, mode="bilinear", padding_mode="zeros", align_corners=False)


class SpatialSoftmax(nn.Module):
    """(N, C, H, W) -> (N, 2K): expected (x, y) in [-1, 1] of K learned keypoint heat maps."""

    def __init__(self, in_channels: int, num_keypoints: int = 32):
        super().__init__()
        self.keypoints = nn.Conv2d(in_channels, num_keypoints, 1)
        self.num_keypoints = num_keypoints

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        attn = torch.softmax(self.keypoints(x).flatten(2), dim=-1)  # (N, K, H*W)
        ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        ex = (attn * gx.reshape(1, 1, -1)).sum(-1)
        ey = (attn * gy.reshape(1, 1, -1)).sum(-1)
        return torch.cat([ex, ey], dim=-1)


class ConvImageEncoder(nn.Module):
    """Normalised image (N, C, H, W) -> features (N, feature_dim)."""

    def __init__(
        self,
        in_channels: int = 3,
        channels: Sequence[int] = (32, 64, 64, 64),
        strides: Sequence[int] = (2, 2, 1, 1),
        feature_dim: int = 64,
        pool: str = "spatial_softmax",
        num_keypoints: int = 32,
        n_groups: int = 8,
    ):
        super().__init__()
        if len(channels) != len(strides):
            raise ValueError(f"image encoder: channels {list(channels)} and strides {list(strides)} differ in length")
        if pool not in ("spatial_softmax", "avg"):
            raise ValueError(f"image encoder pool must be spatial_softmax or avg, got {pool!r}")
        layers, last = [], in_channels
        for c, s in zip(channels, strides):
            layers += [nn.Conv2d(last, c, 3, stride=s, padding=1), nn.GroupNorm(_groups(c, n_groups), c), nn.Mish()]
            last = c
        self.backbone = nn.Sequential(*layers)
        if pool == "spatial_softmax":
            self.pool = SpatialSoftmax(last, num_keypoints)
            pooled = 2 * num_keypoints
        else:
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            pooled = last
        self.proj = nn.Sequential(nn.Linear(pooled, feature_dim), nn.Mish())
        self.feature_dim = int(feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(self.backbone(x)))


class ObsEncoder(nn.Module):
    """Normalised observations (dict of (N, ...) tensors; images (N, C, H, W)) -> (N, out_dim).

    Low-dim keys are flattened and concatenated in `lowdim` order, then each camera's features in `images` order.
    """

    def __init__(
        self,
        lowdim: Mapping[str, int],
        images: Mapping[str, tuple[int, int, int]],
        feature_dim: int = 64,
        channels: Sequence[int] = (32, 64, 64, 64),
        strides: Sequence[int] = (2, 2, 1, 1),
        pool: str = "spatial_softmax",
        num_keypoints: int = 32,
        n_groups: int = 8,
        random_shift_pad: int = 4,
    ):
        super().__init__()
        self.lowdim_keys = list(lowdim)
        self.image_keys = list(images)
        self.shift = RandomShift(random_shift_pad)
        self.image_encoders = nn.ModuleDict(
            {
                module_key(k): ConvImageEncoder(
                    int(images[k][2]), channels, strides, feature_dim, pool, num_keypoints, n_groups
                )
                for k in self.image_keys
            }
        )
        self.out_dim = int(sum(lowdim.values())) + feature_dim * len(self.image_keys)

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        parts = [obs[k].reshape(obs[k].shape[0], -1) for k in self.lowdim_keys]
        for k in self.image_keys:
            parts.append(self.image_encoders[module_key(k)](self.shift(obs[k])))
        return torch.cat(parts, dim=-1)
