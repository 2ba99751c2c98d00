"""PacedLoop bookkeeping on a fake clock: deterministic, no wall-clock timing assertions."""

import math

import pytest

from robot_rl.control.pacing import PacedLoop


class FakeClock:
    """Time only moves when someone sleeps, works, or reads the clock (a 1 µs tick, so spin loops end)."""

    def __init__(self, t: float = 100.0, read_cost: float = 1e-6):
        self.t, self.read_cost = t, read_cost

    def __call__(self) -> float:
        self.t += self.read_cost
        return self.t

    def sleep(self, dt: float) -> None:
        self.t += max(dt, 0.0)

    work = sleep


def make(rate_hz=100.0, **kw):
    clock = FakeClock()
    return PacedLoop(rate_hz, clock=clock, sleep=clock.sleep, **kw), clock


def test_ticks_land_on_absolute_grid():
    loop, clock = make(100.0)
    loop.start()
    for k in range(1, 51):
        clock.work(0.002)
        late = loop.wait()
        assert 0 <= late < 5e-6
        assert loop.k == k
        assert clock.t == pytest.approx(loop.t0 + k * 0.01, abs=5e-6)
    s = loop.stats()
    assert (s["ticks"], s["overruns"], s["missed_slots"]) == (50, 0, 0)
    assert s["rate_hz"] == pytest.approx(100.0, rel=1e-3)
    assert s["work_p50_us"] == pytest.approx(2000, abs=10)
    assert s["lateness_max_us"] < 5


def test_overrun_skips_missed_slots_without_bursting():
    loop, clock = make(100.0)
    loop.start()
    clock.work(0.002)
    loop.wait()  # slot 1
    clock.work(0.025)  # 2.5 periods: slots 2 and 3 pass during the work
    loop.wait()
    assert loop.k == 4
    assert clock.t == pytest.approx(loop.t0 + 0.04, abs=5e-6)
    s = loop.stats()
    assert (s["ticks"], s["overruns"], s["missed_slots"]) == (2, 1, 2)
    # Back on the grid afterwards, no catch-up burst.
    clock.work(0.001)
    loop.wait()
    assert loop.k == 5 and loop.stats()["overruns"] == 1


def test_work_ending_exactly_one_period_late_is_one_missed_slot():
    loop, clock = make(50.0, spin_s=0.0)
    loop.start()
    clock.work(0.02 + 0.005)  # past slot 1, before slot 2
    loop.wait()
    assert loop.k == 2
    assert (loop.overruns, loop.missed_slots) == (1, 1)


def test_sleeps_then_spins():
    clock = FakeClock()
    sleeps = []
    loop = PacedLoop(10.0, spin_s=0.001, clock=clock, sleep=lambda dt: (sleeps.append(dt), clock.sleep(dt)))
    loop.start()
    loop.wait()
    assert len(sleeps) == 1 and sleeps[0] == pytest.approx(0.099, abs=1e-5)  # the last 1 ms is spun


def test_wait_without_start_starts_implicitly():
    loop, clock = make(100.0)
    loop.wait()
    assert loop.ticks == 1 and loop.k == 1


def test_sections_and_ring_bound():
    loop, clock = make(100.0, history=8)
    loop.start()
    for _ in range(20):
        with loop.section("inference"):
            clock.work(0.003)
        loop.wait()
    s = loop.stats()
    assert s["ticks"] == 20
    assert len(loop._lateness.values()) == 8
    assert s["inference_p50_us"] == pytest.approx(3000, abs=10)


@pytest.mark.parametrize("bad", [-5, 0, math.inf, math.nan, "fast", None])
def test_bad_rate_raises_naming_the_field(bad):
    with pytest.raises(ValueError, match=r"session\.rate_hz must be > 0"):
        PacedLoop(bad)


def test_bad_spin_raises():
    with pytest.raises(ValueError, match="spin_s"):
        PacedLoop(100.0, spin_s=-1)


def test_real_clock_smoke():
    loop = PacedLoop(1000.0)
    loop.start()
    for _ in range(5):
        assert loop.wait() >= 0
    assert loop.stats()["ticks"] == 5


def test_restart_keeping_stats_spans_episodes():
    """Episode resets re-anchor the grid without counting as overruns; stats cover the whole session."""
    loop, clock = make(100.0)
    loop.start()
    for _ in range(10):
        clock.work(0.002)
        loop.wait()
    clock.work(1.0)  # an episode reset: far longer than a period
    loop.start(keep_stats=True)
    for _ in range(10):
        clock.work(0.002)
        loop.wait()
    s = loop.stats()
    assert s["ticks"] == 20 and s["overruns"] == 0 and s["missed_slots"] == 0
    assert s["rate_hz"] == pytest.approx(100.0, rel=0.01)  # the reset is not paced time
    loop.start()
    assert loop.stats()["ticks"] == 0


def test_set_priority_applies_to_the_calling_thread_only_and_never_fails():
    import os
    import threading

    from robot_rl.control.pacing import set_priority

    base = os.getpriority(os.PRIO_PROCESS, 0)
    seen = {}

    def control_thread():
        seen["applied"] = set_priority("nice", nice=base + 3)
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, 0)
        seen["fifo"] = set_priority("fifo", rt_priority=1)  # root: applied; otherwise logged, mode none
        seen["policy"] = os.sched_getscheduler(0)

    t = threading.Thread(target=control_thread)
    t.start()
    t.join()
    assert seen["applied"] == {"mode": "nice", "nice": base + 3} and seen["nice"] == base + 3
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # this thread untouched
    assert seen["fifo"]["mode"] in ("fifo", "none")
    assert (seen["policy"] == os.SCHED_FIFO) == (seen["fifo"]["mode"] == "fifo")
    assert set_priority("none") == {"mode": "none"}
    with pytest.raises(ValueError, match="priority mode"):
        set_priority("realtime")
