"""What both ends of the transition stream share: stream ids, the schema (keys, dtypes, shapes) and its wire
form, socket tuning, and the monitor that names failed CURVE handshakes. Wire format: docs/protocol.md."""

from __future__ import annotations

import logging
import os
import secrets

import numpy as np
import zmq
from zmq.utils.monitor import parse_monitor_message

from .protocol import (
    DTYPES,
    ProtocolError,
    wire_dtype,
)
from .security import (
    zap_denials,
)

log = logging.getLogger(__name__)

Transition = dict[str, np.ndarray]
Schema = dict[str, tuple[str, tuple[int, ...]]]  # key -> (wire dtype name, per-transition shape)
MAX_STREAM_LEN = 64


def tune_socket(sock: zmq.Socket) -> None:
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


def schema_of(arrays: dict[str, np.ndarray], batched: bool) -> Schema:
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


class HandshakeMonitor:
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
