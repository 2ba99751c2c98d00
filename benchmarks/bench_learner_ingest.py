"""Learner ingest: transitions acknowledged per second by a learner that trains at the same time, new path vs old.

    python benchmarks/bench_learner_ingest.py [--repeats 3] [--measure-s 6] [--workloads state cameras]

Real processes and sockets: a sender process (`TransitionSender`, a DEALER, batches of `--batch`) pushes
Lift-sized transitions as fast as acknowledgements allow (at most `--window` unacknowledged), to a learner process
(a ROUTER `TransitionReceiver`) that stores them and, meanwhile, trains SAC (RLPD recipe: batch 256, 10 critics,
256x256, 1 torch thread) on a small synthetic demo store + the replay, flat out. SAC stands in for the residual
algorithm (same critic ensemble, sampler and batch; no base policy to relabel demos with).

Transitions: the keys and shapes a Lift session sends (robot_rl/control/process.py `_transition`): robosuite's
Lift low-dim observation keys (106 float32 values, as sim/robosuite_robot.py publishes them), action /
policy_action / expert_action / base_action / residual (7 float32), reward, success, done, intervention,
forced_safe, episode, step, policy_version, t; `cameras` adds two 84x84 RGB images (uint8, random: worst case).

Variants, side by side in one run (interleaved, median of `--repeats`):
  new: what the learner runs (robot_rl/learner/ingest_process.py): ingest in its own process acks once a batch is
       fsynced in the ingest log; the learner process reads the log into its replay and writes zarr behind;
  new-threads: the same ingest as threads inside the training process (the design the measurement replaced);
  old: the learner's code path before it (copied below: a storage thread calling the old `ReplayBuffer.append`,
       which resizes, writes and commits every zarr column per batch before the ack);
  new-idle: `new` in a learner that does not train: the ingest path's ceiling on this machine.
Reported: acked transitions/s over the measured window, ack latency p50/p99 at the learner (batch received ->
ack sent), SAC updates/s meanwhile, and "lost" = transitions submitted but not stored once the sender closed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from lift_shapes import CAMERAS, LIFT_LOWDIM  # noqa: E402 - beside this script

IMAGE = 84
ACTION_DIM = 7
EPISODE_STEPS = 50
POOL = 4 * EPISODE_STEPS  # distinct pre-made transitions the sender cycles through
TARGETS = {"state": 20_000, "cameras": 1_000}  # acked transitions/s the new path should reach
P99_TARGET_MS = 50.0
HEARTBEAT_S = 0.02  # as configs/session/sim.yaml
TRAIN_NICE = 10  # session.learner_nice
VARIANTS = ["old", "new", "new-threads", "new-idle"]


def make_transition(rng: np.random.Generator, i: int, cameras: bool) -> dict[str, np.ndarray]:
    t = {f"obs.{k}": rng.standard_normal(d).astype(np.float32) for k, d in LIFT_LOWDIM.items()}
    if cameras:
        for c in CAMERAS:
            t[f"obs.{c}_image"] = rng.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8)
    for k in ("action", "policy_action", "base_action", "residual"):
        t[k] = rng.uniform(-1, 1, ACTION_DIM).astype(np.float32)
    t["expert_action"] = np.full(ACTION_DIM, np.nan, np.float32)  # nobody labelled it
    t.update(
        intervention=np.bool_(False),
        forced_safe=np.bool_(False),
        episode=np.int64(i // EPISODE_STEPS),
        step=np.int64(i % EPISODE_STEPS),
        policy_version=np.int64(3),
        t=np.float64(i * 0.05),
        reward=np.float32(0),
        success=np.bool_(i % EPISODE_STEPS == EPISODE_STEPS - 1),
        done=np.bool_(i % EPISODE_STEPS == EPISODE_STEPS - 1),
    )
    return t


def make_demos(path: Path, episodes: int = 10) -> None:
    """A small synthetic demo store with the Lift low-dim keys (SAC's demo half of each batch)."""
    from robot_rl.data.episode_store import EpisodeStore
    from robot_rl.interfaces import Feature

    feats = {f"obs.{k}": Feature((d,)) for k, d in LIFT_LOWDIM.items()}
    feats.update(action=Feature((ACTION_DIM,)), success=Feature((), "bool"))
    store = EpisodeStore.create(path, feats, fps=20)
    w, rng = store.writer(), np.random.default_rng(0)
    for e in range(episodes):
        w.begin({"seed": e})
        for s in range(EPISODE_STEPS):
            frame = {k: rng.standard_normal(f.shape).astype(np.float32) for k, f in feats.items() if k != "success"}
            frame["action"] = np.clip(frame["action"], -1, 1)
            w.add({**frame, "success": np.bool_(s == EPISODE_STEPS - 1)})
        w.save()
    w.close()
    store.close()


# ------------------------------------------------------------------------------- the old path (a verbatim copy)
class OldReplayBuffer:
    """robot_rl/learner/replay_buffer.py's ReplayBuffer before the ingest log (git e8e4e68): every `append` resizes,
    writes and commits every zarr column before it returns (and only then was the batch acknowledged)."""

    def __init__(self, path: Path, chunk_rows: int = 1024):
        import zarr

        self.path, self.chunk_rows = Path(path), chunk_rows
        self._lock = threading.Lock()
        self._senders: list[str] = []
        self.next_expected: dict[str, int] = {}
        self._mem: dict[str, np.ndarray] = {}
        self.size = 0
        self.path.mkdir(parents=True, exist_ok=True)
        self._group = zarr.open_group(zarr.storage.LocalStore(str(self.path)), mode="a")
        self._arrays: dict = {}

    def _commit(self) -> None:
        commit = {
            "rows": self.size,
            "keys": sorted(self._mem),
            "senders": self._senders,
            "next_expected": self.next_expected,
        }
        tmp = self.path / "commit.json.tmp"
        with open(tmp, "w") as f:
            json.dump(commit, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / "commit.json")

    def _grow(self, buf, like, need):
        from robot_rl.learner.replay_buffer import MIN_ROWS, next_capacity

        if buf is not None and buf.shape[0] >= need:
            return buf
        cap = next_capacity(MIN_ROWS if buf is None else buf.shape[0], need)
        new = np.empty((cap, *like.shape[1:]), dtype=like.dtype)
        if buf is not None:
            new[: self.size] = buf[: self.size]
        return new

    def append(self, sender_id: str, seqs: np.ndarray, arrays: dict[str, np.ndarray]) -> int:
        from robot_rl.algos.base import SENDER_KEY

        n_new = len(seqs)
        if sender_id not in self._senders:
            self._senders.append(sender_id)
        cols = dict(arrays)
        cols["_seq"] = np.asarray(seqs, dtype=np.int64)
        cols[SENDER_KEY] = np.full(n_new, self._senders.index(sender_id), dtype=np.int32)
        start, end = self.size, self.size + n_new
        for key, value in cols.items():
            value = np.ascontiguousarray(value)
            if key not in self._group:
                chunk = self.chunk_rows if value[0].nbytes < 4096 else 64
                self._group.create_array(
                    key, shape=(0, *value.shape[1:]), dtype=value.dtype, chunks=(chunk, *value.shape[1:])
                )
            arr = self._arrays.get(key)
            if arr is None:
                arr = self._arrays[key] = self._group[key]
            arr.resize((end, *value.shape[1:]))
            arr[start:end] = value
        with self._lock:
            for key, value in cols.items():
                buf = self._grow(self._mem.get(key), value[:0], end)
                buf[start:end] = value
                self._mem[key] = buf
            self.size = end
        self.next_expected[sender_id] = int(seqs[-1]) + 1
        self._commit()
        return int(seqs[-1])

    def keys(self):
        return sorted(k for k in self._mem if not k.startswith("_"))

    def column(self, key):
        with self._lock:
            return self._mem[key][: self.size]

    def sample(self, batch_size, rng, keys):
        with self._lock:
            idx = rng.integers(0, self.size, size=batch_size)
            return {k: self._mem[k][idx] for k in keys}


class OldIngest:
    """The old learner's receiver + storage threads (process.py before the ingest log), with ack latency added
    (and acks addressed by (sender, stream), as today's transport wants them)."""

    def __init__(self, receiver, replay: OldReplayBuffer):
        self.receiver, self.replay = receiver, replay
        self._stop = threading.Event()
        self._to_store: queue.Queue = queue.Queue()
        self._stored: queue.Queue = queue.Queue()
        self.latencies: list[float] = []
        self.delivered = self.acked = 0

    def start(self):
        self.threads = [threading.Thread(target=self._receive_loop), threading.Thread(target=self._store_loop)]
        for t in self.threads:
            t.start()
        return self

    def _receive_loop(self):
        while not self._stop.is_set():
            for batch in self.receiver.poll(timeout_ms=5):
                self._to_store.put((batch, time.monotonic()))
                self.delivered += len(batch.seqs)
            while True:
                try:
                    sender_id, stream, upto, t, n = self._stored.get_nowait()
                except queue.Empty:
                    break
                self.receiver.ack(sender_id, stream, upto)
                self.latencies.append(time.monotonic() - t)
                self.acked += n

    def _store_loop(self):
        while not (self._stop.is_set() and self._to_store.empty()):
            try:
                batch, t = self._to_store.get(timeout=0.05)
            except queue.Empty:
                continue
            upto = self.replay.append(batch.sender_id, batch.seqs, batch.arrays)
            self._stored.put((batch.sender_id, batch.stream, upto, t, len(batch.seqs)))

    @property
    def idle(self):
        return self._to_store.empty() and self._stored.empty() and self.acked == self.delivered

    def stop(self):
        self._stop.set()
        for t in self.threads:
            t.join()


# ----------------------------------------------------------------------------------------------- processes
def learner_proc(
    variant: str, endpoint: str, run_dir: str, demos: str, train: bool, flush_s: float, ready, stop, results
) -> None:
    import torch

    from robot_rl.algos import algo_config
    from robot_rl.algos.sac import SAC
    from robot_rl.learner.ingest import IngestConfig
    from robot_rl.learner.ingest_process import IngestService
    from robot_rl.learner.replay_buffer import ReplayBuffer
    from robot_rl.transport import TransitionReceiver

    torch.set_num_threads(1)
    run_dir = Path(run_dir)
    algo = SAC(algo_config("sac", demos=demos, batch_size=256, learning_starts=0), {}, torch.device("cpu"))
    if variant == "old":
        replay = OldReplayBuffer(run_dir / "replay.zarr")
        receiver = TransitionReceiver(endpoint, heartbeat_interval_s=HEARTBEAT_S)
        ingest = OldIngest(receiver, replay).start()
    else:  # what the learner runs (robot_rl/learner/process.py); new-threads: its ingest threads in this process
        replay = ReplayBuffer(run_dir / "replay.zarr")
        ingest = IngestService(
            replay,
            run_dir,
            endpoint,
            HEARTBEAT_S,
            None,
            IngestConfig(flush_s=flush_s),
            in_process=variant == "new-threads",
        ).start()
    if train and variant != "old":  # as the learner does (session.learner_nice): its training thread yields
        os.nice(TRAIN_NICE)
    rng = np.random.default_rng(0)
    ready.set()
    updates, t_train = 0, None
    while not stop.is_set():
        if train and replay.size >= EPISODE_STEPS:
            t_train = t_train or time.monotonic()
            algo.update(replay, rng)
            updates += 1
        else:
            time.sleep(0.005)
    train_s = time.monotonic() - t_train if t_train else 0.0
    if variant == "old":
        deadline = time.monotonic() + 60
        while not ingest.idle and time.monotonic() < deadline:  # the sender closed: everything it sent is in
            time.sleep(0.05)
        ingest.stop()
        receiver.close()
        p50, p99 = np.percentile(np.asarray(ingest.latencies or [float("nan")]) * 1000, [50, 99])
        lat = {"ack_p50_ms": float(p50), "ack_p99_ms": float(p99)}
    else:
        ingest.stop(drain=True, quiet_s=0.5, timeout_s=60)
        lat = ingest.run_latency()
    results.put(
        {
            "role": "learner",
            "stored": int(replay.size),
            "updates": updates,
            "updates_per_s": updates / train_s if train_s else 0.0,
            "ack_p50_ms": lat["ack_p50_ms"],
            "ack_p99_ms": lat["ack_p99_ms"],
        }
    )


def sender_proc(
    endpoint: str, cameras: bool, batch: int, window: int, warmup_s: float, measure_s: float, results
) -> None:
    from robot_rl.transport import TransitionSender

    rng = np.random.default_rng(1)
    pool = [make_transition(rng, i, cameras) for i in range(POOL)]
    sender = TransitionSender(
        endpoint, "robot0", batch_size=batch, max_batch_delay_s=0.0, heartbeat_interval_s=HEARTBEAT_S
    ).start()
    while sender.last_contact is None:
        time.sleep(0.01)
    t0 = time.monotonic()
    t_start, t_end = t0 + warmup_s, t0 + warmup_s + measure_s
    a0 = a1 = None
    i = 0
    while True:
        now = time.monotonic()
        if a0 is None and now >= t_start:
            a0 = (now, sender.acked_upto)
        if now >= t_end:
            a1 = (now, sender.acked_upto)
            break
        if sender.unacked_count < window:
            t = dict(pool[i % POOL])
            t["episode"], t["step"] = np.int64(i // EPISODE_STEPS), np.int64(i % EPISODE_STEPS)
            sender.submit(t)
            i += 1
        else:
            time.sleep(0.0005)
    left = sender.close(linger_s=60.0)
    results.put(
        {"role": "sender", "submitted": i, "acked_per_s": (a1[1] - a0[1]) / (a1[0] - a0[0]), "unacked_at_close": left}
    )


def run_once(variant: str, workload: str, args, demos: Path, port: int) -> dict:
    ctx = mp.get_context("spawn")
    endpoint = f"tcp://127.0.0.1:{port}"
    results, ready, stop = ctx.Queue(), ctx.Event(), ctx.Event()
    with tempfile.TemporaryDirectory(prefix=f"bench_ingest_{variant}_", dir=args.tmp) as tmp:
        learner = ctx.Process(
            target=learner_proc,
            args=(
                variant,
                endpoint,
                tmp,
                str(demos),
                not args.no_train and variant != "new-idle",
                args.flush_s,
                ready,
                stop,
                results,
            ),
        )
        learner.start()
        if not ready.wait(300):
            raise RuntimeError("learner did not start")
        sender = ctx.Process(
            target=sender_proc,
            args=(
                endpoint,
                workload == "cameras",
                args.batch,
                args.window_cameras if workload == "cameras" else args.window,
                args.warmup_s,
                args.measure_s,
                results,
            ),
        )
        sender.start()
        got = {}
        got["sender"] = results.get(timeout=args.warmup_s + args.measure_s + 300)
        sender.join()
        stop.set()
        got.update({r["role"]: r for r in [results.get(timeout=300)]})
        learner.join()
    s, lr = got["sender"], got["learner"]
    return {
        "acked_per_s": s["acked_per_s"],
        "lost": s["submitted"] - lr["stored"],
        "unacked_at_close": s["unacked_at_close"],
        "submitted": s["submitted"],
        **{k: lr[k] for k in ("ack_p50_ms", "ack_p99_ms", "updates_per_s", "updates")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup-s", type=float, default=2.0)
    ap.add_argument("--measure-s", type=float, default=6.0)
    ap.add_argument("--batch", type=int, default=64, help="transitions per message (the sender's batch_size)")
    ap.add_argument("--window", type=int, default=2048, help="unacknowledged transitions the sender allows")
    ap.add_argument("--window-cameras", type=int, default=256, help="... with cameras (~11 MB in flight)")
    ap.add_argument("--workloads", nargs="+", default=["state", "cameras"], choices=["state", "cameras"])
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--flush-s", type=float, default=1.0, help="new path: zarr write-behind interval")
    ap.add_argument("--no-train", action="store_true", help="the learner only ingests (the ingest path's ceiling)")
    ap.add_argument("--tmp", default=None, help="directory for the learner's run dirs (default: the system temp)")
    args = ap.parse_args()

    load0 = os.getloadavg()
    print(f"cpus {os.cpu_count()}; load average at the start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    print(
        f"sender: batches of {args.batch}, at most {args.window} unacknowledged ({args.window_cameras} with "
        f"cameras); learner: SAC batch 256 "
        f"training flat out (1 torch thread); {args.warmup_s:.0f} s warm-up + {args.measure_s:.0f} s measured; "
        f"{args.repeats} interleaved repeats"
    )
    with tempfile.TemporaryDirectory(prefix="bench_ingest_demos_") as tmp:
        demos = Path(tmp) / "demos"
        make_demos(demos)
        rows: dict[tuple[str, str], list[dict]] = {}
        for rep in range(args.repeats):
            for workload in args.workloads:
                for variant in args.variants:
                    r = run_once(variant, workload, args, demos, free_port())
                    rows.setdefault((workload, variant), []).append(r)
                    print(
                        f"  repeat {rep + 1} {workload:<8} {variant:<11}: {r['acked_per_s']:9.0f} acked/s, ack p50 "
                        f"{r['ack_p50_ms']:7.1f} ms p99 {r['ack_p99_ms']:7.1f} ms, {r['updates_per_s']:5.1f} "
                        f"updates/s, lost {r['lost']}, unacked at close {r['unacked_at_close']}",
                        flush=True,
                    )
    load = os.getloadavg()
    print(f"\nSUMMARY (median of {args.repeats}; acked transitions/s while SAC trains; ack latency at the learner)")
    print(
        f"  {'workload':<10}{'variant':<12}{'acked/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'updates/s':>11}{'lost':>7}"
        f"{'target':>22}"
    )
    for (workload, variant), rs in rows.items():
        med = {
            k: statistics.median(r[k] for r in rs) for k in ("acked_per_s", "ack_p50_ms", "ack_p99_ms", "updates_per_s")
        }
        lost = max(r["lost"] for r in rs)
        target = f">= {TARGETS[workload]}/s, p99 <= {P99_TARGET_MS:.0f} ms" if variant == "new" else ""
        updates = f"{med['updates_per_s']:>11.1f}" if variant != "new-idle" else f"{'(none)':>11}"
        print(
            f"  {workload:<10}{variant:<12}{med['acked_per_s']:>10.0f}{med['ack_p50_ms']:>9.1f}"
            f"{med['ack_p99_ms']:>9.1f}{updates}{lost:>7}  {target}"
        )
    for workload in args.workloads:
        if (workload, "old") in rows and (workload, "new") in rows:
            new = statistics.median(r["acked_per_s"] for r in rows[(workload, "new")])
            old = statistics.median(r["acked_per_s"] for r in rows[(workload, "old")])
            print(f"  {workload}: new / old acked transitions/s = {new / max(old, 1e-9):.1f}x")
    print(
        f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (on {os.cpu_count()} cpus; "
        "the machine is shared)"
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
