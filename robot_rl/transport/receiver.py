"""Learner side of the transition stream: a bound ROUTER. See docs/protocol.md.

`poll()` delivers each transition of each (sender, stream) exactly once and in order (dedup by the stream's next
expected seq); acking is the learner's job, after it has persisted what it got. Connections and streams are tracked
apart: a sender's connection may come and go (and be refused while another holds its id), its streams' seq state
stays.
"""

from __future__ import annotations

import collections
import logging
import math
import re
import time
from dataclasses import dataclass

import numpy as np
import zmq

from .protocol import (
    PROTOCOL_VERSION,
    ProtocolError,
    VersionError,
    decode_message,
    encode_message,
    int_field,
)
from .security import (
    CurveServerKeys,
    check_bind,
    release_server_socket,
    setup_server_socket,
)

from .streams import (
    HandshakeMonitor,
    MAX_STREAM_LEN,
    normalize_schema,
    schema_diff,
    schema_of,
    schema_to_wire,
    tune_socket,
)

log = logging.getLogger(__name__)


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
        tune_socket(self._sock)
        setup_server_socket(self._sock, curve)
        self._monitor = HandshakeMonitor(self._sock, f"transition receiver {endpoint}", server=True)
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
        schema = schema_of(arrays, batched=True)
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
