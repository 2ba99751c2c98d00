"""What an on-robot RL session learned is used like any other policy: `robot-rl eval`, `deploy` and `export-policy`
straight from the session's run dir (the one checkpoint format), the artefact deploying with the same safety filter."""

from __future__ import annotations

import json

import numpy as np

from robot_rl.policies.checkpoint import load_policy, read_manifest
from builders import run_cli, session_args


def test_residual_session_evaluates_deploys_and_exports_from_its_run_dir(lift_base, tmp_path, ports):
    run = tmp_path / "run"
    out = run_cli(session_args(lift_base, run, ports, "session.episodes=3", "session.eval_every_episodes=0"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    pointer = json.loads((run / "learner" / "checkpoints" / "latest").read_text())
    newest = run / "learner" / "checkpoints" / pointer["path"]
    manifest = read_manifest(newest)
    assert manifest["kind"] == "residual" and manifest["base"]["kind"] == "diffusion"
    assert manifest["training"]["source"] == "session" and manifest["training"]["version"] == pointer["version"]
    assert manifest["robot"]["config"]["env_name"] == "Lift" and (newest / "algo_state.pt").is_file()

    # eval: the robot comes from the manifest, the newest version from the run dir
    out = run_cli(
        [
            "eval",
            f"eval.checkpoint={run}",
            "eval.episodes=2",
            "eval.video_episodes=0",
            "eval.plot=false",
            "eval.max_steps=20",
            "device=cpu",
            f"hydra.run.dir={tmp_path / 'eval'}",
        ]
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["checkpoint"] == str(newest) and result["episodes"] == 2
    assert result["robot_config_source"] == "the checkpoint's manifest"

    # export: a self-contained directory (residual + its base), no training state, same actions
    art = tmp_path / "artefact"
    out = run_cli(["export-policy", str(run), str(art)])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert sorted(p.name for p in art.iterdir()) == ["base", "manifest.json", "policy.safetensors"]
    a, b = load_policy(run, device="cpu"), load_policy(art, device="cpu")
    assert a.exploration == b.exploration == "none"
    obs = {k: np.zeros(d["shape"], dtype=np.float32) for k, d in manifest["obs"].items()}
    for p in (a, b):
        p.seed_episode(7)
        p.reset()
    np.testing.assert_array_equal(a.select_action(obs), b.select_action(obs))

    # deploy the run dir and the artefact: same loop, same safety filter (a chunked base inside the residual)
    for i, source in enumerate((run, art)):
        out = run_cli(
            [
                "deploy",
                f"deploy.checkpoint={source}",
                "deploy.episodes=1",
                "deploy.max_episode_steps=8",
                "deploy.rate_hz=60",
                "deploy.executor=thread",
                "deploy.device=cpu",
                "deploy.stop_on_success=false",
                f"hydra.run.dir={tmp_path / f'deploy{i}'}",
            ]
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        summary = json.loads((tmp_path / f"deploy{i}" / "summary.json").read_text())
        assert summary["episodes"] == 1 and summary["steps"] == 8

    # an older version by number, and a clear message for one that does not exist
    assert (
        load_policy(run, device="cpu", version=pointer["version"]).manifest["training"]["version"] == pointer["version"]
    )
    out = run_cli(["export-policy", str(run), str(tmp_path / "nope"), "--version", "99999"])
    assert out.returncode == 2 and "no checkpoint for version 99999" in out.stderr
