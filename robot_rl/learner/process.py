"""The learner process: receive transitions from any number of control processes, train, publish weights.

Three threads with one job each:
- receiver thread: owns the ROUTER socket, keeps heartbeats flowing, acknowledges what storage has written;
- storage thread: appends each new batch to the on-disk replay (so an acknowledged transition survives a crash);
- main thread: gradient updates at a fixed update-to-data ratio, publishes versioned weights, checkpoints.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from robot_rl.algos import make_algorithm, with_defaults
from robot_rl.config import git_hash, resolve_device, write_json
from robot_rl.learner.replay_buffer import ReplayBuffer
from robot_rl.policies.checkpoint import latest_checkpoint, save_checkpoint, write_policy
from robot_rl.transport import TransitionReceiver, WeightPublisher
from robot_rl.transport.security import load_server_keys

log = logging.getLogger("robot_rl.learner")


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
        self.device = resolve_device(cfg.device)
        if self.s.get("learner_threads"):  # sharing a CPU with the control process: oversubscribed OpenMP crawls
            torch.set_num_threads(int(self.s.learner_threads))
        self.rng = np.random.default_rng(int(cfg.seed))
        torch.manual_seed(int(cfg.seed))

        self.replay = ReplayBuffer(self.run_dir / "replay.zarr", preallocate_rows=self.s.get("replay_capacity"))
        self.algo = make_algorithm(algo_cfg, OmegaConf.to_container(cfg.policy, resolve=True), self.device,
                                   self.run_dir)
        keys = load_server_keys(self.s.curve_keys_dir) if self.s.curve_keys_dir else None
        self.receiver = TransitionReceiver(self.s.endpoints.bind_transitions, heartbeat_interval_s=self.s.heartbeat_s,
                                           curve=keys)
        for sender, nxt in self.replay.next_expected.items():  # resume exactly where the stored data ends
            self.receiver.set_next_expected(sender, nxt)
        self.publisher = WeightPublisher(self.s.endpoints.bind_weights, curve=keys)

        self.updates = 0
        self.version = 0
        self.restored_rows = self.replay.size
        self.received = 0
        self._stop = threading.Event()  # ends the receiver and storage threads
        self._stop_requested = threading.Event()  # Ctrl-C / SIGTERM: stop training, drain, then stop
        self._last_batch = time.monotonic()
        self._to_store: queue.Queue = queue.Queue()  # receiver thread -> storage thread
        self._stored: queue.Queue = queue.Queue()  # storage thread -> receiver thread: (sender, upto) to ack
        self._errors: list[str] = []
        self.metrics: dict[str, float] = {}
        self._published_meta: dict | None = None
        self._telemetry = (self.run_dir / "metrics.jsonl").open("a")
        self._rate = (time.monotonic(), 0)  # (t, updates) at the last telemetry line
        self._restore_checkpoint()
        self.writer = None
        if cfg.get("tensorboard", True):
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"))

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
        if not self.algo.ready(self.replay) or not state_path.exists():
            return
        # tensors and plain containers only: no code is loaded
        self.algo.load_state_dict(torch.load(state_path, weights_only=True, map_location=self.device))
        self.updates = int(pointer["updates"])
        log.info("resumed from checkpoint: version %d, %d updates, %d stored transitions",
                 self.version, self.updates, self.replay.size)

    def _checkpoint(self) -> None:
        """One policy directory per published version (the format `robot-rl eval/deploy/export-policy` read),
        with the algorithm's full training state beside it; `latest` moves only once both are written."""
        robot = OmegaConf.to_container(self.cfg.robot, resolve=True)
        robot_info = {"name": robot.get("env_name") or robot.get("lerobot_type") or robot.get("type"),
                      "config": robot, "task": robot.get("task")}
        provenance = {"source": "session", "algo": self.cfg.algo.name, "version": self.version,
                      "updates": self.updates, "replay_rows": self.replay.size, "git": git_hash()}

        def write(directory: Path) -> None:
            write_policy(directory, self.algo.robot_policy(), robot=robot_info, fps=float(self.s.rate_hz),
                         provenance=provenance)
            torch.save(self.algo.state_dict(), directory / "algo_state.pt")

        save_checkpoint(self._ckpt_dir, f"v{self.version}", write,
                        {"version": self.version, "updates": self.updates, "replay_rows": self.replay.size},
                        keep_last=int(self.s.get("keep_checkpoints", 3) or 0) or None)

    # ----------------------------------------------------------------------------------------------- threads
    def _receive_loop(self) -> None:
        """Owns the socket: hands new batches to storage, sends acks for stored ones; never blocks on disk, so
        heartbeats keep flowing while a batch is being written."""
        while not self._stop.is_set():
            for batch in self.receiver.poll(timeout_ms=5):
                self._to_store.put(batch)
                self._last_batch = time.monotonic()
            while True:
                try:
                    sender_id, upto = self._stored.get_nowait()
                except queue.Empty:
                    break
                self.receiver.ack(sender_id, upto)

    def _store_loop(self) -> None:
        """Writes batches to the on-disk replay in arrival order; only then may they be acknowledged."""
        while not (self._stop.is_set() and self._to_store.empty()):
            try:
                batch = self._to_store.get(timeout=0.05)
            except queue.Empty:
                continue
            try:
                upto = self.replay.append(batch.sender_id, batch.seqs, batch.arrays)
            except (ValueError, OSError) as e:  # bad data or disk trouble: do not ack, say why (once per cause)
                if str(e) not in self._errors:
                    log.error("could not store a batch from %s: %s", batch.sender_id, e)
                    self._errors.append(str(e))
                continue
            self._stored.put((batch.sender_id, upto))
            self.received += len(batch.seqs)

    def publish(self) -> None:
        self.algo.on_publish(self.replay)
        self.version += 1
        meta = self.algo.publish_meta(self.replay)
        self.publisher.publish(self.version, self.algo.policy_state(), meta={**meta, "updates": self.updates})
        self._published_meta = meta
        self._checkpoint()

    def _log(self) -> None:
        """Telemetry: tensorboard scalars, one JSON line per interval (metrics.jsonl) and a status line."""
        now = time.monotonic()
        t0, u0 = self._rate
        rate = (self.updates - u0) / (now - t0) if now > t0 else 0.0
        self._rate = (now, self.updates)
        row = {"t": time.time(), "updates": self.updates, "replay": self.replay.size, "version": self.version,
               "updates_per_s": rate, **self.metrics}
        self._telemetry.write(json.dumps(row) + "\n")
        self._telemetry.flush()
        if self.writer is not None:
            for k, v in self.metrics.items():
                self.writer.add_scalar(k, v, self.updates)
            self.writer.add_scalar("learner/replay_size", self.replay.size, self.updates)
            self.writer.add_scalar("learner/updates_per_s", rate, self.updates)
        q = self.metrics.get("critic/q_mean")
        log.info("updates %d (%.0f/s), replay %d, weights v%d%s", self.updates, rate, self.replay.size, self.version,
                 "" if q is None else f", Q mean {q:.3f}")

    def run(self) -> dict:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stop_requested.set())
        threads = [threading.Thread(target=self._receive_loop, name="receiver", daemon=True),
                   threading.Thread(target=self._store_loop, name="storage", daemon=True)]
        for thread in threads:
            thread.start()
        t_start = time.time()
        last_republish = 0.0
        log.info("learner ready on %s (weights on %s), device %s", self.s.endpoints.bind_transitions,
                 self.s.endpoints.bind_weights, self.device)
        while not self._stop_requested.is_set():
            meta = self.algo.publish_meta(self.replay)
            if meta and meta != self._published_meta:  # e.g. warm-up over: tell the robot at once
                self.publish()
            owed = self.updates_per_transition * self.algo.trainable_transitions(self.replay) - self.updates
            if owed >= 1 and self.algo.ready(self.replay):
                self.metrics = self.algo.update(self.replay, self.rng)
                self.updates += 1
                if self.updates % self.publish_every == 0:
                    self.publish()
                if self.updates % self.log_every == 0:
                    self._log()
            else:
                time.sleep(0.005)
            now = time.monotonic()
            if self.version and now - last_republish > self.s.republish_s:
                self.publisher.republish()  # late joiners and reconnecting subscribers miss earlier PUB messages
                last_republish = now
        self._drain()
        self._stop.set()
        for thread in threads:
            thread.join(timeout=5)
        if self.version:
            self._checkpoint()
        summary = self.summary(time.time() - t_start)
        write_json(self.run_dir / "summary.json", summary)
        self.receiver.close()
        self.publisher.close()
        self._telemetry.close()
        if self.writer is not None:
            self.writer.close()
        return summary

    def _drain(self, quiet_s: float = 1.0) -> None:
        """On Ctrl-C the control processes get the same signal and flush their last transitions: keep storing
        and acknowledging until the stream has been quiet for `quiet_s` (bounded by session.drain_timeout_s)."""
        deadline = time.monotonic() + self.s.drain_timeout_s
        while time.monotonic() < deadline:
            quiet = time.monotonic() - self._last_batch > quiet_s
            if quiet and self._to_store.empty() and self._stored.empty() and self.receiver.all_acked:
                return
            time.sleep(0.05)

    def summary(self, wall_s: float) -> dict:
        per_sender = {}
        for sender, seqs in (self.replay.seqs_by_sender().items() if self.replay.size else []):
            per_sender[sender] = {"transitions": int(len(seqs)), "unique": int(len(np.unique(seqs))),
                                  "min_seq": int(seqs.min()), "max_seq": int(seqs.max())}
        return {
            "process": "learner",
            "algo": self.cfg.algo.name,
            "device": str(self.device),
            "replay_rows": self.replay.size,
            "restored_rows": self.restored_rows,
            "received_this_run": self.received,
            "senders": per_sender,
            "duplicates_dropped": self.receiver.duplicates,
            "rejected_messages": self.receiver.rejected,
            "storage_errors": self._errors,
            "updates": self.updates,
            "weight_version": self.version,
            "updates_per_s": self.updates / wall_s if wall_s > 0 else None,
            "last_metrics": self.metrics,
            "wall_s": wall_s,
        }


def main(config_path: str, run_dir: str) -> int:
    from robot_rl.config import setup_logging

    setup_logging()
    cfg = OmegaConf.load(config_path)
    Learner(cfg, Path(run_dir)).run()
    return 0
