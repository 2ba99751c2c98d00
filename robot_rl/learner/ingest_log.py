"""The learner's ingest log: an append-only file of received transition batches, fsynced before they are acked.

Why: acknowledging a transition must mean "it survives a crash", and one append + one fsync is the cheapest
durable write there is (zarr's columns cost ~100 ms per append). The replay's zarr store is written behind,
in large appends; once its commit covers a log record, the record is trimmed (whole segment files deleted).
After a crash the replay is zarr's committed rows + the log records from zarr's `lsn` on, each exactly once.

Layout: `<dir>/seg-<first lsn, 20 digits>.log`, each a sequence of records
    u32 payload length | u32 crc32 of the payload | payload
    payload = u32 header length | msgpack header | array bytes (C order, in header["arrays"] order)
    header  = {lsn, sender, stream, seq, n, end, arrays: [[name, numpy dtype str, row shape], ...]}
`lsn` numbers records 0, 1, 2, ... across segments; `seqs` = seq .. seq+n-1 minus none (rows held back from the
replay are not in the record; `end` is the stream's next expected seq after it). A torn or corrupt record (a crash
mid-write) ends its segment: everything before it is intact, nothing after it was acknowledged. New appends
always start a new segment, so they never follow a torn tail.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np

log = logging.getLogger(__name__)

_PREFIX = struct.Struct("<II")  # payload length, crc32
_HLEN = struct.Struct("<I")
SEGMENT_GLOB = "seg-*.log"
DEFAULT_SEGMENT_BYTES = 64 << 20


@dataclass
class Record:
    """One received batch as stored: rows `seqs` (possibly fewer than received) and the stream's `end`."""

    sender: str
    stream: object
    seqs: np.ndarray
    arrays: dict[str, np.ndarray]
    end: int
    lsn: int = -1


def _segment_name(first_lsn: int) -> str:
    return f"seg-{first_lsn:020d}.log"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode(rec: Record, lsn: int) -> list:
    arrays = {k: np.ascontiguousarray(v) for k, v in rec.arrays.items()}
    seq0 = int(rec.seqs[0]) if len(rec.seqs) else int(rec.end)
    contiguous = len(rec.seqs) == 0 or int(rec.seqs[-1]) - seq0 + 1 == len(rec.seqs)
    header = {
        "lsn": lsn,
        "sender": rec.sender,
        "stream": rec.stream,
        "seq": seq0,
        "n": len(rec.seqs),
        "end": int(rec.end),
        "arrays": [[k, a.dtype.str, list(a.shape[1:])] for k, a in arrays.items()],
    }
    bufs = [memoryview(a).cast("B") for a in arrays.values()]
    if not contiguous:  # rows were held back from the middle of the batch: store the seqs explicitly
        seqs = np.ascontiguousarray(rec.seqs, dtype=np.int64)
        header["seqs"] = True
        bufs.append(memoryview(seqs).cast("B"))
    head = msgpack.packb(header)
    parts = [_HLEN.pack(len(head)), head, *bufs]
    crc, length = 0, 0
    for p in parts:
        crc = zlib.crc32(p, crc)
        length += len(p)
    return [_PREFIX.pack(length, crc), *parts]


def _decode(payload: memoryview) -> Record:
    (hlen,) = _HLEN.unpack_from(payload, 0)
    h = msgpack.unpackb(payload[_HLEN.size : _HLEN.size + hlen])
    off, n, arrays = _HLEN.size + hlen, int(h["n"]), {}
    for name, dtype, shape in h["arrays"]:
        dt = np.dtype(dtype)
        count = n * int(np.prod(shape, dtype=np.int64))
        arrays[name] = np.frombuffer(payload, dt, count, off).reshape(n, *shape)
        off += count * dt.itemsize
    if h.get("seqs"):
        seqs = np.frombuffer(payload, np.int64, n, off)
    else:
        seqs = np.arange(int(h["seq"]), int(h["seq"]) + n, dtype=np.int64)
    return Record(h["sender"], h["stream"], seqs, arrays, int(h["end"]), int(h["lsn"]))


