"""A fleet into one training learner: many robots at 30 Hz with two 84x84 cameras each, through the real transport.

    python benchmarks/bench_fleet.py [--robots 32] [--rate-hz 30] [--seconds 30] [--sender-procs 4] [--no-curve]
                                     [--session-robots 4 --session-episodes 6] [--skip-replay]

Real processes and sockets, not sim physics: `--robots` TransitionSenders (each its own sender id, CURVE key pair
and outbox, as launch/fleet_robot.sh gives a robot), spread over `--sender-procs` processes, each submitting
Lift-sized transitions (robosuite's low-dim keys + two 84x84 RGB cameras, ~43 KB; benchmarks/bench_learner_ingest.py's
`make_transition`, replayed from a pre-made pool) at `--rate-hz` on a paced clock, into ONE learner started as
`python -m robot_rl.learner` (the real Learner: ingest process, ingest log, zarr write-behind) training SAC (RLPD
recipe, batch 256, 10 critics, on a synthetic Lift demo store + the replay) at the same time.

After `--seconds` every sender closes (waits for its acks), then the learner is stopped (it drains). Printed:
per robot the transitions sent / stored / lost, its rate and ack p99 as the learner's summary reports them (the
per-robot figures of robot_rl/learner/process.py `robots()`), the senders' own submit rate, and in total: lost,
the learner's ack latency p50/p99 over the run, SAC updates/s, achieved UTD. Targets (issue 14): 0 lost, ack p99
<= 100 ms at 32 robots. The machine is shared: say what size ran.

`--session-robots N` (default 4, 0 = skip) then runs the real thing at a small size: `robot-rl session
session.num_robots=N` (N MuJoCo Lift robots, the expert driving the first episodes, online BC learning) and prints
each robot's episodes, success rate, rate and health from the session's summary.json (`robots`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from bench_learner_ingest import EPISODE_STEPS, make_demos, make_transition  # noqa: E402 - beside this script

REPO = Path(__file__).resolve().parents[1]
POOL = 2 * EPISODE_STEPS  # distinct pre-made transitions each sender process cycles through
P99_TARGET_MS = 100.0
HEARTBEAT_S = 0.02  # as configs/session/sim.yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def learner_config(path: Path, demos: Path, ports, keys: str | None, seconds: float) -> Path:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("robot_rl.configs", version_base=None):
        cfg = compose(
            "session",
            overrides=[
                "algo=sac",
                f"algo.demos={demos}",
                "algo.learning_starts=256",
                "session.learner=remote",
                f"session.curve_keys_dir={keys or 'null'}",
                f"session.transitions_port={ports[0]}",
                f"session.weights_port={ports[1]}",
                f"session.learner_metrics_s={max(1.0, seconds / 10):.1f}",
                "session.drain_timeout_s=60",
                "device=auto",
                "tensorboard=false",
            ],
        )
    OmegaConf.save(cfg, path, resolve=True)
    return path


def senders_proc(names: list[str], endpoint: str, keys: dict | None, rate_hz: float, start_at: float, seconds: float,
                 outboxes: str, results) -> None:  # fmt: skip
    from robot_rl.transport import TransitionSender
    from robot_rl.transport.security import load_client_keys

    rng = np.random.default_rng(abs(hash(names[0])) % 2**32)
    pool = [make_transition(rng, i, cameras=True) for i in range(POOL)]
    senders = []
    for name in names:
        curve = load_client_keys(keys[name], str(Path(keys[name]) / "server.key")) if keys else None
        senders.append(
            TransitionSender(
                endpoint,
                name,
                batch_size=16,
                max_batch_delay_s=0.05,  # as configs/session/sim.yaml
                heartbeat_interval_s=HEARTBEAT_S,
                curve=curve,
                outbox_dir=Path(outboxes) / name,
            ).start()
        )
    period = 1.0 / rate_hz
    while time.time() < start_at:
        time.sleep(0.005)
    t0 = time.monotonic()
    tick, late = 0, []
    while True:
        due = t0 + tick * period
        now = time.monotonic()
        if now < due:
            time.sleep(due - now)
        late.append(time.monotonic() - due)
        if due - t0 >= seconds:
            break
        for s in senders:
            t = dict(pool[(tick + hash(s.sender_id)) % POOL])
            t["episode"], t["step"] = np.int64(tick // EPISODE_STEPS), np.int64(tick % EPISODE_STEPS)
            s.submit(t)
        tick += 1
    wall = time.monotonic() - t0
    out = {}
    for s in senders:
        submitted = s.next_seq
        out[s.sender_id] = {"submitted": submitted, "rate_hz": submitted / wall, "unacked_at_close": None}
    for s in senders:  # close after the loop: every robot kept its rate to the end
        out[s.sender_id]["unacked_at_close"] = s.close(linger_s=60.0)
    results.put({"senders": out, "tick_late_p99_ms": float(np.percentile(np.asarray(late) * 1000, 99))})


def sim_session(robots: int, episodes: int, tmp: Path) -> None:
    """`robot-rl session session.num_robots=N` on Lift; one line per robot from summary.json."""
    ports = free_port(), free_port()
    run = tmp / "session"
    cmd = [
        str(Path(sys.executable).parent / "robot-rl"),
        "session",
        f"session.num_robots={robots}",
        f"session.episodes={episodes}",
        "session.expert_episodes=2",
        "session.max_episode_steps=100",
        "device=cpu",
        "tensorboard=false",
        f"session.transitions_port={ports[0]}",
        f"session.weights_port={ports[1]}",
        f"hydra.run.dir={run}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))
    t0 = time.monotonic()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    summary = json.loads((run / "summary.json").read_text())
    print(f"\nrobot-rl session session.num_robots={robots} (Lift, online BC, {episodes} episodes each, 2 by the expert)"
          f": exit {res.returncode}, {time.monotonic() - t0:.0f} s")  # fmt: skip
    print(
        f"{'robot':<11}{'seed':>8}{'episodes':>9}{'success':>9}{'sent':>7}{'stored':>8}{'Hz':>7}{'ack p99':>9}  health"
    )
    for name, r in (summary.get("robots") or {}).items():
        print(
            f"{name:<11}{r['seed']!s:>8}{r['episodes']!s:>9}{r['success_rate'] or 0:>9.2f}{r['sent']!s:>7}"
            f"{r['stored']!s:>8}{r['rate_hz'] or 0:>7.1f}{r['ack_p99_ms'] or float('nan'):>9.1f}  {r['health']}"
        )
    print(res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr[-2000:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--robots", type=int, default=32)
    ap.add_argument("--rate-hz", type=float, default=30.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--sender-procs", type=int, default=4)
    ap.add_argument("--no-curve", action="store_true", help="plain TCP on loopback (default: CURVE keys per robot)")
    ap.add_argument("--session-robots", type=int, default=4, help="then a real sim session with N robots (0: skip)")
    ap.add_argument("--session-episodes", type=int, default=6)
    ap.add_argument("--skip-replay", action="store_true", help="only the sim session")
    ap.add_argument("--tmp", default=None, help="directory for the learner's run dir (default: the system temp)")
    args = ap.parse_args()
    if not args.skip_replay:
        replay_fleet(args)
    if args.session_robots:
        with tempfile.TemporaryDirectory(prefix="bench_fleet_session_", dir=args.tmp) as tmp:
            sim_session(args.session_robots, args.session_episodes, Path(tmp))


def replay_fleet(args) -> None:
    from robot_rl.transport.security import fleet_keys

    load0 = os.getloadavg()
    print(
        f"{args.robots} robots x {args.rate_hz:.0f} Hz x two 84x84 cameras ({args.robots * args.rate_hz:.0f} "
        f"transitions/s) for {args.seconds:.0f} s over {args.sender_procs} sender processes, "
        f"{'plain TCP' if args.no_curve else 'CURVE'} on loopback, into one learner training SAC; "
        f"{os.cpu_count()} cpus, load average at the start {load0[0]:.1f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench_fleet_", dir=args.tmp) as tmp:
        tmp = Path(tmp)
        make_demos(tmp / "demos")
        names = [f"robot{k:02d}" for k in range(args.robots)]
        keys = None
        if not args.no_curve:
            made = fleet_keys(str(tmp / "keys"), args.robots)
            keys = {n: made[f"robot{k}"] for k, n in enumerate(names)}
            # the learner authorises every robot's key (fleet_keys names them robot<k>; our ids are zero-padded)
        ports = free_port(), free_port()
        cfg = learner_config(tmp / "learner.yaml", tmp / "demos", ports, None if args.no_curve else made["learner"],
                             args.seconds)  # fmt: skip
        learner = subprocess.Popen(
            [sys.executable, "-m", "robot_rl.learner", str(cfg), str(tmp / "learner")],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp / "learner.log", "w"),  # noqa: SIM115 - closed with the process
        )
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        start_at = time.time() + 15.0 + 0.3 * args.robots  # imports, keys and connections first
        groups = [names[i :: args.sender_procs] for i in range(args.sender_procs)]
        procs = [
            ctx.Process(
                target=senders_proc,
                args=(
                    g,
                    f"tcp://127.0.0.1:{ports[0]}",
                    keys,
                    args.rate_hz,
                    start_at,
                    args.seconds,
                    str(tmp / "out"),
                    results,
                ),  # fmt: skip
            )
            for g in groups
            if g
        ]
        for p in procs:
            p.start()
        got = [results.get(timeout=start_at - time.time() + args.seconds + 300) for _ in procs]
        for p in procs:
            p.join()
        learner.send_signal(signal.SIGINT)
        code = learner.wait(timeout=300)
        summary = json.loads((tmp / "learner" / "summary.json").read_text())
        if code != 0:
            print((tmp / "learner.log").read_text()[-3000:])

    sent = {n: r for g in got for n, r in g["senders"].items()}
    robots = summary["robots"]
    print(
        f"\n{'robot':<9}{'sent':>7}{'stored':>8}{'lost':>6}{'sent Hz':>9}{'learner Hz':>11}{'ack p99 ms':>11}{'health':>8}"
    )
    lost_total = 0
    for name in names:
        s, r = sent[name], robots.get(name, {})
        lost = s["submitted"] - int(r.get("stored", 0)) - int(r.get("quarantined", 0))
        lost_total += lost
        print(
            f"{name:<9}{s['submitted']:>7}{r.get('stored', 0):>8}{lost:>6}{s['rate_hz']:>9.1f}"
            f"{r.get('rate_hz') or 0:>11.1f}{r.get('ack_p99_ms') or float('nan'):>11.1f}{r.get('health', '-'):>8}"
        )
    lat = summary["ack_latency_ms"]
    p99s = [r["ack_p99_ms"] for r in robots.values() if r.get("ack_p99_ms") is not None]
    load = os.getloadavg()
    print(
        f"\nTOTAL: {len(robots)} robots seen by the learner, sent {sum(s['submitted'] for s in sent.values())}, "
        f"stored {summary['replay_rows']}, lost {lost_total} (target 0); unacked at close "
        f"{sum(s['unacked_at_close'] for s in sent.values())}\n"
        f"  learner ack latency over the run: p50 {lat['ack_p50_ms']:.1f} ms, p99 {lat['ack_p99_ms']:.1f} ms "
        f"(target <= {P99_TARGET_MS:.0f} ms); per robot p99 median {statistics.median(p99s):.1f}, "
        f"worst {max(p99s):.1f} ms\n"
        f"  sender clocks: tick lateness p99 {max(g['tick_late_p99_ms'] for g in got):.1f} ms (worst process)\n"
        f"  SAC while ingesting: {summary['updates']} updates, {summary['updates_per_s'] or 0:.1f}/s, achieved UTD "
        f"{summary['achieved_utd'] or 0:.3f} of {summary['target_utd']}; learner exit {code}, drain "
        f"{summary['drain']!r}\n"
        f"  load average at the end {load[0]:.1f} (shared machine)"
    )


if __name__ == "__main__":
    main()
