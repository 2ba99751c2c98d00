"""What the rerun live view costs the control loop: the same sim session with `session.viz=rerun` and without.

    python benchmarks/bench_viz_cost.py [--repeats 2] [--episodes 3] [--cameras]

Each run is a real `robot-rl session` (MuJoCo Lift at 20 Hz, the scripted expert driving every episode, no learner,
so the figure is the loop's own), the two settings alternated so background load hits both alike. Printed: control
p99 / max tick lateness, tick work p99 and overruns per run, the median of each setting, and the view's own counts
(ticks logged / dropped for the viewer, and what the view costs inside the loop per tick: encoding the tick and the
non-blocking send to the viewer process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_session(run_dir: Path, viz: bool, episodes: int, cameras: bool) -> dict:
    args = [
        "session",
        "session.learner=none",
        f"session.episodes={episodes}",
        f"session.expert_episodes={episodes}",
        "session.max_episode_steps=200",
        "tensorboard=false",
        f"session.viz={'rerun' if viz else 'none'}",
        f"hydra.run.dir={run_dir}",
    ]
    if cameras:
        args += ["robot.cameras=[agentview]", "robot.camera_height=64", "robot.camera_width=64"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-m", "robot_rl.cli", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=1800
    )
    if out.returncode != 0:
        raise RuntimeError(f"session failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    summary = json.loads((run_dir / "control" / "summary.json").read_text())
    p = summary["pacing"]
    return {
        "viz": viz,
        "ticks": p["ticks"],
        "lateness_p99_us": p["lateness_p99_us"],
        "lateness_max_us": p["lateness_max_us"],
        "work_p99_us": p["work_p99_us"],
        "overruns": p["overruns"],
        "view": summary.get("viz"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each setting, alternated")
    ap.add_argument("--episodes", type=int, default=3)
    ap.add_argument("--cameras", action="store_true", help="a 64x64 agentview camera (images go to the view too)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for viz in (False, True):
                row = run_session(Path(tmp) / f"run_{i}_{int(viz)}", viz, args.episodes, args.cameras)
                rows.append(row)
                print(
                    f"run {i} viz={'rerun' if viz else 'none ':5s} ticks {row['ticks']:5d}  lateness p99 "
                    f"{row['lateness_p99_us']:9.1f} µs  max {row['lateness_max_us']:9.1f} µs  work p99 "
                    f"{row['work_p99_us'] / 1e3:6.2f} ms  overruns {row['overruns']}  view {row['view']}",
                    flush=True,
                )
    print("\nmedian over runs          lateness p99 µs   work p99 ms   overruns")
    for viz in (False, True):
        sel = [r for r in rows if r["viz"] == viz]
        print(
            f"  viz={'rerun' if viz else 'none':6s}               {statistics.median(r['lateness_p99_us'] for r in sel):10.1f}"
            f"   {statistics.median(r['work_p99_us'] for r in sel) / 1e3:10.2f}   "
            f"{statistics.median(r['overruns'] for r in sel):6.0f}"
        )
    costs = [r["view"]["loop_cost_us_p99"] for r in rows if r["viz"] and r["view"]]
    if costs:
        print(
            f"the view's own cost inside the loop (encode + non-blocking send), p99 per tick: median {statistics.median(costs):.1f} µs"
        )
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (on {os.cpu_count()} cpus)")


if __name__ == "__main__":
    main()
