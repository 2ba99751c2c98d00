"""Reliable, batched transition stream: control process (DEALER) -> learner (ROUTER). See docs/protocol.md.

Sender: `submit()` only enqueues (never blocks the control loop); a background thread owns the socket (and the
outbox, if any), stacks queued transitions into batches, sends them, sends heartbeats, processes acks and resends.
Every transition is kept until the learner acknowledges it as persisted: in memory, and with `outbox_dir` also on
local disk, so that a restarted control process resends what its predecessor had not got acknowledged under the
same stream id and seqs (robot_rl/transport/outbox.py).

Receiver: `poll()` delivers each transition of each (sender, stream) exactly once and in order (dedup by the
stream's next expected seq); acking is the learner's job, after it has persisted what it got.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zmq
from zmq.utils.monitor import parse_monitor_message

from .outbox import Outbox
from .protocol import (
    DTYPES,
    PROTOCOL_VERSION,
    ProtocolError,
    VersionError,
    decode_message,
    encode_message,
    int_field,
    peek_header,
    wire_dtype,
)
from .security import (
    CurveClientKeys,
    CurveServerKeys,
    check_bind,
    release_server_socket,
    setup_client_socket,
    setup_server_socket,
    zap_denials,
)

log = logging.getLogger(__name__)

Transition = dict[str, np.ndarray]
Schema = dict[str, tuple[str, tuple[int, ...]]]  # key -> (wire dtype name, per-transition shape)
MAX_STREAM_LEN = 64


def _tune(sock: zmq.Socket) -> None:
    # ZMTP-level heartbeats: a dead TCP peer is dropped (and reconnected) within a few seconds.
    sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
    sock.setsockopt(zmq.HEARTBEAT_TTL, 3000)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)


def new_stream_id() -> str:
    return secrets.token_hex(8)


def normalize_schema(schema: dict) -> Schema:
    """{key: (dtype, shape)} with any numpy-understood dtype -> wire dtype names and int tuples."""
    return {str(k): (wire_dtype(dt), tuple(int(x) for x in shape)) for k, (dt, shape) in schema.items()}


def schema_to_wire(schema: Schema) -> list[dict]:
    return [{"name": k, "dtype": dt, "shape": list(shape)} for k, (dt, shape) in sorted(schema.items())]


def schema_from_wire(specs) -> Schema:
    if not isinstance(specs, list):
        raise ProtocolError(f"'schema' must be a list of {{name, dtype, shape}} maps, got {type(specs).__name__}")
    out: Schema = {}
    for s in specs:
        if not (
            isinstance(s, dict)
            and isinstance(s.get("name"), str)
            and s.get("dtype") in DTYPES
            and isinstance(s.get("shape"), list)
            and all(isinstance(x, int) and x >= 0 for x in s["shape"])
        ):
            raise ProtocolError(f"bad schema entry {s!r}: need name (str), dtype (wire name), shape (list of ints)")
        out[s["name"]] = (s["dtype"], tuple(s["shape"]))
    return out


def schema_diff(expected: Schema, got: Schema) -> list[str]:
    """Every difference between two schemas, as readable phrases ([] if equal)."""
    out = [f"missing key {k!r} ({expected[k][0]} {expected[k][1]})" for k in sorted(expected.keys() - got.keys())]
    out += [f"unexpected key {k!r} ({got[k][0]} {got[k][1]})" for k in sorted(got.keys() - expected.keys())]
    for k in sorted(expected.keys() & got.keys()):
        if expected[k] != got[k]:
            out.append(
                f"key {k!r} is {got[k][0]} shape {got[k][1]} per transition, expected {expected[k][0]} "
                f"shape {expected[k][1]}"
            )
    return out


def _schema_of(arrays: dict[str, np.ndarray], batched: bool) -> Schema:
    return {k: (wire_dtype(a.dtype), tuple(a.shape[1:] if batched else a.shape)) for k, a in arrays.items()}


# -------------------------------------------------------------------------------------- handshake monitoring
_HS_EVENTS = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no_detail",
}
_MONITOR_MASK = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


def _handshake_reason(event: int, value: int) -> str:
    kind = _HS_EVENTS[event]
    if kind == "auth":
        return (
            f"authentication refused (ZAP status {value}): the client's public key is not among the learner's "
            "authorized_clients/"
        )
    if kind == "protocol":
        if value == getattr(zmq, "ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH", 0x11000002):
            return "security mechanism mismatch: one side uses CURVE and the other does not (check curve_keys_dir)"
        if value == getattr(zmq, "ZMQ_PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC", 0x11000001):
            return "CURVE cryptographic error: the client does not hold the server's current public key"
        return f"ZMTP protocol error 0x{value:x} during the handshake"
    return (
        f"handshake failed ({os.strerror(value) if 0 < value < 200 else value}): with CURVE usually a client "
        "holding the wrong server public key"
    )


class _HandshakeMonitor:
    """ZMQ socket monitor: counts failed handshakes and logs each (peer, reason) once.

    libzmq reports a failed handshake with the socket's endpoint only: a client names the learner it connects to;
    a server names the refused client (address and key) when its ZAP handler refused it (security.zap_denials),
    and otherwise logs the reason once (the client's side logs its own failure with the learner's address)."""

    def __init__(self, sock: zmq.Socket, label: str, server: bool):
        self.label, self.server, self._sock = label, server, sock
        self.mon = sock.get_monitor_socket(_MONITOR_MASK)
        self.failures = 0
        self.last_reason: str | None = None
        self._logged: set = set()

    def process(self) -> None:
        while True:
            try:
                evt = parse_monitor_message(self.mon.recv_multipart(zmq.DONTWAIT))
            except (zmq.Again, zmq.ZMQError, ValueError):
                break
            event, value = int(evt["event"]), int(evt["value"])
            if event not in _HS_EVENTS:
                continue
            self.failures += 1
            self.last_reason = reason = _handshake_reason(event, value)
            endpoint = evt["endpoint"].decode(errors="replace") if isinstance(evt["endpoint"], bytes) else "?"
            if not self.server:
                self._log(f"the learner at {endpoint}", reason)
            elif _HS_EVENTS[event] == "auth" and (denied := zap_denials(self._sock)):
                for address, key in denied:
                    self._log(f"client {address} (public key {key})", reason)
            else:
                self._log("a client (libzmq does not report its address for this failure)", reason)

    def _log(self, peer: str, reason: str) -> None:
        key = (peer, reason)
        if key in self._logged:
            return
        if len(self._logged) < 10000:
            self._logged.add(key)
        log.warning(
            "%s: CURVE/ZMTP handshake with %s failed: %s (%d handshake failures so far; each peer and reason "
            "is logged once)",
            self.label,
            peer,
            reason,
            self.failures,
        )

    def close(self, sock: zmq.Socket) -> None:
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.mon.close(0)


# ------------------------------------------------------------------------------------------------- sender
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
                self._schema = self._schema or _schema_of(r.arrays, batched=True)
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
                schema = _schema_of(t, batched=False)
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
        _tune(sock)
        setup_client_socket(sock, self._curve)
        monitor = _HandshakeMonitor(sock, f"transition sender {self.sender_id}", server=False)
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


# ----------------------------------------------------------------------------------------------- receiver
@dataclass
class TransitionBatch:
    sender_id: str
    stream: str
    seqs: np.ndarray  # int64, contiguous
    arrays: dict[str, np.ndarray]  # each with leading axis len(seqs)

    def __len__(self) -> int:
        return len(self.seqs)


@dataclass
class _Stream:
    """Per (sender, stream): survives the connection (a restarted sender with the same outbox resumes it)."""

    next_expected: int
    acked: int
    req_ne: int = -1
    req_t: float = -math.inf
    behind_warned: bool = False
    stale_warned: bool = False


@dataclass
class _Conn:
    """A sender's current connection (the routing id its messages come from) and the stream it speaks."""

    rid: bytes
    stream: str
    last_heard: float
    addr: str = ""
    greeted: bool = False


