"""The learner's replay buffer: every stored transition, in memory for sampling and in a zarr store on disk.

Two steps, so that acknowledging a transition never waits on zarr: `extend` puts a batch into the in-memory
columns (the learner calls it once the batch is durable in its ingest log, robot_rl/learner/ingest_log.py), and
`flush` writes every row not yet on disk to zarr in one large append per column and commits. `append` does both
(one synchronous batch: tests, tools).

Identity: each row records its control process (`_sender`, an index into `senders`) and its stream (`_stream`,
an index into `streams`) and seq (`_seq`); `next_expected[(sender, stream)]` is where each stream resumes, so a
restarted learner tells every sender exactly what it still needs.

Schema: the first batch fixes the keys, dtypes and row shapes (`schema`, persisted in commit.json); a batch with
another schema is refused (ValueError) and a zarr column is never resized to another row shape.

Memory: every column is one numpy array. Give the expected number of transitions (`preallocate_rows=`, a hint,
not a limit) and exactly that is allocated up front; without it (or past it) the arrays grow by doubling up to
64k rows and by 1.25x beyond, so a large buffer has room for at most 25 % more rows than it holds.
`memory_bytes()` says how much is used and allocated.

Crash consistency: zarr's LocalStore writes every chunk and metadata file atomically (temp file + rename); the
filesystem is synced, then `commit.json` — replaced atomically, written last — says how many rows are committed,
where each stream resumes and up to which ingest-log record (`lsn`) the rows reach. Rows past the committed count
(a crash mid-flush) are cut on open; the ingest log's records from `lsn` on bring them back.
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
from pathlib import Path

import numpy as np
import zarr

from robot_rl.algos.base import SENDER_KEY  # the column naming each row's control process (ReplayView's contract)
from robot_rl.learner.schema import Schema, schema_of, schema_problem  # noqa: F401  (part of this module's API)

COMMIT_FILE = "commit.json"
SEQ_KEY = "_seq"
STREAM_KEY = "_stream"
DEFAULT_STREAM = None  # rows stored before streams existed (and `append` without one): the receiver applies
# this stream's next expected seq to the first stream its sender presents
MIN_ROWS = 1024  # smallest allocation without a preallocation hint
DOUBLING_LIMIT = 1 << 16  # grow by 2x up to this many rows, by 1.25x beyond
READ_ROWS = 4096  # rows read from disk at a time when reopening (no whole-column temporary copy)
SMALL_ROW_BYTES = 4096  # rows smaller than this are chunked `chunk_rows` at a time, bigger ones (images) by 64
BIG_ROW_CHUNK = 64
CHUNK_BYTES = 1 << 18  # ...or more rows, up to chunks of this size: zarr's cost is per chunk written (a 7-float
# column in 1024-row chunks made write-behind cost ~26 us per transition, half that now)


def next_capacity(cap: int, need: int) -> int:
    """Smallest capacity >= need reached from `cap` by the growth rule: 2x up to 64k rows, then 1.25x."""
    cap = max(int(cap), 1)
    while cap < need:
        if cap < DOUBLING_LIMIT:
            cap = min(2 * cap, DOUBLING_LIMIT)
        else:
            cap += -(-cap // 4)  # ceil(cap * 1.25)
    return cap


def sync_filesystem(path: Path) -> None:
    """Flush the filesystem holding `path` to the device (Linux syncfs; elsewhere a global sync): zarr's chunk
    files must be durable before commit.json says they are, or a power cut could trim the log too early."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            if ctypes.CDLL(None, use_errno=True).syncfs(fd) == 0:
                return
        except (AttributeError, OSError):
            pass
        os.sync()
    finally:
        os.close(fd)


