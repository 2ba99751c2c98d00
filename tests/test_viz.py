"""session.viz=rerun: the live view writes an .rrd that reads back; a slow viewer drops ticks, never the robot."""

import json
import threading
import warnings

import numpy as np
import pytest

from robot_rl.rollout import Step

from conftest import robot_rl_cli

rr = pytest.importorskip("rerun")


def read_rrd(path) -> dict[str, list[dict]]:
    """entity path -> its rows (column name -> value), in tick order, from an .rrd file (rerun-sdk >= 0.32)."""
    from rerun.recording import load_recording

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # load_recording is marked deprecated in favour of an experimental API
        rec = load_recording(str(path))
    rows: dict[str, list[dict]] = {}
    for chunk in rec.chunks():
        if not chunk.is_static:
            rows.setdefault(chunk.entity_path, []).extend(chunk.to_record_batch().to_pylist())
    return {k: sorted(v, key=lambda r: r["tick"]) for k, v in rows.items()}


def make_step(i: int) -> Step:
    obs = {"state": np.array([i, 2 * i], np.float32), "front_image": np.full((8, 8, 3), i, np.uint8)}
    return Step(
        index=i,
        obs=obs,
        policy_action=None,
        teleop_action=np.array([0.5, -0.5]),
        source="teleop",
        action=np.array([0.5, -0.5], np.float32),
        forced_safe=False,
        next_obs=obs,
        success=False,
        done=False,
        t=1.7e9 + 0.05 * i,
        policy_s=0.0,
        lateness=1e-4,
    )


def test_view_writes_rrd_and_drops_for_a_slow_viewer(tmp_path):
    from robot_rl.control.viz import RerunView

    view = RerunView(tmp_path / "viz.rrd", max_queue=4)
    gate, real_log = threading.Event(), view._log
    view._log = lambda *a: (gate.wait(10), real_log(*a))  # a viewer stuck until the gate opens
    for i in range(3):
        view.log_step(make_step(i), episode=0)
    gate.set()  # those three reach the file...
    while view.logged < 3:
        threading.Event().wait(0.01)
    gate.clear()  # ...then the viewer stalls: the loop's puts still return at once, the extra ticks are dropped
    for i in range(3, 13):
        view.log_step(make_step(i), episode=1)
    assert view.submitted == 13 and view.dropped in (5, 6)  # 4 queued (+1 taken by the stuck viewer)
    gate.set()
    stats = view.close()
    assert stats["logged"] == 13 - stats["dropped"] and stats["error"] is None

    rows = read_rrd(tmp_path / "viz.rrd")
    assert {"/obs/state", "/obs/front_image", "/action", "/teleop_action", "/control/lateness_ms"} <= set(rows)
    state = rows["/obs/state"]
    assert len(state) == stats["logged"] and [r["tick"] for r in state[:3]] == [0, 1, 2]
    assert state[2]["Scalars:scalars"] == [2.0, 4.0]
    assert rows["/action"][0]["Scalars:scalars"] == [0.5, -0.5] and "/policy_action" not in rows


def test_control_process_with_rerun_view(tmp_path):
    out = robot_rl_cli(
        "control",
        "robot=lerobot_sim",
        "teleop=none",
        "session.learner=none",
        "session.episodes=1",
        "session.max_episode_steps=6",
        "session.rate_hz=50",
        "session.viz=rerun",
        f"hydra.run.dir={tmp_path}",
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "control" / "summary.json").read_text())
    viz = summary["viz"]
    assert viz["ticks"] == 6 and viz["logged"] + viz["dropped"] == 6 and viz["error"] is None
    rows = read_rrd(tmp_path / "control" / "viz.rrd")
    assert len(rows["/obs/state"]) == viz["logged"] and len(rows["/control/forced_safe"]) == viz["logged"]
