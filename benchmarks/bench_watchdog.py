"""How fast the robot gets its safe action after the learner is SIGKILLed, and why it is not faster.

    .venv/bin/python benchmarks/bench_watchdog.py --kills 3 --load 0 --load 4

For each load (busy numpy processes beside the session) and each kill: a learner and a control process (online BC
on Lift, the policy driving) run as in a session; once weights v2 reached the robot the learner is SIGKILLed. From the
control's `ticks.npz` (wall time per tick, safe-action flag, seconds since the learner was last heard from) and the
kill time it prints, per kill: when the learner's children (the ingest process that sends the heartbeats) were gone,
when the robot last heard the learner, and the first safe tick — all relative to the kill, against the watchdog's
timeout. "Last heard" later than "children gone" means heartbeats already sent were read late (a busy control
process); between the kill and "children gone" means the dying learner's ingest process kept heartbeating.
Medians per load, side by side. Timing is noisy on a shared machine: read the ratios to the timeout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak_session import BUSY, free_port, tree  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    end = time.time() + timeout_s
    while not predicate():
        if time.time() > end:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(poll_s)


def dead(pid: int) -> bool:
    """Exited: gone from /proc, or a zombie (it no longer runs; nobody has reaped it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def config(run: Path, args) -> Path:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("robot_rl.configs", version_base=None):
        cfg = compose(
            "session",
            overrides=[
                "session.episodes=1000",
                "session.expert_episodes=1",
                "session.max_episode_steps=60",
                f"session.rate_hz={args.rate_hz}",
                f"session.watchdog_s={args.watchdog_s}",
                f"session.heartbeat_s={args.heartbeat_s}",
                "session.stop_on_success=false",
                "algo.min_transitions=40",
                "algo.publish_every_updates=20",
                "algo.batch_size=64",
                "policy.hidden=[64,64]",
                "device=cpu",
                "tensorboard=false",
                f"session.transitions_port={free_port()}",
                f"session.weights_port={free_port()}",
            ],
        )
    path = run / "config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def start(module: str, cfg: Path, run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", module, str(cfg), str(run_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )


def learner_version(learner_dir: Path) -> int:
    try:
        return int(json.loads((learner_dir / "checkpoints" / "latest").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return 0


def one_kill(args, root: Path) -> dict:
    run = Path(tempfile.mkdtemp(dir=root))
    cfg = config(run, args)
    learner = start("robot_rl.learner", cfg, run / "learner")
    control = start("robot_rl.control", cfg, run / "control")
    try:
        wait_for(lambda: learner_version(run / "learner") >= 2, 300, "weights v2")
        time.sleep(2.0)  # the weights reached the robot: the policy drives
        helpers = tree(learner.pid)[1:]  # its ingest process sends the heartbeats
        kill_t = time.time()
        learner.send_signal(signal.SIGKILL)
        wait_for(lambda: all(dead(p) for p in helpers), 30, "the learner's children to exit", poll_s=0.002)
        gone_t = time.time()
        learner.wait()
        time.sleep(1.5)
    finally:
        control.send_signal(signal.SIGINT)
        control.wait(timeout=120)
        if learner.poll() is None:
            learner.kill()
    ticks = np.load(run / "control" / "ticks.npz")
    t, safe, age = ticks["t"], ticks["forced_safe"], ticks["contact_age"]
    after = np.flatnonzero(t > kill_t)
    first_safe = t[after[np.flatnonzero(safe[after])[0]]] if safe[after].any() else float("nan")
    # the last contact, seen from the tick just before the robot went safe: tick time minus its contact age
    last_heard = float("nan")
    if safe[after].any():
        i = after[np.flatnonzero(safe[after])[0]]
        last_heard = t[i] - age[i]
    # before the kill, with the policy driving: how stale contact gets in normal operation, and spurious holds
    before = (t < kill_t) & (ticks["source"] == 1) & np.isfinite(age)
    shutil.rmtree(run, ignore_errors=True)
    return {
        "normal_contact_age_p99_ms": float(np.percentile(age[before], 99) * 1e3),
        "normal_held_ticks": int(safe[before].sum()),
        "children_gone_s": gone_t - kill_t,
        "last_heard_s": last_heard - kill_t,
        "first_safe_s": first_safe - kill_t,
        "tick_lateness_p99_ms": float(np.percentile(ticks["lateness"][after], 99) * 1e3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=3, help="kills per load")
    ap.add_argument("--load", type=int, action="append", help="busy processes beside the session (repeatable)")
    ap.add_argument("--watchdog-s", type=float, default=0.045)
    ap.add_argument("--heartbeat-s", type=float, default=0.01)
    ap.add_argument("--rate-hz", type=float, default=20)
    args = ap.parse_args()
    loads = args.load or [0, 4]
    root = Path(tempfile.mkdtemp(prefix="bench_watchdog_"))
    results = {}
    try:
        for load in loads:
            busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(load)]
            try:
                rows = [one_kill(args, root) for _ in range(args.kills)]
            finally:
                for b in busy:
                    b.kill()
            results[load] = rows
            for r in rows:
                print(f"load {load}: " + "  ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nwatchdog timeout {args.watchdog_s * 1e3:.0f} ms, heartbeat every {args.heartbeat_s * 1e3:.0f} ms")
    print("medians (s after the SIGKILL): load | children gone | last heard | first safe tick | safe / timeout")
    for load, rows in results.items():
        med = {k: float(np.nanmedian([r[k] for r in rows])) for k in rows[0]}
        print(
            f"  {load:4d} | {med['children_gone_s']:13.3f} | {med['last_heard_s']:10.3f} | "
            f"{med['first_safe_s']:15.3f} | {med['first_safe_s'] / args.watchdog_s:6.1f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
