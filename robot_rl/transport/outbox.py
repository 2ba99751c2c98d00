"""The sender's outbox: every submitted transition on local disk until the learner acknowledges it.

A restarted control process (after a crash or SIGKILL) opens the same directory, gets the same stream id back and
resends, under the ORIGINAL stream and seqs, everything the learner has not acknowledged; new transitions continue
the numbering. With the learner's per-stream dedup this makes "what the robot did reaches the learner exactly
once" hold across control-process restarts. Layout of `<dir>` (docs/protocol.md, "Outbox"):

    stream.json          {"format": 1, "sender_id", "stream", "start_seq"}: written once, atomically
    acked                the highest seq the learner acknowledged (decimal text), replaced atomically
    seg-<seq0>.rec       append-only segments of records; <seq0> = first seq in the segment (20 digits)
    lock                 flock'ed by the live process (a second live sender on the same outbox is refused)

Record: ``b"RRLr" | u32 nframes | u64 payload length | u32 crc32(payload) | payload`` with payload =
``(u64 frame length | frame bytes) * nframes``, the frames being a wire `transitions` message (msgpack header
with seq/n + raw array frames, docs/protocol.md). A torn or corrupt record (a kill mid-write, a bad disk block)
fails its length or crc check: it and everything after it in that segment are dropped (and cut off the file).
Records are written before they are transmitted, so a torn record was never sent.

Durability: no fsync. The page cache survives a process kill (SIGKILL, segfault, OOM), which is what this guards
against; a power loss can lose the last records (if they had reached the learner, the restarted sender would reuse
their seqs and the learner would drop the new transitions as duplicates: the learner warns).
A segment is deleted once every seq in it is acknowledged, so the directory holds the unacknowledged data plus at
most one partly acknowledged segment.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .protocol import ProtocolError, decode_message, encode_message

log = logging.getLogger(__name__)

FORMAT = 1
_MAGIC = b"RRLr"
_HEAD = struct.Struct("<4sIQI")  # magic, nframes, payload length, crc32
_LEN = struct.Struct("<Q")
_SEG = re.compile(r"^seg-(\d{20})\.rec$")


@dataclass
class Record:
    seq0: int
    n: int
    arrays: dict[str, np.ndarray]  # stacked: leading axis n

    @property
    def end(self) -> int:
        return self.seq0 + self.n


@dataclass
class _Segment:
    seq0: int
    end: int  # one past the last seq written to it
    path: Path
    size: int


def encode_record(frames: list) -> bytes:
    parts = []
    for f in frames:
        mv = memoryview(f).cast("B")
        parts += [_LEN.pack(mv.nbytes), mv]
    payload = b"".join(parts)
    return _HEAD.pack(_MAGIC, len(frames), len(payload), zlib.crc32(payload)) + payload


def read_records(data: bytes) -> tuple[list[list[memoryview]], int]:
    """The complete, intact records at the start of `data` (as frame lists) and the byte offset where they end."""
    out, off, mv = [], 0, memoryview(data)
    while off + _HEAD.size <= len(mv):
        magic, nframes, plen, crc = _HEAD.unpack_from(mv, off)
        start = off + _HEAD.size
        if magic != _MAGIC or start + plen > len(mv) or zlib.crc32(mv[start : start + plen]) != crc:
            break
        frames, p, ok = [], start, True
        for _ in range(nframes):
            if p + _LEN.size > start + plen:
                ok = False
                break
            (flen,) = _LEN.unpack_from(mv, p)
            p += _LEN.size
            if p + flen > start + plen:
                ok = False
                break
            frames.append(mv[p : p + flen])
            p += flen
        if not ok or p != start + plen:
            break
        out.append(frames)
        off = start + plen
    return out, off


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Outbox:
    """Append-only local record of one sender's stream. Used by one thread (the TransitionSender's)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        sender_id: str,
        start_seq: int = 0,
        segment_bytes: int = 64 << 20,
        ack_write_interval_s: float = 0.1,
    ):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segment_bytes, self.ack_write_interval_s = int(segment_bytes), ack_write_interval_s
        self._lock_fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise RuntimeError(
                f"outbox {self.dir} is in use by another live process: each control process needs "
                "its own outbox directory"
            ) from None
        meta_path = self.dir / "stream.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("sender_id") != sender_id:
                self._unlock()
                raise ValueError(
                    f"outbox {self.dir} belongs to sender {meta.get('sender_id')!r}, not {sender_id!r}: "
                    "give each sender its own outbox directory"
                )
            self.stream, start = str(meta["stream"]), int(meta["start_seq"])
        else:
            self.stream, start = secrets.token_hex(8), int(start_seq)
            self._retire_leftovers()
            _write_atomic(
                meta_path,
                json.dumps({"format": FORMAT, "sender_id": sender_id, "stream": self.stream, "start_seq": start}),
            )
        self.sender_id = sender_id
        acked_path = self.dir / "acked"
        self.acked = int(acked_path.read_text().strip() or start - 1) if acked_path.exists() else start - 1
        self._acked_written, self._acked_t = self.acked, 0.0
        self.records: list[Record] = []  # unacked records found on open (the sender takes them over)
        self._segments: list[_Segment] = []
        self.next_seq = max(start, self.acked + 1)
        self.dropped = 0  # transitions lost to torn/corrupt records or a gap
        self._fd: int | None = None  # the active segment (the last one), opened on the first append
        self._load()  # may already delete fully acknowledged segments (and so close the active one)

    # ------------------------------------------------------------------------------------------------ open
    def _retire_leftovers(self) -> None:
        """Segments without a stream.json (a stream abandoned after a write error) are moved aside, not resent."""
        old = [p for p in self.dir.iterdir() if _SEG.match(p.name) or p.name == "acked"]
        if not old:
            return
        dest = self.dir / "abandoned" / time.strftime("%Y%m%d-%H%M%S")
        dest.mkdir(parents=True, exist_ok=True)
        for p in old:
            os.replace(p, dest / p.name)
        log.warning("outbox %s: %d files of an abandoned stream moved to %s (not resent)", self.dir, len(old), dest)

    def _load(self) -> None:
        paths = sorted(p for p in self.dir.iterdir() if _SEG.match(p.name))
        for i, path in enumerate(paths):
            seq0 = int(_SEG.match(path.name).group(1))
            data = path.read_bytes()
            frames_list, good = read_records(data)
            if good < len(data):
                log.warning(
                    "outbox %s: %s ends with %d bytes of a torn or corrupt record: dropped (a kill "
                    "mid-write; that record was never transmitted)",
                    self.dir,
                    path.name,
                    len(data) - good,
                )
                with open(path, "r+b") as f:
                    f.truncate(good)
                if i < len(paths) - 1:
                    log.error("outbox %s: corruption inside %s, which is not the last segment", self.dir, path.name)
            end = seq0
            for frames in frames_list:
                try:
                    msg = decode_message(frames)
                    s0, n = int(msg.header["seq"]), int(msg.header["n"])
                except (ProtocolError, KeyError, TypeError, ValueError) as e:
                    log.error("outbox %s: unreadable record in %s (%s): dropped", self.dir, path.name, e)
                    break
                end = s0 + n
                if end - 1 <= self.acked:
                    continue
                expected = self.records[-1].end if self.records else self.acked + 1
                if s0 > expected:
                    log.error(
                        "outbox %s: seqs %d..%d are missing from the records (a gap): the %d transitions "
                        "after it cannot be delivered in order and are dropped",
                        self.dir,
                        expected,
                        s0 - 1,
                        n,
                    )
                    self.dropped += n
                    continue
                k = max(0, expected - s0)  # partly acked, or overlapping (never written so, but be safe)
                if k >= n:
                    continue
                arrays = {name: a[k:] for name, a in msg.arrays.items()}
                self.records.append(Record(s0 + k, n - k, arrays))
            self._segments.append(_Segment(seq0, max(end, seq0), path, good))
        if self.records:
            self.next_seq = max(self.next_seq, self.records[-1].end)
        if self._segments:
            self.next_seq = max(self.next_seq, self._segments[-1].end)
        self._delete([s for s in self._segments if s.end - 1 <= self.acked])

    # --------------------------------------------------------------------------------------------- writing
    def append(self, seq0: int, arrays: dict[str, np.ndarray]) -> None:
        """Write one record of len(arrays[*]) transitions starting at `seq0` (contiguous with the last one)."""
        n = len(next(iter(arrays.values())))
        if seq0 != self.next_seq:
            raise ValueError(f"outbox {self.dir}: record starts at seq {seq0}, expected {self.next_seq}")
        buf = encode_record(encode_message("transitions", {"stream": self.stream, "seq": seq0, "n": n}, arrays))
        seg = self._segments[-1] if self._segments else None
        if seg is None or seg.size >= self.segment_bytes:
            if self._fd is not None:
                os.close(self._fd)
            seg = _Segment(seq0, seq0, self.dir / f"seg-{seq0:020d}.rec", 0)
            self._fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._segments.append(seg)
        elif self._fd is None:
            self._fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND)
        view = memoryview(buf)
        while view:  # one write() per record; loops only on a partial write
            view = view[os.write(self._fd, view) :]
        seg.size += len(buf)
        seg.end = self.next_seq = seq0 + n

    def set_acked(self, upto: int, force: bool = False) -> None:
        """The learner persisted every seq <= `upto`: remember it and delete segments that hold nothing else.
        The active (last) segment is deleted once fully acknowledged and at least segment_bytes/8 big."""
        self.acked = max(self.acked, upto)
        segs = self._segments
        done = [s for s in segs[:-1] if s.end - 1 <= self.acked]
        if segs and segs[-1].end - 1 <= self.acked and segs[-1].size >= self.segment_bytes // 8:
            done.append(segs[-1])
        now = time.monotonic()
        if self.acked == self._acked_written or not (force or done or now - self._acked_t >= self.ack_write_interval_s):
            return
        _write_atomic(self.dir / "acked", str(self.acked))  # first: a segment never disappears before its ack
        self._acked_written, self._acked_t = self.acked, now
        self._delete(done)

    def _delete(self, done: list[_Segment]) -> None:
        if not done:
            return
        if self._segments[-1] in done and self._fd is not None:  # the active segment: the next append starts anew
            os.close(self._fd)
            self._fd = None
        for s in done:
            try:
                s.path.unlink()
            except FileNotFoundError:
                pass
        self._segments = [s for s in self._segments if s not in done]

    def abandon(self) -> None:
        """Writing failed (disk full?): retire this stream, so that a restart starts a new one instead of reusing
        seqs that may have reached the learner but are missing here."""
        try:
            os.replace(self.dir / "stream.json", self.dir / f"stream.{self.stream}.abandoned.json")
        except OSError:
            pass

    def disk_bytes(self) -> int:
        return sum(s.size for s in self._segments)

    def close(self) -> None:
        if self.acked != self._acked_written:
            self.set_acked(self.acked, force=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            finally:
                os.close(self._lock_fd)
                self._lock_fd = None
