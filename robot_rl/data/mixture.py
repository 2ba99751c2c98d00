"""Training windows drawn from several datasets with mixing weights (behavior retrieval's 50/50 batches).

A `WindowSource` is one dataset's windows: a `SequenceSampler` over the episodes it loaded, optionally restricted
to some of their steps (a retrieve selection: the windows of the selected steps, their observation history and
action chunk taken from the real episode around them). `MixtureSampler` draws every batch from its sources:

    weights given  (e.g. [0.5, 0.5]): each batch holds round(w_i * B) windows of source i (largest remainder, so
                   the counts always add up to B), as BehaviorRetrieval welds one target batch to one retrieved
                   batch with no loss weights;
    weights None:  uniform over the union of all windows (each batch's counts drawn multinomially by size), i.e.
                   the sources simply concatenated: the "uniform mixing" baseline.

With one source and no weights a batch is exactly `SequenceSampler.sample`'s (same RNG draws).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from robot_rl.data.sequence import SequenceSampler


@dataclass
class WindowSource:
    name: str
    sampler: SequenceSampler
    steps: np.ndarray | None = None  # rows of `sampler` to draw from (None: all)

    def __len__(self) -> int:
        return len(self.sampler) if self.steps is None else len(self.steps)

    def rows(self, t: np.ndarray) -> np.ndarray:
        return t if self.steps is None else self.steps[t]

    def sample(self, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return self.sampler.get(self.rows(rng.integers(0, len(self), size=n)))

    def column(self, key: str) -> np.ndarray:
        """The rows of `key` this source draws from (what a normaliser should see)."""
        x = self.sampler.data[key]
        return x if self.steps is None else x[self.steps]


def check_weights(weights: Sequence[float] | None, n: int, what: str = "weights") -> np.ndarray | None:
    """Normalised mixing weights, or None (uniform over all windows); ValueError saying what is wrong."""
    if weights is None:
        return None
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"{what} has {len(w)} entries for {n} datasets; give one weight per dataset")
    if not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"{what}={w}: weights must be finite, >= 0 and not all 0")
    return np.asarray(w) / sum(w)


class MixtureSampler:
    def __init__(self, sources: Sequence[WindowSource], weights: Sequence[float] | None = None):
        if not sources:
            raise ValueError("a mixture needs at least one dataset")
        empty = [s.name for s in sources if len(s) == 0]
        if empty:
            raise ValueError(f"datasets without windows: {', '.join(empty)}")
        self.sources = list(sources)
        self.weights = check_weights(weights, len(self.sources))
        self.sizes = np.array([len(s) for s in self.sources], np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self.sizes)])

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def counts(self, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        """Windows of each source in one batch of `batch_size`."""
        if len(self.sources) == 1:
            return np.array([batch_size])
        if self.weights is None:
            return rng.multinomial(batch_size, self.sizes / self.sizes.sum())
        exact = self.weights * batch_size
        n = np.floor(exact).astype(np.int64)
        short = batch_size - int(n.sum())
        n[np.argsort(-(exact - n), kind="stable")[:short]] += 1  # largest remainders get the leftover windows
        return n

    def sample(self, batch_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        parts = [s.sample(int(k), rng) for s, k in zip(self.sources, self.counts(batch_size, rng)) if k > 0]
        return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get(self, t: np.ndarray) -> dict[str, np.ndarray]:
        """Windows by global index over the sources laid end to end (inspection, tests)."""
        t = np.asarray(t, np.int64)
        which = np.searchsorted(self._offsets, t, side="right") - 1
        out: dict[str, np.ndarray] = {}
        for i in np.unique(which):
            mask = which == i
            part = self.sources[i].sampler.get(self.sources[i].rows(t[mask] - self._offsets[i]))
            for k, v in part.items():
                out.setdefault(k, np.empty((len(t), *v.shape[1:]), v.dtype))[mask] = v
        return out

    def column(self, key: str) -> np.ndarray:
        cols = [s.column(key) for s in self.sources]
        return cols[0] if len(cols) == 1 else np.concatenate(cols)


def store_windows(
    name: str,
    store,
    keys: Sequence[str],
    episodes: Sequence[int],
    selected: tuple[np.ndarray, np.ndarray] | None = None,
    **horizons,
) -> WindowSource:
    """The windows of some episodes of an episode store, all their steps or only the `selected` (episode, step)
    pairs that fall in them (a selection's rows; the windows still reach into the unselected steps around)."""
    episodes = [int(e) for e in episodes]
    sampler = SequenceSampler.from_store(store, keys, episodes=episodes, **horizons)
    if selected is None:
        return WindowSource(name, sampler)
    ep, step = (np.asarray(x, np.int64) for x in selected)
    lengths = np.array([b - a for a, b in map(store.episode_bounds, episodes)], np.int64)
    first_row = dict(zip(episodes, np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()))
    keep = np.isin(ep, episodes)
    rows = np.array([first_row[e] for e in ep[keep].tolist()], np.int64) + step[keep]
    return WindowSource(name, sampler, np.sort(rows))