class ReplayBuffer:
    """Implements the algorithms' read-only `ReplayView` (size, keys, column, sample) over what was stored."""

    def __init__(self, path: str | os.PathLike, chunk_rows: int = 1024, preallocate_rows: int | None = None):
        """`preallocate_rows`: rows to allocate in memory up front (the expected number of transitions); the
        buffer still accepts more (growing past it), and never drops any."""
        if preallocate_rows is not None and int(preallocate_rows) < 1:
            raise ValueError(f"preallocate_rows must be >= 1 (or None), got {preallocate_rows!r}")
        self.path = Path(path)
        self.chunk_rows = chunk_rows
        self.preallocate_rows = None if preallocate_rows is None else int(preallocate_rows)
        self._lock = threading.Lock()  # memory columns and counters (extend/sample/flush's snapshot)
        self._flush_lock = threading.Lock()  # one flush at a time
        self.senders: list[str] = []  # sender index -> sender id
        self.streams: list = []  # stream index -> stream id
        self.next_expected: dict[tuple[str, object], int] = {}
        self.schema: Schema | None = None
        self.lsn = 0  # ingest-log records applied to the memory columns (the log's numbering)
        self._mem: dict[str, np.ndarray] = {}
        self.size = 0
        self.disk_rows = 0  # rows committed to zarr
        self.disk_lsn = 0  # ingest-log records whose rows are all committed to zarr
        self.disk_next_expected: dict[tuple[str, object], int] = {}
        self._group = None
        self._arrays: dict[str, zarr.Array] = {}
        self._open()

    # ------------------------------------------------------------------ disk
    def _open(self) -> None:
        commit_path = self.path / COMMIT_FILE
        self.path.mkdir(parents=True, exist_ok=True)
        self._group = zarr.open_group(zarr.storage.LocalStore(str(self.path)), mode="a")
        if not commit_path.exists():
            return
        commit = json.loads(commit_path.read_text())
        n = int(commit["rows"])
        self.senders = list(commit["senders"])
        self.streams = list(commit.get("streams", [DEFAULT_STREAM]))
        ne = commit["next_expected"]
        if isinstance(ne, dict):  # written before streams existed: sender -> next
            self.next_expected = {(s, DEFAULT_STREAM): int(v) for s, v in ne.items()}
        else:
            self.next_expected = {(s, st): int(v) for s, st, v in ne}
        self.lsn = self.disk_lsn = int(commit.get("lsn", 0))
        keys = list(commit["keys"])
        for key in keys:
            arr = self._group[key]
            if arr.shape[0] != n:  # a crash mid-flush left uncommitted rows: cut them
                arr.resize((n, *arr.shape[1:]))
            buf = np.empty((self._capacity_for(0, n), *arr.shape[1:]), dtype=arr.dtype)
            for a in range(0, n, READ_ROWS):
                buf[a : min(n, a + READ_ROWS)] = arr[a : min(n, a + READ_ROWS)]
            self._mem[key] = buf
        if n and STREAM_KEY not in self._mem:  # rows written before streams existed: the default stream
            self._mem[STREAM_KEY] = np.zeros(self._mem[SEQ_KEY].shape[0], np.int32)
            self._write_column(STREAM_KEY, self._mem[STREAM_KEY], 0, n)
        if "schema" in commit:
            self.schema = {k: (d, tuple(s)) for k, (d, s) in commit["schema"].items()}
        elif n:
            self.schema = {k: (v.dtype.str, v.shape[1:]) for k, v in self._mem.items() if not k.startswith("_")}
        self.size = self.disk_rows = n
        self.disk_next_expected = dict(self.next_expected)

    def _commit(self, state: dict) -> None:
        tmp = self.path / (COMMIT_FILE + ".tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path / COMMIT_FILE)
        except OSError:
            tmp.unlink(missing_ok=True)  # a full disk leaves the last commit, and no half-written file
            raise

    def _write_column(self, key: str, buf: np.ndarray, start: int, end: int) -> None:
        """Rows [start, end) of one column to zarr (created on first use with the column's row shape)."""
        row_shape = buf.shape[1:]
        arr = self._arrays.get(key)
        if arr is None:
            if key not in self._group:
                row_bytes = max(1, buf[:1].nbytes)
                chunk = max(self.chunk_rows if row_bytes < SMALL_ROW_BYTES else BIG_ROW_CHUNK, CHUNK_BYTES // row_bytes)
                self._group.create_array(key, shape=(0, *row_shape), dtype=buf.dtype, chunks=(chunk, *row_shape))
            arr = self._arrays[key] = self._group[key]  # opening reads metadata from disk: once per key
        if arr.shape[1:] != row_shape or arr.dtype != buf.dtype:  # never reshape a column on disk
            raise ValueError(
                f"replay column {key!r} on disk is {arr.dtype} {arr.shape[1:]}, refusing to write "
                f"{buf.dtype} {row_shape} rows into it"
            )
        if arr.shape[0] != end:
            arr.resize((end, *row_shape))
        arr[start:end] = buf[start:end]

    def flush(self) -> int:
        """Write every row not yet on disk to zarr (one append per column) and commit; returns rows written.
        Safe to call from another thread than `extend`'s: it works on a snapshot taken under the lock."""
        with self._flush_lock:
            with self._lock:
                start, end, lsn = self.disk_rows, self.size, self.lsn
                cols = dict(self._mem)  # references: rows below `end` never change, growth copies them
                state = {
                    "rows": end,
                    "keys": sorted(cols),
                    "senders": list(self.senders),
                    "streams": list(self.streams),
                    "next_expected": [[s, st, v] for (s, st), v in self.next_expected.items()],
                    "schema": None if self.schema is None else {k: [d, list(s)] for k, (d, s) in self.schema.items()},
                    "lsn": lsn,
                }
                next_expected = dict(self.next_expected)
            if end == start and lsn == self.disk_lsn:
                return 0
            for key, buf in cols.items():
                if end > start:
                    self._write_column(key, buf, start, end)
            sync_filesystem(self.path)
            self._commit(state)
            self.disk_rows, self.disk_lsn, self.disk_next_expected = end, lsn, next_expected
            return end - start

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
    def check_schema(self, sender_id: str, arrays: dict[str, np.ndarray]) -> None:
        """Raise ValueError (naming the difference) if a batch does not fit the replay's schema."""
        if self.schema is None:
            return
        problem = schema_problem(self.schema, schema_of(arrays))
        if problem:
            raise ValueError(
                f"sender {sender_id!r} sent a batch whose {problem}: every control process feeding "
                "one learner must use the same robot observation/action features"
            )

    def extend(
        self,
        sender_id: str,
        seqs: np.ndarray,
        arrays: dict[str, np.ndarray],
        stream=DEFAULT_STREAM,
        end: int | None = None,
        lsn: int | None = None,
    ) -> int:
        """Add one batch to the memory columns (not to disk: see `flush`); returns the stream's highest handled
        seq. `end`: the stream's next expected seq after this batch when rows were held back (quarantined) —
        by default the last row's seq + 1. `lsn`: the ingest-log record this batch came from."""
        n_new = len(seqs)
        if n_new:
            self.check_schema(sender_id, arrays)
        if end is None:
            end = int(seqs[-1]) + 1
        cols = {k: np.asarray(v) for k, v in arrays.items()}
        with self._lock:
            if sender_id not in self.senders:
                self.senders.append(sender_id)
            if stream not in self.streams:
                self.streams.append(stream)
            if n_new:
                cols[SEQ_KEY] = np.asarray(seqs, dtype=np.int64)
                cols[SENDER_KEY] = np.full(n_new, self.senders.index(sender_id), dtype=np.int32)
                cols[STREAM_KEY] = np.full(n_new, self.streams.index(stream), dtype=np.int32)
                if self.schema is None:
                    self.schema = schema_of(arrays)
                start, stop = self.size, self.size + n_new
                for key, value in cols.items():
                    buf = self._grow(self._mem.get(key), value[:0], stop)
                    buf[start:stop] = value
                    self._mem[key] = buf
                self.size = stop
            self.next_expected[(sender_id, stream)] = int(end)
            if lsn is not None:
                self.lsn = max(self.lsn, int(lsn) + 1)
        return int(end) - 1

    def append(self, sender_id: str, seqs: np.ndarray, arrays: dict[str, np.ndarray], stream=DEFAULT_STREAM) -> int:
        """Store one batch in memory and on disk, synchronously; returns the stream's highest stored seq."""
        upto = self.extend(sender_id, seqs, arrays, stream)
        self.flush()
        return upto

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

    def snapshot(self) -> ReplaySnapshot:
        """The rows held now, as a ReplayView that does not grow while the feeder thread appends."""
        with self._lock:
            return ReplaySnapshot(self.size, dict(self._mem))

    def seqs_by_stream(self) -> dict[tuple[str, object], np.ndarray]:
        """The stored seqs of each (sender, stream), in storage order."""
        if not self.size:
            return {}
        with self._lock:
            seq, snd = self._mem[SEQ_KEY][: self.size], self._mem[SENDER_KEY][: self.size]
            stm = self._mem[STREAM_KEY][: self.size]
            return {
                (s, st): seq[(snd == i) & (stm == j)]
                for i, s in enumerate(self.senders)
                for j, st in enumerate(self.streams)
                if ((snd == i) & (stm == j)).any()
            }

    def seqs_by_sender(self) -> dict[str, np.ndarray]:
        """The stored seqs of each sender (all its streams), in storage order."""
        if not self.size:
            return {}
        with self._lock:
            seq, snd = self._mem[SEQ_KEY][: self.size], self._mem[SENDER_KEY][: self.size]
            return {s: seq[snd == i] for i, s in enumerate(self.senders)}


class ReplaySnapshot:
    """A ReplayView fixed at `size` rows. What the learner hands an algorithm for one update or one publish: every
    column it reads has the same rows (the replay's feeder thread appends meanwhile; a column read a moment later
    would be longer, e.g. online BC's labels vs its label mask). Rows below `size` are never rewritten, and a
    buffer replaced when the replay grows keeps them, so the views stay valid."""

    def __init__(self, size: int, mem: dict[str, np.ndarray]):
        self.size, self._mem = int(size), mem

    def keys(self) -> list[str]:
        return sorted(k for k in self._mem if not k.startswith("_"))

    def column(self, key: str) -> np.ndarray:
        return self._mem[key][: self.size]

    def sample(self, batch_size: int, rng: np.random.Generator, keys: list[str]) -> dict[str, np.ndarray]:
        idx = rng.integers(0, self.size, size=batch_size)
        return {k: self._mem[k][idx] for k in keys}
