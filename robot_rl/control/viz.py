"""A live view of the control loop in rerun (`session.viz=rerun`): observations, actions, who acted, rewards,
weight versions, lateness.

The view runs in **its own process** (`python -m robot_rl.control.viz`), niced, so rerun's logging never competes
with the control loop for the GIL. The loop's side is one non-blocking ZMQ send per tick over loopback: a header
(JSON) and the raw bytes of each array, no pickle. When the viewer falls behind, ZMQ's high-water mark is reached
and the tick is dropped *for the viewer* (counted), never for the robot; a viewer that dies or never starts only
switches the view off.

By default the recording goes to `control/viz.rrd` (open it with `rerun control/viz.rrd`);
`session.viz_spawn=true` also streams it to a rerun viewer on this machine. Needs `pip install 'robot_rl[viz]'`.

Entities: `obs/<key>` (vectors as scalar series, `*_image` as images), `action` (executed), `policy_action`,
`teleop_action`, `base_action` and `residual` (residual RL), `reward`, `control/{lateness_ms,forced_safe,source,
episode,weights_version}`; timelines `tick` (per process) and `time` (wall clock).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zmq

from robot_rl.control.takeover import SOURCES

log = logging.getLogger(__name__)

END = b"end"  # the last message: the viewer flushes the recording and exits
MAX_VECTOR = 64  # longer 1-D observations are not plotted as scalar series
VIEWER_NICE = 10  # the viewer yields the CPU to the control loop
ACTIONS = ("action", "policy_action", "teleop_action")
EXTRAS = ("base_action", "residual")  # transition fields worth seeing, when the algorithm sends them


def encode_tick(tick: int, episode: int, step, transition: dict | None = None) -> list[bytes]:
    """One tick as ZMQ frames: a JSON header naming each array (dtype, shape), then the arrays' raw bytes."""
    transition = transition or {}
    arrays: list[tuple[str, np.ndarray]] = []
    for key, value in step.obs.items():
        v = np.asarray(value)
        if (key.endswith("_image") and v.ndim == 3 and v.dtype == np.uint8) or (
            v.dtype.kind in "biuf" and v.size <= MAX_VECTOR
        ):
            arrays.append((f"obs/{key}", v))
    for name in ACTIONS:
        a = getattr(step, name)
        if a is not None:
            arrays.append((name, np.asarray(a, np.float64).reshape(-1)))
    for name in EXTRAS:
        if transition.get(name) is not None:
            arrays.append((name, np.asarray(transition[name], np.float64).reshape(-1)))
    reward = transition.get("reward", float(step.success))
    version = transition.get("policy_version")
    header = {
        "tick": tick,
        "episode": episode,
        "t": float(step.t),
        "source": step.source,
        "forced_safe": bool(step.forced_safe),
        "lateness": None if step.lateness is None else float(step.lateness),
        "reward": float(np.asarray(reward).reshape(-1)[0]),
        "weights_version": None if version is None else int(np.asarray(version).reshape(-1)[0]),
        "arrays": [[name, a.dtype.str, list(a.shape)] for name, a in arrays],
    }
    return [json.dumps(header).encode(), *(np.ascontiguousarray(a).tobytes() for _, a in arrays)]


def decode_tick(frames: list[bytes]) -> tuple[dict, dict[str, np.ndarray]]:
    """The inverse of `encode_tick`; a malformed message raises ValueError saying what was wrong."""
    try:
        header = json.loads(frames[0])
        specs = header["arrays"]
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ValueError(f"viewer message without a valid header: {e}") from e
    if len(specs) != len(frames) - 1:
        raise ValueError(f"viewer message names {len(specs)} arrays but carries {len(frames) - 1}")
    arrays = {}
    for (name, dtype, shape), raw in zip(specs, frames[1:]):
        a = np.frombuffer(raw, dtype=np.dtype(dtype))
        if a.size != int(np.prod(shape)):
            raise ValueError(f"viewer message: {name} has {a.size} values, its header says shape {shape}")
        arrays[name] = a.reshape(shape)
    return header, arrays


