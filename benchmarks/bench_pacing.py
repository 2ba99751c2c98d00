"""Loop pacing jitter: PacedLoop (absolute deadline + final spin) vs two plain-Python baselines.

    python benchmarks/bench_pacing.py [--quick] [--seconds S]

Every method runs the same fake workload (a 0.2 ms busy wait) and is measured against the same absolute grid
t0 + k·period, so relative sleep shows up as lateness that grows tick by tick (drift). Methods are interleaved
in short segments so that background load hits all of them alike. Target: PacedLoop p99 < 100 µs on an idle
machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from robot_rl.control.pacing import PacedLoop  # noqa: E402

WORK_S = 0.0002
TARGET_P99_US = 100.0
clock = time.perf_counter


def busy(seconds: float) -> None:
    end = clock() + seconds
    while clock() < end:
        pass


def run_relative(rate_hz: float, seconds: float):
    """`time.sleep(period)` after the work: what most robot scripts do."""
    period, n = 1.0 / rate_hz, int(seconds * rate_hz)
    late, overruns = np.empty(n), 0
    t0 = clock()
    for k in range(1, n + 1):
        busy(WORK_S)
        if clock() > t0 + k * period:
            overruns += 1
        time.sleep(period)
        late[k - 1] = clock() - (t0 + k * period)
    return late, late[-1], overruns


def run_absolute_sleep(rate_hz: float, seconds: float):
    """Sleep until the absolute deadline, no spin: no drift, but the kernel's wake-up jitter remains."""
    period, n = 1.0 / rate_hz, int(seconds * rate_hz)
    late, overruns = np.empty(n), 0
    t0 = clock()
    for k in range(1, n + 1):
        busy(WORK_S)
        deadline = t0 + k * period
        remaining = deadline - clock()
        if remaining > 0:
            time.sleep(remaining)
        else:
            overruns += 1
        late[k - 1] = clock() - deadline
    return late, late[-1], overruns


def run_paced(rate_hz: float, seconds: float):
    n = int(seconds * rate_hz)
    loop = PacedLoop(rate_hz)
    late = np.empty(n)
    loop.start()
    for i in range(n):
        busy(WORK_S)
        late[i] = loop.wait()
    drift = clock() - (loop.t0 + n * loop.period)  # includes any skipped slots, so it is honest about overruns
    return late, drift, loop.stats()["overruns"]


METHODS = {"sleep(period)": run_relative, "abs sleep": run_absolute_sleep, "PacedLoop": run_paced}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run (< 20 s)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per method and rate (default 8, quick 1.8)")
    args = ap.parse_args()
    total = args.seconds if args.seconds is not None else (1.8 if args.quick else 8.0)
    segments = 3 if args.quick else 4
    seg_s = total / segments

    print(
        f"loop pacing, fake work {WORK_S * 1e3:.1f} ms/tick, {total:.1f} s per method and rate in {segments} "
        f"interleaved segments of {seg_s:.2f} s; cpus={os.cpu_count()} loadavg={os.getloadavg()[0]:.2f}"
    )
    print("lateness vs the absolute grid t0 + k*period; drift = lateness of the last tick of a segment (mean)")
    print(f"target: PacedLoop p99 < {TARGET_P99_US:.0f} µs on an idle machine\n")
    hdr = f"{'rate':>6} {'method':<14} {'p50 µs':>9} {'p99 µs':>9} {'max µs':>9} {'drift ms':>9} {'overruns':>8}"
    print(hdr + f" {'p99 / PacedLoop':>17}")
    print("-" * (len(hdr) + 18))

    verdicts = []
    for rate in (50.0, 100.0, 500.0):
        res = {m: ([], [], 0) for m in METHODS}
        names = list(METHODS)
        for s in range(segments):
            for m in names[s % len(names) :] + names[: s % len(names)]:  # rotate the order each segment
                late, drift, over = METHODS[m](rate, seg_s)
                lats, drifts, overs = res[m]
                res[m] = (lats + [late], drifts + [drift], overs + over)
        p99 = {m: np.percentile(np.concatenate(res[m][0]), 99) * 1e6 for m in METHODS}
        for m in METHODS:
            lat = np.concatenate(res[m][0]) * 1e6
            ratio = max(p99[m], 1.0) / max(p99["PacedLoop"], 1.0)  # floor at 1 µs: below is clock noise
            print(
                f"{rate:>4.0f}Hz {m:<14} {np.percentile(lat, 50):>9.1f} {p99[m]:>9.1f} {lat.max():>9.1f} "
                f"{np.mean(res[m][1]) * 1e3:>9.2f} {res[m][2]:>8d} {ratio:>16.0f}x"
            )
        verdicts.append(
            f"{rate:.0f} Hz: PacedLoop p99 {p99['PacedLoop']:.1f} µs "
            f"({'meets' if p99['PacedLoop'] < TARGET_P99_US else 'MISSES'} target)"
        )
        print()
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