@dataclass
class _SenderStats:
    received: int = 0
    duplicates: int = 0
    gaps: int = 0
    skipped: int = 0
    rejected: int = 0
    takeovers_refused: int = 0


class _Reject(Exception):
    def __init__(self, message: str, code: str = "malformed", extra: dict | None = None):
        super().__init__(message)
        self.code, self.extra = code, extra or {}


class _RejectionLog:
    """Every distinct problem logged once per peer; after that a periodic count per peer, never silence."""

    MAX_PEERS = 1000

    def __init__(self, where: str, interval_s: float):
        self.where, self.interval_s = where, interval_s
        self.seen: dict[str, set] = {}
        self.pending: dict[str, list] = {}  # label -> [count since the last line, since (wall time), last problem]
        self.last_line: dict[str, float] = {}

    def record(self, label: str, problem: str, now: float) -> None:
        if label not in self.seen and len(self.seen) >= self.MAX_PEERS:
            label = "<other peers>"
        kinds = self.seen.setdefault(label, set())
        key = re.sub(r"\d+", "#", problem)[:300]
        if key not in kinds and len(kinds) < 100:
            kinds.add(key)
            log.warning("transition receiver %s: rejected a message from %s: %s", self.where, label, problem)
            return
        p = self.pending.get(label)
        if p is None:
            p = self.pending[label] = [0, time.strftime("%H:%M:%S"), problem]
            self.last_line.setdefault(label, now)
        p[0] += 1
        p[2] = problem

    def tick(self, now: float, counts: dict[str, int]) -> None:
        for label in [lb for lb, p in self.pending.items() if now - self.last_line.get(lb, 0) >= self.interval_s]:
            n, since, problem = self.pending.pop(label)
            self.last_line[label] = now
            log.warning(
                "transition receiver %s: %d more messages rejected from %s since %s (%d in all; latest: %s)",
                self.where,
                n,
                label,
                since,
                counts.get(label, n),
                problem,
            )


