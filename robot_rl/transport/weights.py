"""Policy weights, learner -> control processes: PUB/SUB, one frame per update, newest wins (ZMQ_CONFLATE).

A subscriber that connects after a publish sees nothing until the next one; learners that publish rarely should
call `WeightPublisher.republish()` every few seconds so late joiners (or restarted robots) catch up.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq

from .protocol import ProtocolError, WeightUpdate, decode_weights, encode_weights
from .security import (
    CurveClientKeys,
    CurveServerKeys,
    check_bind,
    release_server_socket,
    setup_client_socket,
    setup_server_socket,
)
from .streams import tune_socket

log = logging.getLogger(__name__)


class WeightPublisher:
    def __init__(self, endpoint: str, curve: CurveServerKeys | None = None):
        check_bind(endpoint, curve)
        self.endpoint, self._curve = endpoint, curve
        self._sock = zmq.Context.instance().socket(zmq.PUB)
        self._sock.setsockopt(zmq.CONFLATE, 1)  # per subscriber, only the newest update waits in the queue
        self._sock.setsockopt(zmq.LINGER, 0)
        tune_socket(self._sock)
        setup_server_socket(self._sock, curve)
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError as e:
            release_server_socket(self._sock, curve)
            self._sock.close(0)
            raise OSError(f"cannot bind weight publisher to {endpoint}: {e}") from e
        self._last: bytes | None = None
        self.version: int | None = None

    def publish(self, version: int, state_dict: dict, meta: dict | None = None) -> int:
        """Encode and send; returns the frame size in bytes. Versions must not decrease."""
        if self.version is not None and version < self.version:
            raise ValueError(
                f"weights version {version} is older than the last published {self.version}: "
                "versions must increase (subscribers ignore older ones)"
            )
        buf = encode_weights(version, state_dict, meta)
        self._last, self.version = buf, version
        self._send(buf)
        return len(buf)

    def republish(self) -> None:
        """Send the last update again (for subscribers that joined since); no-op before the first publish."""
        if self._last is not None:
            self._send(self._last)

    def _send(self, buf: bytes) -> None:
        try:
            self._sock.send(buf, flags=zmq.DONTWAIT, copy=len(buf) < 65536)
        except zmq.Again:
            pass  # PUB drops rather than blocks

    def close(self) -> None:
        if self._sock.closed:
            return
        release_server_socket(self._sock, self._curve)
        self._sock.close(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class WeightSubscriber:
    """Receives, verifies and decodes updates in a background thread; `latest()` never blocks."""

    def __init__(self, endpoint: str, curve: CurveClientKeys | None = None):
        self.endpoint, self._curve = endpoint, curve
        self._lock = threading.Lock()
        self._pending: WeightUpdate | None = None
        self.version: int | None = None  # newest accepted version
        self.last_received: float | None = None
        self.rejected = self.received = self.ignored = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> WeightSubscriber:
        if self._thread is None:
            ready = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(ready,), name="WeightSubscriber", daemon=True)
            self._thread.start()
            ready.wait(5.0)
        return self

    def latest(self) -> WeightUpdate | None:
        """The newest update not yet returned, or None."""
        with self._lock:
            upd, self._pending = self._pending, None
        return upd

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def _run(self, ready: threading.Event) -> None:
        sock = zmq.Context.instance().socket(zmq.SUB)
        try:
            sock.setsockopt(zmq.CONFLATE, 1)  # must precede connect
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            tune_socket(sock)
            setup_client_socket(sock, self._curve)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.connect(self.endpoint)
            ready.set()
            while not self._stop.is_set():
                if not sock.poll(50, zmq.POLLIN):
                    continue
                frame = sock.recv(copy=False)
                try:
                    upd = decode_weights(frame)
                except ProtocolError as e:
                    self.rejected += 1
                    log.warning("weight subscriber %s: rejected an update: %s", self.endpoint, e)
                    continue
                self.last_received = time.monotonic()
                if self.version is not None and upd.version <= self.version:
                    self.ignored += 1
                    continue
                with self._lock:
                    self._pending, self.version = upd, upd.version
                self.received += 1
        except Exception:
            log.exception("weight subscriber %s thread crashed", self.endpoint)
        finally:
            ready.set()
            sock.close(0)
