"""Control-process side of the transition stream (DEALER -> the learner's ROUTER). See docs/protocol.md.

`submit()` only enqueues (never blocks the control loop); a background thread owns the socket (and the outbox, if
any), stacks queued transitions into batches, sends them, sends heartbeats, processes acks and resends. Every
transition is kept until the learner acknowledges it as persisted: in memory, and with `outbox_dir` also on local
disk, so that a restarted control process resends what its predecessor had not got acknowledged under the same
stream id and seqs (robot_rl/transport/outbox.py).
"""

from __future__ import annotations

import collections
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zmq

from .outbox import Outbox
from .protocol import (
    PROTOCOL_VERSION,
    ProtocolError,
    VersionError,
    decode_message,
    encode_message,
    int_field,
    peek_header,
)
from .security import (
    CurveClientKeys,
    setup_client_socket,
)

from .streams import (
    HandshakeMonitor,
    Schema,
    Transition,
    new_stream_id,
    schema_diff,
    schema_from_wire,
    schema_of,
    tune_socket,
)

log = logging.getLogger(__name__)


@dataclass
class _Chunk:
    seq0: int
    n: int
    arrays: dict[str, np.ndarray]
    nbytes: int

    @property
    def end(self) -> int:  # one past the last seq
        return self.seq0 + self.n


