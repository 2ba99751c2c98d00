"""robot-rl replay: real Lift recordings (scripted expert) replayed in MuJoCo, state and open-loop; mp4 output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from robot_rl.data.episode_store import EpisodeStore
from robot_rl.interfaces import OBS_PREFIX, Feature
from robot_rl.commands.replay import build_replay_robot, main, replay_episode, replay_robot_config
from robot_rl.video import Mp4Writer, read_mp4, tile, write_mp4

from builders import camera, record_demos

ROBOT_RL = str(Path(sys.executable).parent / "robot-rl")
CAM = 48  # recorded agentview size (small: the recording renders it every step)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Two Lift episodes by the scripted expert, with a recorded agentview camera, in a real store."""
    tmp = tmp_path_factory.mktemp("replay")
    summary = record_demos(tmp / "store", tmp / "run", "record.episodes=2", *camera(CAM))
    assert summary["saved"] == 2 and summary["success_rate"] == 1.0
    return tmp / "store"


@pytest.fixture(scope="module")
def sim(recorded):
    """One replay robot for the API tests (building robosuite's model is the slow part)."""
    robot = build_replay_robot(EpisodeStore.open(recorded))
    yield robot
    robot.disconnect()


def _decode(path: Path) -> tuple[int, tuple[int, int], float]:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        return len(frames), frames[0].shape[:2], float(s.average_rate)


# ------------------------------------------------------------------------------------------------------ video
def test_write_mp4_round_trip_pads_odd_sizes(tmp_path):
    frames = [np.full((51, 77, 3), 8 * i, np.uint8) for i in range(12)]
    assert write_mp4(tmp_path / "a.mp4", iter(frames), fps=15) == 12
    n, size, fps = _decode(tmp_path / "a.mp4")
    assert (n, size, fps) == (12, (52, 78), 15.0)  # padded to even sizes for yuv420p (edge rows)
    back = read_mp4(tmp_path / "a.mp4")
    assert all(np.abs(b[:51, :77].astype(int) - 8 * i).max() <= 4 for i, b in enumerate(back))
    with Mp4Writer(tmp_path / "b.mp4", fps=20, codec="mpeg4") as w:  # the fallback encoder works too
        for f in frames[:5]:
            w.write(f)
        with pytest.raises(ValueError, match="one size"):
            w.write(np.zeros((10, 10, 3), np.uint8))
    assert _decode(tmp_path / "b.mp4")[:2] == (5, (52, 78))


def test_tile_side_by_side_and_grid():
    a, b = np.zeros((40, 40, 3), np.uint8), np.full((20, 30, 3), 255, np.uint8)
    row = tile([a, b])
    assert row.shape == (40, 100, 3) and row[:, 40:].min() == 255  # b scaled to the first image's height
    grid = tile([a, a, a], columns=2, gap=2)
    assert grid.shape == (82, 82, 3)


# ------------------------------------------------------------------------------------------------------ state
def test_state_replay_reproduces_the_recording(recorded, sim):
    store = EpisodeStore.open(recorded)
    for i in range(store.num_episodes):
        r = replay_episode(store, i, robot=sim)
        assert r["mode"] == "state" and r["steps"] == store.episodes[i]["length"]
        # measured on this setup: qpos <= 1.3e-7, positions <= 6e-8 m (float32 rounding of the observations)
        assert r["qpos_err"]["max"] < 1e-6, r["qpos_err"]
        assert r["max_divergence_m"] < 1e-6 and not r["diverged"] and r["first_exceed_step"] is None
        assert r["divergence_basis"] == "sim_state"  # judged on the recorded state, not the lagging observations
        assert {"cube_pos", "robot0_eef_pos", "gripper_to_cube_pos"} <= set(r["position_keys"])
        assert r["success_recorded"] is True and r["success_replayed"] is True
        assert r["first_success_step_replayed"] == r["first_success_step_recorded"] and r["success_agreement"] == 1
        assert r["step_time_ms"]["mean"] > 0 and r["realtime_factor"] > 1  # faster than the 20 Hz recording
        json.dumps(r)  # the report is plain JSON


def test_open_loop_replay_from_the_seed(recorded, sim):
    store = EpisodeStore.open(recorded)
    for i in range(store.num_episodes):
        r = replay_episode(store, i, mode="open_loop", robot=sim)
        assert r["seed"] == i and r["success_replayed"] is True and r["success_match"]
        # robosuite draws Lift's cube size when it builds a model and places the cube with this process's size:
        # the regenerated scene starts up to ~1 mm off (measured 0.76 mm), the actions still lift the cube
        assert r["max_divergence_m"] < 5e-3 and r["pos_err_m"]["final"] < 1e-3, r["pos_err_m"]
        assert r["warnings"] == []


def test_open_loop_replay_without_a_seed_warns_that_the_scene_is_new(recorded, sim):
    store = EpisodeStore.open(recorded)
    store.episodes[0]["seed"] = None  # as an imported or hand-made episode without one
    r = replay_episode(store, 0, mode="open_loop", robot=sim)
    assert r["seed"] is None
    assert any("has no seed: its scene cannot be regenerated" in w and "--mode state" in w for w in r["warnings"])


