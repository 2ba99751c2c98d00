"""session.viz=rerun: the live view writes an .rrd that reads back; a slow viewer drops ticks, never the robot."""

import json
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


def test_tick_frames_round_trip_and_malformed_messages_say_what_is_wrong():
    from robot_rl.control.viz import decode_tick, encode_tick

    frames = encode_tick(7, 2, make_step(3), {"reward": np.float32(1.0), "policy_version": np.int64(4)})
    assert all(isinstance(f, bytes) for f in frames)  # no pickle: a JSON header and raw array bytes
    header, arrays = decode_tick(frames)
    assert header["tick"] == 7 and header["episode"] == 2 and header["reward"] == 1.0
    assert header["weights_version"] == 4 and header["source"] == "teleop"
    assert arrays["obs/front_image"].shape == (8, 8, 3) and arrays["obs/front_image"][0, 0, 0] == 3
    np.testing.assert_array_equal(arrays["obs/state"], [3, 6])
    np.testing.assert_array_equal(arrays["action"], [0.5, -0.5])
    with pytest.raises(ValueError, match="valid header"):
        decode_tick([b"not json"])
    with pytest.raises(ValueError, match="names 4 arrays but carries 3"):
        decode_tick(frames[:-1])
    with pytest.raises(ValueError, match="obs/state has 1 values"):
        decode_tick([frames[0], frames[1][:4], *frames[2:]])


def test_view_process_writes_rrd_and_a_stopped_viewer_drops_ticks_never_the_robot(tmp_path):
    import os
    import signal

    from robot_rl.control.viz import RerunView

    view = RerunView(tmp_path / "viz.rrd", max_queue=4)
    assert view.error is None, view.error
    for i in range(3):
        view.log_step(make_step(i), episode=0)
    os.kill(view.proc.pid, signal.SIGSTOP)  # a viewer that stops reading: the loop's sends still return at once
    try:
        big = make_step(3)
        big.obs["front_image"] = np.zeros((256, 256, 3), np.uint8)  # fills the socket buffers quickly
        for _ in range(2000):
            view.log_step(big, episode=1)
        assert view.dropped > 0
    finally:
        os.kill(view.proc.pid, signal.SIGCONT)
    stats = view.close(timeout_s=60)
    assert stats["error"] is None and stats["ticks"] == 2003
    assert stats["logged"] + stats["dropped"] == 2003 and stats["logged"] >= 3

    rows = read_rrd(tmp_path / "viz.rrd")
    assert {"/obs/state", "/obs/front_image", "/action", "/teleop_action", "/control/lateness_ms", "/reward"} <= set(
        rows
    )
    state = rows["/obs/state"]
    assert len(state) == stats["logged"] and [r["tick"] for r in state[:3]] == [0, 1, 2]
    assert state[2]["Scalars:scalars"] == [2.0, 4.0]
    assert rows["/action"][0]["Scalars:scalars"] == [0.5, -0.5] and "/policy_action" not in rows


def test_a_viewer_that_cannot_start_switches_the_view_off(tmp_path, monkeypatch):
    from robot_rl.control import viz

    monkeypatch.setattr(viz.sys, "executable", "/bin/false")  # the viewer process exits at once
    view = viz.RerunView(tmp_path / "viz.rrd", start_timeout_s=10)
    assert view.error and "exited" in view.error
    view.log_step(make_step(0), episode=0)
    stats = view.close(timeout_s=5)
    assert stats["dropped"] == 1 and stats["logged"] == 0 and "exited" in stats["error"]


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


def test_record_with_rerun_view(tmp_path):
    from builders import record_demos

    summary = record_demos(
        tmp_path / "store",
        tmp_path / "run",
        "record.episodes=1",
        "record.max_episode_steps=5",
        "record.viz=rerun",
        paced=False,
    )
    viz = summary["viz"]
    assert viz["error"] is None and viz["ticks"] == 5 and viz["logged"] + viz["dropped"] == 5
    rows = read_rrd(tmp_path / "run" / "viz.rrd")
    assert len(rows["/teleop_action"]) == viz["logged"] and len(rows["/reward"]) == viz["logged"]
