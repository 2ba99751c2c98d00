"""The learner's ingest in a process of its own, and the learner-process side that turns the ingest log into the
replay.

Why a process: measured (benchmarks/bench_learner_ingest.py), a learner training in the same process doubled the
ack latency p99 of the ingest threads (the GIL); a process of its own keeps acks and heartbeats on time whatever
training, zarr or a growing replay do.

    ingest process (robot_rl/learner/ingest.py)          learner process (this module's IngestService)
    receive -> log append + fsync -> ack                  feeder: read the log up to `durable` -> replay (memory)
           `durable` lsn (shared value) ----------------> writer: every flush_s zarr append + commit, trim the log

The ingest process ignores Ctrl-C (the learner coordinates the drain) and leaves on its own as soon as the learner
process begins to exit (a dead learner must not be heartbeated for). It reports its counters every `STATS_S` and
at once on a storage failure.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

from robot_rl.learner.ingest import Ingest, IngestConfig, percentiles
from robot_rl.learner.ingest_log import IngestLog, LogTail

if TYPE_CHECKING:
    from robot_rl.learner.replay_buffer import ReplayBuffer

log = logging.getLogger("robot_rl.learner")

INGEST_LOG_DIR = "ingest_log"
STATS_S = 0.2  # the ingest process reports this often
FEED_S = 0.002  # the feeder looks for newly durable records this often
LATENCY_KEEP = 100_000  # ack latencies kept for the run's percentiles (the newest ones)
LATENCY_KEEP_PER_SENDER = 10_000  # ... and per sender
START_TIMEOUT_S = 60.0  # the ingest process binds its socket within this (imports included)
STOP_GRACE_S = 30.0  # beyond the drain timeout, for the ingest process to finish
BIND_RETRY_S = 5.0  # the transitions address may still be held this long by a killed learner's ingest process
PR_SET_PDEATHSIG = 1  # linux/prctl.h
PF_EXITING = 0x4  # linux/sched.h: the task has begun to exit


def _die_with_parent() -> None:
    """Linux: the kernel kills this process the moment the learner dies (a SIGKILLed learner must not leave its
    socket bound under a restarted one). Elsewhere the parent check in the main loop does it, a little later."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (AttributeError, OSError):
        pass


def exiting(pid: int) -> bool:
    """Linux: process `pid` has begun to exit (or is gone). Read from /proc/<pid>/stat: state and flags."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return True
    return fields[0] in ("Z", "X") or bool(int(fields[6]) & PF_EXITING)


def _leave_when_parent_exits(parent: int, interval_s: float) -> None:
    """Linux: leave the moment the learner begins to exit. The parent-death signal comes only once a SIGKILLed
    learner's memory is torn down (76-180 ms measured by benchmarks/bench_watchdog.py), and until then this process
    would go on heartbeating and acking for a dead learner, holding off the robot's watchdog. Leaving is as safe as
    that signal: what was acknowledged is already in the fsynced log; the robot resends the rest."""
    if not Path(f"/proc/{parent}/stat").exists():  # no /proc: the parent-death signal / main-loop check only
        return

    def watch() -> None:
        while not exiting(parent):
            time.sleep(interval_s)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _bind(args: dict):
    """The receiver, retrying while the address is still held (a previous learner's ingest process exiting)."""
    from robot_rl.transport import TransitionReceiver
    from robot_rl.transport.security import load_server_keys

    keys = load_server_keys(args["curve_keys_dir"]) if args["curve_keys_dir"] else None
    deadline = time.monotonic() + BIND_RETRY_S
    while True:
        try:
            return TransitionReceiver(args["endpoint"], heartbeat_interval_s=args["heartbeat_s"], curve=keys)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _child(args: dict, conn, durable) -> None:
    """The ingest process: receiver + log threads (robot_rl/learner/ingest.py) until told to stop."""
    _die_with_parent()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the learner process stops us, after its drain
    # as robot_rl.config.setup_logging, which would import torch into this small process
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S", force=True
    )
    parent = os.getppid()
    _leave_when_parent_exits(parent, args["heartbeat_s"])
    try:
        receiver = _bind(args)
    except OSError as e:
        conn.send(("fatal", str(e)))
        return
    cfg: IngestConfig = args["cfg"]
    ilog = IngestLog(args["log_dir"], segment_bytes=int(cfg.segment_mb * 2**20), start_lsn=args["start_lsn"])
    durable.value = ilog.next_lsn

    def set_durable(lsn: int) -> None:
        durable.value = lsn

    ingest = Ingest(
        receiver,
        ilog,
        Path(args["run_dir"]),
        cfg,
        args["schema"],
        args["next_expected"],
        on_durable=set_durable,
        log_failure=False,
    ).start()
    conn.send(("ready", None))
    drain_result, reported_failure = "not run", False
    try:
        while os.getppid() == parent:
            if conn.poll(STATS_S):
                cmd = conn.recv()
                if cmd[0] == "stop":
                    _, drain, quiet_s, timeout_s = cmd
                    drain_result = ingest.drain(quiet_s, timeout_s) if drain else "skipped"
                    break
            conn.send(("stats", ingest.stats()))
            if ingest.failed.is_set() and not reported_failure:
                reported_failure = True  # the stats just sent carry it: the learner reports and stops
    except (EOFError, OSError):
        pass  # the learner process is gone
    ingest.stop()
    receiver.close()
    try:
        conn.send(("final", {**ingest.stats(), "drain": drain_result}))
    except (BrokenPipeError, OSError):
        pass


