"""Off-policy evaluation for choosing among candidate policies: the AM-Q estimate (Uni-O4 / RL-100 §1.6), its
bootstrap interval, and the risk-return summary SCOPE-RL proposes for policy selection (SharpeRatio@k).

AM-Q ("approximate-model Q"): from dataset start features z_0, roll the candidate through the learned latent model
for H chunk steps and average the critic along the way, mean_h Q(z_h, π(z_h)). A rollout the model ends keeps its
last Q (a finished success keeps scoring as one). The chunks come from a fixed noise (a seeded generator), so two
candidates are compared on common random numbers: their difference is not blurred by sampling noise.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch


@torch.no_grad()
def am_q(
    act: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    q: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    dynamics,
    z0: torch.Tensor,
    horizon: int,
    seed: int,
) -> torch.Tensor:
    """Per-start-state AM-Q values (N,). `act(z, generator)` -> flat normalised chunk; `q(z, a)` -> (N,);
    `dynamics.step(z, a, generator)` -> (next z, reward, done)."""
    gen = torch.Generator().manual_seed(int(seed))
    z, done = z0, torch.zeros(z0.shape[0], dtype=torch.bool, device=z0.device)
    last, values = None, []
    for _ in range(int(horizon)):
        a = act(z, gen)
        value = q(z, a)
        value = value if last is None else torch.where(done, last, value)
        values.append(value)
        last = value
        z_next, _, d = dynamics.step(z, a, gen)
        z = torch.where(done[:, None], z, z_next)
        done = done | d.to(done.device)
    return torch.stack(values).mean(0)


def bootstrap_ci(values: np.ndarray, n_boot: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampling start states)."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(int(n_boot), len(values)))].mean(1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def sharpe_ratio_at_k(estimates, values, baseline: float, k: int) -> float | None:
    """SCOPE-RL's SharpeRatio@k (Kiyohara et al. 2023): the k candidates ranked best by `estimates`; their best
    `values` above the baseline (the behaviour/BC policy's value), per unit of their spread (std). High: the top-k
    by estimate hold a policy better than the baseline without risking bad ones. None when the spread is 0."""
    order = np.argsort(-np.asarray(estimates, dtype=np.float64), kind="stable")[: int(k)]
    top = np.asarray(values, dtype=np.float64)[order]
    std = float(top.std())
    return (float(top.max()) - baseline) / std if std > 0 else None


def spearman(x, y) -> float | None:
    """Spearman rank correlation (average ranks for ties); None for fewer than 2 points or a constant input."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return None

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for value in np.unique(v):  # ties share their average rank
            r[v == value] = r[v == value].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])