def _scan(path: Path) -> Iterator[Record]:
    """The intact records of one segment file, stopping at a torn or corrupt one."""
    data = memoryview(path.read_bytes())
    off = 0
    while off + _PREFIX.size <= len(data):
        length, crc = _PREFIX.unpack_from(data, off)
        payload = data[off + _PREFIX.size : off + _PREFIX.size + length]
        if len(payload) < length or zlib.crc32(payload) != crc:
            log.warning(
                "ingest log %s: torn record at byte %d (a crash mid-write): ignoring the rest of the "
                "segment, which was never acknowledged",
                path.name,
                off,
            )
            return
        yield _decode(payload)
        off += _PREFIX.size + length


def _first_lsn(path: Path) -> int:
    return int(path.stem.split("-")[1])


class LogTail:
    """Reads the records another process appends, in lsn order, up to a bound the writer says is durable (a
    record being written is never read half). Deletes the segments zarr has committed (never the newest: the
    writer may still append to it)."""

    def __init__(self, directory: str | os.PathLike, from_lsn: int = 0):
        self.dir = Path(directory)
        self.next_lsn = from_lsn  # the next record wanted
        self._path: Path | None = None
        self._offset = 0
        self._last: dict[Path, int] = {}  # segment -> last lsn read from it

    def read(self, upto_lsn: int | None = None) -> list[Record]:
        """Every new record with lsn < upto_lsn (None: every whole record there is)."""
        out: list[Record] = []
        while upto_lsn is None or self.next_lsn < upto_lsn:
            paths = sorted(self.dir.glob(SEGMENT_GLOB))
            if not paths:
                return out
            if self._path is None or not self._path.exists():
                holding = [p for p in paths if _first_lsn(p) <= self.next_lsn]
                self._path, self._offset = (holding[-1] if holding else paths[0]), 0
            with open(self._path, "rb") as f:
                f.seek(self._offset)
                data = memoryview(f.read())
            off = 0
            while off + _PREFIX.size <= len(data) and (upto_lsn is None or self.next_lsn < upto_lsn):
                length, crc = _PREFIX.unpack_from(data, off)
                payload = data[off + _PREFIX.size : off + _PREFIX.size + length]
                if len(payload) < length or zlib.crc32(payload) != crc:
                    break  # being written: read again later (in a closed segment: torn by a crash, skipped)
                rec = _decode(payload)
                off += _PREFIX.size + length
                if rec.lsn >= self.next_lsn:
                    out.append(rec)
                    self.next_lsn = rec.lsn + 1
            self._offset += off
            newer = [p for p in paths if p > self._path]
            if not newer or (upto_lsn is not None and self.next_lsn >= upto_lsn):
                return out  # the newest segment: its writer may append more
            self._path, self._offset = newer[0], 0
        return out

    def trim(self, below_lsn: int, newest_too: bool = False) -> int:
        """Delete segments all of whose records have lsn < below_lsn (zarr committed them); the newest one only
        with `newest_too` (its writer has stopped) and once read to its end. Returns files deleted."""
        paths = sorted(self.dir.glob(SEGMENT_GLOB))
        deleted = 0
        for i, path in enumerate(paths):
            if i < len(paths) - 1:
                last = _first_lsn(paths[i + 1]) - 1
            elif newest_too and path.stat().st_size == 0:
                last = -1
            elif newest_too and path == self._path and self._offset >= path.stat().st_size:
                last = self.next_lsn - 1
            else:
                continue
            if last < below_lsn:
                path.unlink(missing_ok=True)
                if path == self._path:
                    self._path, self._offset = None, 0
                deleted += 1
        return deleted


