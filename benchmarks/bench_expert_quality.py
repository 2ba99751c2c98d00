"""Success rate and episode length of the scripted experts per task and quality preset.

    python benchmarks/bench_expert_quality.py [--quick] [--episodes N] [--tasks Lift Stack ...]

For each task x preset ("expert", "mediocre", "poor"; see `robot_rl.sim.experts.QUALITY_PRESETS`): one expert
(seed 0) runs episodes on env seeds 0..N-1 (N = 20, or 5 with --quick), each until success or the task's horizon.
Reported: success rate, mean episode length (steps; a failed episode counts as the horizon), mean length of the
successful ones, and gripper open->close command switches per episode (1 = one clean grasp; more = retried grasps,
or a brief re-close while placing).
"""

import argparse
import time

import numpy as np

HORIZONS = {"Lift": 200, "PickPlaceCan": 400, "Stack": 300}
PRESETS = ("expert", "mediocre", "poor")


def run(robot, expert, seeds, horizon):
    succ, lens, closings = [], [], []
    for s in seeds:
        obs = robot.reset(seed=s)
        expert.reset()
        prev, n_close, ok, t = -1.0, 0, False, 0
        for t in range(1, horizon + 1):
            a = expert.get_action(obs)
            n_close += int(prev < 0 < a[6])
            prev = float(a[6])
            robot.send_action(a)
            obs = robot.get_observation()
            if robot.is_success():
                ok = True
                break
        succ.append(ok)
        lens.append(t)
        closings.append(n_close)
    return np.array(succ), np.array(lens), np.array(closings)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="5 episodes per cell instead of 20")
    ap.add_argument("--episodes", type=int, default=None)
    ap.add_argument("--tasks", nargs="+", default=list(HORIZONS))
    args = ap.parse_args()
    n = args.episodes or (5 if args.quick else 20)

    from robot_rl.sim.experts import make_expert
    from robot_rl.sim.robosuite_robot import RobosuiteRobot

    rows = []
    for task in args.tasks:
        horizon = HORIZONS.get(task, 400)
        robot = RobosuiteRobot(env_name=task, horizon=horizon)
        robot.connect()
        for q in PRESETS:
            t0 = time.perf_counter()
            succ, lens, closings = run(robot, make_expert(task, quality=q, seed=0), range(n), horizon)
            rows.append(
                (
                    task,
                    q,
                    horizon,
                    succ.mean(),
                    lens.mean(),
                    lens[succ].mean() if succ.any() else float("nan"),
                    closings.mean(),
                    time.perf_counter() - t0,
                )
            )
            print(f"  {task:<13} {q:<9} done in {rows[-1][-1]:.1f}s", flush=True)
        robot.disconnect()

    print(f"\nscripted expert quality, {n} episodes per cell (env seeds 0..{n - 1}, expert seed 0)\n")
    head = f"{'task':<13} {'preset':<9} {'horizon':>7} {'success':>8} {'mean len':>9} {'len|succ':>9} {'closings':>9}"
    print(head)
    print("-" * len(head))
    for task, q, h, sr, ml, mls, mc, _ in rows:
        print(f"{task:<13} {q:<9} {h:>7} {sr:>8.0%} {ml:>9.1f} {mls:>9.1f} {mc:>9.2f}")


if __name__ == "__main__":
    main()