class RerunView:
    """The control process's side: starts the viewer process and hands it each finished tick without waiting."""

    def __init__(
        self,
        path: str | Path | None,
        app_id: str = "robot_rl",
        max_queue: int = 64,
        spawn: bool = False,
        start_timeout_s: float = 30.0,
    ):
        self.path = Path(path) if path is not None else None
        self.stats_path = (self.path.parent if self.path else Path.cwd()) / "viz_stats.json"
        self.stats_path.parent.mkdir(parents=True, exist_ok=True)
        self.stats_path.unlink(missing_ok=True)
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, max(1, int(max_queue)))
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")  # loopback only
        cmd = [sys.executable, "-m", "robot_rl.control.viz", "--connect", f"tcp://127.0.0.1:{port}"]
        cmd += ["--app-id", app_id, "--stats", str(self.stats_path)]
        cmd += ["--rrd", str(self.path)] if self.path else []
        cmd += ["--spawn"] if spawn else []
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        self.submitted = self.dropped = self._tick = 0
        self.send_s: list[float] = []  # the loop's cost of the view per tick: encoding + the non-blocking send
        self.error: str | None = None
        self._wait_for_viewer(start_timeout_s)

    def _wait_for_viewer(self, timeout_s: float) -> None:
        """The first ticks would be dropped while the viewer imports rerun: wait (once, before the loop starts)."""
        monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    self.error = f"the viewer process exited with code {self.proc.returncode} before connecting"
                    log.error("rerun view off (the robot is not affected): %s", self.error)
                    return
                if monitor.poll(100):
                    monitor.recv_multipart()
                    return
            self.error = f"the viewer process did not connect within {timeout_s:.0f} s"
            log.error("rerun view off (the robot is not affected): %s", self.error)
        finally:
            self.sock.disable_monitor()
            monitor.close(0)

    # -------------------------------------------------------------------------------- control-loop side (no waits)
    def log_step(self, step, episode: int, transition: dict | None = None) -> None:
        """Called by the control loop after every tick: never blocks; a full queue drops the tick for the viewer."""
        self.submitted += 1
        if self.error is not None:
            self.dropped += 1
            return
        t0 = time.perf_counter()
        frames = encode_tick(self._tick, episode, step, transition)
        self._tick += 1
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=True)
        except zmq.Again:
            self.dropped += 1
        self.send_s.append(time.perf_counter() - t0)

    def close(self, timeout_s: float = 10.0) -> dict:
        """Send the end mark, let the viewer log what is queued (at most `timeout_s`); the counts for the summary."""
        deadline = time.monotonic() + timeout_s
        while self.error is None and self.proc.poll() is None and time.monotonic() < deadline:
            try:
                self.sock.send(END, flags=zmq.NOBLOCK)
                break
            except zmq.Again:
                time.sleep(0.01)
        try:
            self.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.error = self.error or f"the viewer did not finish within {timeout_s:.0f} s (killed)"
        self.sock.close(0)
        logged = 0
        try:
            viewer = json.loads(self.stats_path.read_text())
            logged = int(viewer["logged"])
            self.error = self.error or viewer.get("error")
        except (OSError, ValueError, KeyError) as e:
            self.error = self.error or f"no statistics from the viewer process ({type(e).__name__}: {e})"
        return {
            "path": str(self.path) if self.path else None,
            "ticks": self.submitted,
            "logged": logged,
            "dropped": self.submitted - logged,
            "error": self.error,
            "loop_cost_us_p50": round(1e6 * float(np.percentile(self.send_s, 50)), 1) if self.send_s else None,
            "loop_cost_us_p99": round(1e6 * float(np.percentile(self.send_s, 99)), 1) if self.send_s else None,
        }


# ---------------------------------------------------------------------------------------------- viewer process
def log_tick(rr, rec, header: dict, arrays: dict[str, np.ndarray]) -> None:
    rec.set_time("tick", sequence=int(header["tick"]))
    rec.set_time("time", timestamp=float(header["t"]))
    for name, a in arrays.items():
        if name.startswith("obs/") and a.ndim == 3 and a.dtype == np.uint8:
            rec.log(name, rr.Image(a))
        elif a.size and np.isfinite(a).all():
            rec.log(name, rr.Scalars(a.reshape(-1).astype(np.float64)))
    source = header["source"]
    rec.log("control/episode", rr.Scalars(float(header["episode"])))
    rec.log("control/source", rr.Scalars(float(SOURCES.index(source)) if source in SOURCES else -1.0))
    rec.log("control/forced_safe", rr.Scalars(float(header["forced_safe"])))
    rec.log("reward", rr.Scalars(float(header["reward"])))
    if header.get("lateness") is not None:
        rec.log("control/lateness_ms", rr.Scalars(1e3 * float(header["lateness"])))
    if header.get("weights_version") is not None:
        rec.log("control/weights_version", rr.Scalars(float(header["weights_version"])))


def run_viewer(connect: str, rrd: str | None, app_id: str, spawn: bool, stats: Path) -> int:
    """Receive ticks until the end mark (or the control process is gone), log them to rerun, write the counts."""
    try:
        os.nice(VIEWER_NICE)
    except OSError:
        pass
    logged, error = 0, None
    try:
        import rerun as rr
    except ImportError:
        error = "session.viz=rerun needs rerun-sdk: pip install 'robot_rl[viz]'"
    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.connect(connect)
    if error is None:
        rec = rr.RecordingStream(app_id)
        if rrd:
            rec.save(rrd)
        if spawn:
            rec.spawn(connect=rrd is None)
        parent = os.getppid()
        while True:
            if not sock.poll(1000):
                if os.getppid() != parent:  # the control process died without the end mark
                    break
                continue
            frames = sock.recv_multipart()
            if frames == [END]:
                break
            try:
                log_tick(rr, rec, *decode_tick(frames))
                logged += 1
            except Exception as e:  # the view is best effort: say why it stopped, keep draining
                error = error or f"{type(e).__name__}: {e}"
        rec.flush()
        rec.disconnect()
    sock.close(0)
    tmp = stats.with_suffix(".tmp")
    tmp.write_text(json.dumps({"logged": logged, "error": error}))
    tmp.replace(stats)
    return 0 if error is None else 1


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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="robot_rl's rerun viewer process (started by the control process)")
    parser.add_argument("--connect", required=True)
    parser.add_argument("--rrd", default=None)
    parser.add_argument("--app-id", default="robot_rl")
    parser.add_argument("--spawn", action="store_true")
    parser.add_argument("--stats", required=True, type=Path)
    a = parser.parse_args()
    sys.exit(run_viewer(a.connect, a.rrd, a.app_id, a.spawn, a.stats))