class TransitionSender:
    """Control-process side of the stream. Thread-safe `submit`; everything else runs in one background thread.

    Batching: a batch is sent when `batch_size` transitions are queued or the oldest queued one is
    `max_batch_delay_s` old. With `max_batch_delay_s=0` whatever is queued goes out as soon as the sender thread is
    free (lowest latency; batches still form under load).

    `outbox_dir`: keep every unacknowledged transition in this directory too (robot_rl/transport/outbox.py); a
    new sender on the same directory resumes the same stream (id and seqs) and resends what was not acknowledged.
    Without it the stream id is fresh for every sender object, so the learner treats a restart as a new stream.

    Resends happen only (1) from the seq the learner names in `resend_from`, or (2) when acks make no progress for
    `resend_after_s * max(1, batches in flight)` while something is in flight (a fallback; docs/protocol.md).
    """

    def __init__(
        self,
        endpoint: str,
        sender_id: str,
        batch_size: int = 32,
        max_batch_delay_s: float = 0.05,
        resend_after_s: float = 2.0,
        heartbeat_interval_s: float = 0.1,
        start_seq: int = 0,
        curve: CurveClientKeys | None = None,
        outbox_dir: str | os.PathLike | None = None,
        outbox_segment_bytes: int = 64 << 20,
    ):
        rid = sender_id.encode()
        if not 1 <= len(rid) <= 255:
            raise ValueError(f"sender_id must be 1..255 bytes of UTF-8, got {sender_id!r}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.endpoint, self.sender_id = endpoint, sender_id
        self.batch_size, self.max_batch_delay_s = batch_size, max_batch_delay_s
        self.resend_after_s, self.heartbeat_interval_s = resend_after_s, heartbeat_interval_s
        self._curve = curve
        self._lock = threading.Lock()
        self._queue: collections.deque = collections.deque()  # (seq, t_submit, transition), from submit()
        self._schema: Schema | None = None
        self._raw_schema: dict | None = None
        self._signaled = False
        # Owned by the sender thread (set up here before it starts):
        self._staged: collections.deque = collections.deque()  # journaled (outbox), waiting to form a batch
        self._chunks: list[_Chunk] = []
        self._cursor = 0  # index of the next chunk to transmit
        self.outbox: Outbox | None = None
        if outbox_dir is not None:
            self.outbox = Outbox(Path(outbox_dir), sender_id, start_seq, segment_bytes=outbox_segment_bytes)
            self.stream = self.outbox.stream
            self._acked = self.outbox.acked
            for r in self.outbox.records:  # what the previous process had not got acknowledged: resend first
                self._chunks.append(_Chunk(r.seq0, r.n, r.arrays, sum(a.nbytes for a in r.arrays.values())))
                self._schema = self._schema or schema_of(r.arrays, batched=True)
            self._next_seq = self.outbox.next_seq
            if self._chunks:
                log.info(
                    "sender %s: outbox %s holds %d unacknowledged transitions of stream %s (seq %d..%d): "
                    "resending them first",
                    sender_id,
                    outbox_dir,
                    self.outbox.next_seq - self._chunks[0].seq0,
                    self.stream,
                    self._chunks[0].seq0,
                    self._chunks[-1].end - 1,
                )
        else:
            self.stream = new_stream_id()
            self._acked = start_seq - 1
            self._next_seq = start_seq
        self.start_seq = self._acked + 1 if self._chunks == [] else self._chunks[0].seq0
        self._first_seq = self._next_seq  # first seq submitted by this object
        self._journaled = self._next_seq  # every seq below is in the outbox (or staged, without one)
        self._journal_cv = threading.Condition(self._lock)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        self._progress_t = time.monotonic()
        self._last_contact: float | None = None
        self._sent = self._resent = self._rejected = self._batches = self._errors = 0
        self.rejected_reason: str | None = None  # the learner's (or handshake's) latest reason for refusing us
        self.expected_schema: Schema | None = None  # what the learner said it expects (greeting)
        self._logged_errors: set[str] = set()
        self._hs_failures = 0
        self._outbox_error: str | None = None
        self._stop = threading.Event()
        self._linger_deadline = 0.0
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- caller side ----------------------------------------------------------------------------------
    def start(self) -> TransitionSender:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"TransitionSender[{self.sender_id}]", daemon=True)
            self._thread.start()
        return self

    def submit(self, transition: Transition) -> int:
        """Enqueue one transition (arrays are copied); returns its seq. Never blocks on the network or disk."""
        if self._closed:
            raise RuntimeError("TransitionSender.submit() after close()")
        t = {k: np.array(v) for k, v in transition.items()}
        raw = {k: (a.dtype, a.shape) for k, a in t.items()}  # cheap to compare; wire names only when it changes
        with self._lock:
            if raw != self._raw_schema:
                if not t:
                    raise ValueError("a transition needs at least one array")
                schema = schema_of(t, batched=False)
                if self._schema is not None and schema != self._schema:
                    raise ValueError(
                        f"transition differs from the stream's earlier ones: "
                        f"{'; '.join(schema_diff(self._schema, schema))}: every transition of one "
                        "sender must have the same keys, dtypes and shapes"
                    )
                self._schema, self._raw_schema = schema, raw
            seq = self._next_seq
            self._next_seq += 1
            self._queue.append((seq, time.monotonic(), t))
            wake = not self._signaled
            self._signaled = True
        if wake:
            self._wake()
        return seq

    def flush(self, timeout_s: float = 1.0) -> bool:
        """Wait until every transition submitted so far is written to the outbox (so it survives a kill of this
        process), e.g. before logging an episode as complete. Without an outbox: until the sender thread took them.
        False if `timeout_s` passed first (or the sender thread is not running)."""
        deadline = time.monotonic() + timeout_s
        with self._journal_cv:
            target = self._next_seq
            while self._journaled < target:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return self._journaled >= target
                self._journal_cv.wait(left)
        return True

    def close(self, linger_s: float = 1.0) -> int:
        """Stop, first waiting up to `linger_s` for every transition to be acked; returns how many were not
        (with an outbox they stay on disk for the next sender on that directory)."""
        if self._closed:
            return self.unacked_count
        self._closed = True
        self._linger_deadline = time.monotonic() + linger_s
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(linger_s + 5.0)
        if self._thread is None or not self._thread.is_alive():
            if self.outbox is not None:
                self._journal()  # never started, or stopped early: whatever is queued goes to disk
                self.outbox.close()
        left = self.unacked_count
        if left:
            log.warning(
                "TransitionSender %s closed with %d unacknowledged transitions (stream %s, seq %d..%d)%s",
                self.sender_id,
                left,
                self.stream,
                self._base(),
                self._next_seq - 1,
                f"; they stay in the outbox {self.outbox.dir}" if self.outbox else "",
            )
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        return left

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    @property
    def last_contact(self) -> float | None:
        return self._last_contact

    @property
    def acked_upto(self) -> int:
        return self._acked

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def unacked_count(self) -> int:
        return self._next_seq - self._base()

    @property
    def sent_count(self) -> int:
        return self._sent

    def stats(self) -> dict:
        chunks = list(self._chunks)
        return {
            "stream": self.stream,
            "submitted": self._next_seq - self._first_seq,
            "sent": self._sent,
            "resent": self._resent,
            "batches": self._batches,
            "acked_upto": self._acked,
            "unacked": self.unacked_count,
            "queued": len(self._queue) + len(self._staged),
            "unacked_bytes": sum(c.nbytes for c in chunks),
            "outbox_bytes": self.outbox.disk_bytes() if self.outbox else None,
            "outbox_error": self._outbox_error,
            "rejected": self._rejected,
            "errors": self._errors,
            "rejected_reason": self.rejected_reason,
            "handshake_failures": self._hs_failures,
            "last_contact_age_s": None if self._last_contact is None else time.monotonic() - self._last_contact,
        }

    # -- sender thread --------------------------------------------------------------------------------
    def _base(self) -> int:
        return max(self._acked + 1, self.start_seq)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass

    def _header(self, **kw) -> dict:
        return {"sender": self.sender_id, "stream": self.stream, **kw}

    def _run(self) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)  # no ROUTING_ID: the learner names connections itself (sender id in header)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on live connections: we do our own resending
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        tune_socket(sock)
        setup_client_socket(sock, self._curve)
        monitor = HandshakeMonitor(sock, f"transition sender {self.sender_id}", server=False)
        sock.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        poller.register(monitor.mon, zmq.POLLIN)
        next_hb = 0.0
        try:
            while True:
                now = time.monotonic()
                stopping = self._stop.is_set()
                self._journal()
                if stopping and (self.unacked_count == 0 or now >= self._linger_deadline):
                    break
                self._make_chunks(now, force=stopping)
                blocked = not self._send_pending(sock)
                if now >= next_hb:
                    self._heartbeat(sock)
                    next_hb = now + self.heartbeat_interval_s
                if self._cursor > 0 and now - self._progress_t > self._ack_deadline():
                    log.info(
                        "sender %s: no ack progress for %.1fs with %d batches in flight, resending from seq %d",
                        self.sender_id,
                        now - self._progress_t,
                        self._cursor,
                        self._acked + 1,
                    )
                    self._rewind(0, now)
                    continue
                # sleep until: a message, a submit, the socket becomes writable, or a timer
                deadlines = [next_hb]
                if self._cursor > 0:
                    deadlines.append(self._progress_t + self._ack_deadline())
                if self._staged and self.max_batch_delay_s > 0:
                    deadlines.append(self._staged[0][1] + self.max_batch_delay_s)
                if stopping:
                    deadlines.append(min(self._linger_deadline, now + 0.01))
                timeout_ms = max(0, math.ceil((min(deadlines) - time.monotonic()) * 1000))
                poller.modify(sock, zmq.POLLIN | (zmq.POLLOUT if blocked else 0))
                events = dict(poller.poll(timeout_ms))
                if self._wake_r in events:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    with self._lock:
                        self._signaled = False
                if monitor.mon in events:
                    monitor.process()
                    if monitor.failures > self._hs_failures:
                        self._hs_failures = monitor.failures
                        self.rejected_reason = (
                            f"handshake with the learner at {self.endpoint} failed: {monitor.last_reason}"
                        )
                if events.get(sock, 0) & zmq.POLLIN:
                    self._recv_all(sock)
        except Exception:
            log.exception("TransitionSender %s thread crashed", self.sender_id)
        finally:
            monitor.close(sock)
            sock.close(0)
            if self.outbox is not None:
                try:
                    self._journal()
                finally:
                    self.outbox.close()

    def _ack_deadline(self) -> float:
        return self.resend_after_s * max(1, self._cursor)

    def _journal(self) -> None:
        """Move submitted transitions to the staging area, writing them to the outbox first (one record per
        `batch_size` transitions at most): as soon as the sender thread wakes, not when a batch fills."""
        with self._lock:
            if not self._queue:
                return
            items = list(self._queue)
            self._queue.clear()
        if self.outbox is not None and self._outbox_error is None:
            try:
                for i in range(0, len(items), self.batch_size):
                    group = items[i : i + self.batch_size]
                    self.outbox.append(group[0][0], {k: np.stack([it[2][k] for it in group]) for k in group[0][2]})
            except OSError as e:  # disk full or gone: go on from memory; the stream can no longer be resumed
                self._outbox_error = str(e)
                self.outbox.abandon()
                log.error(
                    "sender %s: cannot write the outbox %s (%s): continuing without it; a restart will start a "
                    "new stream, and what is unacknowledged at a crash is lost",
                    self.sender_id,
                    self.outbox.dir,
                    e,
                )
        self._staged.extend(items)
        with self._journal_cv:
            self._journaled = items[-1][0] + 1
            self._journal_cv.notify_all()

    def _make_chunks(self, now: float, force: bool) -> None:
        bs, delay, q = self.batch_size, self.max_batch_delay_s, self._staged
        while q and (force or delay <= 0 or len(q) >= bs or now - q[0][1] >= delay):
            items = [q.popleft() for _ in range(min(bs, len(q)))]
            arrays = {k: np.stack([it[2][k] for it in items]) for k in items[0][2]}
            self._chunks.append(_Chunk(items[0][0], len(items), arrays, sum(a.nbytes for a in arrays.values())))

    def _send_pending(self, sock: zmq.Socket) -> bool:
        """Transmit chunks from the cursor; False if the socket would block (no peer / high-water mark)."""
        while self._cursor < len(self._chunks):
            c = self._chunks[self._cursor]
            frames = encode_message("transitions", self._header(seq=c.seq0, n=c.n, base=self._base()), c.arrays)
            try:
                sock.send_multipart(frames, flags=zmq.DONTWAIT, copy=c.nbytes < 65536)
            except zmq.Again:
                return False
            if self._cursor == 0:
                self._progress_t = time.monotonic()  # nothing was in flight: the resend timer starts now
            self._cursor += 1
            self._sent += c.n
            self._batches += 1
        return True

    def _next_to_send(self) -> int:
        if self._cursor < len(self._chunks):
            return self._chunks[self._cursor].seq0
        if self._chunks:
            return self._chunks[-1].end
        return self._staged[0][0] if self._staged else self._journaled

    def _heartbeat(self, sock: zmq.Socket) -> None:
        hdr = self._header(base=self._base(), next=self._next_seq, sent=self._next_to_send())
        try:
            sock.send_multipart(encode_message("heartbeat", hdr), flags=zmq.DONTWAIT)
        except zmq.Again:
            pass

    def _rewind(self, index: int, now: float) -> None:
        if index < self._cursor:
            self._resent += sum(c.n for c in self._chunks[index : self._cursor])
            self._cursor = index
        self._progress_t = now

    def _learner_error(self, text: str) -> None:
        self._errors += 1
        self.rejected_reason = text
        key = re.sub(r"\d+", "#", text)
        if key not in self._logged_errors:
            if len(self._logged_errors) < 1000:
                self._logged_errors.add(key)
            log.error("sender %s: the learner at %s refused our messages: %s", self.sender_id, self.endpoint, text)

    def _recv_all(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.DONTWAIT)
            except zmq.Again:
                return
            now = time.monotonic()
            try:
                msg = decode_message(frames)
                if msg.type == "error":  # not "contact": a refused robot is not in touch with its learner
                    m, code = msg.header.get("message"), msg.header.get("code")
                    self._learner_error(f"[{code}] {m}")
                    continue
                if msg.type not in ("ack", "heartbeat"):
                    raise ProtocolError(f"unexpected message type {msg.type!r} from the learner")
                stream = msg.header.get("stream")
                upto = int_field(msg.header, "upto", minimum=-1)
                resend_from = msg.header.get("resend_from")
                if resend_from is not None:
                    resend_from = int_field(msg.header, "resend_from")
                schema = msg.header.get("schema")
                schema = None if schema is None else schema_from_wire(schema)
            except VersionError as e:
                hdr = peek_header(frames) or {}
                self._rejected += 1
                if hdr.get("type") == "error" and isinstance(hdr.get("message"), str):
                    self._learner_error(f"[{hdr.get('code')}] {hdr['message']}")
                else:
                    self._learner_error(
                        f"the learner's messages are protocol v{e.peer_version}, this build speaks "
                        f"v{PROTOCOL_VERSION}: upgrade robot_rl on the older side"
                    )
                continue
            except ProtocolError as e:
                self._rejected += 1
                log.warning(
                    "sender %s: rejected a message from the learner at %s: %s", self.sender_id, self.endpoint, e
                )
                continue
            if stream != self.stream:  # meant for an earlier stream of this sender id (another process)
                continue
            self._last_contact = now
            if schema is not None:
                self.expected_schema = schema
                diff = schema_diff(schema, self._schema) if self._schema is not None else []
                if diff:
                    self._learner_error(f"the learner expects other transitions: {'; '.join(diff)}")
            if upto > self._acked:
                if upto >= self._next_seq:
                    log.warning(
                        "sender %s: learner acked seq %d of stream %s but this sender has only produced up to %d: "
                        "the outbox lost records the learner has (a power loss?); ignoring the ack",
                        self.sender_id,
                        upto,
                        self.stream,
                        self._next_seq - 1,
                    )
                    continue
                self._acked = upto
                self.rejected_reason = None  # progress: whatever was refused before is resolved
                k = 0
                while k < len(self._chunks) and self._chunks[k].end <= upto + 1:
                    k += 1
                if k:
                    del self._chunks[:k]
                    self._cursor = max(0, self._cursor - k)
                if self._chunks and self._chunks[0].seq0 <= upto:  # partly acked first chunk: keep the rest
                    c = self._chunks[0]
                    cut = upto + 1 - c.seq0
                    arrays = {name: a[cut:] for name, a in c.arrays.items()}
                    self._chunks[0] = _Chunk(upto + 1, c.n - cut, arrays, sum(a.nbytes for a in arrays.values()))
                if self.outbox is not None and self._outbox_error is None:
                    try:
                        self.outbox.set_acked(upto)
                    except OSError as e:
                        log.warning("sender %s: could not record the ack in the outbox: %s", self.sender_id, e)
                self._progress_t = now
            if resend_from is not None:
                idx = next((i for i, c in enumerate(self._chunks) if c.end > resend_from), len(self._chunks))
                if idx < self._cursor:
                    log.info("sender %s: learner asked for a resend from seq %d", self.sender_id, resend_from)
                self._rewind(idx, now)
