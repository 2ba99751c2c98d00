"""Training windows from recorded episodes: `obs_horizon` past observations and `action_horizon` actions.

One window per recorded step t. Observation rows t-To+1..t, action rows t+action_start..t+action_start+Ha-1
(`action_start=-(To-1)` is diffusion_policy's convention: the action chunk starts with the oldest observation).
Rows outside the episode repeat its first/last row, and `action_is_pad` marks the repeated actions so a loss
can ignore them. Everything is gathered with one fancy index per key from arrays held in memory (images stay
uint8), so a batch costs a few memcpy's, not a Python loop over samples.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from robot_rl.data.episode_store import EpisodeStore


class SequenceSampler:
    def __init__(
        self,
        data: dict[str, np.ndarray],
        episode_ends: np.ndarray,
        obs_keys: Iterable[str],
        action_keys: Iterable[str] = ("action",),
        obs_horizon: int = 2,
        action_horizon: int = 16,
        action_start: int | None = None,
    ):
        self.obs_keys, self.action_keys = list(obs_keys), list(action_keys)
        for k in [*self.obs_keys, *self.action_keys]:
            if k not in data:
                raise KeyError(f"no key {k!r} in the data; keys: {', '.join(data)}")
        if obs_horizon < 1 or action_horizon < 1:
            raise ValueError("obs_horizon and action_horizon must be >= 1")
        self.data = data
        self.obs_horizon, self.action_horizon = int(obs_horizon), int(action_horizon)
        self.action_start = -(self.obs_horizon - 1) if action_start is None else int(action_start)
        ends = np.asarray(episode_ends, dtype=np.int64)
        starts = np.concatenate([[0], ends[:-1]])
        lengths = ends - starts
        self.num_steps = int(ends[-1]) if len(ends) else 0
        self._ep_start = np.repeat(starts, lengths)  # per step: its episode's first row...
        self._ep_end = np.repeat(ends, lengths)  # ...and one past its last
        self._obs_off = np.arange(-self.obs_horizon + 1, 1)
        self._act_off = np.arange(self.action_start, self.action_start + self.action_horizon)

    @classmethod
    def from_store(
        cls,
        store: EpisodeStore,
        obs_keys: Iterable[str],
        action_keys: Iterable[str] = ("action",),
        episodes: Iterable[int] | None = None,
        **kw,
    ) -> SequenceSampler:
        """Load the needed keys of (some) episodes into memory."""
        keys = [*obs_keys, *action_keys]
        if episodes is None:
            data = {k: store.array(k) for k in keys}
            ends = store.episode_ends
        else:
            eps = [store.episode(i, keys) for i in episodes]
            data = {k: np.concatenate([e[k] for e in eps]) for k in keys}
            ends = np.cumsum([len(e[keys[0]]) for e in eps])
        return cls(data, ends, obs_keys, action_keys, **kw)

    def __len__(self) -> int:
        return self.num_steps

    def get(self, t: np.ndarray) -> dict[str, np.ndarray]:
        """Windows for the steps `t` (B,): obs keys (B, To, ...), action keys (B, Ha, ...), action_is_pad (B, Ha)."""
        t = np.asarray(t, dtype=np.int64)
        lo, hi = self._ep_start[t][:, None], self._ep_end[t][:, None] - 1
        obs_idx = np.clip(t[:, None] + self._obs_off, lo, hi)
        raw_act = t[:, None] + self._act_off
        act_idx = np.clip(raw_act, lo, hi)
        out = {k: self.data[k][obs_idx] for k in self.obs_keys}
        out.update({k: self.data[k][act_idx] for k in self.action_keys})
        out["action_is_pad"] = (raw_act < lo) | (raw_act > hi)
        return out

    def sample(self, batch_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return self.get(rng.integers(0, self.num_steps, size=batch_size))


class SequenceDataset:
    """torch-style map dataset over the windows (for a DataLoader with workers/shuffling)."""

    def __init__(self, sampler: SequenceSampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.sampler.get(np.array([i])).items()}