class TransitionReceiver:
    """Learner side: a bound ROUTER. Not thread-safe: call poll/ack/set_next_expected from one thread.

    Sender ids and takeover: a sender names itself in every header (`sender`) and the connection it speaks from
    is its current one. A message naming sender X from another connection is refused (`error`, code
    "sender_id_in_use") while X's current connection was heard within `peer_timeout_s`, unless it carries X's
    current stream (the same process reconnecting, or a restart on the same outbox): that takes over at once; a
    new stream takes over once the old connection has been silent for `peer_timeout_s`.
    Connections silent for `peer_timeout_s` get no heartbeats; after `forget_after_s` they are forgotten. Stream
    state (next expected / acked seq per (sender, stream)) is never forgotten.
    """

    MAX_DRAIN = 1000  # messages handled per poll() call before returning

    def __init__(
        self,
        endpoint: str,
        heartbeat_interval_s: float = 0.1,
        curve: CurveServerKeys | None = None,
        peer_timeout_s: float = 5.0,
        forget_after_s: float = 300.0,
        reject_log_interval_s: float = 10.0,
        expected_schema: dict | None = None,
    ):
        check_bind(endpoint, curve)
        if forget_after_s < peer_timeout_s:
            raise ValueError("forget_after_s must be >= peer_timeout_s")
        self.endpoint, self.heartbeat_interval_s, self._curve = endpoint, heartbeat_interval_s, curve
        self.peer_timeout_s, self.forget_after_s = peer_timeout_s, forget_after_s
        self._sock = zmq.Context.instance().socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        _tune(self._sock)
        setup_server_socket(self._sock, curve)
        self._monitor = _HandshakeMonitor(self._sock, f"transition receiver {endpoint}", server=True)
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError as e:
            self._monitor.close(self._sock)
            release_server_socket(self._sock, curve)
            self._sock.close(0)
            raise OSError(f"cannot bind transition receiver to {endpoint}: {e}") from e
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor.mon, zmq.POLLIN)
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._conns: dict[str, _Conn] = {}
        self._rid_label: dict[bytes, str] = {}
        self._restore_any: dict[str, int] = {}  # set_next_expected(sender, None, seq): for its first stream
        self._per_sender: dict[str, _SenderStats] = collections.defaultdict(_SenderStats)
        self._err_sent: dict[tuple[bytes, str], float] = {}
        self._rejections = _RejectionLog(endpoint, reject_log_interval_s)
        self._reject_counts: dict[str, int] = collections.defaultdict(int)
        self._warned: set = set()
        self.expected_schema: dict | None = expected_schema
        self._next_hb = 0.0
        self.rejected = self.duplicates = self.gaps = self.skipped = self.received = 0
        self._closed = False

    # -- application side -----------------------------------------------------------------------------
    @property
    def senders(self) -> dict[str, float]:
        """Sender id -> when its current connection was last heard (monotonic), for connections not forgotten."""
        return {s: c.last_heard for s, c in self._conns.items()}

    @property
    def handshake_failures(self) -> int:
        return self._monitor.failures

    def current_stream(self, sender_id: str) -> str | None:
        c = self._conns.get(sender_id)
        return None if c is None else c.stream

    def next_expected(self, sender_id: str, stream: str | None = None) -> int | None:
        """Lowest seq of (sender, stream) not yet delivered (stream None: the sender's current stream)."""
        stream = stream if stream is not None else self.current_stream(sender_id)
        st = self._streams.get((sender_id, stream))
        return None if st is None else st.next_expected

    def set_next_expected(self, sender_id: str, stream: str | None, seq: int) -> None:
        """Restore after a learner restart: everything below `seq` of this (sender, stream) is persisted (acked).
        stream=None (legacy replays that did not record streams): applies to the first stream the sender presents
        that the receiver has no state for."""
        if stream is None:
            self._restore_any[sender_id] = int(seq)
            return
        self._streams[(sender_id, stream)] = _Stream(int(seq), int(seq) - 1)
        c = self._conns.get(sender_id)
        if c is not None and c.stream == stream:
            c.greeted = False

    def ack(self, sender_id: str, stream: str, upto: int) -> None:
        """Tell the sender everything of `stream` up to and including `upto` is persisted (it may drop it).
        Never raises: an unknown stream or undelivered seqs are ignored with a warning; a stream that is no longer
        the sender's current one is recorded as acked but nothing is sent (its process is gone)."""
        st = self._streams.get((sender_id, stream))
        if st is None:
            self._warn_once(
                ("unknown", sender_id, stream), "ack for unknown stream %s of sender %r ignored", stream, sender_id
            )
            return
        if upto >= st.next_expected:
            self._warn_once(
                ("ahead", sender_id, stream),
                "cannot ack seq %d of sender %r stream %s: only seqs < %d were delivered; ack ignored",
                upto,
                sender_id,
                stream,
                st.next_expected,
            )
            return
        st.acked = max(st.acked, upto)
        c = self._conns.get(sender_id)
        if c is None or c.stream != stream:
            if not st.stale_warned:
                st.stale_warned = True
                log.warning(
                    "transition receiver %s: ack of stream %s of sender %r not sent: that stream is no longer "
                    "the sender's current one (the sender restarted without its outbox)",
                    self.endpoint,
                    stream,
                    sender_id,
                )
            return
        self._send(c.rid, "ack", {"stream": stream, "upto": st.acked})

    def poll(self, timeout_ms: int) -> list[TransitionBatch]:
        """Wait up to `timeout_ms` for transitions; returns new ones (possibly []). Never raises on bad input."""
        deadline = time.monotonic() + max(0, timeout_ms) / 1000
        out: list[TransitionBatch] = []
        while True:
            now = time.monotonic()
            if now >= self._next_hb:
                self._housekeeping(now)
                self._next_hb = now + self.heartbeat_interval_s
            wait = min(deadline, self._next_hb) - now
            events = dict(self._poller.poll(max(0, math.ceil(wait * 1000))))
            if self._monitor.mon in events:
                self._monitor.process()
            if self._sock in events:
                for _ in range(self.MAX_DRAIN):
                    try:
                        frames = self._sock.recv_multipart(zmq.DONTWAIT, copy=False)
                    except zmq.Again:
                        break
                    self._handle(frames, out)
            if out or time.monotonic() >= deadline:
                return out

    @property
    def all_acked(self) -> bool:
        """Every transition delivered so far has been acknowledged (nothing a sender still waits for)."""
        return all(st.acked >= st.next_expected - 1 for st in list(self._streams.values()))

    def stats(self) -> dict:
        now = time.monotonic()
        per = {}
        for s, ps in self._per_sender.items():
            c = self._conns.get(s)
            per[s] = {
                **ps.__dict__,
                "rejected": self._reject_counts.get(s, 0),
                "stream": None if c is None else c.stream,
                "next_expected": None if c is None else self.next_expected(s),
                "last_heard_age_s": None if c is None else now - c.last_heard,
                "alive": c is not None and now - c.last_heard <= self.peer_timeout_s,
            }
        return {
            "rejected": self.rejected,
            "duplicates": self.duplicates,
            "gaps": self.gaps,
            "skipped": self.skipped,
            "received": self.received,
            "handshake_failures": self._monitor.failures,
            "streams": len(self._streams),
            "senders": per,
            "rejected_by_peer": dict(self._reject_counts),
        }

    def close(self, linger_s: float = 0.5) -> None:
        """Close, giving the last acks up to `linger_s` to leave (linger 0 would drop them unsent)."""
        if self._closed:
            return
        self._closed = True
        self._monitor.close(self._sock)
        release_server_socket(self._sock, self._curve)
        self._sock.close(int(linger_s * 1000))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- internals ------------------------------------------------------------------------------------
    def _warn_once(self, key, fmt: str, *args) -> None:
        if key in self._warned:
            return
        if len(self._warned) < 10000:
            self._warned.add(key)
        log.warning("transition receiver %s: " + fmt, self.endpoint, *args)

    def _send(self, rid: bytes, msg_type: str, header: dict) -> None:
        try:
            self._sock.send_multipart([rid, *encode_message(msg_type, header)], flags=zmq.DONTWAIT)
        except zmq.ZMQError:
            pass  # peer gone or its queue full: the next heartbeat repeats the information

    def _housekeeping(self, now: float) -> None:
        for sender, c in list(self._conns.items()):
            age = now - c.last_heard
            if age > self.forget_after_s:
                del self._conns[sender]
                self._rid_label.pop(c.rid, None)
                log.info(
                    "transition receiver %s: forgot the connection of sender %r (silent %.0f s); its stream "
                    "state is kept",
                    self.endpoint,
                    sender,
                    age,
                )
            elif age <= self.peer_timeout_s:
                st = self._streams.get((sender, c.stream))
                if st is not None:
                    self._send(c.rid, "heartbeat", {"stream": c.stream, "upto": st.acked})
        if len(self._err_sent) > 10000:
            self._err_sent.clear()
        self._monitor.process()
        self._rejections.tick(now, self._reject_counts)

    def _reply_error(self, rid: bytes, code: str, message: str, extra: dict | None = None) -> None:
        now, key = time.monotonic(), (rid, code)
        if now - self._err_sent.get(key, -math.inf) < 0.5:
            return
        self._err_sent[key] = now
        self._send(
            rid, "error", {"code": code, "message": message, "expected_version": PROTOCOL_VERSION, **(extra or {})}
        )

    def _reject(self, rid: bytes, label: str, code: str, problem: str, extra: dict | None = None) -> None:
        self.rejected += 1
        self._reject_counts[label] += 1
        self._rejections.record(label, problem, time.monotonic())
        self._reply_error(rid, code, problem, extra)

    def _label(self, rid: bytes, frames) -> str:
        label = self._rid_label.get(rid)
        if label is not None:
            return label
        try:
            addr = frames[1].get("Peer-Address") if len(frames) > 1 else ""
        except Exception:  # noqa: BLE001
            addr = ""
        return f"peer {addr or rid.hex()}"

    def _handle(self, frames: list, out: list) -> None:
        try:
            rid = frames[0].bytes
        except Exception:  # noqa: BLE001
            self.rejected += 1
            return
        try:
            msg = decode_message(frames[1:])
            self._dispatch(rid, msg, frames, out)
        except VersionError as e:
            self._reject(
                rid,
                self._label(rid, frames),
                e.code,
                f"your message is protocol v{e.peer_version} but this learner speaks v{PROTOCOL_VERSION}: "
                "upgrade robot_rl on the older side so both ends run the same protocol version",
                {"peer_version": e.peer_version if isinstance(e.peer_version, int) else None},
            )
        except ProtocolError as e:
            self._reject(rid, self._label(rid, frames), e.code, str(e))
        except _Reject as e:
            self._reject(rid, self._label(rid, frames), e.code, str(e), e.extra)
        except Exception as e:  # noqa: BLE001 - never let a peer's bytes crash the learner
            self._reject(rid, self._label(rid, frames), "malformed", f"unexpected error while handling it: {e!r}")

    def _connection(self, sender: str, stream: str, rid: bytes, frames, now: float) -> _Conn:
        """The sender's connection for this message, applying the takeover rule (class docstring)."""
        c = self._conns.get(sender)
        if c is not None and c.rid != rid:
            silent = now - c.last_heard
            if c.stream != stream and silent <= self.peer_timeout_s:
                self._per_sender[sender].takeovers_refused += 1
                raise _Reject(
                    f"sender id {sender!r} is in use by another live connection (heard {silent:.1f} s ago) "
                    f"speaking another stream; a new stream takes the id over once that connection has been silent for "
                    f"{self.peer_timeout_s:g} s. Give every control process its own sender id (or reuse its "
                    "outbox to continue its stream)",
                    "sender_id_in_use",
                    {"stream": stream},
                )
            log.info(
                "transition receiver %s: sender %r now speaks from a new connection (%s)",
                self.endpoint,
                sender,
                "same stream: reconnected or restarted on its outbox"
                if c.stream == stream
                else f"new stream {stream}, the old connection was silent {silent:.1f} s",
            )
            self._rid_label.pop(c.rid, None)
            c = None
        if c is None or c.stream != stream:
            try:
                addr = frames[1].get("Peer-Address")
            except Exception:  # noqa: BLE001
                addr = ""
            c = self._conns[sender] = _Conn(rid, stream, now, addr)
            if len(self._rid_label) > 100_000:
                self._rid_label.clear()
            self._rid_label[rid] = sender
        c.last_heard = now
        return c

    def _stream(self, sender: str, stream: str, base: int) -> _Stream:
        st = self._streams.get((sender, stream))
        if st is None:
            start = self._restore_any.pop(sender, None)
            start = base if start is None else start
            st = self._streams[(sender, stream)] = _Stream(start, start - 1)
            log.info(
                "transition receiver %s: sender %r stream %s starts at seq %d", self.endpoint, sender, stream, start
            )
        if base > st.next_expected:
            log.warning(
                "transition receiver %s: sender %r stream %s no longer holds seqs %d..%d (its oldest is %d); "
                "they are lost to this learner, continuing from %d",
                self.endpoint,
                sender,
                stream,
                st.next_expected,
                base - 1,
                base,
                base,
            )
            self.skipped += base - st.next_expected
            self._per_sender[sender].skipped += base - st.next_expected
            st.next_expected, st.acked = base, max(st.acked, base - 1)
        return st

    def _request_resend(self, c: _Conn, st: _Stream, now: float) -> bool:
        if st.req_ne == st.next_expected and now - st.req_t < max(0.25, 2 * self.heartbeat_interval_s):
            return False
        st.req_ne, st.req_t = st.next_expected, now
        self._send(c.rid, "ack", {"stream": c.stream, "upto": st.acked, "resend_from": st.next_expected})
        return True

    def _greet(self, c: _Conn, st: _Stream, resend: bool) -> None:
        """First reply to a new connection: where the learner stands, and what it expects."""
        c.greeted = True
        hdr = {"stream": c.stream, "upto": st.acked}
        if resend:
            hdr["resend_from"] = st.next_expected
            st.req_ne, st.req_t = st.next_expected, time.monotonic()
        if self.expected_schema is not None:
            hdr["schema"] = schema_to_wire(normalize_schema(self.expected_schema))
        self._send(c.rid, "ack", hdr)

    def _dispatch(self, rid: bytes, msg, frames, out: list) -> None:
        h, now = msg.header, time.monotonic()
        if msg.type not in ("transitions", "heartbeat"):
            raise _Reject(f"unexpected message type {msg.type!r} (expected 'transitions' or 'heartbeat')")
        sender, stream = h.get("sender"), h.get("stream")
        if not isinstance(sender, str) or not 1 <= len(sender.encode()) <= 255:
            raise _Reject(
                f"header field 'sender' must be the sender id, a string of 1..255 UTF-8 bytes, got {sender!r}"
            )
        if not isinstance(stream, str) or not 1 <= len(stream) <= MAX_STREAM_LEN:
            raise _Reject(
                f"header field 'stream' must be a string of 1..{MAX_STREAM_LEN} characters (a random id "
                f"per stream, kept across restarts by the outbox), got {stream!r}"
            )
        base = int_field(h, "base")
        if msg.type == "heartbeat":
            nxt, sent = int_field(h, "next"), int_field(h, "sent")
            c = self._connection(sender, stream, rid, frames, now)
            st = self._stream(sender, stream, base)
            if nxt < st.next_expected and not st.behind_warned:
                st.behind_warned = True
                log.warning(
                    "transition receiver %s: sender %r stream %s will number its next transition %d, but "
                    "seqs up to %d were already received: its outbox lost records (power loss?); its seqs "
                    "below %d will be dropped as duplicates",
                    self.endpoint,
                    sender,
                    stream,
                    nxt,
                    st.next_expected - 1,
                    st.next_expected,
                )
            if not c.greeted:
                self._greet(c, st, resend=sent > st.next_expected)
            elif sent > st.next_expected:
                self._request_resend(c, st, now)
            return
        seq, n = int_field(h, "seq"), int_field(h, "n", minimum=1)
        if seq + n - 1 > 2**63 - 1:
            raise _Reject(f"batch seq {seq} + n {n} runs past the int64 range of seq numbers")
        arrays = msg.arrays
        if not arrays:
            raise _Reject("transitions batch carries no arrays")
        for k, a in arrays.items():
            if a.ndim == 0 or a.shape[0] != n:
                raise _Reject(f"array {k!r} has shape {a.shape} but the batch header says n={n} transitions")
        schema = _schema_of(arrays, batched=True)
        c = self._connection(sender, stream, rid, frames, now)
        if self.expected_schema is None:
            self.expected_schema = schema  # the first sender fixes the schema for every later one
            log.info(
                "transition receiver %s: transition schema fixed by sender %r: %s",
                self.endpoint,
                sender,
                ", ".join(f"{k} {dt}{list(s)}" for k, (dt, s) in sorted(schema.items())),
            )
        else:
            diff = schema_diff(normalize_schema(self.expected_schema), schema)
            if diff:
                raise _Reject(
                    f"batch seq {seq}..{seq + n - 1} does not match the transitions this learner expects: "
                    f"{'; '.join(diff)}",
                    "schema",
                    {"stream": stream, "seq": seq},
                )
        st = self._stream(sender, stream, base)
        if not c.greeted:
            self._greet(c, st, resend=seq > st.next_expected)
        ne, end = st.next_expected, seq + n
        ps = self._per_sender[sender]
        if seq > ne:
            self.gaps += 1
            ps.gaps += 1
            self._request_resend(c, st, now)
            return
        if end <= ne:
            self.duplicates += n
            ps.duplicates += n
            return
        k = ne - seq
        self.duplicates += k
        ps.duplicates += k
        out.append(
            TransitionBatch(
                sender,
                stream,
                np.arange(ne, end, dtype=np.int64),
                {name: np.array(a[k:]) for name, a in arrays.items()},
            )
        )
        st.next_expected = end
        self.received += end - ne
        ps.received += end - ne
