"""Reliable, batched transition stream: control process (DEALER) -> learner (ROUTER). See docs/protocol.md.

Sender: `submit()` only enqueues (never blocks the control loop); a background thread owns the socket, stacks
queued transitions into batches, sends them, sends heartbeats, processes acks and resends. Every transition is
kept in memory until the learner acknowledges it as persisted, so an unreachable learner makes the sender's
memory grow by (rate x transition size) — watch `unacked_count` / `stats()["unacked_bytes"]`.

Receiver: `poll()` delivers each transition of each sender exactly once and in order (dedup by the per-sender
next expected seq); acking is the learner's job, after it has persisted what it got.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import zmq

from .protocol import ProtocolError, decode_message, encode_message, wire_dtype
from .security import (
    CurveClientKeys,
    CurveServerKeys,
    check_bind,
    release_server_socket,
    setup_client_socket,
    setup_server_socket,
)

log = logging.getLogger(__name__)

Transition = dict[str, np.ndarray]


def _tune(sock: zmq.Socket) -> None:
    # ZMTP-level heartbeats: a dead TCP peer is dropped (and reconnected) within a few seconds.
    sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
    sock.setsockopt(zmq.HEARTBEAT_TTL, 3000)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)


def _int_field(h: dict, key: str, minimum: int | None = 0) -> int:
    v = h.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or (minimum is not None and v < minimum):
        raise ProtocolError(f"header field {key!r} must be an integer >= {minimum}, got {v!r}")
    return v


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
    """

    def __init__(
        self,
        endpoint: str,
        sender_id: str,
        batch_size: int = 32,
        max_batch_delay_s: float = 0.05,
        resend_after_s: float = 1.0,
        heartbeat_interval_s: float = 0.1,
        start_seq: int = 0,
        curve: CurveClientKeys | None = None,
    ):
        rid = sender_id.encode()
        if not 1 <= len(rid) <= 255:
            raise ValueError(f"sender_id must be 1..255 bytes of UTF-8, got {sender_id!r}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.endpoint, self.sender_id = endpoint, sender_id
        self.batch_size, self.max_batch_delay_s = batch_size, max_batch_delay_s
        self.resend_after_s, self.heartbeat_interval_s = resend_after_s, heartbeat_interval_s
        self.start_seq, self._curve = start_seq, curve
        self._lock = threading.Lock()
        self._queue: collections.deque = collections.deque()  # (seq, t_submit, transition)
        self._next_seq = start_seq
        self._schema: dict | None = None
        self._signaled = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        # Owned by the sender thread:
        self._chunks: list[_Chunk] = []
        self._cursor = 0  # index of the next chunk to transmit
        self._acked = -1
        self._progress_t = time.monotonic()
        self._last_contact: float | None = None
        self._sent = self._resent = self._rejected = self._batches = 0
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
        """Enqueue one transition (arrays are copied); returns its seq. Never blocks on the network."""
        if self._closed:
            raise RuntimeError("TransitionSender.submit() after close()")
        t = {k: np.array(v) for k, v in transition.items()}
        schema = {k: (a.dtype, a.shape) for k, a in t.items()}
        with self._lock:
            if self._schema is None:
                if not t:
                    raise ValueError("a transition needs at least one array")
                for k, a in t.items():
                    wire_dtype(a.dtype)
                self._schema = schema
            elif schema != self._schema:
                raise ValueError(f"transition {_schema_diff(self._schema, schema)}: every transition of one "
                                 "sender must have the same keys, dtypes and shapes")
            seq = self._next_seq
            self._next_seq += 1
            self._queue.append((seq, time.monotonic(), t))
            wake = not self._signaled
            self._signaled = True
        if wake:
            try:
                os.write(self._wake_w, b"\0")
            except (BlockingIOError, OSError):
                pass
        return seq

    def close(self, linger_s: float = 1.0) -> int:
        """Stop, first waiting up to `linger_s` for every transition to be acked; returns how many were not."""
        if self._closed:
            return self.unacked_count
        self._closed = True
        self._linger_deadline = time.monotonic() + linger_s
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(linger_s + 5.0)
        left = self.unacked_count
        if left:
            log.warning("TransitionSender %s closed with %d unacknowledged transitions (seq %d..%d)",
                        self.sender_id, left, self._base(), self._next_seq - 1)
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
    def unacked_count(self) -> int:
        return self._next_seq - self._base()

    @property
    def sent_count(self) -> int:
        return self._sent

    def stats(self) -> dict:
        chunks = list(self._chunks)
        return {
            "submitted": self._next_seq - self.start_seq,
            "sent": self._sent,
            "resent": self._resent,
            "batches": self._batches,
            "acked_upto": self._acked,
            "unacked": self.unacked_count,
            "queued": len(self._queue),
            "unacked_bytes": sum(c.nbytes for c in chunks),
            "rejected": self._rejected,
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

    def _run(self) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.sender_id.encode())
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on live connections: we do our own resending
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        _tune(sock)
        setup_client_socket(sock, self._curve)
        sock.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        next_hb = 0.0
        try:
            while True:
                now = time.monotonic()
                stopping = self._stop.is_set()
                if stopping and (self.unacked_count == 0 or now >= self._linger_deadline):
                    break
                self._make_chunks(now, force=stopping)
                blocked = not self._send_pending(sock)
                if now >= next_hb:
                    self._heartbeat(sock)
                    next_hb = now + self.heartbeat_interval_s
                if self._cursor > 0 and now - self._progress_t > self.resend_after_s:
                    log.info("sender %s: no ack progress for %.1fs, resending from seq %d",
                             self.sender_id, now - self._progress_t, self._acked + 1)
                    self._rewind(0, now)
                    continue
                # sleep until: a message, a submit, the socket becomes writable, or a timer
                deadlines = [next_hb]
                if self._cursor > 0:
                    deadlines.append(self._progress_t + self.resend_after_s)
                if self._queue and self.max_batch_delay_s > 0:
                    deadlines.append(self._queue[0][1] + self.max_batch_delay_s)
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
                if events.get(sock, 0) & zmq.POLLIN:
                    self._recv_all(sock)
        except Exception:
            log.exception("TransitionSender %s thread crashed", self.sender_id)
        finally:
            sock.close(0)

    def _make_chunks(self, now: float, force: bool) -> None:
        bs, delay = self.batch_size, self.max_batch_delay_s
        while True:
            with self._lock:
                q = self._queue
                if not q or not (force or delay <= 0 or len(q) >= bs or now - q[0][1] >= delay):
                    return
                items = [q.popleft() for _ in range(min(bs, len(q)))]
            arrays = {k: np.stack([it[2][k] for it in items]) for k in items[0][2]}
            self._chunks.append(_Chunk(items[0][0], len(items), arrays, sum(a.nbytes for a in arrays.values())))

    def _send_pending(self, sock: zmq.Socket) -> bool:
        """Transmit chunks from the cursor; False if the socket would block (no peer / high-water mark)."""
        while self._cursor < len(self._chunks):
            c = self._chunks[self._cursor]
            frames = encode_message("transitions", {"seq": c.seq0, "n": c.n, "base": self._base()}, c.arrays)
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
        return self._chunks[-1].end if self._chunks else self._base()

    def _heartbeat(self, sock: zmq.Socket) -> None:
        hdr = {"base": self._base(), "next": self._next_seq, "sent": self._next_to_send()}
        try:
            sock.send_multipart(encode_message("heartbeat", hdr), flags=zmq.DONTWAIT)
        except zmq.Again:
            pass

    def _rewind(self, index: int, now: float) -> None:
        if index < self._cursor:
            self._resent += sum(c.n for c in self._chunks[index : self._cursor])
            self._cursor = index
        self._progress_t = now

    def _recv_all(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.DONTWAIT)
            except zmq.Again:
                return
            now = time.monotonic()
            try:
                msg = decode_message(frames)
                if msg.type not in ("ack", "heartbeat"):
                    raise ProtocolError(f"unexpected message type {msg.type!r} from the learner")
                upto = _int_field(msg.header, "upto", minimum=-1)
                resend_from = msg.header.get("resend_from")
                if resend_from is not None:
                    resend_from = _int_field(msg.header, "resend_from")
            except ProtocolError as e:
                self._rejected += 1
                log.warning("sender %s: rejected a message from the learner at %s: %s", self.sender_id,
                            self.endpoint, e)
                continue
            self._last_contact = now
            if upto > self._acked:
                if upto >= self._next_seq:
                    log.warning(
                        "sender %s: learner acked seq %d but this sender has only produced up to %d; the learner "
                        "holds state from an earlier run with this sender_id. Ignoring the ack; start the sender "
                        "with start_seq=%d to continue that numbering", self.sender_id, upto, self._next_seq - 1,
                        upto + 1)
                    continue
                self._acked = upto
                k = 0
                while k < len(self._chunks) and self._chunks[k].end <= upto + 1:
                    k += 1
                if k:
                    del self._chunks[:k]
                    self._cursor = max(0, self._cursor - k)
                self._progress_t = now
            if resend_from is not None:
                idx = next((i for i, c in enumerate(self._chunks) if c.end > resend_from), len(self._chunks))
                if idx < self._cursor:
                    log.info("sender %s: learner asked for a resend from seq %d", self.sender_id, resend_from)
                self._rewind(idx, now)


def _schema_diff(old: dict, new: dict) -> str:
    missing, extra = sorted(old.keys() - new.keys()), sorted(new.keys() - old.keys())
    if missing or extra:
        return f"keys differ from the stream's earlier ones (missing {missing}, unexpected {extra})"
    for k in old:
        if old[k] != new[k]:
            return (f"key {k!r} has dtype {np.dtype(new[k][0]).name} shape {tuple(new[k][1])} per transition, but the "
                    f"stream's earlier ones had dtype {np.dtype(old[k][0]).name} shape {tuple(old[k][1])}")
    return "schema differs"


# ----------------------------------------------------------------------------------------------- receiver
@dataclass
class TransitionBatch:
    sender_id: str
    seqs: np.ndarray  # int64, contiguous
    arrays: dict[str, np.ndarray]  # each with leading axis len(seqs)

    def __len__(self) -> int:
        return len(self.seqs)


@dataclass
class _Peer:
    rid: bytes
    next_expected: int
    acked: int
    last_heard: float | None = None
    greeted: bool = False
    schema: dict | None = None
    req_ne: int = -1
    req_t: float = -math.inf
    warnings: int = 0


class _Reject(Exception):
    pass


class TransitionReceiver:
    """Learner side: a bound ROUTER. Not thread-safe: call poll/ack/set_next_expected from one thread."""

    MAX_DRAIN = 1000  # messages handled per poll() call before returning

    def __init__(self, endpoint: str, heartbeat_interval_s: float = 0.1, curve: CurveServerKeys | None = None):
        check_bind(endpoint, curve)
        self.endpoint, self.heartbeat_interval_s, self._curve = endpoint, heartbeat_interval_s, curve
        self._sock = zmq.Context.instance().socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting sender takes its routing id back
        self._sock.setsockopt(zmq.LINGER, 0)
        _tune(self._sock)
        setup_server_socket(self._sock, curve)
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError as e:
            release_server_socket(self._sock, curve)
            self._sock.close(0)
            raise OSError(f"cannot bind transition receiver to {endpoint}: {e}") from e
        self._peers: dict[str, _Peer] = {}
        self._next_hb = 0.0
        self.rejected = self.duplicates = self.gaps = self.skipped = self.received = 0
        self._closed = False

    @property
    def senders(self) -> dict[str, float]:
        return {s: p.last_heard for s, p in self._peers.items() if p.last_heard is not None}

    def next_expected(self, sender_id: str) -> int | None:
        p = self._peers.get(sender_id)
        return None if p is None else p.next_expected

    def set_next_expected(self, sender_id: str, seq: int) -> None:
        """Restore after a restart: everything below `seq` from this sender is already persisted (acked)."""
        p = self._peers.get(sender_id)
        if p is None:
            p = self._peers[sender_id] = _Peer(sender_id.encode(), seq, seq - 1)
        p.next_expected, p.acked, p.greeted = seq, seq - 1, False

    def ack(self, sender_id: str, upto: int) -> None:
        """Tell the sender everything up to and including `upto` is persisted (it may drop it)."""
        p = self._peers.get(sender_id)
        if p is None:
            raise KeyError(f"ack for unknown sender {sender_id!r}")
        if upto >= p.next_expected:
            raise ValueError(f"cannot ack seq {upto} of sender {sender_id!r}: only seqs < {p.next_expected} "
                             "have been delivered")
        p.acked = max(p.acked, upto)
        self._send(p, "ack", {"upto": p.acked})

    def poll(self, timeout_ms: int) -> list[TransitionBatch]:
        """Wait up to `timeout_ms` for transitions; returns new ones (possibly []). Never raises on bad input."""
        deadline = time.monotonic() + max(0, timeout_ms) / 1000
        out: list[TransitionBatch] = []
        while True:
            now = time.monotonic()
            if now >= self._next_hb:
                self._heartbeats()
                self._next_hb = now + self.heartbeat_interval_s
            wait = min(deadline, self._next_hb) - now
            if self._sock.poll(max(0, math.ceil(wait * 1000)), zmq.POLLIN):
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
        return all(p.acked >= p.next_expected - 1 for p in list(self._peers.values()))

    def close(self, linger_s: float = 0.5) -> None:
        """Close, giving the last acks up to `linger_s` to leave (linger 0 would drop them unsent)."""
        if self._closed:
            return
        self._closed = True
        release_server_socket(self._sock, self._curve)
        self._sock.close(int(linger_s * 1000))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- internals ------------------------------------------------------------------------------------
    def _send(self, p: _Peer, msg_type: str, header: dict) -> None:
        try:
            self._sock.send_multipart([p.rid, *encode_message(msg_type, header)], flags=zmq.DONTWAIT)
        except zmq.ZMQError:
            pass  # peer gone or its queue full: the next heartbeat repeats the information

    def _heartbeats(self) -> None:
        for p in self._peers.values():
            self._send(p, "heartbeat", {"upto": p.acked})

    def _reject(self, sender: str, problem: str) -> None:
        self.rejected += 1
        p = self._peers.get(sender)
        n = (p.warnings + 1) if p else self.rejected
        if p:
            p.warnings = n
        if n <= 10 or n % 1000 == 0:
            log.warning("transition receiver %s: rejected a message from sender %r: %s", self.endpoint, sender,
                        problem)

    def _handle(self, frames: list, out: list) -> None:
        try:
            rid = frames[0].bytes
            sender = rid.decode("utf-8", "replace")
        except Exception:
            self.rejected += 1
            return
        try:
            msg = decode_message(frames[1:])
            self._dispatch(sender, rid, msg, out)
        except (ProtocolError, _Reject) as e:
            self._reject(sender, str(e))
        except Exception as e:  # never let a peer's bytes crash the learner
            self._reject(sender, f"unexpected error while handling it: {e!r}")

    def _peer(self, sender: str, rid: bytes, base: int, now: float) -> _Peer:
        p = self._peers.get(sender)
        if p is None:
            p = self._peers[sender] = _Peer(rid, base, base - 1)
            log.info("transition receiver %s: new sender %r starting at seq %d", self.endpoint, sender, base)
        p.rid, p.last_heard = rid, now
        if base > p.next_expected:
            log.warning("transition receiver %s: sender %r no longer holds seqs %d..%d (its oldest is %d); they "
                        "are lost to this learner, continuing from %d", self.endpoint, sender, p.next_expected,
                        base - 1, base, base)
            self.skipped += base - p.next_expected
            p.next_expected, p.acked = base, max(p.acked, base - 1)
        return p

    def _request_resend(self, p: _Peer, now: float) -> bool:
        if p.req_ne == p.next_expected and now - p.req_t < max(0.25, 2 * self.heartbeat_interval_s):
            return False
        p.req_ne, p.req_t = p.next_expected, now
        self._send(p, "ack", {"upto": p.acked, "resend_from": p.next_expected})
        return True

    def _dispatch(self, sender: str, rid: bytes, msg, out: list) -> None:
        h, now = msg.header, time.monotonic()
        if msg.type == "heartbeat":
            base, nxt, sent = _int_field(h, "base"), _int_field(h, "next"), _int_field(h, "sent")
            p = self._peer(sender, rid, base, now)
            if nxt < p.next_expected:
                log.warning("transition receiver %s: sender %r restarted its numbering (next seq %d, but %d were "
                            "already received); accepting its stream from seq %d — give senders a persistent "
                            "start_seq to keep seqs unique", self.endpoint, sender, nxt, p.next_expected, base)
                p.next_expected, p.acked, p.schema = base, base - 1, None
            requested = sent > p.next_expected and self._request_resend(p, now)
            if not p.greeted and not requested:
                self._send(p, "ack", {"upto": p.acked})
            p.greeted = True
            return
        if msg.type != "transitions":
            raise _Reject(f"unexpected message type {msg.type!r} (expected 'transitions' or 'heartbeat')")
        seq, n, base = _int_field(h, "seq"), _int_field(h, "n", minimum=1), _int_field(h, "base")
        arrays = msg.arrays
        if not arrays:
            raise _Reject("transitions batch carries no arrays")
        for k, a in arrays.items():
            if a.ndim == 0 or a.shape[0] != n:
                raise _Reject(f"array {k!r} has shape {a.shape} but the batch header says n={n} transitions")
        schema = {k: (a.dtype.str, a.shape[1:]) for k, a in arrays.items()}
        p = self._peer(sender, rid, base, now)
        if p.schema is None:
            p.schema = schema
        elif schema != p.schema:
            raise _Reject(f"batch seq {seq}..{seq + n - 1}: {_schema_diff(p.schema, schema)}")
        if not p.greeted:
            p.greeted = True
            if seq <= p.next_expected:
                self._send(p, "ack", {"upto": p.acked})
        ne, end = p.next_expected, seq + n
        if seq > ne:
            self.gaps += 1
            self._request_resend(p, now)
            return
        if end <= ne:
            self.duplicates += n
            return
        k = ne - seq
        self.duplicates += k
        out.append(TransitionBatch(sender, np.arange(ne, end, dtype=np.int64),
                                   {name: np.array(a[k:]) for name, a in arrays.items()}))
        p.next_expected = end
        self.received += end - ne
