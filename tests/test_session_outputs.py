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


# ------------------------------------------------------------------------------------------- learning curve
def _episodes(path, rows):
    path.mkdir(parents=True, exist_ok=True)
    (path / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _row(i, steps, who, version, success, **extra):
    counts = {"expert": (0, steps, 0), "policy": (steps, 0, 0), "nobody": (0, 0, steps)}[who]
    driven = f"expert (expert episode {i + 1} of 3)" if who == "expert" else who
    return {
        "episode": i,
        "success": success,
        "steps": steps,
        "env_steps": steps * (i + 1),
        "policy_version": version,
        "policy_steps": counts[0],
        "teleop_steps": counts[1],
        "safe_steps": counts[2],
        "driven_by": driven,
        **extra,
    }


def _drawn(monkeypatch):
    """What the next learning_curve draws, read from its figure as it is saved: legend texts per panel, the x of
    every vertical mark, the title, and per legend entry whether its line has a marker."""
    import matplotlib.figure

    drawn = {}
    real = matplotlib.figure.Figure.savefig

    def savefig(fig, fname, **kw):
        axes = [ax for ax in fig.axes if ax.get_legend() is not None]
        drawn["legends"] = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in axes]
        drawn["marks"] = [ln.get_xdata()[0] for ln in fig.axes[0].lines if ln.get_color() == "tab:purple"]
        drawn["title"] = fig._suptitle.get_text() if fig._suptitle else None
        drawn["markers"] = {ln.get_label(): ln.get_marker() for ln in fig.axes[0].lines}
        return real(fig, fname, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return drawn


def test_learning_curve_separates_who_drove_marks_versions_and_counts_interventions(tmp_path, monkeypatch):
    """Expert episodes, policy episodes and evaluation blocks are separate series (an expert-to-policy hand-over
    does not read as 'learning made it worse'), each new weights version is marked, the run is the title, and a
    panel of interventions per episode appears when episodes.jsonl carries `interventions`."""
    from robot_rl.control.learning_curve import learning_curve

    rows = [_row(i, 50, "expert", -1, True) for i in range(3)]
    rows += [_row(i, 50, "policy", i // 2, i % 3 == 0, interventions=i % 2) for i in range(3, 9)]
    _episodes(tmp_path / "control", rows)
    block = {"mode": "policy", "after_episode": 8, "env_steps": 450, "policy_version": 4, "episodes": 5}
    (tmp_path / "control" / "evals.jsonl").write_text(json.dumps({**block, "success_rate": 0.4}) + "\n")
    drawn = _drawn(monkeypatch)
    path, why = learning_curve([tmp_path / "control"], tmp_path / "curve.png", title="session quick: algo=online_bc")
    assert why is None and path.stat().st_size > 0
    top, bottom = drawn["legends"]
    assert top[0].startswith("policy-driven episodes (mean of the last 6, n=6)")
    assert top[1] == "expert/teleop-driven episodes (n=3)"
    assert top[2].startswith("evaluation blocks (policy, 5 seeded episodes, 95 % CI)")
    assert bottom == ["interventions per episode (mean of the last 6)"]
    assert drawn["marks"] == [150, 200, 300, 400]  # where episodes 3, 4, 6 and 8 started, on v1, v2, v3, v4
    assert drawn["title"] == "session quick: algo=online_bc"


def test_learning_curve_with_one_episode_draws_a_point(tmp_path, monkeypatch):
    """A short residual session with one finished episode is still a plot with something on it: the average is
    drawn with a marker, and no interventions panel without `interventions` in the rows."""
    from robot_rl.control.learning_curve import learning_curve

    _episodes(tmp_path / "control", [_row(0, 120, "policy", -1, False)])
    drawn = _drawn(monkeypatch)
    path, why = learning_curve([tmp_path / "control"], tmp_path / "curve.png")
    assert why is None and path.stat().st_size > 0
    [legend] = drawn["legends"]
    assert legend == ["policy-driven episodes (mean of the last 1, n=1)"] and drawn["marks"] == []
    assert drawn["markers"][legend[0]] == "o"
