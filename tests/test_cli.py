"""The CLI says what a verb does and what was wrong with a command line, before anything runs: per-verb --help,
unknown keys with the closest existing one, values of the wrong kind, plain verbs that reject unknown options."""

from __future__ import annotations

import pytest

from robot_rl.cli import VERBS, check_overrides, main

HYDRA_VERBS = ["session", "control", "learner", "record", "train", "eval", "distill", "deploy", "train-classifier"]


@pytest.mark.parametrize("verb", HYDRA_VERBS)
def test_each_verb_says_what_it_does_its_options_and_two_examples(verb, capsys):
    assert main([verb, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"robot-rl {verb}: ") and "powered by Hydra" not in out
    assert "main options" in out and " # " in out  # options with their comments
    examples = out.split("examples:\n")[1].split("\n\n")[0].splitlines()
    assert len(examples) == 2 and all(e.strip().startswith(f"robot-rl {verb} ") for e in examples)


def test_help_shows_the_options_of_the_verb_with_their_comments_and_overrides(capsys):
    assert main(["record", "record.episodes=3", "--help"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("record.episodes="))
    assert line.split()[0] == "record.episodes=3" and line.endswith("# episodes to save in this run")
    assert "record.stop_on_success=true" in out
    assert "session.rate_hz" not in out  # the record verb's options, not every group of every verb


def test_keys_help_makes_no_directory_and_unknown_options_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["keys", "--help"]) == 0 and "usage: robot-rl keys" in capsys.readouterr().out
    assert main(["keys", "--force"]) == 2
    assert main(["keys"]) == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "arg, said",
    [
        (
            "sesion.episodes=3",
            "there is no setting 'sesion.episodes' in robot-rl session's config; did you mean session.episodes?",
        ),
        ("session.episodez=3", "did you mean session.episodes?"),
        ("robot=stak", "robot=stak: no such robot config; did you mean stack?"),
        ("session.rate_hz=abc", "session.rate_hz must be a number (default 20), got 'abc'"),
        ("session.resume=3", "session.resume must be true or false (default false), got 3"),
    ],
)
def test_bad_overrides_are_named_with_what_to_do(arg, said):
    problem = check_overrides("session", [arg])
    assert said in problem and "+" not in problem


def test_good_overrides_pass_and_main_stops_a_bad_one_before_hydra_runs(tmp_path, monkeypatch, capsys):
    assert (
        check_overrides(
            "session",
            [
                "robot=stack",
                "robot.robots=Panda",
                "session.episodes=3",
                "algo=residual",
                "algo.base_checkpoint=runs/base",
                "+extra.note=1",
                "hydra.run.dir=x",
            ],
        )
        is None
    )
    assert check_overrides("eval", ["eval.max_steps=100", "eval.video_cameras=[agentview]"]) is None
    assert check_overrides("session", ["session.learner_threads=null", "seed=${oc.env:SEED,0}"]) is None
    monkeypatch.chdir(tmp_path)
    assert main(["record", "record.episodes=abc", f"hydra.run.dir={tmp_path / 'run'}"]) == 2
    assert "record.episodes must be a number (default 10), got 'abc'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no run dir, no outputs/
    assert set(HYDRA_VERBS) <= set(VERBS)


@pytest.mark.parametrize(
    "arg", ["record.episodes=0", "record.fps=-1", "record.max_episode_steps=2.5", "record.partial=keep"]
)
def test_record_numbers_are_validated_before_the_robot_is_built(arg):
    from hydra import compose, initialize_config_module

    from robot_rl.commands.record import validate_record
    from robot_rl.config import ConfigError

    with initialize_config_module("robot_rl.configs", version_base=None):
        cfg = compose("record", overrides=[arg])
    with pytest.raises(ConfigError, match=arg.split("=")[0].replace(".", r"\.")):
        validate_record(cfg)


def _composed(verb, overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module("robot_rl.configs", version_base=None):
        return compose(VERBS[verb][0], overrides=overrides)


@pytest.mark.parametrize("verb", HYDRA_VERBS)
def test_the_smoke_preset_keeps_each_verbs_own_sections_only(verb):
    """+preset=smoke holds settings for every verb; what a verb runs with (and writes to config.yaml) has only its
    own sections, the same top-level keys as without the preset."""
    from robot_rl.cli import fit_preset

    cfg = _composed(verb, ["+preset=smoke"])
    fit_preset(verb, cfg, ["+preset=smoke"])
    assert set(cfg) == set(_composed(verb, []))


def test_the_smoke_preset_sizes_runs_down_and_the_command_line_still_wins():
    from robot_rl.cli import fit_preset

    cfg = _composed("train", ["+preset=smoke", "train.steps=7"])
    fit_preset("train", cfg, ["+preset=smoke", "train.steps=7"])
    assert cfg.train.steps == 7 and cfg.train.batch_size == 32 and list(cfg.policy.down_dims) == [64, 128, 256]
    args = ["+preset=smoke", "algo=residual", "algo.critic_warmup=300"]
    cfg = _composed("session", args)
    fit_preset("session", cfg, args)
    assert cfg.algo.learning_starts == 200 and cfg.algo.critic_warmup == 300 and cfg.session.episodes == 16
    from robot_rl.commands.session import preflight_warnings

    assert preflight_warnings(cfg) == []  # the smoke budget reaches the residual's first weights
    cfg = _composed("session", ["+preset=smoke"])
    fit_preset("session", cfg, ["+preset=smoke"])
    assert preflight_warnings(cfg) == [] and "learning_starts" not in cfg.algo  # online_bc: nothing of residual's
    assert check_overrides("eval", ["+preset=smoke", "eval.checkpoint=runs/dp"]) is None


def test_dataset_stats_is_a_table_by_default_and_json_on_request(tmp_path, capsys):
    import json

    from builders import toy_store

    store = toy_store(tmp_path / "store", episodes=2, steps=5)
    assert main(["dataset", "stats", str(store)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["key", "shape", "min", "max", "mean", "std"]
    assert [ln.split()[0] for ln in lines[2:-1]] == ["obs.state", "action", "success"]
    assert lines[-1].startswith("3 keys over 10 steps of 2 episodes")
    assert main(["dataset", "stats", str(store), "--keys", "action"]) == 0
    assert [ln.split()[0] for ln in capsys.readouterr().out.splitlines()[2:-1]] == ["action[a0]", "action[a1]"]
    assert main(["dataset", "stats", str(store), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert set(stats) == {"obs.state", "action", "success"} and len(stats["action"]["mean"]) == 2
