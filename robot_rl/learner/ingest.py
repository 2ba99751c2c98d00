"""Receive, make durable, acknowledge: the learner's ingest path. It runs in its own process
(robot_rl/learner/ingest_process.py), so neither training nor zarr ever delays an ack or a heartbeat.

Two threads with one job each:
- receiver: owns the ROUTER socket (heartbeats keep flowing), checks each new batch against the replay's schema,
  hands it to the log thread, and sends the acks the log thread posts back;
- log: takes what queued meanwhile (up to `group_mb`), holds back rows with non-finite observations/reward/action
  (quarantine), appends the batches to the ingest log with ONE fsync, then posts the acks and advances
  `durable_lsn` (the learner process reads the log up to there into its replay and writes zarr behind).
An ack therefore costs one log append + fsync, shared by every batch that arrived meanwhile.

A full disk (or any other error writing the log) stops acknowledging for good: the robots keep what was not
acknowledged; `failure` says why and the learner exits (see robot_rl/learner/process.py's exit codes).
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from robot_rl.learner.ingest_log import IngestLog, Record
from robot_rl.learner.schema import Schema, schema_of, schema_problem

log = logging.getLogger("robot_rl.learner")

QUARANTINE_FILE = "quarantine.jsonl"
PEERS_S = 0.1  # the receiver thread copies its connections' last-heard times this often (for per-robot health)


@dataclass
class IngestConfig:
    """session.learner_ingest (configs/session/sim.yaml, where each is explained); these defaults match it, for
    tests and benchmarks that build one directly."""

    poll_ms: int = 5  # receiver wait per poll: bounds how long a posted ack waits to be sent
    flush_s: float = 1.0  # zarr write-behind interval
    finite_keys: tuple = ("obs.", "reward", "action")  # must be finite ('x.' = every key starting with it)
    quarantine_log_max: int = 10  # quarantined batches described in the log (all are counted)
    segment_mb: float = 64.0  # ingest-log segment size: a closed segment is deleted once zarr holds it
    group_mb: float = 8.0  # batches written per fsync at most (what queued meanwhile, up to this size)

    @property
    def group_bytes(self) -> int:
        return int(self.group_mb * 2**20)

    @classmethod
    def from_session(cls, s) -> IngestConfig:
        learner = dict(s.get("learner_ingest") or {})
        if "finite_keys" in learner:
            learner["finite_keys"] = tuple(learner["finite_keys"])
        return cls(**learner)


def finite_mask(arrays: dict[str, np.ndarray], finite_keys: tuple) -> tuple[np.ndarray, list[str]]:
    """(rows whose checked keys are all finite, the keys that had non-finite values). Other columns may carry
    NaN on purpose ("not applicable": expert_action, policy_action, base_action, residual ...)."""
    n = len(next(iter(arrays.values())))
    ok, bad = np.ones(n, bool), []
    for key, a in arrays.items():
        if not any(key.startswith(k) if k.endswith(".") else key == k for k in finite_keys):
            continue
        if a.dtype.kind not in "fc":
            continue
        row_ok = np.isfinite(a.reshape(n, -1)).all(axis=1)
        if not row_ok.all():
            ok &= row_ok
            bad.append(key)
    return ok, bad


@dataclass
class _Pending:
    batch: object
    stream: object
    t: float  # when the receiver delivered it (ack latency is measured from here)
    nbytes: int


class Ingest:
    """Owns the receiver and the ingest log; `start()`, then `stop()` (joins). `schema` and `next_expected` are the
    replay's (what it holds, so a restarted learner resumes each (sender, stream) exactly where it ends)."""

    def __init__(
        self,
        receiver,
        ingest_log: IngestLog,
        run_dir: Path,
        cfg: IngestConfig,
        schema: Schema | None,
        next_expected: dict,
        on_durable=None,
        log_failure: bool = True,
    ):
        """`on_durable(lsn)`: called once records below `lsn` are fsynced; `log_failure`: log a storage failure
        here (False: the caller reports `failure` itself, once)."""
        self.receiver, self.log, self.cfg = receiver, ingest_log, cfg
        self.run_dir = Path(run_dir)
        self.schema = schema
        if self.schema is not None:  # a sender with other keys/dtypes/shapes is refused with a reply it shows
            receiver.expected_schema = dict(self.schema)
        for (sender, stream), nxt in next_expected.items():  # resume exactly where the stored data ends
            receiver.set_next_expected(sender, stream, nxt)  # stream None (rows from before streams): its first
        self.durable_lsn = ingest_log.next_lsn  # every log record below this is fsynced
        self._on_durable, self._log_failure = on_durable, log_failure
        self._to_log: queue.Queue[_Pending] = queue.Queue()
        self._acks: queue.Queue = queue.Queue()  # (sender, stream, upto, [receive times])
        self._stop_rx = threading.Event()
        self._rx_done = threading.Event()  # the receiver takes no more batches: the log thread may finish
        self.failed = threading.Event()
        self.failure: tuple[str, str] | None = None  # (kind: "disk_full" | "storage", message)
        self._threads: list[threading.Thread] = []
        self.last_batch = time.monotonic()
        # counters (written by one thread each, read by anyone)
        self.received: collections.Counter = collections.Counter()  # (sender, stream) -> transitions delivered
        self.stored: collections.Counter = collections.Counter()  # ... made durable (for the replay)
        self.quarantined: collections.Counter = collections.Counter()
        self.schema_rejected: collections.Counter = collections.Counter()
        self.acked: dict = {}  # (sender, stream) -> highest acked seq
        self.acked_transitions = 0  # acknowledged this run (stored + quarantined)
        self.errors: list[str] = []  # storage errors
        self.rejections: list[str] = []  # batches refused for their schema (not a storage problem)
        self._window: list[float] = []  # latencies since the last `window_latency()`
        self._window_by: dict[str, list[float]] = collections.defaultdict(list)  # ... per sender
        self._window_lock = threading.Lock()
        self._quarantine_logged = 0
        # per sender (a fleet's robots): when its batches arrived (monotonic), and its connection as last polled
        self.first_batch: dict[str, float] = {}
        self.last_batch_by: dict[str, float] = {}
        self._peers: dict[str, float] = {}  # sender -> last heard (monotonic), connections not forgotten
        self._peers_t = 0.0

    # ---------------------------------------------------------------------------------------------- control
    def start(self) -> Ingest:
        self._threads = [
            threading.Thread(target=self._receive_loop, name="ingest-receiver"),
            threading.Thread(target=self._log_loop, name="ingest-log"),
        ]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        """Clean shutdown, in dependency order: the receiver stops taking batches, the log thread makes the
        queued ones durable, and their acks go out before the receiver thread ends."""
        self._stop_rx.set()
        for t in self._threads:
            t.join()
        self.log.close()

    def drain(self, quiet_s: float, timeout_s: float) -> str:
        """Keep acknowledging until the stream has been quiet for `quiet_s` and nothing is left unacknowledged
        (bounded by `timeout_s`); returns what happened, for the summary."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self.failed.is_set():
            if time.monotonic() - self.last_batch > quiet_s and self.idle:
                return "all acknowledged"
            time.sleep(0.05)
        if self.failed.is_set():
            return f"stopped: {self.failure[1]}"
        unacked = self.backlog()["unacked"]
        return "all acknowledged" if unacked == 0 else f"timed out after {timeout_s} s with {unacked} unacknowledged"

    @property
    def idle(self) -> bool:
        """Nothing queued and every delivered transition acknowledged."""
        return self._to_log.empty() and self._acks.empty() and self.backlog()["unacked"] == 0

    # ---------------------------------------------------------------------------------------------- threads
    def _receive_loop(self) -> None:
        while True:
            stopping = self._stop_rx.is_set()
            if stopping:
                self._rx_done.set()
            else:
                for batch in self.receiver.poll(timeout_ms=self.cfg.poll_ms):
                    self._accept(batch, time.monotonic())
                self._snapshot_peers()
            self._send_acks()
            if stopping and not self._log_thread_alive():
                self._send_acks()
                return
            if stopping:
                time.sleep(self.cfg.poll_ms / 1000)

    def _snapshot_peers(self) -> None:
        """The receiver's connections, copied by its own thread (it is not thread-safe) for `stats()`."""
        now = time.monotonic()
        if now - self._peers_t >= PEERS_S:
            self._peers, self._peers_t = self.receiver.senders, now

    def _log_thread_alive(self) -> bool:
        return self._threads[1].is_alive()

    def _accept(self, batch, t: float) -> None:
        stream = batch.stream
        key = (batch.sender_id, stream)
        self.received[key] += len(batch.seqs)
        self.last_batch = t
        self.first_batch.setdefault(batch.sender_id, t)
        self.last_batch_by[batch.sender_id] = t
        if self.failed.is_set():
            return  # storage is gone: acknowledge nothing more (the robot keeps these)
        got = schema_of(batch.arrays)
        if self.schema is None:
            self.schema = got  # the first batch fixes the replay's schema (persisted with it; the receiver too
            # fixed its expected_schema from it); a later mismatch is refused by the receiver, and here again
        else:
            problem = schema_problem(self.schema, got)
            if problem:
                self.schema_rejected[key] += len(batch.seqs)
                msg = f"rejected a batch from {batch.sender_id!r}: its {problem}"
                if msg not in self.rejections:
                    log.error(
                        "%s (the replay's schema is fixed by its first batch; this sender's transitions "
                        "are not stored or acknowledged)",
                        msg,
                    )
                    self.rejections.append(msg)
                return
        self._to_log.put(_Pending(batch, stream, t, sum(a.nbytes for a in batch.arrays.values())))

    def _send_acks(self) -> None:
        now = time.monotonic()
        while True:
            try:
                sender, stream, upto, times, n = self._acks.get_nowait()
            except queue.Empty:
                return
            self.receiver.ack(sender, stream, upto)  # never raises
            self.acked[(sender, stream)] = upto
            self.acked_transitions += n
            lat = [now - t for t in times]
            with self._window_lock:
                self._window.extend(lat)
                self._window_by[sender].extend(lat)

    def _log_loop(self) -> None:
        while True:
            try:
                first = self._to_log.get(timeout=self.cfg.poll_ms / 1000)
            except queue.Empty:
                if self._rx_done.is_set():
                    return
                continue
            pending, nbytes = [first], first.nbytes
            while nbytes < self.cfg.group_bytes:  # one fsync for what queued meanwhile, bounded: acks keep flowing
                try:
                    p = self._to_log.get_nowait()
                except queue.Empty:
                    break
                pending.append(p)
                nbytes += p.nbytes
            if self.failed.is_set():
                continue  # drain without storing: nothing more is acknowledged
            self._store(pending)

    def _store(self, pending: list[_Pending]) -> None:
        records = []
        for p in pending:
            b = p.batch
            ok, bad = finite_mask(b.arrays, self.cfg.finite_keys)
            if ok.all():
                records.append(Record(b.sender_id, p.stream, b.seqs, b.arrays, int(b.seqs[-1]) + 1))
                continue
            self._quarantine(b, p.stream, ~ok, bad)
            records.append(
                Record(b.sender_id, p.stream, b.seqs[ok], {k: a[ok] for k, a in b.arrays.items()}, int(b.seqs[-1]) + 1)
            )
        try:
            lsns = self.log.append(records)
        except OSError as e:
            self.fail(e, "the ingest log")
            return
        acks: dict = {}  # durable now: acknowledge
        for rec, p in zip(records, pending):
            key = (rec.sender, rec.stream)
            upto, times, n = acks.get(key, (-1, [], 0))
            acks[key] = (max(upto, rec.end - 1), times + [p.t], n + len(p.batch.seqs))
        for (sender, stream), (upto, times, n) in acks.items():
            self._acks.put((sender, stream, upto, times, n))
        for rec in records:
            self.stored[(rec.sender, rec.stream)] += len(rec.seqs)
        if lsns:
            self.durable_lsn = lsns[-1] + 1
            if self._on_durable is not None:
                self._on_durable(self.durable_lsn)

    def _quarantine(self, batch, stream, rows: np.ndarray, bad: list[str]) -> None:
        """Rows with NaN/inf where the learner needs numbers: counted, described, never put in the replay."""
        key = (batch.sender_id, stream)
        seqs = batch.seqs[rows]
        self.quarantined[key] += len(seqs)
        entry = {"t": time.time(), "sender": batch.sender_id, "stream": stream, "seqs": seqs.tolist(), "keys": bad}
        try:
            with (self.run_dir / QUARANTINE_FILE).open("a") as f:
                f.write(json.dumps(entry) + "\n")
        except OSError:
            pass  # the log append right after reports a full disk once
        if self._quarantine_logged < self.cfg.quarantine_log_max:
            self._quarantine_logged += 1
            log.warning(
                "quarantined %d transition(s) from %s (seq %d..%d): non-finite values in %s; they are "
                "acknowledged but never trained on (%s)",
                len(seqs),
                batch.sender_id,
                int(seqs[0]),
                int(seqs[-1]),
                ", ".join(bad),
                self.run_dir / QUARANTINE_FILE,
            )

    def fail(self, e: OSError, where: str) -> None:
        kind = "disk_full" if e.errno == errno.ENOSPC else "storage"
        msg = f"cannot write {where}: {e.strerror or e} ({getattr(e, 'filename', None) or self.run_dir})"
        if not self.failed.is_set():
            self.failure = (kind, msg)
            if self._log_failure:
                log.error("%s; no longer acknowledging transitions (the robots keep them); stopping", msg)
            self.errors.append(msg)
            self.failed.set()

    # ---------------------------------------------------------------------------------------------- figures
    def window_latencies(self) -> tuple[list[float], dict[str, list[float]]]:
        """Ack latencies (s) since the previous call: all, and per sender."""
        with self._window_lock:
            lat, self._window = self._window, []
            by, self._window_by = dict(self._window_by), collections.defaultdict(list)
        return lat, by

    def peers(self) -> dict[str, dict]:
        """Per sender seen this run: seconds since its connection was last heard (None: no connection, or it was
        forgotten), since its first and its last batch."""
        now, heard = time.monotonic(), dict(self._peers)
        names = set(heard) | set(self.last_batch_by)
        return {
            s: {
                "last_heard_s": now - heard[s] if s in heard else None,
                "first_batch_s": now - self.first_batch[s] if s in self.first_batch else None,
                "last_batch_s": now - self.last_batch_by[s] if s in self.last_batch_by else None,
            }
            for s in sorted(names)
        }

    def backlog(self) -> dict[str, int]:
        """Transitions delivered but not yet acknowledged."""
        delivered = sum(self.received.values()) - sum(self.schema_rejected.values())
        return {"unacked": max(0, delivered - self.acked_transitions)}

    def stats(self) -> dict:
        """Everything the learner process reports, as plain data (it crosses the process boundary)."""
        return {
            "received": dict(self.received),
            "stored": dict(self.stored),
            "quarantined": dict(self.quarantined),
            "schema_rejected": dict(self.schema_rejected),
            "acked": dict(self.acked),
            "errors": list(self.errors),
            "rejections": list(self.rejections),
            "failure": self.failure,
            "durable_lsn": self.durable_lsn,
            "unacked": self.backlog()["unacked"],
            **dict(zip(("latencies", "latencies_by_sender"), self.window_latencies())),
            "peers": self.peers(),
            "peer_timeout_s": getattr(self.receiver, "peer_timeout_s", None),
            "last_batch_age_s": time.monotonic() - self.last_batch,
            "duplicates": self.receiver.duplicates,
            "rejected": self.receiver.rejected,
        }


def percentiles(lat) -> dict[str, float]:
    """Ack latency p50/p99 in ms (NaN without samples)."""
    if not len(lat):
        return {"ack_p50_ms": float("nan"), "ack_p99_ms": float("nan")}
    p50, p99 = np.percentile(np.asarray(lat) * 1000, [50, 99])
    return {"ack_p50_ms": float(p50), "ack_p99_ms": float(p99)}
