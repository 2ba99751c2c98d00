"""A live view of the control loop in rerun (`session.viz=rerun`): observations, actions, who acted, lateness.

The control loop only hands each finished tick to a bounded queue (`put_nowait`); a background thread logs it to
rerun. When the viewer falls behind the queue fills and ticks are dropped *for the viewer* (counted), never for
the robot: the loop never waits on rerun, and a rerun error switches the view off instead of stopping the robot.

By default the recording goes to `control/viz.rrd` (open it with `rerun control/viz.rrd`);
`session.viz_spawn=true` also streams it to a rerun viewer on this machine. Needs `pip install 'robot_rl[viz]'`.

Entities: `obs/<key>` (vectors as scalar series, `*_image` as images), `action`, `policy_action`, `teleop_action`,
`control/{lateness_ms,forced_safe,source,episode}`; timelines `tick` (per process) and `time` (wall clock).
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

import numpy as np

from robot_rl.control.takeover import SOURCES

log = logging.getLogger(__name__)


class RerunView:
    def __init__(self, path: str | Path | None, app_id: str = "robot_rl", max_queue: int = 64, spawn: bool = False):
        try:
            import rerun as rr
        except ImportError as e:
            raise ImportError("session.viz=rerun needs rerun-sdk: pip install 'robot_rl[viz]'") from e
        self.rr = rr
        self.path = Path(path) if path is not None else None
        self.rec = rr.RecordingStream(app_id)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.rec.save(str(self.path))
        if spawn:
            self.rec.spawn(connect=self.path is None)
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, int(max_queue)))
        self.submitted = self.dropped = self.logged = 0
        self.error: str | None = None
        self._tick = 0
        self._thread = threading.Thread(target=self._run, name="rerun-view", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------------------------- control-loop side (no waits)
    def log_step(self, step, episode: int) -> None:
        """Called by the control loop after every tick: never blocks; a full queue drops the tick for the viewer."""
        self.submitted += 1
        if self.error is not None:
            self.dropped += 1
            return
        item = (self._tick, episode, step)
        self._tick += 1
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1

    def close(self, timeout_s: float = 10.0) -> dict:
        """Log what is queued (at most `timeout_s`), close the recording; returns the counts for the summary."""
        try:
            self.queue.put(None, timeout=timeout_s)
        except queue.Full:
            pass
        self._thread.join(timeout_s)
        try:
            self.rec.flush()
            self.rec.disconnect()
        except Exception as e:  # the view is best effort
            self.error = self.error or f"{type(e).__name__}: {e}"
        return {
            "path": str(self.path) if self.path else None,
            "ticks": self.submitted,
            "logged": self.logged,
            "dropped": self.dropped,
            "error": self.error,
        }

    # ------------------------------------------------------------------------------------------------ viewer side
    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue
            try:
                self._log(*item)
                self.logged += 1
            except Exception as e:
                self.error = f"{type(e).__name__}: {e}"
                log.error("rerun view stopped (the robot is not affected): %s", self.error)

    def _log(self, tick: int, episode: int, step) -> None:
        rr, rec = self.rr, self.rec
        rec.set_time("tick", sequence=tick)
        rec.set_time("time", timestamp=float(step.t))
        for key, value in step.obs.items():
            v = np.asarray(value)
            if key.endswith("_image") and v.ndim == 3 and v.dtype == np.uint8:
                rec.log(f"obs/{key}", rr.Image(v))
            elif v.dtype.kind in "biuf" and v.size <= 64:
                rec.log(f"obs/{key}", rr.Scalars(v.reshape(-1).astype(np.float64)))
        for name in ("action", "policy_action", "teleop_action"):
            a = getattr(step, name)
            if a is not None:
                a = np.asarray(a, np.float64).reshape(-1)
                if a.size and np.isfinite(a).all():
                    rec.log(name, rr.Scalars(a))
        rec.log("control/episode", rr.Scalars(float(episode)))
        rec.log("control/source", rr.Scalars(float(SOURCES.index(step.source)) if step.source in SOURCES else -1.0))
        rec.log("control/forced_safe", rr.Scalars(float(step.forced_safe)))
        if step.lateness is not None:
            rec.log("control/lateness_ms", rr.Scalars(1e3 * float(step.lateness)))


def make_view(session_cfg, run_dir: Path) -> RerunView | None:
    """session.viz: none | rerun (session.viz_path: the .rrd, default <run dir>/viz.rrd; session.viz_queue)."""
    kind = str(session_cfg.get("viz", "none") or "none")
    if kind == "none":
        return None
    if kind != "rerun":
        raise ValueError(f"session.viz={kind!r}: choose one of none, rerun")
    path = session_cfg.get("viz_path") or (Path(run_dir) / "viz.rrd")
    return RerunView(
        path, max_queue=int(session_cfg.get("viz_queue", 64) or 64), spawn=bool(session_cfg.get("viz_spawn", False))
    )
