"""The last line between any policy and the robot: action validation, bounds, rate limits, and a watchdog.

Everything here runs every tick, so faults are counted rather than logged per tick: each kind of fault logs
once, and `counts` carries the totals into the run's metrics.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import numpy as np
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

_INVALID = ("non_numeric", "shape", "nan", "inf")  # faults that replace the whole action by the safe action
EVENTS = (*_INVALID, "clip", "rate_limit", "forced_safe")


def _vector(x, n: int, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float32)
    if a.ndim == 0:
        a = np.full(n, a, dtype=np.float32)
    if a.shape != (n,):
        raise ValueError(f"{what} must be a scalar or have shape ({n},), got shape {a.shape}")
    return a


class SafetyFilter:
    """Turns whatever a policy/teleop produced into an action that is safe to send.

    Invalid actions (wrong shape, non-numeric, NaN, inf) and `force_safe` yield the safe action. Valid ones are
    clipped to [low, high], then moved at most `max_delta` per dimension away from the last sent action.

    `safe_action`: NaN entries mean "hold the last sent value" (e.g. `[0]*6 + [nan]`: no arm motion, gripper
    stays); `None` holds the whole last action. Before anything was sent, held entries fall back to 0 clipped
    into [low, high]. The safe action is clipped to the bounds but deliberately NOT rate-limited: it has to take
    effect on this tick (a stop must not ramp), so give it as zero motion / hold, never as a distant pose.
    """

    def __init__(
        self,
        low: np.ndarray,
        high: np.ndarray,
        max_delta: np.ndarray | float | None = None,
        safe_action: np.ndarray | None = None,
    ):
        self.low = np.asarray(low, dtype=np.float32)
        if self.low.ndim != 1 or self.low.size == 0:
            raise ValueError(f"low must be a non-empty 1-D vector, got shape {self.low.shape}")
        n = self.low.size
        self.high = _vector(high, n, "high")
        if np.isnan(self.low).any() or np.isnan(self.high).any():
            raise ValueError("low/high must not contain NaN")
        if (bad := np.flatnonzero(self.low > self.high)).size:
            raise ValueError(f"low must be <= high; violated at indices {bad.tolist()}")
        self.max_delta = None
        if max_delta is not None:
            self.max_delta = _vector(max_delta, n, "max_delta")
            if not (self.max_delta >= 0).all():  # also rejects NaN
                raise ValueError(f"max_delta must be >= 0 (inf = unlimited), got {self.max_delta.tolist()}")
        self.safe_action = None
        if safe_action is not None:
            self.safe_action = _vector(safe_action, n, "safe_action")
            if np.isinf(self.safe_action).any():
                raise ValueError("safe_action must be finite (NaN = hold the last sent value)")
        self._zero = np.clip(np.zeros(n, dtype=np.float32), self.low, self.high)
        self.counts: dict[str, int] = dict.fromkeys(EVENTS, 0)
        self.last_sent: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return self.low.size

    def reset(self) -> None:
        """Episode start: forget the last sent action (counts are kept for the whole session)."""
        self.last_sent = None

    def safe(self) -> np.ndarray:
        """The safe action for the current state."""
        held = self.last_sent if self.last_sent is not None else self._zero
        if self.safe_action is None:
            return held.copy()
        a = self.safe_action.copy()
        hold = np.isnan(a)
        a[hold] = held[hold]
        return np.clip(a, self.low, self.high)

    def __call__(self, action, *, force_safe: bool = False) -> tuple[np.ndarray, list[str]]:
        """Returns (action to send, events applied this tick); the result becomes `last_sent`."""
        fault = "forced_safe" if force_safe else None
        if fault is None:
            fault, a = self._validate(action)
        if fault:
            events, out = [fault], self.safe()
        else:
            events, out = [], np.clip(a, self.low, self.high)
            if not np.array_equal(out, a):
                events.append("clip")
            if self.max_delta is not None and self.last_sent is not None:
                limited = np.clip(out, self.last_sent - self.max_delta, self.last_sent + self.max_delta)
                if not np.array_equal(limited, out):
                    events.append("rate_limit")
                out = limited
        for e in events:
            self.counts[e] += 1
        self.last_sent = out
        return out.copy(), events

    def _validate(self, action) -> tuple[str | None, np.ndarray | None]:
        try:
            raw = np.asarray(action)
        except Exception:  # ragged nested lists and the like
            raw = np.asarray(None)
        if raw.dtype.kind not in "biuf":
            return self._fault("non_numeric", f"dtype {raw.dtype}"), None
        if raw.shape != (self.dim,):
            return self._fault("shape", f"shape {raw.shape}, expected ({self.dim},)"), None
        with np.errstate(over="ignore"):  # values beyond float32 become inf, caught just below
            a = raw.astype(np.float32)
        if np.isnan(a).any():
            return self._fault("nan", f"NaN at indices {np.flatnonzero(np.isnan(a)).tolist()}"), None
        if np.isinf(a).any():  # includes float64 values too large for float32
            return self._fault("inf", f"inf at indices {np.flatnonzero(np.isinf(a)).tolist()}"), None
        return None, a

    def _fault(self, kind: str, detail: str) -> str:
        if self.counts[kind] == 0:
            log.warning(
                "invalid action (%s: %s): sending the safe action; further '%s' faults are only counted",
                kind,
                detail,
                kind,
            )
        return kind


class Watchdog:
    """Detects a silent peer (the learner, a teleop device) so the control loop can fall back to safe actions.

    Once armed (explicitly, or by the first `feed`), it is expired until the first feed and whenever the last
    contact is older than `timeout_s`, so a session that starts with the peer missing is safe from tick one.

    `feed(t)` reports a contact at time `t`; feeding the same (or an older) contact time again is not news and
    changes nothing, so a caller may feed "the peer's last contact" every tick. One silence is one outage: it
    trips once, logs once when it starts and once when contact returns (with its true length: last contact
    before it to first contact after it), and `outages()` reports the count, total and longest seconds.
    """

    def __init__(self, timeout_s: float, name: str = "learner", *, clock: Callable[[], float] = time.monotonic):
        if not isinstance(timeout_s, (int, float)) or not math.isfinite(timeout_s) or timeout_s <= 0:
            raise ValueError(f"{name} watchdog timeout_s must be > 0 and finite, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self.name = name
        self._clock = clock
        self.armed = False
        self.armed_at: float | None = None
        self.last_fed: float | None = None
        self.trips = 0  # outages begun (one per silence, however many ticks it lasts)
        self._stale = False
        self._outage_from: float | None = None  # last contact before the current outage (or when armed)
        self.outage_total_s = 0.0  # closed outages only; `outages()` adds the one in progress
        self.outage_longest_s = 0.0

    def arm(self, now: float | None = None) -> None:
        if not self.armed:
            self.armed, self.armed_at = True, self._clock() if now is None else now

    def feed(self, now: float | None = None) -> None:
        now = self._clock() if now is None else now
        if self.last_fed is not None and now <= self.last_fed:
            return  # the same contact again: not news
        if self._stale:
            self._stale = False
            length = now - self._outage_from
            self.outage_total_s += length
            self.outage_longest_s = max(self.outage_longest_s, length)
            log.warning("%s back after %.2f s of silence: resuming", self.name, length)
        self.arm(now)
        self.last_fed = now

    def silence_s(self, now: float | None = None) -> float:
        """Seconds since the last feed (inf if never fed)."""
        if self.last_fed is None:
            return math.inf
        return (self._clock() if now is None else now) - self.last_fed

    def expired(self, now: float | None = None) -> bool:
        if not self.armed:
            return False
        now = self._clock() if now is None else now
        silence = self.silence_s(now)
        stale = silence > self.timeout_s
        if stale and not self._stale:
            self._stale = True
            self._outage_from = next(t for t in (self.last_fed, self.armed_at, now) if t is not None)
            self.trips += 1
            if self.last_fed is None:
                log.warning("%s not heard from yet: sending safe actions", self.name)
            else:
                log.warning("%s silent for %.2f s (> %.2f s): sending safe actions", self.name, silence, self.timeout_s)
        return stale

    def outages(self, now: float | None = None) -> dict:
        """{count, total_s, longest_s, ongoing}: every silence longer than timeout_s so far; an outage still in
        progress counts with its length up to `now`."""
        total, longest, ongoing = self.outage_total_s, self.outage_longest_s, self._stale
        if ongoing:
            length = (self._clock() if now is None else now) - self._outage_from
            total, longest = total + length, max(longest, length)
        return {"count": self.trips, "total_s": round(total, 3), "longest_s": round(longest, 3), "ongoing": ongoing}


def build_safety(cfg: DictConfig, robot) -> SafetyFilter:
    feat = robot.action_feature
    safety = OmegaConf.to_container(cfg.robot.get("safety", {}) or {}, resolve=True)
    dim = feat.shape[0]
    low = np.asarray(feat.low if feat.low is not None else np.full(dim, -np.inf), dtype=np.float64)
    high = np.asarray(feat.high if feat.high is not None else np.full(dim, np.inf), dtype=np.float64)
    if safety.get("low") is not None:  # configured bounds may only tighten the device's own
        low = np.maximum(low, np.asarray(safety["low"], dtype=np.float64))
        high = np.minimum(high, np.asarray(safety["high"], dtype=np.float64))
    safe = safety.get("safe_action")
    return SafetyFilter(
        low,
        high,
        max_delta=safety.get("max_delta"),
        safe_action=None if safe is None else np.asarray(safe, dtype=np.float64),
    )