class _Durable:
    """The in-process stand-in for the shared `durable` value."""

    def __init__(self, value: int):
        self.value = value


class IngestService:
    """Learner-process side: rebuilds the replay (zarr + log tail, exactly once), runs the ingest process, feeds
    the replay from the log, writes zarr behind and trims the log. `failure` / `stats()` for the learner."""

    def __init__(
        self,
        replay: ReplayBuffer,
        run_dir: Path,
        endpoint: str,
        heartbeat_s: float,
        curve_keys_dir: str | None,
        cfg: IngestConfig,
        in_process: bool = False,
    ):
        """`in_process`: run the ingest threads in this process instead (what benchmarks compare it with)."""
        self.replay, self.run_dir, self.cfg, self.in_process = replay, Path(run_dir), cfg, in_process
        self.endpoint, self.heartbeat_s, self.curve_keys_dir = endpoint, heartbeat_s, curve_keys_dir
        self.log_dir = self.run_dir / INGEST_LOG_DIR
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.tail = LogTail(self.log_dir, from_lsn=replay.lsn)
        self.from_log = 0  # rows the restart took from the log (zarr had not committed them)
        for rec in self.tail.read():
            self._feed(rec)
            self.from_log += len(rec.seqs)
        self.tail.trim(replay.disk_lsn, newest_too=True)  # no writer yet: what zarr holds can go
        self._tail_lock = threading.Lock()
        self._poll_lock = threading.Lock()  # the pipe and the figures: the feeder thread and `stop` read them
        self._proc = None
        self._conn = None
        self._local: Ingest | None = None  # in_process: the ingest threads, and their receiver
        self._local_receiver = None
        self._local_t = 0.0
        self._durable = None
        self._stats: dict = {}
        self._final: dict | None = None
        self._latencies: deque = deque(maxlen=LATENCY_KEEP)
        self._window: list[float] = []
        self._latencies_by: dict[str, deque] = {}  # per sender (a fleet's robots)
        self._window_by: dict[str, list[float]] = {}
        self._stop_threads = threading.Event()
        self._threads: list[threading.Thread] = []
        self.errors: list[str] = []
        self.failure: tuple[str, str] | None = None
        self._failure_logged = False
        self.last_batch = time.monotonic()

    def _feed(self, rec) -> None:
        self.replay.extend(rec.sender, rec.seqs, rec.arrays, rec.stream, end=rec.end, lsn=rec.lsn)

    # ---------------------------------------------------------------------------------------------- control
    def start(self) -> IngestService:
        args = {
            "endpoint": self.endpoint,
            "heartbeat_s": self.heartbeat_s,
            "curve_keys_dir": self.curve_keys_dir,
            "log_dir": str(self.log_dir),
            "run_dir": str(self.run_dir),
            "cfg": self.cfg,
            "schema": self.replay.schema,
            "next_expected": dict(self.replay.next_expected),
            "start_lsn": self.replay.lsn,
        }
        if self.in_process:
            self._start_local(args)
        else:
            self._start_process(args)
        self._threads = [
            threading.Thread(target=self._feed_loop, name="replay-feeder"),
            threading.Thread(target=self._write_loop, name="zarr-writer"),
        ]
        for t in self._threads:
            t.start()
        return self

    def _start_local(self, args: dict) -> None:
        self._durable = _Durable(self.replay.lsn)
        self._local_receiver = _bind(args)
        ilog = IngestLog(self.log_dir, segment_bytes=int(self.cfg.segment_mb * 2**20), start_lsn=self.replay.lsn)

        def set_durable(lsn: int) -> None:
            self._durable.value = lsn

        self._local = Ingest(
            self._local_receiver,
            ilog,
            self.run_dir,
            self.cfg,
            args["schema"],
            args["next_expected"],
            on_durable=set_durable,
            log_failure=False,
        ).start()

    def _start_process(self, args: dict) -> None:
        ctx = mp.get_context("spawn")  # no fork of a process holding torch threads and sockets
        self._conn, child_conn = ctx.Pipe()
        self._durable = ctx.Value("q", self.replay.lsn)
        self._proc = ctx.Process(target=_child, args=(args, child_conn, self._durable), name="ingest", daemon=True)
        self._proc.start()
        child_conn.close()
        if not self._conn.poll(START_TIMEOUT_S):
            raise RuntimeError(f"the ingest process did not start within {START_TIMEOUT_S:.0f} s")
        kind, detail = self._conn.recv()
        if kind == "fatal":
            self._proc.join()
            raise OSError(detail)

    def poll(self) -> None:
        """Take the ingest process's reports (the feeder thread calls this every few ms)."""
        if self._local is not None:
            if time.monotonic() - self._local_t >= STATS_S and self._final is None:
                self._local_t = time.monotonic()
                with self._poll_lock:
                    self._take(self._local.stats())
            return
        with self._poll_lock:
            try:
                while self._conn.poll(0):
                    kind, stats = self._conn.recv()
                    self._take(stats)
                    if kind == "final":
                        self._final = stats
            except (EOFError, OSError):
                pass
        if self._final is None and self._proc is not None and not self._proc.is_alive():
            self._fail("storage", f"the ingest process exited unexpectedly (exit code {self._proc.exitcode})")

    def _take(self, stats: dict) -> None:
        lat = stats.pop("latencies", [])
        self._latencies.extend(lat)
        self._window.extend(lat)
        for sender, sl in stats.pop("latencies_by_sender", {}).items():
            self._latencies_by.setdefault(sender, deque(maxlen=LATENCY_KEEP_PER_SENDER)).extend(sl)
            self._window_by.setdefault(sender, []).extend(sl)
        self._stats = stats
        self.last_batch = time.monotonic() - stats["last_batch_age_s"]
        if stats["failure"] and self.failure is None:
            self._fail(*stats["failure"])

    def report(self, e: OSError, where: str) -> None:
        """A storage error in the learner process (zarr, a checkpoint, the metrics): stop like the ingest would."""
        kind = "disk_full" if e.errno == errno.ENOSPC else "storage"
        self._fail(kind, f"cannot write {where}: {e.strerror or e} ({e.filename or self.run_dir})")

    def _fail(self, kind: str, msg: str) -> None:
        if self.failure is None:
            self.failure = (kind, msg)
            self.errors.append(msg)
            log.error("%s; no longer acknowledging transitions (the robots keep them); stopping", msg)

    def stop(self, drain: bool, quiet_s: float, timeout_s: float) -> str:
        """Drain (if asked) and stop the ingest process, then put the rest of the log into the replay, write zarr
        and trim the log. Returns the drain result. Nothing touches zarr after this returns."""
        result = "not run"
        if self._local is not None and self._final is None:
            result = self._local.drain(quiet_s, timeout_s) if drain else "skipped"
            self._local.stop()
            self._local_receiver.close()
            with self._poll_lock:
                self._final = {**self._local.stats(), "drain": result}
                self._take(self._final)
        if self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(("stop", drain, quiet_s, timeout_s))
            except (BrokenPipeError, OSError):
                pass
            deadline = time.monotonic() + timeout_s + STOP_GRACE_S
            while self._final is None and self._proc.is_alive() and time.monotonic() < deadline:
                self.poll()
                time.sleep(0.01)
            self.poll()
            self._proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        if self._final is not None:
            result = self._final.get("drain", result)
        self._stop_threads.set()
        for t in self._threads:
            t.join()
        self._feed_durable()  # reading needs no space: the replay (and the summary) hold every acked transition
        if self.failure is None or self.failure[0] != "disk_full":
            self.flush(final=True)
        return result

    # ---------------------------------------------------------------------------------------------- threads
    def _feed_durable(self) -> None:
        with self._tail_lock:
            for rec in self.tail.read(self._durable.value):
                self._feed(rec)

    def _feed_loop(self) -> None:
        while not self._stop_threads.wait(FEED_S):
            self.poll()
            self._feed_durable()

    def _write_loop(self) -> None:
        while not self._stop_threads.wait(self.cfg.flush_s):
            if self.failure is not None and self.failure[0] == "disk_full":
                return  # writing more would fail the same way; zarr's last commit + the log hold what was acked
            self.flush()

    def flush(self, final: bool = False) -> None:
        """The replay's new rows to zarr, then delete the log segments zarr now holds."""
        try:
            self.replay.flush()
            with self._tail_lock:
                self.tail.trim(self.replay.disk_lsn, newest_too=final)
        except OSError as e:
            self.report(e, "the replay's zarr store")
        except ValueError as e:  # a column on disk with another shape: a bug, say so once
            if str(e) not in self.errors:
                log.error("could not write the replay to zarr: %s", e)
                self.errors.append(str(e))

    # ---------------------------------------------------------------------------------------------- figures
    def stats(self) -> dict:
        """The ingest process's newest counters (final ones after `stop`)."""
        return self._final or self._stats

    def window_latency(self) -> dict[str, float]:
        """Ack latency p50/p99 since the previous call."""
        with self._poll_lock:
            lat, self._window = self._window, []
        return percentiles(lat)

    def window_latency_by_sender(self) -> dict[str, dict[str, float]]:
        """Per sender: ack latency p50/p99 since the previous call."""
        with self._poll_lock:
            by, self._window_by = self._window_by, {}
        return {sender: percentiles(lat) for sender, lat in by.items()}

    def run_latency(self) -> dict:
        with self._poll_lock:
            lat = list(self._latencies)
        return {**percentiles(lat), "acked_batches": len(lat)}

    def run_latency_by_sender(self) -> dict[str, dict]:
        with self._poll_lock:
            by = {sender: list(lat) for sender, lat in self._latencies_by.items()}
        return {sender: {**percentiles(lat), "acked_batches": len(lat)} for sender, lat in by.items()}

    def backlog(self) -> dict[str, int]:
        """Transitions received but not in zarr yet, and delivered but not acknowledged yet."""
        unacked = int(self.stats().get("unacked", 0))
        return {"not_in_zarr": self.replay.size - self.replay.disk_rows + unacked, "unacked": unacked}

    def counters(self, name: str) -> dict:
        """Per (sender, stream): received / stored / quarantined / schema_rejected / acked."""
        return dict(self.stats().get(name, {}))