# -------------------------------------------------------------------------------------------------------- CLI
def test_cli_video_recorded_beside_replayed(recorded, tmp_path, capsys):
    out, report = tmp_path / "ep1.mp4", tmp_path / "r.json"
    assert main([str(recorded), "--episode", "1", "--video", str(out), "--size", "64", "--json", str(report)]) == 0
    text = capsys.readouterr().out
    assert "state replay" in text and "replayed yes" in text and "recorded | replayed" in text
    r = json.loads(report.read_text())
    n, size, fps = _decode(out)
    assert n == r["steps"] == EpisodeStore.open(recorded).episodes[1]["length"]
    assert size == (64, 130) and fps == 20.0  # one row: recorded agentview (48 px, scaled) | gap | replayed
    assert r["video"]["cameras"] == ["agentview"] and r["video"]["recorded_side_by_side"] == ["obs.agentview_image"]
    # the recorded and replayed agentview show the same scene
    frame = read_mp4(out)[n // 2].astype(int)
    assert np.abs(frame[:, :64] - frame[:, 66:]).mean() < 12


def test_cli_all_episodes_two_cameras(recorded, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    assert (
        main(
            [
                str(recorded),
                "--all",
                "--mode",
                "open_loop",
                "--video",
                str(out),
                "--size",
                "32x48",
                "--cameras",
                "frontview",
                "robot0_eye_in_hand",
            ]
        )
        == 0
    )
    assert "success reproduced in 2/2" in capsys.readouterr().out  # (the start may be > 1 mm off: see above)
    for i in range(2):
        n, size, _ = _decode(tmp_path / f"v_ep{i:03d}.mp4")
        # side by side, no recorded frames of these cameras to pair with
        assert n == EpisodeStore.open(recorded).episodes[i]["length"] and size == (32, 96)


def test_cli_errors_exit_2_with_a_message(recorded, capsys):
    p = subprocess.run(
        [ROBOT_RL, "replay", str(recorded), "--episode", "7"], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 2 and "episode 7 out of range" in p.stderr and "2 episodes" in p.stderr
    assert main([str(recorded), "--video", "x.mp4", "--cameras", "nope"]) == 2
    assert "unknown camera 'nope'" in capsys.readouterr().err
    assert main([str(recorded), "--sim-robot", "no_such_robot"]) == 2
    assert "no such robot config" in capsys.readouterr().err
    assert main([str(recorded) + "_missing"]) == 2
    assert "not an episode store" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- a real-robot episode
def _lerobot_style_store(recorded: Path, path: Path) -> EpisodeStore:
    """Episode 0 as a real robot recorded through the lerobot adapter would hold it: one flat `obs.state`
    vector with lerobot's entry names (`cube_pos.0` ...), the action, no simulator states, a lerobot
    robot_config (a real Panda driven in end-effector deltas)."""
    src = EpisodeStore.open(recorded)
    ep = src.episode(0)
    keys = [
        k[len(OBS_PREFIX) :]
        for k, f in src.features.items()
        if k.startswith(OBS_PREFIX) and not f.is_image and not k.endswith("-state")
    ]
    names, cols = [], []
    for k in keys:
        x = ep[OBS_PREFIX + k].reshape(len(ep["action"]), -1)
        names += [f"{k}.{i}" for i in range(x.shape[1])]
        cols.append(x)
    state = np.concatenate(cols, axis=1).astype(np.float32)
    feats = {
        "obs.state": Feature((len(names),), "float32", tuple(names)),
        "action": src.features["action"],
        "success": Feature((), "bool"),
        "timestamp": Feature((), "float64"),
        "intervention": Feature((), "bool"),
    }
    info = {"robot": "lerobot_my_panda", "robot_config": {"type": "lerobot", "lerobot_type": "my_panda"}}
    store = EpisodeStore.create(path, feats, src.fps, info=info)
    w = store.writer()
    w.begin({"seed": 0, "operator": "test"})
    for t in range(len(state)):
        w.add(
            {
                "obs.state": state[t],
                "action": ep["action"][t],
                "success": ep["success"][t],
                "timestamp": ep["timestamp"][t],
                "intervention": np.bool_(True),
            }
        )
    w.save({"success": bool(ep["success"][-1])}).result()
    store.close()
    return EpisodeStore.open(path)


def test_real_robot_episode_open_loop_in_sim(recorded, tmp_path, capsys):
    store = _lerobot_style_store(recorded, tmp_path / "real")
    assert main([str(store.path)]) == 2  # a real robot: which simulator?
    assert "--sim-robot" in capsys.readouterr().err
    assert main([str(store.path), "--mode", "state", "--sim-robot", "lift"]) == 2
    assert "no recorded simulator states" in capsys.readouterr().err

    report = tmp_path / "real.json"
    assert main([str(store.path), "--sim-robot", "lift", "--json", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["mode"] == "open_loop" and r["qpos_err"] is None
    assert {"cube_pos", "robot0_eef_pos", "robot0_joint_pos"} <= set(r["compared_keys"])  # from `state` names
    assert r["success_recorded"] is True and r["success_replayed"] is True
    assert r["max_divergence_m"] < 5e-3  # the fresh scene's cube size differs by up to ~2 mm
    assert "open_loop replay" in capsys.readouterr().out


def test_replay_robot_config_of_our_sim_behind_lerobot():
    class _Store:
        path = Path("s")
        meta = {
            "info": {
                "robot_config": {
                    "type": "lerobot",
                    "lerobot_type": "robot_rl_sim",
                    "env_name": "Stack",
                    "camera_names": ["agentview"],
                    "safety": {"max_delta": None},
                }
            }
        }

    assert replay_robot_config(_Store()) == {"type": "robosuite", "env_name": "Stack", "cameras": []}
    cfg = replay_robot_config(_Store(), "pick_place_can")
    assert cfg["env_name"] == "PickPlaceCan" and cfg["cameras"] == [] and "safety" not in cfg
