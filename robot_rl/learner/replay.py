"""The learner's replay: every received transition, in memory for sampling and in a zarr store on disk.

Why on disk: the learner acknowledges a transition only after it is stored, so a learner killed at any moment
restarts with exactly what it acknowledged and tells each control process where to resume (exactly once).

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

COMMIT_FILE = "commit.json"
SEQ_KEY = "_seq"
SENDER_KEY = "_sender"


class ReplayStore:
    def __init__(self, path: str | os.PathLike, chunk_rows: int = 1024):
        self.path = Path(path)
        self.chunk_rows = chunk_rows
        self._lock = threading.Lock()
        self._senders: list[str] = []  # sender index -> sender id
        self.next_expected: dict[str, int] = {}
        self._mem: dict[str, np.ndarray] = {}
        self.size = 0
        self._group = None
        self._open()  # memory buffers grow by doubling

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
            self._mem[key] = self._grow(None, arr[:n], max(n, 1024))
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

    @staticmethod
    def _grow(buf: np.ndarray | None, rows: np.ndarray, need: int) -> np.ndarray:
        """Return a buffer of capacity >= need holding `rows` at its start (when buf is None)."""
        if buf is not None and buf.shape[0] >= need:
            return buf
        cap = max(1024, 1 << (max(need, 1) - 1).bit_length())
        new = np.empty((cap, *rows.shape[1:]), dtype=rows.dtype)
        if buf is None:
            new[: len(rows)] = rows
        else:
            new[: buf.shape[0]] = buf
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
            arr = self._group[key]
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
