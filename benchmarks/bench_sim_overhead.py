"""Control steps/s of RobosuiteRobot (send_action + get_observation) vs raw robosuite env.step, same task.

    python benchmarks/bench_sim_overhead.py [--quick] [--env Lift]

Interleaved repeats (wrapper, raw, wrapper, raw, ...) on one env each, medians reported; target ratio >= 95%.
"""

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer steps and repeats (smoke run)")
    ap.add_argument("--env", default="Lift")
    args = ap.parse_args()
    steps, repeats = (100, 3) if args.quick else (400, 7)

    import robosuite as suite

    from robot_rl.sim.robosuite_robot import RobosuiteRobot

    robot = RobosuiteRobot(env_name=args.env)
    robot.connect()
    raw = suite.make(
        args.env,
        robots="Panda",
        has_renderer=False,
        has_offscreen_renderer=False,
        use_camera_obs=False,
        ignore_done=True,
        control_freq=20,
        horizon=200,
        hard_reset=False,
    )
    dim = robot.action_feature.shape[0]
    actions = np.random.default_rng(0).uniform(-0.3, 0.3, (steps, dim)).astype(np.float32)

    def run_robot() -> float:
        robot.reset(seed=0)
        t = time.perf_counter()
        for a in actions:
            robot.send_action(a)
            robot.get_observation()
        return steps / (time.perf_counter() - t)

    def run_raw() -> float:
        raw.reset()
        t = time.perf_counter()
        for a in actions:
            raw.step(a.astype(np.float64))
        return steps / (time.perf_counter() - t)

    run_robot(), run_raw()  # warm-up (numba JIT in robosuite's transform utils)
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(run_robot())
        theirs.append(run_raw())
    m_ours, m_raw = statistics.median(ours), statistics.median(theirs)
    print(f"{args.env} state obs, {steps} steps x {repeats} interleaved repeats (medians)")
    print(f"  raw robosuite env.step          : {m_raw:8.1f} steps/s")
    print(f"  RobosuiteRobot send+get_obs     : {m_ours:8.1f} steps/s")
    print(f"  ratio                           : {100 * m_ours / m_raw:8.1f} %  (target >= 95 %)")
    robot.disconnect()
    raw.close()


if __name__ == "__main__":
    main()
