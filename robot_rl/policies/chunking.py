"""Action chunks computed ahead on a background thread, so the control loop never waits on inference.

The loop talks to `AsyncChunkRunner` twice a tick, both in microseconds::

    runner.observe(obs, tick)          # newest observation (copied), wakes the inference thread
    action = runner.action_for(tick)   # the planned action for this tick, or None (-> send the safe action)

Ticks are the loop's slot indices (PacedLoop.k), i.e. absolute time on the loop's grid: an action planned for
tick 12 is sent at tick 12 or never (diffusion_policy's real-world eval executes actions against timestamps).

How a chunk becomes actions (a diffusion chunk conditioned on the observations up to tick c covers ticks c,
c+1, ... from its row obs_horizon-1 on):

* **Prefetch.** The inference thread predicts the next chunk from the newest observation window when the
  current chunk's executed part (`replan_every` ticks from its observation, default the policy's
  n_action_steps) has at most `margin` ticks left. `margin` is `prefetch_margin`, or, by default, the measured
  inference latency in ticks (p90 of recent chunks, warm-up excluded): the chunk lands about when it is due.
* **Latency-aware switch.** A chunk from tick c that arrives when the loop has already pulled the action for
  tick f-1 has its first `delay = f - c` rows in the past: they are skipped, the chunk is aligned on absolute
  ticks, not on "the next action".
* **Blending** over the ticks both the old plan and the new chunk cover: `ensemble` (ACT temporal ensembling:
  the i-th prediction for a tick, oldest first, weighs exp(-ensemble_k * i); k > 0 favours older
  predictions as in ACT, k < 0 newer ones, 0 is a plain mean), `crossfade` (linear ramp to the new chunk over
  `crossfade_steps` ticks) or `switch` (new chunk wins at once).
* **Validity.** An action is never used more than `max_action_age` ticks after the observation its chunk was
  conditioned on (default: all the chunk's rows from "now" on). Past the plan's end `action_for` returns None
  and counts a *starvation*: the loop sends the safe action (hold), never a stale action.
* **Errors.** An exception in the inference thread is logged with its traceback, kept in `error`, and empties
  the plan: every later `action_for` returns None (safe action) and `raise_if_failed()` re-raises it.

Policies without `predict_chunk` (the MLP) and `synchronous=True` run `select_action` inside `action_for`, timed:
the naive way, kept for comparison and for single-action policies whose inference is cheap.

**Thread or process.** Torch releases the GIL inside its kernels, but a diffusion sampling loop is also a lot of
small Python-level calls, and a robot driver written in Python (robosuite's step calls MuJoCo 25 times a tick,
each call releasing and retaking the GIL) pays a GIL hand-off every time the inference thread has it: measured
here on a loaded 2-core machine, robosuite's step went from 8.6 ms p50 to 16 ms with a busy inference thread
(8.6 ms with the same inference in another process). `ProcessPredictor` (inference_process.py) runs `predict_chunk` in a child
process behind the same interface (raw array bytes over a pipe, no pickle); the runner's thread then only waits
on the pipe (GIL released) and blends (~50 µs).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

log = logging.getLogger(__name__)

BLENDS = ("ensemble", "crossfade", "switch")


# ---------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """Planned actions for ticks [start, start + len(actions)); replaced as a whole (an atomic swap)."""

    start: int
    actions: np.ndarray  # (N, A) float32: what action_for returns
    wsum: np.ndarray  # (N,) ensembling: sum of weights ...
    wasum: np.ndarray  # (N, A) ... and of weighted actions (float64)
    count: np.ndarray  # (N,) predictions that contributed to each tick
    soft_end: int  # the newest chunk's executed part ends here (obs tick + replan_every)
    obs_tick: int  # observation tick of the newest chunk
    generation: int  # episode the plan belongs to

    @property
    def end(self) -> int:
        return self.start + len(self.actions)


def blend_chunk(
    old: Plan | None,
    rows: np.ndarray,
    obs_tick: int,
    first: int,
    *,
    blend: str = "ensemble",
    ensemble_k: float = 0.01,
    crossfade_steps: int = 4,
    max_action_age: int | None = None,
    replan_every: int = 1,
    generation: int = 0,
) -> Plan | None:
    """The plan after a new chunk arrives. `rows[i]` is the chunk's action for tick `obs_tick + i`; ticks
    before `first` are past (skipped) and rows at age >= `max_action_age` are not valid. None if nothing of the
    chunk is usable (it arrived after its whole validity)."""
    rows = np.asarray(rows, dtype=np.float32)
    valid = len(rows) if max_action_age is None else min(len(rows), int(max_action_age))
    end_new = obs_tick + valid
    first = max(first, obs_tick)
    if first >= end_new:
        return None
    new = rows[first - obs_tick : end_new - obs_tick].astype(np.float64)
    soft_end = obs_tick + replan_every
    if old is not None and old.generation == generation and old.end > first:
        end = max(old.end, end_new)
    else:
        old, end = None, end_new
    n, dim = end - first, rows.shape[1]
    in_new = np.zeros(n, dtype=bool)
    in_new[: end_new - first] = True
    o_wsum, o_wasum, o_count = np.zeros(n), np.zeros((n, dim)), np.zeros(n, dtype=np.int64)
    o_act = np.zeros((n, dim), dtype=np.float64)
    in_old = np.zeros(n, dtype=bool)
    if old is not None:
        a = max(first, old.start)  # old covers [a, old.end) within the new range
        src = slice(a - old.start, old.end - old.start)
        dst = slice(a - first, old.end - first)
        o_wsum[dst], o_wasum[dst], o_count[dst] = old.wsum[src], old.wasum[src], old.count[src]
        o_act[dst], in_old[dst] = old.actions[src], True
    n_new = np.zeros((n, dim))
    n_new[in_new] = new
    both = in_old & in_new
    if blend == "ensemble":
        w_new = np.where(in_new, np.exp(-float(ensemble_k) * o_count), 0.0)
        wsum = o_wsum + w_new
        wasum = o_wasum + w_new[:, None] * n_new
        count = o_count + in_new
        actions = wasum / wsum[:, None]
    else:
        if blend == "crossfade":
            j = np.arange(n)
            alpha = np.where(j < crossfade_steps, (j + 1) / (crossfade_steps + 1), 1.0)
        elif blend == "switch":
            alpha = np.ones(n)
        else:
            raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
        alpha = np.where(both, alpha, np.where(in_new, 1.0, 0.0))
        actions = (1.0 - alpha)[:, None] * o_act + alpha[:, None] * n_new
        wsum, wasum, count = np.ones(n), actions.copy(), np.maximum(o_count, 0) + in_new
    return Plan(first, actions.astype(np.float32), wsum, wasum, count, soft_end, obs_tick, generation)


def policy_attr(policy, name: str, default=None):
    cfg = getattr(policy, "cfg", None)
    if cfg is not None and getattr(cfg, name, None) is not None:
        return getattr(cfg, name)
    return getattr(policy, name, default)


def _lookup(obs: Mapping[str, Any], key: str):
    if key in obs:
        return obs[key]
    if "obs." + key in obs:
        return obs["obs." + key]
    raise KeyError(f"observation {key!r} missing (keys: {sorted(obs)})")


def default_torch_threads() -> int:
    """Intra-op threads for inference: half the cores (the loop, the robot driver/sim and the OS keep the rest),
    at most 4 (small networks stop scaling there); 1 on a two-core machine."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def _pct_ms(values, q: float) -> float | None:
    return float(np.percentile(values, q) * 1e3) if len(values) else None


