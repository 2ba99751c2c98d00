"""The learner process: receive transitions from any number of control processes, train, publish weights.

Ingest runs in a process of its own (robot_rl/learner/ingest_process.py, ingest.py): it acknowledges a batch once
it is fsynced in the ingest log; this process reads the log into the in-memory replay and writes zarr behind.
The main thread only trains: gradient updates at the configured update-to-data ratio (achieved UTD, backlog and
ack latency are reported), publishes versioned weights and checkpoints them — never non-finite ones: a state dict with NaN/inf is not published or checkpointed, it is
counted, and training stops with a clear error (the robots keep the last good weights, the newest checkpoint is
the last good state; ingest goes on, so no transition is lost).

Exit codes (`python -m robot_rl.learner`):
    0   clean stop (Ctrl-C / SIGTERM), everything received acknowledged or reported in summary.json
    28  EXIT_DISK_FULL: no space left on the learner's disk. It stopped acknowledging (the robots keep what was
        not acknowledged), wrote what it could and said so in summary.json. Restarting will not help until space
        is freed: a supervisor should not restart a learner that exits with this code.
    74  EXIT_STORAGE_ERROR: any other error writing the ingest log or the replay (I/O error, permissions)
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from robot_rl.algos import make_algorithm, with_defaults
from robot_rl.config import git_hash, resolve_device, write_json
from robot_rl.learner.ingest import IngestConfig
from robot_rl.learner.ingest_process import IngestService
from robot_rl.learner.replay_buffer import ReplayBuffer
from robot_rl.policies.checkpoint import latest_checkpoint, save_checkpoint, write_policy
from robot_rl.transport import WeightPublisher
from robot_rl.transport.security import load_server_keys

log = logging.getLogger("robot_rl.learner")

EXIT_OK = 0
EXIT_DISK_FULL = 28  # = errno ENOSPC
EXIT_STORAGE_ERROR = 74  # = sysexits EX_IOERR
DRAIN_QUIET_S = 1.0  # at a stop, the stream must be quiet this long before the ingest process stops
SPACE_RESERVE = ".space_reserve"  # held at start, deleted on a full disk: room for summary.json
SPACE_RESERVE_BYTES = 1 << 18


def nonfinite_tensors(state, prefix: str = "") -> list[str]:
    """Names of the floating tensors holding NaN/inf in a (nested) state dict."""
    if isinstance(state, torch.Tensor):
        return [prefix or "tensor"] if state.is_floating_point() and not torch.isfinite(state).all() else []
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return []
    return [name for k, v in items for name in nonfinite_tensors(v, f"{prefix}.{k}" if prefix else str(k))]


def _finite_or_none(v):
    """JSON has no NaN/inf: such a float is written as null (nested dicts too)."""
    if isinstance(v, dict):
        return {k: _finite_or_none(x) for k, x in v.items()}
    return None if isinstance(v, float) and not math.isfinite(v) else v


def scalars(metrics: dict) -> dict[str, float]:
    """An update's metrics as floats. Algorithms may return detached 0-d tensors so that an update on a GPU never
    waits for the device (`.item()` is a host-device sync); the learner reads them at log intervals only."""
    return {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}


def robots_line(robots: dict[str, dict]) -> str:
    """', robots 3 ok 1 silent (robot2 12 s), 18.9-20.1 Hz' for the status line."""
    health: dict[str, list[str]] = {}
    for name, r in robots.items():
        health.setdefault(r["health"], []).append(name)
    parts = [f"{len(v)} {h}" for h, v in sorted(health.items())]
    bad = [f"{n} {robots[n]['last_heard_s']:.0f} s" for n in health.get("silent", [])[:3]]
    rates = [r["rate_hz"] for r in robots.values() if r["rate_hz"] is not None and r["health"] == "ok"]
    span = f", {min(rates):.1f}-{max(rates):.1f} Hz" if rates else ""
    return f", robots {' '.join(parts)}{' (' + ', '.join(bad) + ')' if bad else ''}{span}"


class Learner:
    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg, self.s = cfg, cfg.session
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        algo_cfg = OmegaConf.to_container(cfg.algo, resolve=True)
        settings = with_defaults(algo_cfg)  # the learner's keys of the algo config (defaults: configs/algo/)
        self.updates_per_transition = float(settings["updates_per_transition"])
        self.publish_every = int(settings["publish_every_updates"])
        self.log_every = int(settings["log_every_updates"])
        self.metrics_every_s = float(self.s.get("learner_metrics_s", 5.0))
        self.device = resolve_device(cfg.device)
        if self.s.get("learner_threads"):  # sharing a CPU with the control process: oversubscribed OpenMP crawls
            torch.set_num_threads(int(self.s.learner_threads))
        self.rng = np.random.default_rng(int(cfg.seed))
        torch.manual_seed(int(cfg.seed))

        # the replay: zarr's committed rows, then the ingest log's records zarr does not hold yet (exactly once)
        self.replay = ReplayBuffer(self.run_dir / "replay.zarr", preallocate_rows=self.s.get("replay_capacity"))
        self.ingest = IngestService(
            self.replay,
            self.run_dir,
            self.s.endpoints.bind_transitions,
            self.s.heartbeat_s,
            self.s.curve_keys_dir,
            IngestConfig.from_session(self.s),
        )
        self.from_log = self.ingest.from_log
        if self.from_log:
            log.info("replay rebuilt: %d rows from zarr + %d from the ingest log", self.replay.disk_rows, self.from_log)
        self.algo = make_algorithm(
            algo_cfg, OmegaConf.to_container(cfg.policy, resolve=True), self.device, self.run_dir
        )
        keys = load_server_keys(self.s.curve_keys_dir) if self.s.curve_keys_dir else None
        self.publisher = WeightPublisher(self.s.endpoints.bind_weights, curve=keys)

        self.updates = 0
        self.version = 0
        self.restored_rows = self.replay.size
        self.nonfinite_weights = 0  # state dicts refused (not published, not checkpointed)
        self.training_stopped: str | None = None
        self.exit_code = EXIT_OK
        self.drain_result = "not run"
        self._stop_requested = False  # Ctrl-C / SIGTERM: stop training, drain, then stop
        self.metrics: dict[str, float] = {}
        self._published_meta: dict | None = None
        self._telemetry = (self.run_dir / "metrics.jsonl").open("a")
        self._robots_file = (self.run_dir / "robots.jsonl").open("a")  # per-robot telemetry (a fleet's health)
        self._robots_last: dict[str, dict] = {}
        self._reserve_space()
        self._rate = (time.monotonic(), 0)  # (t, updates) at the last telemetry line
        self._robot_rate: tuple[float, dict[str, int]] = (time.monotonic(), {})  # (t, received per robot) ditto
        self._restore_checkpoint()
        self.writer = None
        if cfg.get("tensorboard", True):
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"))

    def _reserve_space(self) -> None:
        try:
            (self.run_dir / SPACE_RESERVE).write_bytes(bytes(SPACE_RESERVE_BYTES))
        except OSError:
            pass  # already full: the failure is reported when the first batch cannot be stored

    # -------------------------------------------------------------------------------------------- checkpoints
    @property
    def _ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def _restore_checkpoint(self) -> None:
        """Resume from the newest checkpoint: all nets, targets, optimisers and counters (algo_state.pt beside the
        policy), and the version numbering (robots ignore versions they already have). Sessions written before
        the one checkpoint format kept algo_state.pt + latest.json in checkpoints/ itself: still read."""
        latest = latest_checkpoint(self._ckpt_dir)
        if latest is not None:
            pointer = json.loads((self._ckpt_dir / "latest").read_text())
            state_path = latest / "algo_state.pt"
        elif (self._ckpt_dir / "latest.json").exists():
            pointer = json.loads((self._ckpt_dir / "latest.json").read_text())
            state_path = self._ckpt_dir / "algo_state.pt"
        else:
            return
        self.version = int(pointer["version"])
        if not self.algo.ready(self.replay.snapshot()) or not state_path.exists():
            return
        # tensors and plain containers only: no code is loaded
        self.algo.load_state_dict(torch.load(state_path, weights_only=True, map_location=self.device))
        self.updates = int(pointer["updates"])
        log.info(
            "resumed from checkpoint: version %d, %d updates, %d stored transitions",
            self.version,
            self.updates,
            self.replay.size,
        )

    def _checkpoint(self) -> None:
        """One policy directory per published version (the format `robot-rl eval/deploy/export-policy` read),
        with the algorithm's full training state beside it; `latest` moves only once both are written.
        Non-finite training state is never checkpointed."""
        bad = nonfinite_tensors(self.algo.state_dict())
        if bad:
            self._refuse_weights(bad, "checkpoint")
            return
        robot = OmegaConf.to_container(self.cfg.robot, resolve=True)
        robot_info = {
            "name": robot.get("env_name") or robot.get("lerobot_type") or robot.get("type"),
            "config": robot,
            "task": robot.get("task"),
        }
        provenance = {
            "source": "session",
            "algo": self.cfg.algo.name,
            "version": self.version,
            "updates": self.updates,
            "replay_rows": self.replay.size,
            "git": git_hash(),
        }

        def write(directory: Path) -> None:
            write_policy(
                directory, self.algo.robot_policy(), robot=robot_info, fps=float(self.s.rate_hz), provenance=provenance
            )
            torch.save(self.algo.state_dict(), directory / "algo_state.pt")

        save_checkpoint(
            self._ckpt_dir,
            f"v{self.version}",
            write,
            {"version": self.version, "updates": self.updates, "replay_rows": self.replay.size},
            keep_last=int(self.s.get("keep_checkpoints", 3) or 0) or None,
        )

    def _refuse_weights(self, bad: list[str], what: str) -> None:
        """Non-finite weights: never published or checkpointed; training stops (the data may be fine — a
        learning rate or a reward scale is the usual cause — so the user decides, from the last good state)."""
        self.nonfinite_weights += 1
        if self.training_stopped is None:
            self.training_stopped = (
                f"non-finite weights after update {self.updates} ({len(bad)} tensors, e.g. "
                f"{', '.join(bad[:3])}): not {what}ed"
            )
            log.error(
                "%s. Training stopped; the robots keep weights v%d and checkpoints/ holds the last good "
                "state (resume from it with other settings). Transitions are still received and stored.",
                self.training_stopped,
                self.version,
            )

    # ----------------------------------------------------------------------------------------------- training
    def publish(self, view=None) -> None:
        view = view if view is not None else self.replay.snapshot()
        self.algo.on_publish(view)
        state = self.algo.policy_state()
        bad = nonfinite_tensors(state)
        if bad:
            self._refuse_weights(bad, "publish")
            return
        self.version += 1
        meta = self.algo.publish_meta(view)
        self.publisher.publish(self.version, state, meta={**meta, "updates": self.updates})
        self._published_meta = meta
        self._checkpoint()

    def achieved_utd(self) -> float | None:
        """Updates per trainable transition so far (the configured ratio is `updates_per_transition`)."""
        n = self.algo.trainable_transitions(self.replay.snapshot())
        return self.updates / n if n else None

    def ingest_metrics(self) -> dict[str, float]:
        backlog = self.ingest.backlog()
        utd = self.achieved_utd()
        return {
            "learner/utd": float("nan") if utd is None else utd,
            "learner/backlog_not_in_zarr": backlog["not_in_zarr"],
            "learner/unacked": backlog["unacked"],
            **{f"learner/{k}": v for k, v in self.ingest.window_latency().items()},
            "learner/quarantined": sum(self.ingest.counters("quarantined").values()),
        }

    def robots(self, final: bool = False) -> dict[str, dict]:
        """Per robot (sender) of the fleet: transitions received / stored / quarantined / unacknowledged, its
        streams (more than one: it restarted without its outbox), its rate, ack latency, and health:
            ok      its connection was heard within the receiver's peer timeout (heartbeats every few ms)
            silent  not heard for longer (stopped, finished, frozen or cut off; `unacked` tells which matters)
            gone    no connection at all (never connected this run, or forgotten after a long silence)
        Telemetry (`final` false): the rate and ack latency over the interval since the previous call; the
        summary (`final`): received / its active time (first to last batch) and the run's ack latency."""
        counts = {n: self.ingest.counters(n) for n in ("received", "stored", "quarantined", "schema_rejected")}
        stats = self.ingest.stats()
        peers, timeout = stats.get("peers", {}), stats.get("peer_timeout_s") or float("inf")
        names = sorted({k[0] for k in counts["received"]} | set(peers))
        total = {name: {n: sum(v for k, v in c.items() if k[0] == name) for n, c in counts.items()} for name in names}
        now = time.monotonic()
        t0, before = self._robot_rate
        if not final:
            self._robot_rate = (now, {name: total[name]["received"] for name in names})
        latency = self.ingest.run_latency_by_sender() if final else self.ingest.window_latency_by_sender()
        out = {}
        for name in names:
            c, peer = total[name], peers.get(name) or {}
            heard = peer.get("last_heard_s")
            if final:
                first, last = peer.get("first_batch_s"), peer.get("last_batch_s")
                active = first - last if first is not None and last is not None else 0.0
                rate = c["received"] / active if active > 0 else None
            else:
                rate = (c["received"] - before.get(name, 0)) / (now - t0) if now > t0 else None
            out[name] = {
                "received": c["received"],
                "stored": c["stored"],
                "quarantined": c["quarantined"],
                "rejected_schema": c["schema_rejected"],
                "unacked": max(0, c["received"] - c["stored"] - c["quarantined"] - c["schema_rejected"]),
                "streams": len({k[1] for k in counts["received"] if k[0] == name}),
                "rate_hz": rate,
                "ack_p99_ms": (latency.get(name) or {}).get("ack_p99_ms"),
                "last_heard_s": heard,
                "health": "gone" if heard is None else ("ok" if heard <= timeout else "silent"),
            }
        return out

    def _log_robots(self) -> None:
        """Per-robot telemetry, every learner_metrics_s from the first transition on (training or not): one line of
        robots.jsonl, tensorboard robots/<id>/rate_hz|ack_p99_ms, and a status line while nothing trains yet."""
        robots = self._robots_last = self.robots()
        line = {"t": time.time(), "updates": self.updates, "replay": self.replay.size, "robots": robots}
        self._robots_file.write(json.dumps(_finite_or_none(line)) + "\n")
        self._robots_file.flush()
        if self.writer is not None:
            for name, r in robots.items():
                for k in ("rate_hz", "ack_p99_ms"):
                    if r[k] is not None and math.isfinite(r[k]):
                        self.writer.add_scalar(f"robots/{name}/{k}", r[k], self.updates)
        if not self.metrics:
            log.info("replay %d, no updates yet%s", self.replay.size, robots_line(robots))

    def _log(self) -> None:
        """Telemetry: tensorboard scalars, one JSON line per interval (metrics.jsonl) and a status line."""
        now = time.monotonic()
        t0, u0 = self._rate
        rate = (self.updates - u0) / (now - t0) if now > t0 else 0.0
        self._rate = (now, self.updates)
        ingest = self.ingest_metrics()
        robots = self._robots_last
        self.metrics = scalars(self.metrics)  # an algorithm may return 0-d tensors: read (synced) only here
        row = {
            "t": time.time(),
            "updates": self.updates,
            "replay": self.replay.size,
            "version": self.version,
            "updates_per_s": rate,
            **ingest,
            **self.metrics,
        }
        self._telemetry.write(json.dumps({k: _finite_or_none(v) for k, v in row.items()}) + "\n")
        self._telemetry.flush()
        if self.writer is not None:
            for k, v in {**self.metrics, **ingest}.items():
                self.writer.add_scalar(k, v, self.updates)
            self.writer.add_scalar("learner/replay_size", self.replay.size, self.updates)
            self.writer.add_scalar("learner/updates_per_s", rate, self.updates)
        q = self.metrics.get("critic/q_mean")
        log.info(
            "updates %d (%.0f/s, UTD %.2f of %.2f), replay %d, weights v%d, ack p99 %.1f ms%s%s",
            self.updates,
            rate,
            ingest["learner/utd"],
            self.updates_per_transition,
            self.replay.size,
            self.version,
            ingest["learner/ack_p99_ms"],
            "" if q is None else f", Q mean {q:.3f}",
            robots_line(robots) if len(robots) > 1 else "",
        )

    def _train_step(self) -> bool:
        """One update if one is owed (UTD x trainable transitions); False when there was nothing to do."""
        if self.training_stopped is not None:
            return False
        view = self.replay.snapshot()  # one set of rows for this step: the feeder thread appends meanwhile
        meta = self.algo.publish_meta(view)
        if meta and meta != self._published_meta:  # e.g. warm-up over: tell the robot at once
            self.publish(view)
        owed = self.updates_per_transition * self.algo.trainable_transitions(view) - self.updates
        if owed < 1 or not self.algo.ready(view):
            return False
        self.metrics = self.algo.update(view, self.rng)
        self.updates += 1
        if self.updates % self.publish_every == 0:
            self.publish(view)
        if self.updates % self.log_every == 0:
            self._log()
        return True

    def run(self) -> dict:
        def request_stop(*_):
            self._stop_requested = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, request_stop)
        self.ingest.start()  # the ingest process binds the transitions socket
        if self.s.get("learner_nice"):  # this (training) thread only: acks and the robot's loop come first
            os.nice(int(self.s.learner_nice))
        t_start = time.time()
        last_republish = last_log = last_robots = 0.0
        log.info(
            "learner ready on %s (weights on %s), device %s",
            self.s.endpoints.bind_transitions,
            self.s.endpoints.bind_weights,
            self.device,
        )
        while not self._stop_requested and self.ingest.failure is None:
            try:
                trained = self._train_step()
                if self.metrics and time.monotonic() - last_log > self.metrics_every_s:
                    self._log()  # ingest figures between update logs
                    last_log = time.monotonic()
                if self.replay.size and time.monotonic() - last_robots > self.metrics_every_s:
                    self._log_robots()  # per robot, also before training starts
                    last_robots = time.monotonic()
            except OSError as e:  # a checkpoint or a metrics line hit a full (or failing) disk
                self.ingest.report(e, "a checkpoint or the metrics")
                break
            if not trained:
                time.sleep(0.005)
            now = time.monotonic()
            if self.version and now - last_republish > self.s.republish_s:
                self.publisher.republish()  # late joiners and reconnecting subscribers miss earlier PUB messages
                last_republish = now
        # On Ctrl-C the control processes get the same signal and flush their last transitions: the ingest process
        # keeps acknowledging until the stream has been quiet a second (bounded by session.drain_timeout_s).
        failed = self.ingest.failure is not None
        self.drain_result = self.ingest.stop(
            drain=not failed, quiet_s=DRAIN_QUIET_S, timeout_s=float(self.s.drain_timeout_s)
        )
        # the ingest process has stopped and the write-behind threads are joined: nothing touches zarr after this
        if self.ingest.failure is not None:
            kind, msg = self.ingest.failure
            self.exit_code = EXIT_DISK_FULL if kind == "disk_full" else EXIT_STORAGE_ERROR
            self.drain_result = f"skipped: {msg}" if failed else self.drain_result
            (self.run_dir / SPACE_RESERVE).unlink(missing_ok=True)
        if self.version and self.exit_code == EXIT_OK:
            self._checkpoint()
        (self.run_dir / SPACE_RESERVE).unlink(missing_ok=True)
        summary = self.summary(time.time() - t_start)
        try:
            write_json(self.run_dir / "summary.json", summary)
        except OSError as e:
            log.error("could not write %s: %s", self.run_dir / "summary.json", e.strerror or e)
        self.publisher.close()
        for f in (self._telemetry, self._robots_file):
            try:
                f.close()
            except OSError:
                pass
        if self.writer is not None:
            self.writer.close()
        if self.exit_code == EXIT_DISK_FULL:
            log.error(
                "learner stopped: no space left on device under %s (exit code %d); the robots keep what "
                "was not acknowledged — free space and resume the session",
                self.run_dir,
                self.exit_code,
            )
        return summary

    def summary(self, wall_s: float) -> dict:
        per_sender = {}
        for sender, seqs in self.replay.seqs_by_sender().items():
            per_sender[sender] = {
                "transitions": int(len(seqs)),
                "unique": int(len(np.unique(seqs))),
                "min_seq": int(seqs.min()),
                "max_seq": int(seqs.max()),
            }
        ing = self.ingest
        counts = {
            name: ing.counters(name) for name in ("received", "stored", "quarantined", "schema_rejected", "acked")
        }
        streams = {}
        for key in sorted(set(counts["received"]) | set(self.replay.next_expected), key=str):
            streams[f"{key[0]}/{key[1]}"] = {
                "received": counts["received"].get(key, 0),
                "stored": counts["stored"].get(key, 0),
                "quarantined": counts["quarantined"].get(key, 0),
                "rejected_schema": counts["schema_rejected"].get(key, 0),
                "acked_upto": counts["acked"].get(key),
                "next_expected": self.replay.next_expected.get(key),
            }
        stats = ing.stats()
        utd = self.achieved_utd()
        return {
            "process": "learner",
            "algo": self.cfg.algo.name,
            "device": str(self.device),
            "replay_rows": self.replay.size,
            "replay_rows_in_zarr": self.replay.disk_rows,
            "restored_rows": self.restored_rows,
            "restored_from_log": self.from_log,
            "received_this_run": sum(counts["received"].values()),
            "stored_this_run": sum(counts["stored"].values()),
            "quarantined": sum(counts["quarantined"].values()),
            "senders": per_sender,
            "robots": self.robots(final=True),
            "streams": streams,
            "duplicates_dropped": stats.get("duplicates", 0),
            "rejected_messages": stats.get("rejected", 0),
            "rejected_transitions_schema": sum(counts["schema_rejected"].values()),
            "rejections": stats.get("rejections", []),
            "storage_errors": [*stats.get("errors", []), *(e for e in ing.errors if e not in stats.get("errors", []))],
            "backlog": ing.backlog(),
            "ack_latency_ms": ing.run_latency(),
            "drain": self.drain_result,
            "updates": self.updates,
            "target_utd": self.updates_per_transition,
            "achieved_utd": utd,
            "weight_version": self.version,
            "nonfinite_weights_refused": self.nonfinite_weights,
            "training_stopped": self.training_stopped,
            "updates_per_s": self.updates / wall_s if wall_s > 0 else None,
            "last_metrics": scalars(self.metrics),
            "algo_warnings": list(self.algo.warnings()),
            "exit_code": self.exit_code,
            "disk_full": self.exit_code == EXIT_DISK_FULL,
            "wall_s": wall_s,
        }


def main(config_path: str, run_dir: str) -> int:
    from robot_rl.config import setup_logging

    setup_logging()
    cfg = OmegaConf.load(config_path)
    learner = Learner(cfg, Path(run_dir))
    learner.run()
    return learner.exit_code
