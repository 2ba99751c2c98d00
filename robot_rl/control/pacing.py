"""Fixed-rate loop pacing on absolute deadlines.

A relative `time.sleep(period)` after the work drifts by the work time plus the sleep overshoot on every tick;
sleeping to an absolute deadline alone still wakes ~250 µs late. So we sleep until `spin_s` before the deadline
and busy-spin the rest (measured: ~10–20 µs p99 vs ~250 µs). Do not combine the spin with
SCHED_FIFO: a spinning real-time thread trips the kernel's RT throttle.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np


class _Ring:
    """Bounded float64 sample buffer, so a week-long session keeps constant memory."""

    def __init__(self, size: int):
        self._buf = np.zeros(size, dtype=np.float64)
        self._n = 0

    def add(self, x: float) -> None:
        self._buf[self._n % len(self._buf)] = x
        self._n += 1

    def values(self) -> np.ndarray:
        return self._buf[: min(self._n, len(self._buf))]

    def clear(self) -> None:
        self._n = 0


def _pct_us(samples: np.ndarray, q: float) -> float:
    return float(np.percentile(samples, q) * 1e6) if len(samples) else 0.0


class PacedLoop:
    """Ticks at `rate_hz` on the grid t0 + k·period; overruns skip slots instead of bursting to catch up.

    Usage::

        loop = PacedLoop(20.0)
        loop.start()
        while running:
            obs = robot.get_observation(); ...; robot.send_action(a)
            loop.wait()

    `clock` and `sleep` are injection seams for deterministic tests.
    """

    def __init__(
        self,
        rate_hz: float,
        spin_s: float = 0.001,
        *,
        history: int = 10_000,
        field: str = "session.rate_hz",
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
    ):
        try:
            rate = float(rate_hz)
        except (TypeError, ValueError):
            rate = math.nan
        if not math.isfinite(rate) or rate <= 0:
            raise ValueError(f"{field} must be > 0 and finite, got {rate_hz!r}")
        if not math.isfinite(spin_s) or spin_s < 0:
            raise ValueError(f"spin_s must be >= 0 and finite, got {spin_s!r}")
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history!r}")
        self.rate_hz = rate
        self.period = 1.0 / self.rate_hz
        self.spin_s = float(spin_s)
        self._clock, self._sleep = clock, sleep
        self._lateness, self._work = _Ring(history), _Ring(history)
        self._sections: dict[str, _Ring] = {}
        self._history = history
        self.t0: float | None = None
        self._paced_before = 0.0
        self.k = self.ticks = self.overruns = self.missed_slots = 0

    # --- pacing -------------------------------------------------------------------------------------------
    def start(self, keep_stats: bool = False) -> None:
        """Set t0 (slot 0); call right before the first tick's work. `keep_stats` re-anchors the grid after a
        pause that is not an overrun (an episode reset) while statistics keep accumulating over the session."""
        if keep_stats and self.t0 is not None:
            self._paced_before += self._last_wake - self.t0  # time spent on earlier grids, for the achieved rate
        else:
            self._paced_before = 0.0
        self.t0 = self._clock()
        self.k = 0  # index of the slot the loop last woke at
        self._last_return = self.t0
        self._last_wake = self.t0
        if keep_stats:
            return
        self.ticks = self.overruns = self.missed_slots = 0
        self._lateness.clear()
        self._work.clear()
        for ring in self._sections.values():
            ring.clear()

    @property
    def deadline(self) -> float:
        """Absolute time of the slot the loop last woke at (a timestamp for this tick's observation/action)."""
        return self.t0 + self.k * self.period

    def wait(self) -> float:
        """Block until the next slot; returns how late (s) we woke past it."""
        if self.t0 is None:
            self.start()
        now = self._clock()
        self._work.add(now - self._last_return)

        k = self.k + 1
        if now > self.t0 + k * self.period:
            # The work ran past the next deadline: skip to the first future slot rather than firing a burst of
            # back-to-back ticks, which would hand the robot stale, bunched-up actions.
            k_future = int((now - self.t0) // self.period) + 1
            while self.t0 + k_future * self.period <= now:  # guard float rounding at slot boundaries
                k_future += 1
            self.overruns += 1
            self.missed_slots += k_future - k
            k = k_future
        deadline = self.t0 + k * self.period

        remaining = deadline - self._clock()
        if remaining > self.spin_s:
            self._sleep(remaining - self.spin_s)
        now = self._clock()
        while now < deadline:
            now = self._clock()

        lateness = now - deadline
        self.k = k
        self.ticks += 1
        self._lateness.add(lateness)
        self._last_wake = now
        self._last_return = self._clock()
        return lateness

    # --- instrumentation -----------------------------------------------------------------------------------
    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Time a named part of the tick (robot io, inference); reported as `<name>_p50_us`/`<name>_p99_us`."""
        ring = self._sections.get(name)
        if ring is None:
            ring = self._sections[name] = _Ring(self._history)
        t = self._clock()
        try:
            yield
        finally:
            ring.add(self._clock() - t)

    def stats(self) -> dict:
        """Flat scalars (ready for a metrics logger); percentiles cover the last `history` ticks."""
        late, work = self._lateness.values(), self._work.values()
        elapsed = (self._paced_before + self._last_wake - self.t0) if self.t0 is not None else 0.0
        out = {
            "target_hz": self.rate_hz,
            "rate_hz": self.ticks / elapsed if elapsed > 0 else 0.0,
            "ticks": self.ticks,
            "overruns": self.overruns,
            "missed_slots": self.missed_slots,
            "lateness_p50_us": _pct_us(late, 50),
            "lateness_p99_us": _pct_us(late, 99),
            "lateness_max_us": float(late.max() * 1e6) if len(late) else 0.0,
            "work_p50_us": _pct_us(work, 50),
            "work_p99_us": _pct_us(work, 99),
        }
        for name, ring in self._sections.items():
            out[f"{name}_p50_us"] = _pct_us(ring.values(), 50)
            out[f"{name}_p99_us"] = _pct_us(ring.values(), 99)
        return out


# ------------------------------------------------------------------------------------------------ priority
PRIORITY_MODES = ("none", "nice", "fifo")


def set_priority(mode: str, nice: int = 0, rt_priority: int = 50, cpus: list[int] | None = None) -> dict:
    """Give the calling thread the CPU ahead of the learner and other work, as far as the OS allows; returns what
    was applied (for the summary) and never fails the run:

        none   leave it
        nice   this thread's niceness to `nice` (negative needs root / CAP_SYS_NICE; unprivileged: left as is)
        fifo   SCHED_FIFO at `rt_priority` for this thread (root, CAP_SYS_NICE or an rtprio limit; real hardware
               on an isolated core: docs/scale.md). The paced loop must then sleep, not spin (see above).
    `cpus`: pin this thread to these CPUs (e.g. an isolated core, `isolcpus=3`).
    Linux applies scheduling per thread: call it from the control thread after the transport threads started."""
    import logging
    import os

    log = logging.getLogger("robot_rl.control")
    if mode not in PRIORITY_MODES:
        raise ValueError(f"priority mode must be one of {', '.join(PRIORITY_MODES)}, got {mode!r}")
    applied: dict = {"mode": "none"}
    if cpus:
        try:
            os.sched_setaffinity(0, set(int(c) for c in cpus))
            applied["cpus"] = sorted(os.sched_getaffinity(0))
        except (OSError, AttributeError) as e:
            log.warning("could not pin the control thread to cpus %s: %s", cpus, e)
    if mode == "nice":
        try:
            current = os.getpriority(os.PRIO_PROCESS, 0)
            if nice != current:
                os.setpriority(os.PRIO_PROCESS, 0, int(nice))  # pid 0 = this thread (Linux: per-thread niceness)
            applied.update(mode="nice", nice=os.getpriority(os.PRIO_PROCESS, 0))
        except (OSError, AttributeError) as e:
            log.info("control niceness %d not permitted (%s): running at the default; see docs/scale.md", nice, e)
    elif mode == "fifo":
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(int(rt_priority)))
            applied.update(mode="fifo", rt_priority=int(rt_priority))
        except (OSError, AttributeError) as e:
            log.warning(
                "SCHED_FIFO priority %d not permitted (%s): running under the default scheduler; grant "
                "CAP_SYS_NICE or an rtprio limit (docs/scale.md)",
                rt_priority,
                e,
            )
    return applied
