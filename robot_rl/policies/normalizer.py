"""Per-key normalisation held as torch buffers, so the statistics travel inside the policy's state_dict
(and hence inside `model.safetensors`): a checkpoint never needs the training data to act.

Modes (diffusion_policy's conventions):

* ``minmax`` (actions and low-dim observations, the default): ``x -> 2 (x - min) / (max - min) - 1``, i.e. the
  data range maps onto [-1, 1]; that is what the diffusion model's ``clip_sample`` (to [-1, 1]) assumes for
  actions. An entry whose range is below ``eps`` (a constant input) maps to ``x - (min + max) / 2`` — 0 on the
  data — instead of dividing by ~0.
* ``meanstd`` (optional for low-dim observations): ``x -> (x - mean) / max(std, eps)``.
* ``image``: uint8 HxWxC in [0, 255] -> float CxHxW in [-1, 1] (``x / 255 * 2 - 1``), a fixed map with no
  statistics (diffusion_policy's image range normaliser; no ImageNet mean/std because the encoder is trained
  from scratch).

Keys are the policy's own names (robot observation names without the ``obs.`` store prefix, and ``action``);
buffer names replace '.' (not allowed in a torch buffer name) so any key works.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

MODES = ("minmax", "meanstd", "image")


def _buffer_name(key: str, stat: str) -> str:
    return f"{key.replace('.', '__dot__')}__{stat}"


class Normalizer(nn.Module):
    """`normalize(key, x)` / `unnormalize(key, x)` over the trailing dims of `x` (any leading batch/time dims)."""

    def __init__(self, specs: Mapping[str, tuple[str, tuple[int, ...]]], eps: float = 1e-4):
        """`specs`: key -> (mode, per-entry stat shape); image keys need no stats (shape ignored)."""
        super().__init__()
        self.eps = float(eps)
        self.modes: dict[str, str] = {}
        for key, (mode, shape) in specs.items():
            if mode not in MODES:
                raise ValueError(f"normalizer mode for {key!r} must be one of {MODES}, got {mode!r}")
            self.modes[key] = mode
            if mode == "image":
                continue
            shape = tuple(int(s) for s in shape)
            # defaults are the identity map: min -1 / max 1, mean 0 / std 1
            self.register_buffer(_buffer_name(key, "min"), -torch.ones(shape))
            self.register_buffer(_buffer_name(key, "max"), torch.ones(shape))
            self.register_buffer(_buffer_name(key, "mean"), torch.zeros(shape))
            self.register_buffer(_buffer_name(key, "std"), torch.ones(shape))

    # -------------------------------------------------------------------------------------------------- stats
    def stat(self, key: str, name: str) -> torch.Tensor:
        return getattr(self, _buffer_name(key, name))

    def fit(self, data: Mapping[str, np.ndarray | torch.Tensor]) -> Normalizer:
        """Compute every non-image key's min/max/mean/std from `data[key]` of shape (N, *stat_shape)."""
        for key, mode in self.modes.items():
            if mode == "image":
                continue
            if key not in data:
                raise KeyError(f"normalizer.fit: no data for {key!r}")
            x = torch.as_tensor(np.asarray(data[key]), dtype=torch.float64)
            shape = tuple(self.stat(key, "min").shape)
            x = x.reshape(-1, *shape)
            if len(x) == 0:
                raise ValueError(f"normalizer.fit: no rows for {key!r}")
            self.set_stats(key, minimum=x.amin(0), maximum=x.amax(0), mean=x.mean(0), std=x.std(0, correction=0))
        return self

    def set_stats(self, key: str, *, minimum=None, maximum=None, mean=None, std=None) -> None:
        for name, value in (("min", minimum), ("max", maximum), ("mean", mean), ("std", std)):
            if value is not None:
                buf = self.stat(key, name)
                buf.copy_(torch.as_tensor(np.asarray(value), dtype=buf.dtype).reshape(buf.shape))

    def stats(self) -> dict[str, dict[str, np.ndarray]]:
        return {
            k: {s: self.stat(k, s).cpu().numpy() for s in ("min", "max", "mean", "std")}
            for k, m in self.modes.items()
            if m != "image"
        }

    # ------------------------------------------------------------------------------------------------ mapping
    def _scale_offset(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """y = x * scale + offset."""
        if self.modes[key] == "minmax":
            lo, hi = self.stat(key, "min"), self.stat(key, "max")
            rng = hi - lo
            const = rng < self.eps
            scale = torch.where(const, torch.ones_like(rng), 2.0 / torch.where(const, torch.ones_like(rng), rng))
            offset = torch.where(const, -(lo + hi) / 2, -1.0 - lo * scale)
            return scale, offset
        std = self.stat(key, "std").clamp_min(self.eps)
        return 1.0 / std, -self.stat(key, "mean") / std

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        if self.modes[key] == "image":  # (..., H, W, C) uint8 -> (..., C, H, W) float in [-1, 1]
            x = x.float() * (2.0 / 255.0) - 1.0
            return x.movedim(-1, -3)
        scale, offset = self._scale_offset(key)
        return x.float() * scale + offset

    def unnormalize(self, key: str, y: torch.Tensor) -> torch.Tensor:
        if self.modes[key] == "image":  # (..., C, H, W) in [-1, 1] -> (..., H, W, C) float in [0, 255]
            return ((y.float() + 1.0) * (255.0 / 2.0)).movedim(-3, -1)
        scale, offset = self._scale_offset(key)
        return (y.float() - offset) / scale