class IngestLog:
    """Append-only, fsynced batches. Thread-safe: one thread appends, another trims."""

    def __init__(self, directory: str | os.PathLike, segment_bytes: int = DEFAULT_SEGMENT_BYTES, start_lsn: int = 0):
        """`segment_bytes`: a segment this large is closed and the next append starts a new one (a closed segment
        is deleted once zarr holds all its records; the active one is deleted when zarr has caught up).
        `start_lsn`: the lowest lsn a new record may get — the replay's committed lsn, since zarr may hold
        records whose segments are gone: numbering must go on after them, never restart."""
        self.dir = Path(directory)
        self.segment_bytes = int(segment_bytes)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._segments: dict[Path, int] = {}  # closed segment -> its last lsn
        self.next_lsn = 0
        for path in self._paths():
            last = -1
            for rec in _scan(path):
                last = rec.lsn
            first = int(path.stem.split("-")[1])
            self._segments[path] = last if last >= 0 else first - 1
            self.next_lsn = max(self.next_lsn, last + 1, first)
        self.next_lsn = max(self.next_lsn, int(start_lsn))
        self._fd: int | None = None
        self._active: Path | None = None
        self._active_last = -1
        self.bytes_written = 0

    def _paths(self) -> list[Path]:
        return sorted(self.dir.glob(SEGMENT_GLOB))

    def records(self, from_lsn: int = 0) -> Iterator[Record]:
        """Every intact record with lsn >= from_lsn, in order (what zarr has not committed yet)."""
        for path in self._paths():
            if self._segments.get(path, self.next_lsn) < from_lsn:
                continue
            for rec in _scan(path):
                if rec.lsn >= from_lsn:
                    yield rec

    def append(self, records: list[Record]) -> list[int]:
        """Write the records and fsync once; returns their lsns. Durable when this returns. On OSError (e.g.
        ENOSPC) the segment is cut back to its last whole record and the error is raised: nothing is acked."""
        with self._lock:
            if self._fd is None:
                self._active = self.dir / _segment_name(self.next_lsn)
                self._fd = os.open(self._active, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                _fsync_dir(self.dir)
            start = os.lseek(self._fd, 0, os.SEEK_END)
            lsns, written = [], 0
            try:
                for rec in records:
                    parts = _encode(rec, self.next_lsn + len(lsns))
                    total = sum(len(p) for p in parts)
                    n = os.writev(self._fd, parts)
                    if n != total:  # a short write: finish it (writev may stop early on big buffers)
                        rest = b"".join(bytes(p) for p in parts)[n:]
                        while rest:
                            k = os.write(self._fd, rest)
                            if k <= 0:
                                raise OSError(errno.EIO, "short write to the ingest log")
                            rest = rest[k:]
                    written += total
                    lsns.append(self.next_lsn + len(lsns))
                os.fsync(self._fd)
            except OSError:
                try:
                    os.ftruncate(self._fd, start)
                except OSError:
                    pass
                raise
            self.next_lsn += len(lsns)
            self._active_last = lsns[-1] if lsns else self._active_last
            self.bytes_written += written
            if start + written >= self.segment_bytes:  # full: the next append starts a new segment
                self._close_active()
            return lsns

    def _close_active(self) -> None:
        os.close(self._fd)
        self._segments[self._active] = self._active_last
        self._fd, self._active, self._active_last = None, None, -1

    def trim(self, below_lsn: int) -> int:
        """Delete segments whose records all have lsn < below_lsn (zarr committed them); returns files deleted.
        The active segment, once fully committed, is closed and deleted too (the next append starts a new one)."""
        deleted = 0
        with self._lock:
            if self._fd is not None and self._active_last < below_lsn and self.next_lsn <= below_lsn:
                self._close_active()
            for path, last in list(self._segments.items()):
                if last < below_lsn:
                    try:
                        path.unlink()
                    except FileNotFoundError:
                        pass
                    del self._segments[path]
                    deleted += 1
        return deleted

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._paths() if p.exists())

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                self._close_active()
