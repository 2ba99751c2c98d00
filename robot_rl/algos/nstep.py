"""Transition pools for off-policy RL with n-step returns, over data stored once per step (no next-observation copy).

A row is one control step: the observation, the base action, the executed action, reward and success. The
next observation is simply the next row of the same episode, found through `next_idx`; images are therefore
stored once (uint8) and never duplicated as "next_obs". A row can start a transition if it is terminal (task
solved: reward given, no bootstrap) or has a successor. The last row of an episode cut by the time limit (or a
stop) has no successor, so it is never a start, but it still serves as the bootstrap state of earlier rows.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from robot_rl.algos.base import SENDER_KEY, ReplayView


class EpisodeLinks:
    """`next_idx` for rows appended in order, possibly interleaved from several senders (robots).

    Row j follows row i when both come from the same sender and episode and j's step is i's step + 1 — so a
    control process restarted after a crash (episode/step numbering starting again) never links across runs.
    """

    def __init__(self):
        self.next_idx = np.full(1024, -1, dtype=np.int64)
        self.size = 0
        self._last: dict[int, tuple[int, int, int]] = {}  # sender -> (row, episode, step) of its newest row

    def extend(self, sender: np.ndarray, episode: np.ndarray, step: np.ndarray) -> None:
        """Link the rows [size, size + len(sender)); arrays are those rows' columns."""
        n, start = len(sender), self.size
        if start + n > len(self.next_idx):
            grown = np.full(max(2 * len(self.next_idx), start + n), -1, dtype=np.int64)
            grown[:start] = self.next_idx[:start]
            self.next_idx = grown
        rows = np.arange(start, start + n)
        for s in np.unique(sender):
            mine = np.flatnonzero(sender == s)
            r, ep, st = rows[mine], episode[mine], step[mine]
            prev_r, prev_ep, prev_st = np.empty_like(r), np.empty_like(ep), np.empty_like(st)
            prev_r[1:], prev_ep[1:], prev_st[1:] = r[:-1], ep[:-1], st[:-1]
            prev_r[0], prev_ep[0], prev_st[0] = self._last.get(int(s), (-1, -1, -2))
            linked = (prev_r >= 0) & (prev_ep == ep) & (prev_st + 1 == st)
            self.next_idx[prev_r[linked]] = r[linked]
            self._last[int(s)] = (int(r[-1]), int(ep[-1]), int(st[-1]))
        self.size = start + n


class Pool:
    """A set of rows to sample transitions from: column getter + reward/terminal/next links."""

    def __init__(
        self,
        column: Callable[[str], np.ndarray],
        reward: np.ndarray,
        terminal: np.ndarray,
        next_idx: np.ndarray,
        starts: np.ndarray,
    ):
        self.column, self.reward, self.terminal, self.next_idx = column, reward, terminal, next_idx
        self.starts = starts  # row indices that can start a transition

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], episode_ends: np.ndarray) -> Pool:
        """Whole episodes laid out back to back (a demo buffer); `reward` and `success` columns required."""
        n = len(arrays["reward"])
        next_idx = np.arange(1, n + 1, dtype=np.int64)
        next_idx[np.asarray(episode_ends, dtype=np.int64) - 1] = -1
        terminal = np.asarray(arrays["success"], dtype=bool)
        starts = np.flatnonzero(terminal | (next_idx >= 0))
        return cls(arrays.__getitem__, np.asarray(arrays["reward"], np.float32), terminal, next_idx, starts)

    def __len__(self) -> int:
        return len(self.starts)

    def nstep(self, idx: np.ndarray, n: int, gamma: float) -> dict[str, np.ndarray]:
        """n-step return from each start row: sum of discounted rewards up to n steps or the first terminal row,
        the row to bootstrap from and its discount (gamma^h, 0 after a terminal row)."""
        cur = np.asarray(idx, dtype=np.int64)
        ret = np.zeros(len(cur), dtype=np.float32)
        disc = np.ones(len(cur), dtype=np.float32)
        boot = cur.copy()
        active = np.ones(len(cur), dtype=bool)
        done = np.zeros(len(cur), dtype=bool)
        for _ in range(n):
            ret += np.where(active, disc * self.reward[cur], 0.0)
            term = active & self.terminal[cur]
            done |= term
            go = active & ~term
            nxt = self.next_idx[cur]
            boot = np.where(go, nxt, boot)
            disc = np.where(go, disc * gamma, disc)
            # keep accumulating only through rows that can themselves start a transition
            can = go & (nxt >= 0)
            can[can] &= self.terminal[nxt[can]] | (self.next_idx[nxt[can]] >= 0)
            active = can
            cur = np.where(active, nxt, cur)
        return {"return": ret, "boot": boot, "discount": np.where(done, 0.0, disc).astype(np.float32)}


class RLPDSampler:
    """RLPD's symmetric sampling: `demo_fraction` of every batch from the demonstrations (plus, optionally, the
    online steps where a human took over), the rest from online data; each row with its n-step return."""

    def __init__(
        self,
        demos: Pool,
        obs_keys: list[str],
        action_keys: list[str],
        n_step: int,
        gamma: float,
        batch_size: int,
        demo_fraction: float,
        interventions_to_demos: bool,
    ):
        self.demos, self.obs_keys, self.action_keys = demos, list(obs_keys), list(action_keys)
        self.n_step, self.gamma, self.batch_size = n_step, gamma, batch_size
        self.demo_fraction, self.interventions_to_demos = demo_fraction, interventions_to_demos
        self.links = EpisodeLinks()

    def online_pool(self, replay: ReplayView) -> Pool:
        """The learner's replay as a pool (links extended incrementally as rows arrive)."""
        n = replay.size
        if self.links.size < n:
            a = self.links.size
            self.links.extend(replay.column(SENDER_KEY)[a:n], replay.column("episode")[a:n], replay.column("step")[a:n])
        terminal = replay.column("success")[:n].astype(bool)
        next_idx = self.links.next_idx[:n]
        starts = np.flatnonzero(terminal | (next_idx >= 0))
        return Pool(replay.column, replay.column("reward")[:n].astype(np.float32), terminal, next_idx, starts)

    def gather(self, pool: Pool, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `idx`: obs.<k>, next.<k> (the bootstrap row), the action keys and next_<key>, return, discount."""
        ns = pool.nstep(idx, self.n_step, self.gamma)
        out = {}
        for k in self.obs_keys:
            col = pool.column("obs." + k)
            out["obs." + k], out["next." + k] = col[idx], col[ns["boot"]]
        for k in self.action_keys:
            col = pool.column(k)
            out[k], out["next_" + k] = col[idx], col[ns["boot"]]
        out["return"], out["discount"] = ns["return"], ns["discount"]
        return out

    def sample(self, replay: ReplayView, rng: np.random.Generator) -> dict[str, np.ndarray]:
        online = self.online_pool(replay)
        n_demo = int(round(self.batch_size * self.demo_fraction)) if len(online) else self.batch_size
        sources = [(self.demos, self.demos.starts)]
        if self.interventions_to_demos and len(online):
            took_over = online.starts[replay.column("intervention")[online.starts].astype(bool)]
            if len(took_over):
                sources.append((online, took_over))
        sizes = np.array([len(s) for _, s in sources], dtype=float)
        parts = []
        for (pool, starts), k in zip(sources, rng.multinomial(n_demo, sizes / sizes.sum())):
            if k:
                parts.append(self.gather(pool, starts[rng.integers(0, len(starts), k)]))
        if self.batch_size - n_demo:
            parts.append(self.gather(online, online.starts[rng.integers(0, len(online), self.batch_size - n_demo)]))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