# -------------------------------------------------------------------------------------------- the runner


class AsyncChunkRunner:
    """See the module docstring. `start()` before the first episode, `reset()` at every episode start (optionally
    `prime(obs)` to have the first chunk before the clock starts), `stop()` at the end."""

    def __init__(
        self,
        policy,
        rate_hz: float,
        *,
        blend: str = "ensemble",
        ensemble_k: float = 0.01,
        crossfade_steps: int = 4,
        prefetch_margin: int | None = None,
        replan_every: int | None = None,
        max_action_age: int | None = None,
        num_inference_steps: int | None = None,
        synchronous: bool = False,
        seed: int | None = 0,
        torch_threads: int | None = None,
        warmup: int = 1,
        obs_keys: list[str] | None = None,
        history: int = 10_000,
    ):
        if blend not in BLENDS:
            raise ValueError(f"blend must be one of {', '.join(BLENDS)}, got {blend!r}")
        if not (isinstance(rate_hz, (int, float)) and math.isfinite(rate_hz) and rate_hz > 0):
            raise ValueError(f"rate_hz must be > 0, got {rate_hz!r}")
        self.policy = policy
        self.period = 1.0 / float(rate_hz)
        self.blend, self.ensemble_k, self.crossfade_steps = blend, float(ensemble_k), int(crossfade_steps)
        self.chunked = hasattr(policy, "predict_chunk") and not synchronous
        self.obs_horizon = int(policy_attr(policy, "obs_horizon", 1) or 1)
        self.action_horizon = int(policy_attr(policy, "action_horizon", 1) or 1)
        self.rows_from_now = self.action_horizon - (self.obs_horizon - 1)  # chunk rows at ticks obs_tick, ...
        n_exec = int(policy_attr(policy, "n_action_steps", 1) or 1)
        self.replan_every = int(replan_every) if replan_every else n_exec
        self.max_action_age = int(max_action_age) if max_action_age else self.rows_from_now
        if self.chunked:
            if self.rows_from_now < 1:
                raise ValueError(f"policy: action_horizon ({self.action_horizon}) < obs_horizon ({self.obs_horizon})")
            if not 1 <= self.replan_every <= self.rows_from_now:
                raise ValueError(
                    f"replan_every must be in 1..{self.rows_from_now} (the chunk's rows from 'now' on), "
                    f"got {self.replan_every}"
                )
            if self.max_action_age < 1:
                raise ValueError(f"max_action_age must be >= 1 tick, got {self.max_action_age}")
        if prefetch_margin is not None and int(prefetch_margin) < 0:
            raise ValueError(
                f"prefetch_margin must be >= 0 ticks (or null: from the measured latency), got {prefetch_margin!r}"
            )
        self.prefetch_margin = None if prefetch_margin is None else int(prefetch_margin)
        self.num_inference_steps = num_inference_steps
        self.seed = seed
        self.torch_threads = torch_threads
        self.warmup = int(warmup)
        self.obs_keys = list(obs_keys if obs_keys is not None else getattr(policy, "obs_keys", []) or [])

        self._lock = threading.Lock()  # guards the window, the plan swap and the trigger state (held for µs)
        self._infer_lock = threading.Lock()  # one inference at a time (thread vs prime)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._window: deque = deque(maxlen=self.obs_horizon)
        self._latest_tick = -1
        self._last_pulled = -1
        self._plan: Plan | None = None
        self._generation = 0
        self._force_replan = False
        self._generator: torch.Generator | None = None
        self._sync_obs: tuple[int, Any] | None = None

        self.error: BaseException | None = None
        self.error_traceback: str | None = None
        self._latencies: deque = deque(maxlen=history)  # s, per chunk (warm-up excluded)
        self._recent: deque = deque(maxlen=20)  # for the automatic margin
        self._delays: deque = deque(maxlen=history)  # ticks skipped per chunk
        self.chunk_log: deque = deque(maxlen=history)  # one dict per chunk
        self.chunks = self.starvations = self.reserve_ticks = self.unusable_chunks = 0
        self.discarded_chunks = self.error_ticks = self.warmup_chunks = 0
        self.ticks_served = 0

    # -------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> AsyncChunkRunner:
        n = self.torch_threads if self.torch_threads else default_torch_threads()
        if torch.get_num_threads() != n:
            torch.set_num_threads(int(n))
        if self.chunked and self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="chunk-inference", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning(
                    "the inference thread did not stop within %.0f s (inference still running); leaving it as a daemon",
                    timeout,
                )
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def reset(self, seed: int | None = None) -> None:
        """Episode start: forget observations and the plan; a chunk still in flight is discarded on arrival."""
        with self._lock:
            self._generation += 1
            self._window.clear()
            self._plan = None
            self._latest_tick = self._last_pulled = -1
            self._force_replan = False
            self._sync_obs = None
        reset = getattr(self.policy, "reset", None)
        if reset is not None and not self.chunked:
            reset()  # the synchronous path uses the policy's own queue
        seed = self.seed if seed is None else seed
        if seed is not None and hasattr(self.policy, "set_seed"):  # a ProcessPredictor seeds its own generator
            self.policy.set_seed(int(seed))
        elif seed is not None:
            device = getattr(self.policy, "device", torch.device("cpu"))
            self._generator = torch.Generator(device=device).manual_seed(int(seed))
            if not self.chunked and hasattr(self.policy, "generator"):
                self.policy.generator = self._generator

    # ----------------------------------------------------------------------------------------- loop side
    def observe(self, obs: Mapping[str, Any], tick: int) -> None:
        """The observation taken at `tick` (copied: drivers may reuse their buffers). Microseconds."""
        if not self.chunked:
            self._sync_obs = (tick, obs)
            return
        frame = {k: np.array(_lookup(obs, k)) for k in self.obs_keys}
        with self._lock:
            if not self._window:
                self._window.extend([frame] * self.obs_horizon)  # episode start: the first frame repeated
            else:
                self._window.append(frame)
            self._latest_tick = tick
        self._wake.set()

    def action_for(self, tick: int) -> np.ndarray | None:
        """The action planned for `tick`, or None (starvation or a failed runner: send the safe action)."""
        if not self.chunked:
            return self._sync_action(tick)
        self._last_pulled = tick
        plan = self._plan  # one reference read: the inference thread swaps whole plans
        if self.error is not None:
            self.error_ticks += 1
            return None
        if plan is None or not plan.start <= tick < plan.end:
            self.starvations += 1
            return None
        if tick >= plan.soft_end:
            self.reserve_ticks += 1  # the next chunk is late: running on the current chunk's later rows
        self.ticks_served += 1
        return plan.actions[tick - plan.start].copy()

    def remaining(self, tick: int) -> int:
        """Planned actions after `tick` (valid ones; the soft queue ends earlier, at the next replan)."""
        plan = self._plan
        return 0 if plan is None else max(0, plan.end - tick - 1)

    def request_replan(self) -> None:
        """Predict a fresh chunk at the next observation (e.g. when a human hands control back)."""
        self._force_replan = True
        self._wake.set()

    @property
    def failed(self) -> bool:
        return self.error is not None

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"policy inference failed: {self.error!r}") from self.error

    # ------------------------------------------------------------------------------------------ inference
    def margin_ticks(self) -> int:
        """How many ticks before the executed part runs out the next chunk is requested."""
        if self.prefetch_margin is not None:
            return self.prefetch_margin
        if not self._recent:
            return 1
        lat = float(np.percentile(np.asarray(self._recent), 90))
        return max(1, math.ceil(lat / self.period))

    def _due(self) -> bool:
        """Called with the lock held."""
        if self._latest_tick < 0 or not self._window:
            return False
        if self._force_replan:
            return True
        plan = self._plan
        if plan is None:
            return True
        return self._latest_tick + 1 + self.margin_ticks() >= min(plan.soft_end, plan.end)

    def step(self) -> bool:
        """Run one inference if one is due, in the calling thread (what the background thread does each time
        it wakes; for deterministic tests and single-threaded use). Returns whether a chunk was computed."""
        with self._infer_lock:
            with self._lock:
                if not self._due():
                    return False
                self._force_replan = False
                window = list(self._window)
                obs_tick, generation = self._latest_tick, self._generation
            t0 = time.perf_counter()
            rows = self._predict(window)
            latency = time.perf_counter() - t0
            self._install(rows, obs_tick, generation, latency)
            return True

    def prime(self, obs: Mapping[str, Any], tick: int = 0) -> None:
        """Before the loop's clock starts: observe `obs` at `tick` and compute the first chunk in this thread
        (warm-up passes first, the first time), so the episode does not begin with starvation ticks. An exception
        is handled as in the thread: reported, kept in `error`, safe actions from then on."""
        if not self.chunked or self.error is not None:
            return
        self.observe(obs, tick)
        try:
            with self._infer_lock:
                with self._lock:
                    window = list(self._window)
                    generation = self._generation
                while self.warmup_chunks < self.warmup:  # first passes allocate / pick kernels: not a fair latency
                    self._predict(window)
                    self.warmup_chunks += 1
                t0 = time.perf_counter()
                rows = self._predict(window)
                self._install(rows, tick, generation, time.perf_counter() - t0, first=tick)
        except Exception as e:  # noqa: BLE001 - same contract as the thread
            self._fail(e)

    def _predict(self, window: list[dict]) -> np.ndarray:
        batch = {k: torch.as_tensor(np.stack([f[k] for f in window]))[None] for k in self.obs_keys}
        kw = {}
        if self.num_inference_steps:
            kw["num_inference_steps"] = int(self.num_inference_steps)
        with torch.inference_mode():
            chunk = self.policy.predict_chunk(batch, generator=self._generator, **kw)
        chunk = chunk[0].detach().to("cpu").numpy() if torch.is_tensor(chunk) else np.asarray(chunk)[0]
        return chunk[self.obs_horizon - 1 :].astype(np.float32)  # row 0 = the action for the observation's tick

    def _install(
        self, rows: np.ndarray, obs_tick: int, generation: int, latency: float, first: int | None = None
    ) -> None:
        first = self._last_pulled + 1 if first is None else first
        plan = blend_chunk(
            self._plan,
            rows,
            obs_tick,
            first,
            blend=self.blend,
            ensemble_k=self.ensemble_k,
            crossfade_steps=self.crossfade_steps,
            max_action_age=self.max_action_age,
            replan_every=self.replan_every,
            generation=generation,
        )
        delay = max(0, first - obs_tick)
        with self._lock:
            if generation != self._generation:  # the episode ended while this chunk was computed
                self.discarded_chunks += 1
                return
            if plan is None:
                self.unusable_chunks += 1
            else:
                # `first` may have moved on while we blended: the plan still starts at the old `first`, which
                # only means an entry that is now in the past (never read again)
                self._plan = plan
        self.chunks += 1
        self._latencies.append(latency)
        self._recent.append(latency)
        self._delays.append(delay)
        entry = {
            "obs_tick": int(obs_tick),
            "first_tick": int(first),
            "delay_ticks": int(delay),
            "latency_ms": latency * 1e3,
            "usable": plan is not None,
            "episode": int(generation),
        }
        self.chunk_log.append(entry)
        log.debug(
            "chunk from tick %d: %.1f ms, delay %d ticks%s",
            obs_tick,
            latency * 1e3,
            delay,
            "" if plan is not None else " (all rows past their validity: unused)",
        )

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(timeout=0.05)
            self._wake.clear()
            if self._stopping:
                break
            try:
                while not self._stopping and self.step():
                    pass  # a chunk that took long may already be followed by the next one
            except BaseException as e:  # noqa: BLE001 - reported, kept, and turned into safe actions
                self._fail(e)
                return

    def _fail(self, e: BaseException) -> None:
        self.error_traceback = traceback.format_exc()
        with self._lock:
            self.error = e
            self._plan = None
        log.error("policy inference failed; the loop sends safe actions from now on:\n%s", self.error_traceback)

    # ---------------------------------------------------------------------------------------- synchronous
    def _sync_action(self, tick: int) -> np.ndarray | None:
        if self.error is not None:
            self.error_ticks += 1
            return None
        if self._sync_obs is None or self._sync_obs[0] != tick:
            self.starvations += 1  # no observation for this tick
            return None
        before = getattr(self.policy, "num_predictions", None)
        t0 = time.perf_counter()
        try:
            action = self.policy.select_action(self._sync_obs[1])
        except Exception as e:  # noqa: BLE001 - same contract as the thread: report, then safe actions
            self._fail(e)
            self.error_ticks += 1
            return None
        latency = time.perf_counter() - t0
        if before is None or getattr(self.policy, "num_predictions", None) != before:  # a chunk was computed
            self.chunks += 1
            self._latencies.append(latency)
            self._recent.append(latency)
            self._delays.append(0)
            self.chunk_log.append(
                {
                    "obs_tick": int(tick),
                    "first_tick": int(tick),
                    "delay_ticks": 0,
                    "latency_ms": latency * 1e3,
                    "usable": True,
                    "episode": self._generation,
                }
            )
        self.ticks_served += 1
        return np.asarray(action, dtype=np.float32)

    # -------------------------------------------------------------------------------------------- numbers
    def stats(self) -> dict:
        lat = np.asarray(self._latencies)
        delays = np.asarray(self._delays)
        return {
            "mode": ("async-" + self.blend) if self.chunked else "sync",
            "chunks": self.chunks,
            "inference_p50_ms": _pct_ms(lat, 50),
            "inference_p99_ms": _pct_ms(lat, 99),
            "inference_max_ms": float(lat.max() * 1e3) if len(lat) else None,
            "delay_ticks_p50": float(np.percentile(delays, 50)) if len(delays) else None,
            "delay_ticks_max": int(delays.max()) if len(delays) else None,
            "margin_ticks": self.margin_ticks() if self.chunked else 0,
            "replan_every": self.replan_every if self.chunked else 1,
            "max_action_age": self.max_action_age if self.chunked else 1,
            "ticks_served": self.ticks_served,
            "starvations": self.starvations,
            "reserve_ticks": self.reserve_ticks,
            "unusable_chunks": self.unusable_chunks,
            "discarded_chunks": self.discarded_chunks,
            "error_ticks": self.error_ticks,
            "error": None if self.error is None else repr(self.error),
            "torch_threads": torch.get_num_threads(),
        }
