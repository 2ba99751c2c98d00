"""`robot-rl session algo=residual` end to end: MuJoCo Lift, a frozen chunked diffusion base, control process and
learner as separate processes over ZMQ; telemetry, evaluation blocks, resume, a crashed learner restarted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from robot_rl.learner.replay_buffer import ReplayBuffer

from builders import base_from_demos, camera, run_cli, session_args
from conftest import REPO
from test_session import _wait_for, learner_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def stored_rows(learner_dir) -> int:
    """Rows the learner has written to its replay on disk, from its per-robot telemetry (robots.jsonl)."""
    try:
        lines = (learner_dir / "robots.jsonl").read_text().splitlines()
        return sum(r["stored"] for r in json.loads(lines[-1])["robots"].values()) if lines else 0
    except (FileNotFoundError, json.JSONDecodeError, IndexError):  # not written yet, or read mid-line
        return 0


def test_residual_session_trains_evaluates_and_resumes(lift_base, tmp_path, ports):
    run = tmp_path / "run"
    out = run_cli(session_args(lift_base, run, ports, "session.episodes=4"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    episodes = read_jsonl(run / "control" / "episodes.jsonl")
    assert [e["episode"] for e in episodes] == [0, 1, 2, 3]
    assert all(e["residual_abs"] is not None and e["achieved_hz"] > 0 for e in episodes)
    assert episodes[0]["exploration"] == "warmup"
    evals = read_jsonl(run / "control" / "evals.jsonl")
    assert [e["mode"] for e in evals] == ["base", "residual", "residual"], "the frozen base is evaluated once"
    replay = ReplayBuffer(run / "learner" / "replay.zarr")
    assert replay.size == sum(e["steps"] for e in episodes)
    base_actions = replay.column("base_action")
    assert np.isfinite(base_actions).all(), "every online step carries the base action"
    # the executed action = base + residual + exploration: it differs from the base during warm-up noise
    assert not np.allclose(replay.column("action"), base_actions)
    metrics = read_jsonl(run / "learner" / "metrics.jsonl")
    assert metrics and all(np.isfinite(m["critic/loss"]) and m["updates_per_s"] >= 0 for m in metrics)
    ckpt, ckpt_dir = learner_checkpoint(run / "learner")
    assert ckpt["updates"] > 0 and (ckpt_dir / "algo_state.pt").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["learning_curve"] and (run / "learning_curve.png").stat().st_size > 0
    updates_before = summary["learner_updates"]

    # resume in the same run dir: numbering (and seeds) continue, the learner restores replay and weights
    out = run_cli(session_args(lift_base, run, ports, "session.episodes=6", "session.resume=true"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    episodes = read_jsonl(run / "control" / "episodes.jsonl")
    assert [e["episode"] for e in episodes] == [0, 1, 2, 3, 4, 5]
    learner = json.loads((run / "learner" / "summary.json").read_text())
    assert learner["restored_rows"] == replay.size and learner["updates"] >= updates_before
    assert [e["mode"] for e in read_jsonl(run / "control" / "evals.jsonl")].count("base") == 1


def test_crashed_learner_is_restarted_and_resumes(lift_base, tmp_path, ports):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "robot_rl.cli",
            *session_args(
                lift_base,
                run,
                ports,
                "session.episodes=8",
                "session.restart_crashed=1",
                # the robot may finish its 8 short episodes while the learner restarts: its drain waits for the
                # restarted learner's acks, however long a loaded machine takes to start it
                "session.drain_timeout_s=150",
            ),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env=env,
    )
    # kill as soon as the learner has rows on disk, early in the 8 episodes: waiting for a trained checkpoint
    # instead let a loaded machine finish every episode first, and a session whose robots are done does not restart
    _wait_for(lambda: stored_rows(run / "learner") > 0, 180, "the learner's first stored rows")
    pids = subprocess.run(["pgrep", "-f", f"robot_rl.learner .*{run}"], capture_output=True, text=True).stdout.split()
    assert pids, "learner process not found"
    os.kill(int(pids[0]), signal.SIGKILL)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["restarts"] == {"learner": 1}
    learner = json.loads((run / "learner" / "summary.json").read_text())
    assert learner["restored_rows"] > 0, "the restarted learner resumed from its replay on disk"
    assert summary["episodes"] == 8


def test_residual_session_with_a_camera(tmp_path, ports):
    """The image path: the residual and critic see an 48x48 camera (conv encoder trained by the critic, DrQ
    shift), the base stays low-dim; images travel as uint8 and are stored once in the learner's replay."""
    lowdim = "[robot0_eef_pos,cube_pos,robot0_gripper_qpos]"
    base_from_demos(
        tmp_path,
        "train.steps=5",
        "train.warmup_steps=1",
        f"policy.obs_keys={lowdim}",
        demos=2,
        record_overrides=camera(48),
    )
    run = tmp_path / "run"
    out = run_cli(
        session_args(
            tmp_path,
            run,
            ports,
            "session.episodes=3",
            *camera(48),
            "algo.obs_keys=[agentview_image,robot0_eef_pos,cube_pos,robot0_gripper_qpos]",
            "++algo.image_encoder={feature_dim:16,channels:[8,16],strides:[2,2],num_keypoints:8}",
            "session.eval_every_episodes=0",
        )
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    replay = ReplayBuffer(run / "learner" / "replay.zarr")
    images = replay.column("obs.agentview_image")
    assert images.dtype == np.uint8 and images.shape[1:] == (48, 48, 3)
    assert not any(k.startswith("next") for k in replay.keys()), "next observations are not stored"
    metrics = read_jsonl(run / "learner" / "metrics.jsonl")
    assert metrics and all(np.isfinite(m["critic/loss"]) for m in metrics)
    ckpt = torch.load(learner_checkpoint(run / "learner")[1] / "algo_state.pt", weights_only=True)
    assert any("image_encoders" in k for k in ckpt["model"]), "the conv encoder travels with the residual"
