"""Pieces of a resumable offline run: learning-rate schedules and RNG states that survive a JSON round trip."""

from __future__ import annotations

import base64
import math

import numpy as np
import torch


def rng_to_json(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode()


def rng_from_json(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


SCHEDULES = ("cosine", "constant")


def lr_lambda(warmup: int, total: int, schedule: str):
    """LR multiplier: linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (or constant)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return step / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f
