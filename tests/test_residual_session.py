"""`robot-rl session algo=residual` end to end: MuJoCo Lift, a frozen chunked diffusion base, control process and
learner as separate processes over ZMQ; telemetry, evaluation blocks, resume, a crashed learner restarted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from robot_rl.control.pacing import PacedLoop
from robot_rl.learner.replay_buffer import ReplayBuffer
from robot_rl.commands.record import Recorder
from robot_rl.commands.train import Trainer

from conftest import REPO
from test_session import learner_checkpoint

TINY_POLICY = ["policy.down_dims=[32,64]", "policy.diffusion_step_embed_dim=16", "policy.kernel_size=3",
               "policy.n_groups=4", "policy.action_horizon=8", "policy.n_action_steps=4",
               "policy.num_inference_steps=3"]


@pytest.fixture(scope="module")
def lift_base(tmp_path_factory):
    """Three scripted Lift demos and a tiny diffusion base trained on them for a few steps."""
    tmp = tmp_path_factory.mktemp("lift_base")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with initialize_config_module("robot_rl.configs", version_base=None):
        cfg = compose("record", overrides=["robot=lift", f"record.path={tmp / 'demos'}", "record.episodes=3",
                                           "record.report_every_s=1e9", "teleop.quality=expert", "teleop.seed=0"])
        rec = Recorder(cfg, tmp / "record_run")
        rec.loop = PacedLoop(1e6)  # unpaced
        assert rec.run()["saved"] == 3
        tcfg = compose("train", overrides=[f"train.data={tmp / 'demos'}", "train.progress=false", "train.steps=20",
                                           "train.batch_size=16", "train.warmup_steps=2", "train.tensorboard=false",
                                           "train.checkpoint_every=1000", *TINY_POLICY])
    Trainer(tcfg, tmp / "base").run()
    torch.set_num_threads(threads)
    return tmp


def session_args(base, run_dir, ports, *extra):
    return ["session", "algo=residual", f"algo.base_checkpoint={base / 'base'}", f"algo.demos={base / 'demos'}",
            "algo.actor_hidden=[32]", "algo.critic_hidden=[32,32]", "algo.num_critics=4", "algo.batch_size=32",
            "algo.learning_starts=40", "algo.critic_warmup=20", "algo.publish_every_updates=10",
            "algo.log_every_updates=10", "algo.updates_per_transition=1", "session.max_episode_steps=30",
            "session.rate_hz=60", "session.stop_on_success=true", "session.eval_every_episodes=2",
            "session.eval_episodes=1", "session.watchdog_s=1.0", "session.heartbeat_s=0.02", "device=cpu",
            "tensorboard=false", f"session.transitions_port={ports[0]}", f"session.weights_port={ports[1]}",
            f"hydra.run.dir={run_dir}", *extra]


def run_cli(args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "robot_rl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


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
    proc = subprocess.Popen([sys.executable, "-m", "robot_rl.cli",
                             *session_args(lift_base, run, ports, "session.episodes=8", "session.restart_crashed=1")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    deadline = time.time() + 180
    while not (learner_checkpoint(run / "learner")[0] or {"updates": 0})["updates"] > 0 and time.time() < deadline:
        time.sleep(0.2)
    assert learner_checkpoint(run / "learner")[0] is not None, "the learner never checkpointed"
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
    with initialize_config_module("robot_rl.configs", version_base=None):
        cfg = compose("record", overrides=["robot=lift", "robot.cameras=[agentview]", "robot.camera_height=48",
                                           "robot.camera_width=48", f"record.path={tmp_path / 'demos'}",
                                           "record.episodes=2", "record.report_every_s=1e9", "teleop.quality=expert",
                                           "teleop.seed=0"])
        rec = Recorder(cfg, tmp_path / "record_run")
        rec.loop = PacedLoop(1e6)
        assert rec.run()["saved"] == 2
        tcfg = compose("train", overrides=[f"train.data={tmp_path / 'demos'}", "train.progress=false",
                                           "train.steps=5", "train.batch_size=16", "train.warmup_steps=1",
                                           "train.tensorboard=false", "train.checkpoint_every=1000",
                                           f"policy.obs_keys={lowdim}", *TINY_POLICY])
    Trainer(tcfg, tmp_path / "base").run()
    run = tmp_path / "run"
    out = run_cli(session_args(tmp_path, run, ports, "session.episodes=3", "robot.cameras=[agentview]",
                               "robot.camera_height=48", "robot.camera_width=48",
                               "algo.obs_keys=[agentview_image,robot0_eef_pos,cube_pos,robot0_gripper_qpos]",
                               "++algo.image_encoder={feature_dim:16,channels:[8,16],strides:[2,2],num_keypoints:8}",
                               "session.eval_every_episodes=0"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    replay = ReplayBuffer(run / "learner" / "replay.zarr")
    images = replay.column("obs.agentview_image")
    assert images.dtype == np.uint8 and images.shape[1:] == (48, 48, 3)
    assert not any(k.startswith("next") for k in replay.keys()), "next observations are not stored"
    metrics = read_jsonl(run / "learner" / "metrics.jsonl")
    assert metrics and all(np.isfinite(m["critic/loss"]) for m in metrics)
    ckpt = torch.load(learner_checkpoint(run / "learner")[1] / "algo_state.pt", weights_only=True)
    assert any("image_encoders" in k for k in ckpt["model"]), "the conv encoder travels with the residual"
