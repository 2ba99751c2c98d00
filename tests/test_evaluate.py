"""robot_rl.commands.evaluate: Wilson intervals, seeded sim evaluation (eval.json, mp4), training curves, `robot-rl eval`."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from hydra import compose, initialize_config_module

from robot_rl.config import ConfigError
from robot_rl.commands.evaluate import (
    evaluate,
    main,
    plot_training_curves,
    robot_config_from_checkpoint,
    set_sampler,
    summary_line,
    wilson_interval,
)

from builders import robot_store, tiny_diffusion, train_policy

LIFT = {
    "type": "robosuite",
    "env_name": "Lift",
    "robots": "Panda",
    "control_freq": 20,
    "horizon": 200,
    "cameras": [],
    "camera_height": 84,
    "camera_width": 84,
    "safety": {"max_delta": None, "safe_action": [0, 0, 0, 0, 0, 0, float("nan")]},
}

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------- Wilson


@pytest.mark.parametrize(
    "k, n, lo, hi",
    [
        (0, 10, 0.0, 0.2775),  # textbook values (e.g. Brown, Cai & DasGupta 2001; Newcombe 1998)
        (1, 10, 0.0179, 0.4042),
        (5, 10, 0.2366, 0.7634),
        (10, 10, 0.7225, 1.0),
        (81, 263, 0.2553, 0.3662),  # Newcombe (1998) examples 81/263 and 15/148
        (15, 148, 0.0624, 0.1605),
        (48, 50, 0.8654, 0.9890),
        (50, 50, 0.9287, 1.0),
    ],
)
def test_wilson_interval_known_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_interval_properties():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for n in (1, 7, 50):
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
            lo2, hi2 = wilson_interval(n - k, n)  # symmetric
            assert math.isclose(lo, 1 - hi2, abs_tol=1e-12) and math.isclose(hi, 1 - lo2, abs_tol=1e-12)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    res = {
        "success_rate": 0.96,
        "success_ci95": list(wilson_interval(48, 50)),
        "episodes": 50,
        "mean_length": 41.0,
        "latency": {"chunk": {"p50_ms": 4.0, "p99_ms": 6.0}},
    }
    assert summary_line(res).startswith("success 0.96 [0.87, 0.99] over 50 episodes")


# --------------------------------------------------------------------------------------------- a tiny run


@pytest.fixture(scope="module")
def lift_run(tmp_path_factory):
    """A tiny diffusion policy 'trained' (a few steps on random data) on a store that says it came from Lift."""
    tmp = tmp_path_factory.mktemp("lift")
    robot_store(tmp / "store", LIFT, draw=lambda rng, shape: rng.normal(size=shape).astype(np.float32) * 0.1)
    return train_policy(
        tmp / "store",
        tmp / "run",
        "train.steps=4",
        "train.batch_size=8",
        "train.warmup_steps=1",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.tensorboard=true",
        *tiny_diffusion(),
    )


def eval_cfg(*overrides):
    with initialize_config_module("robot_rl.configs", version_base=None):
        return compose("eval", overrides=["eval.progress=false", *overrides])


def test_eval_main_writes_results_video_and_curves(lift_run, tmp_path, capsys):
    from robot_rl.video import read_mp4

    cfg = eval_cfg(
        f"eval.checkpoint={lift_run}",
        "eval.episodes=2",
        "eval.max_steps=6",
        "eval.video_episodes=1",
        "eval.video_size=64",
        "eval.seed=5",
        "device=cpu",
    )
    assert main(cfg, tmp_path / "out") == 0
    res = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert res["checkpoint"].endswith("step_4") and res["sampler"] == "ddim-3"
    assert res["robot_config_source"] == "the checkpoint's manifest" and res["robot_config"]["env_name"] == "Lift"
    assert res["episodes"] == 2 and res["max_steps"] == 6 and len(res["per_episode"]) == 2
    assert [e["seed"] for e in res["per_episode"]] == [5, 6]
    assert res["successes"] == sum(e["success"] for e in res["per_episode"])
    lo, hi = res["success_ci95"]
    assert 0.0 <= lo <= res["success_rate"] <= hi <= 1.0
    assert all(e["length"] == 6 for e in res["per_episode"] if not e["success"])
    lat = res["latency"]
    assert lat["step"]["n"] == sum(e["length"] for e in res["per_episode"])
    # n_action_steps=4: a chunk on calls 1 and 5 of each 6-step episode
    assert lat["chunk"]["n"] == 4 and lat["chunk"]["p50_ms"] > 0 and lat["chunk"]["p99_ms"] >= lat["chunk"]["p50_ms"]
    assert len(res["videos"]) == 1
    frames = read_mp4(res["videos"][0])
    assert len(frames) == 7 and frames[0].shape == (64, 64, 3)  # the reset frame + one per step
    assert frames[0].std() > 1  # a rendered scene, not a blank frame
    png = tmp_path / "out" / "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("success ")


def test_evaluate_is_seeded(lift_run):
    from robot_rl.policies.checkpoint import load_policy

    policy = load_policy(lift_run, device="cpu")
    a = evaluate(policy, LIFT, episodes=1, seed=3, max_steps=5)
    b = evaluate(policy, LIFT, episodes=1, seed=3, max_steps=5)
    assert a["per_episode"][0]["length"] == b["per_episode"][0]["length"]
    assert a["videos"] == [] and a["latency"]["chunk"]["n"] == 2


def test_plot_training_curves(lift_run, tmp_path):
    out = plot_training_curves(lift_run, tmp_path / "curves.png")
    assert out is not None and out.read_bytes()[:4] == b"\x89PNG"
    ckpt = lift_run / "checkpoints" / "step_2"  # a checkpoint directory works too
    assert plot_training_curves(ckpt, tmp_path / "c2.png").exists()
    (tmp_path / "empty").mkdir()
    assert plot_training_curves(tmp_path / "empty", tmp_path / "none.png") is None


def test_config_errors(lift_run, tmp_path):
    with pytest.raises(ConfigError, match="eval.checkpoint is empty"):
        main(eval_cfg(), tmp_path)
    with pytest.raises(ConfigError, match="eval.checkpoint"):
        main(eval_cfg(f"eval.checkpoint={tmp_path / 'nowhere'}"), tmp_path)
    with pytest.raises(ConfigError, match="eval.episodes"):
        main(eval_cfg(f"eval.checkpoint={lift_run}", "eval.episodes=0"), tmp_path)
    with pytest.raises(ConfigError, match="eval.scheduler"):
        main(eval_cfg(f"eval.checkpoint={lift_run}", "eval.scheduler=euler"), tmp_path)
    with pytest.raises(ConfigError, match="num_inference_steps"):
        main(
            eval_cfg(f"eval.checkpoint={lift_run}", "eval.scheduler=ddpm", "eval.num_inference_steps=5", "device=cpu"),
            tmp_path,
        )
    with pytest.raises(ConfigError, match="robot.env_name"):
        main(eval_cfg(f"eval.checkpoint={lift_run}", "robot=lift", "robot.env_name=NoSuchEnv"), tmp_path)
    # a checkpoint whose manifest names no robot (written before it carried one) and whose training store is gone:
    # the robot must be given
    import shutil

    moved = tmp_path / "run_copy"
    shutil.copytree(lift_run, moved)
    step = moved / "checkpoints" / "step_4"
    manifest = json.loads((step / "manifest.json").read_text())
    (step / "manifest.json").write_text(json.dumps({**manifest, "robot": {"name": None, "config": None}}))
    from_store, source = robot_config_from_checkpoint(moved)
    assert from_store["env_name"] == "Lift" and source == "the training store"
    cfg_path = step / "config.yaml"
    cfg_path.write_text(cfg_path.read_text().replace(str(lift_run.parent / "store"), str(tmp_path / "gone")))
    with pytest.raises(ConfigError, match="robot=lift"):
        robot_config_from_checkpoint(moved)
    assert robot_config_from_checkpoint(lift_run) == (manifest["robot"]["config"], "the checkpoint's manifest")


def test_set_sampler(lift_run):
    from robot_rl.policies.checkpoint import load_policy

    pol = load_policy(lift_run, device="cpu")
    assert set_sampler(pol) == "ddim-3"
    assert set_sampler(pol, num_inference_steps=2) == "ddim-2" and pol.cfg.num_inference_steps == 2
    assert set_sampler(pol, "ddpm") == "ddpm-100"
    with pytest.raises(ConfigError):
        set_sampler(pol, "ddim", 1000)


@pytest.mark.skipif(
    "eval" not in __import__("robot_rl.cli", fromlist=["VERBS"]).VERBS,
    reason="robot-rl eval is not wired into robot_rl/cli.py yet",
)
def test_cli_config_error_exit_code(tmp_path):
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "robot_rl.cli", "eval", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "eval.checkpoint is empty" in out.stderr
