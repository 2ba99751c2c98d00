"""SafetyFilter and Watchdog: every fault path, with injected time."""

import logging

import numpy as np
import pytest

from robot_rl.control.safety import SafetyFilter, Watchdog

NAN = np.nan
LOW = np.array([-1, -1, -1, 0], dtype=np.float32)
HIGH = np.array([1, 1, 1, 1], dtype=np.float32)


def filt(**kw):
    return SafetyFilter(LOW, HIGH, **kw)


def test_valid_action_passes_unchanged():
    f = filt()
    out, ev = f(np.array([0.1, -0.2, 0.3, 0.5]))
    assert ev == [] and out.dtype == np.float32
    np.testing.assert_allclose(out, [0.1, -0.2, 0.3, 0.5], rtol=1e-6)


def test_clip():
    f = filt()
    out, ev = f([2.0, -3.0, 0.0, 0.5])
    assert ev == ["clip"]
    np.testing.assert_array_equal(out, [1, -1, 0, 0.5])


def test_rate_limit_per_dimension():
    f = filt(max_delta=[0.1, 0.1, 0.1, 1.0])
    f([0, 0, 0, 0])  # nothing sent before: not rate limited
    out, ev = f([0.5, -0.05, 0.0, 1.0])
    assert ev == ["rate_limit"]
    np.testing.assert_allclose(out, [0.1, -0.05, 0.0, 1.0], atol=1e-7)
    out, ev = f([5.0, 0, 0, 1.0])  # clip then rate limit
    assert ev == ["clip", "rate_limit"]
    np.testing.assert_allclose(out, [0.2, 0, 0, 1.0], atol=1e-6)


def test_nan_gives_safe_action_with_hold_semantics(caplog):
    f = filt(safe_action=[0, 0, 0, NAN])  # no motion, gripper holds
    f([0.5, 0.5, 0.5, 0.7])
    with caplog.at_level(logging.WARNING):
        out, ev = f([NAN, 0, 0, 0])
        f([0, NAN, 0, 0])
    assert ev == ["nan"]
    np.testing.assert_allclose(out, [0, 0, 0, 0.7], rtol=1e-6)
    assert f.counts["nan"] == 2
    assert sum("nan" in r.getMessage() for r in caplog.records) == 1  # logged once, then counted


def test_safe_action_before_anything_sent_falls_back_to_clipped_zero():
    f = SafetyFilter([-1, 0.2], [1, 1], safe_action=[NAN, NAN])
    out, ev = f([NAN, 0.5])
    np.testing.assert_allclose(out, [0, 0.2])
    out, _ = SafetyFilter([-1, 0.2], [1, 1])(None, force_safe=True)  # None = hold everything
    np.testing.assert_allclose(out, [0, 0.2])


def test_safe_action_obeys_bounds():
    f = SafetyFilter([-1, -1], [1, 1], safe_action=[5.0, NAN])
    out, _ = f([0, 0], force_safe=True)
    np.testing.assert_array_equal(out, [1, 0])


def test_none_safe_action_holds_last_sent():
    f = filt()
    f([0.3, 0.2, 0.1, 0.9])
    out, ev = f(np.array([np.inf, 0, 0, 0]))
    assert ev == ["inf"]
    np.testing.assert_allclose(out, [0.3, 0.2, 0.1, 0.9], rtol=1e-6)


@pytest.mark.parametrize(
    "bad, event",
    [
        (np.zeros(3), "shape"),
        (np.zeros((1, 4)), "shape"),
        (np.zeros((2, 4)), "shape"),
        (["a", "b", "c", "d"], "non_numeric"),
        (None, "non_numeric"),
        ([[1, 2], [3]], "non_numeric"),
        ([1e300, 0, 0, 0], "inf"),  # overflows float32
        ([0, -np.inf, 0, 0], "inf"),
    ],
)
def test_invalid_actions_become_safe(bad, event):
    f = filt(safe_action=[0, 0, 0, NAN])
    out, ev = f(bad)
    assert ev == [event] and f.counts[event] == 1
    assert out.shape == (4,) and np.isfinite(out).all()


def test_force_safe_and_counts_and_reset():
    f = filt(max_delta=0.1, safe_action=[0, 0, 0, NAN])
    f([0.05, 0.05, 0.05, 0.05])
    out, ev = f([0.05, 0.05, 0.05, 0.05], force_safe=True)
    assert ev == ["forced_safe"]
    np.testing.assert_allclose(out, [0, 0, 0, 0.05])
    f([5, 0, 0, 0])
    assert f.counts["forced_safe"] == 1 and f.counts["clip"] == 1 and f.counts["rate_limit"] == 1
    f.reset()
    out, ev = f([0.9, 0.9, 0.9, 0.9])  # last_sent forgotten: no rate limit against the previous episode
    assert ev == [] and f.counts["clip"] == 1


