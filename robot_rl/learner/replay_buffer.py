"""The learner's replay buffer: every received transition, in memory for sampling and in a zarr store on disk.

Why on disk: the learner acknowledges a transition only after it is stored, so a learner killed at any moment
restarts with exactly what it acknowledged and tells each control process where to resume (exactly once).

Memory: every column is one numpy array. Give the expected number of transitions (`preallocate_rows=`, a hint,
not a limit) and exactly that is allocated up front; without it (or past it) the arrays grow by doubling up to
64k rows and by 1.25x beyond, so a large buffer has room for at most 25 % more rows than it holds (doubling
alone: up to 100 %).
`memory_bytes()` says how much is used and allocated.

Crash consistency: zarr's LocalStore writes every chunk and metadata file atomically (temp file + rename), and
`commit.json` — also replaced atomically, and written last — says how many rows are committed and up to which
sequence number each sender is stored. Rows past the committed count (a crash mid-append) are cut on open.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import zarr

from robot_rl.algos.base import SENDER_KEY  # the column naming each row's control process (ReplayView's contract)

COMMIT_FILE = "commit.json"
SEQ_KEY = "_seq"
MIN_ROWS = 1024           # smallest allocation without a preallocation hint
DOUBLING_LIMIT = 1 << 16  # grow by 2x up to this many rows, by 1.25x beyond
READ_ROWS = 4096          # rows read from disk at a time when reopening (no whole-column temporary copy)


def next_capacity(cap: int, need: int) -> int:
    """Smallest capacity >= need reached from `cap` by the growth rule: 2x up to 64k rows, then 1.25x."""
    cap = max(int(cap), 1)
    while cap < need:
        if cap < DOUBLING_LIMIT:
            cap = min(2 * cap, DOUBLING_LIMIT)
        else:
            cap += -(-cap // 4)  # ceil(cap * 1.25)
    return cap


class ReplayBuffer:
    """Implements the algorithms' read-only `ReplayView` (size, keys, column, sample) over what `append` stored."""

    def __init__(self, path: str | os.PathLike, chunk_rows: int = 1024, preallocate_rows: int | None = None):
        """`preallocate_rows`: rows to allocate in memory up front (the expected number of transitions); the
        buffer still accepts more (growing past it), and never drops any."""
        if preallocate_rows is not None and int(preallocate_rows) < 1:
            raise ValueError(f"preallocate_rows must be >= 1 (or None), got {preallocate_rows!r}")
        self.path = Path(path)
        self.chunk_rows = chunk_rows
        self.preallocate_rows = None if preallocate_rows is None else int(preallocate_rows)
        self._lock = threading.Lock()
        self._senders: list[str] = []  # sender index -> sender id
        self.next_expected: dict[str, int] = {}
        self._mem: dict[str, np.ndarray] = {}
        self.size = 0
        self._group = None
        self._arrays: dict[str, zarr.Array] = {}
        self._open()

    # ------------------------------------------------------------------ disk
    def _open(self) -> None:
        commit_path = self.path / COMMIT_FILE
        if not commit_path.exists():
            self.path.mkdir(parents=True, exist_ok=True)
            self._group = zarr.open_group(zarr.storage.LocalStore(str(self.path)), mode="a")
            return
        commit = json.loads(commit_path.read_text())
        self._group = zarr.open_group(zarr.storage.LocalStore(str(self.path)), mode="a")
        n = int(commit["rows"])
        self._senders = list(commit["senders"])
        self.next_expected = {k: int(v) for k, v in commit["next_expected"].items()}
        for key in commit["keys"]:
            arr = self._group[key]
            if arr.shape[0] != n:  # a crash mid-append left uncommitted rows: cut them
                arr.resize((n, *arr.shape[1:]))
            buf = np.empty((self._capacity_for(0, n), *arr.shape[1:]), dtype=arr.dtype)
            for a in range(0, n, READ_ROWS):
                buf[a:min(n, a + READ_ROWS)] = arr[a:min(n, a + READ_ROWS)]
            self._mem[key] = buf
        self.size = n

    def _commit(self) -> None:
        commit = {
            "rows": self.size,
            "keys": sorted(self._mem),
            "senders": self._senders,
            "next_expected": self.next_expected,
        }
        tmp = self.path / (COMMIT_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(commit, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / COMMIT_FILE)

    def _capacity_for(self, current: int, need: int) -> int:
        """Rows to allocate for `need` rows, given a buffer of `current` rows (0: none yet)."""
        if current == 0:
            current = self.preallocate_rows if self.preallocate_rows is not None else MIN_ROWS
            if need <= current:
                return current
        return next_capacity(current, need)

    def _grow(self, buf: np.ndarray | None, like: np.ndarray, need: int) -> np.ndarray:
        """`buf` if it has room for `need` rows, else a larger buffer holding its first `size` rows (the
        dtype/row shape of a new buffer comes from `like`)."""
        if buf is not None and buf.shape[0] >= need:
            return buf
        cap = self._capacity_for(0 if buf is None else buf.shape[0], need)
        new = np.empty((cap, *like.shape[1:]), dtype=like.dtype)
        if buf is not None:
            new[: self.size] = buf[: self.size]
        return new

    # ---------------------------------------------------------------- append
    def append(self, sender_id: str, seqs: np.ndarray, arrays: dict[str, np.ndarray]) -> int:
        """Store one batch durably; returns the sender's highest stored seq (what to acknowledge)."""
        n_new = len(seqs)
        if self.size and set(arrays) | {SEQ_KEY, SENDER_KEY} != set(self._mem):
            raise ValueError(
                f"sender {sender_id!r} sent keys {sorted(arrays)}, but this replay holds "
                f"{sorted(k for k in self._mem if not k.startswith('_'))}: every control process feeding one "
                "learner must use the same robot observation/action features"
            )
        if sender_id not in self._senders:
            self._senders.append(sender_id)
        cols = dict(arrays)
        cols[SEQ_KEY] = np.asarray(seqs, dtype=np.int64)
        cols[SENDER_KEY] = np.full(n_new, self._senders.index(sender_id), dtype=np.int32)
        start, end = self.size, self.size + n_new
        for key, value in cols.items():
            value = np.ascontiguousarray(value)
            if key not in self._group:
                chunk = self.chunk_rows if value[0].nbytes < 4096 else 64
                self._group.create_array(
                    key, shape=(0, *value.shape[1:]), dtype=value.dtype, chunks=(chunk, *value.shape[1:])
                )
            arr = self._arrays.get(key)
            if arr is None:  # opening an array reads its metadata from disk: once per key, not per batch
                arr = self._arrays[key] = self._group[key]
            arr.resize((end, *value.shape[1:]))
            arr[start:end] = value
        with self._lock:
            for key, value in cols.items():
                buf = self._grow(self._mem.get(key), value[:0], end)
                buf[start:end] = value
                self._mem[key] = buf
            self.size = end
        self.next_expected[sender_id] = int(seqs[-1]) + 1
        self._commit()
        return int(seqs[-1])

    # ---------------------------------------------------------------- access
    def keys(self) -> list[str]:
        return sorted(k for k in self._mem if not k.startswith("_"))

    def memory_bytes(self) -> tuple[int, int]:
        """(used, allocated) bytes of the in-memory columns: the `size` rows held, and the arrays' capacity."""
        with self._lock:
            used = sum(buf[: self.size].nbytes for buf in self._mem.values())
            allocated = sum(buf.nbytes for buf in self._mem.values())
        return used, allocated

    def column(self, key: str) -> np.ndarray:
        """A view of the first `size` rows of one key (do not write into it)."""
        with self._lock:
            return self._mem[key][: self.size]

    def sample(self, batch_size: int, rng: np.random.Generator, keys: list[str]) -> dict[str, np.ndarray]:
        with self._lock:
            idx = rng.integers(0, self.size, size=batch_size)
            return {k: self._mem[k][idx] for k in keys}

    def seqs_by_sender(self) -> dict[str, np.ndarray]:
        with self._lock:
            seq, snd = self._mem[SEQ_KEY][: self.size], self._mem[SENDER_KEY][: self.size]
            return {s: seq[snd == i] for i, s in enumerate(self._senders)}