def test_returned_action_is_a_copy():
    f = filt(max_delta=0.1)
    out, _ = f([0, 0, 0, 0])
    out[:] = 0.9
    out2, ev = f([0.9, 0.9, 0.9, 0.9])
    assert ev == ["rate_limit"]
    np.testing.assert_allclose(out2, 0.1, atol=1e-7)


def test_constructor_validation():
    with pytest.raises(ValueError, match="low must be <= high"):
        SafetyFilter([0, 1], [1, 0])
    with pytest.raises(ValueError, match=r"high must be .* shape \(2,\)"):
        SafetyFilter([0, 0], [1, 1, 1])
    with pytest.raises(ValueError, match="max_delta"):
        SafetyFilter([0, 0], [1, 1], max_delta=-0.1)
    with pytest.raises(ValueError, match="safe_action"):
        SafetyFilter([0, 0], [1, 1], safe_action=[0, 0, 0])
    with pytest.raises(ValueError, match="1-D"):
        SafetyFilter(np.zeros((2, 2)), np.ones((2, 2)))


# --- Watchdog -----------------------------------------------------------------------------------------------


def test_unarmed_watchdog_never_expires():
    w = Watchdog(0.25)
    assert not w.expired(now=1e9)


def test_armed_but_never_fed_is_expired():
    w = Watchdog(0.25)
    w.arm()
    assert w.expired(now=0.0) and w.trips == 1


def test_watchdog_transitions_log_once_each(caplog):
    w = Watchdog(0.25, name="learner")
    with caplog.at_level(logging.WARNING):
        w.feed(now=10.0)
        assert not w.expired(now=10.2)
        assert w.expired(now=10.52)
        assert w.expired(now=10.6) and w.expired(now=11.0)  # still stale: no new log, no new trip
        w.feed(now=11.5)
        assert not w.expired(now=11.6)
        assert w.expired(now=12.0)
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == [
        "learner silent for 0.52 s (> 0.25 s): sending safe actions",
        "learner back after 1.50 s of silence: resuming",
        "learner silent for 0.50 s (> 0.25 s): sending safe actions",
    ]
    assert w.trips == 2


def test_watchdog_injected_clock_and_bad_timeout():
    t = [0.0]
    w = Watchdog(1.0, clock=lambda: t[0])
    w.feed()
    t[0] = 0.9
    assert not w.expired()
    t[0] = 1.1
    assert w.expired() and w.silence_s() == pytest.approx(1.1)
    with pytest.raises(ValueError, match="timeout_s"):
        Watchdog(0)


def test_one_outage_is_one_trip_however_often_the_stale_contact_is_fed(caplog):
    """The control process feeds the learner's last contact time every tick: a 3 s silence at 20 Hz is 60 ticks
    feeding the same old timestamp, and must count one trip and log its true length once contact returns."""
    w = Watchdog(0.1, name="learner")
    with caplog.at_level(logging.WARNING):
        w.feed(now=10.0)
        for tick in range(60):  # 3 s of ticks while the learner is frozen: last contact stays 10.0
            now = 10.05 + tick * 0.05
            w.feed(now=10.0)
            w.expired(now=now)
        assert w.trips == 1 and w.outages(now=13.0) == {"count": 1, "total_s": 3.0, "longest_s": 3.0, "ongoing": True}
        w.feed(now=13.1)  # contact again
        assert not w.expired(now=13.12)
        w.feed(now=13.1)  # fed again with the same contact: nothing logged
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == [
        "learner silent for 0.10 s (> 0.10 s): sending safe actions",
        "learner back after 3.10 s of silence: resuming",
    ]
    assert w.outages() == {"count": 1, "total_s": 3.1, "longest_s": 3.1, "ongoing": False}


def test_outages_count_total_and_longest():
    w = Watchdog(0.25)
    w.arm(now=0.0)
    assert w.expired(now=0.3)  # never heard from: an outage from when it was armed
    w.feed(now=1.0)
    assert not w.expired(now=1.1)
    assert w.expired(now=1.5)
    w.feed(now=3.0)
    assert w.outages() == {"count": 2, "total_s": 3.0, "longest_s": 2.0, "ongoing": False}
