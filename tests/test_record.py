"""robot-rl record: a real sim robot driven by the scripted expert, episodes in a real store on disk."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from robot_rl.config import ConfigError
from robot_rl.data.episode_store import EpisodeStore
from robot_rl.commands.record import Recorder

from builders import ScriptedControls, record_config, record_demos

ROBOT_RL = str(Path(sys.executable).parent / "robot-rl")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rec")
    return tmp, record_demos(tmp / "store", tmp / "run", "record.episodes=2", "record.task=lift it")


def test_record_writes_episodes_with_metadata(recorded):
    tmp, summary = recorded
    assert summary["saved"] == 2 and summary["success_rate"] == 1.0
    store = EpisodeStore.open(tmp / "store")
    assert store.num_episodes == 2
    assert {"obs.cube_pos", "obs.robot0_eef_pos", "action", "intervention", "success", "timestamp", "sim_state"} <= set(
        store.features
    )
    for i in range(2):
        ep, meta = store.episode(i), store.episodes[i]
        assert meta["task"] == "lift it" and meta["seed"] == i and meta["success"] is True
        assert meta["length"] == len(ep["action"]) and meta["missed_ticks"] >= 0 and meta["dropped_frames"] == 0
        np.testing.assert_array_equal(ep["sim_state"][0], np.asarray(meta["initial_sim_state"]))
        assert "<mujoco" in store.model_xml(meta["model_id"])
        ts = ep["timestamp"]
        # the real clock, paced at 20 Hz: a busy machine can only make ticks later, never earlier than the rate
        assert np.all(np.diff(ts) > 0) and np.median(np.diff(ts)) >= 0.045
        assert ep["success"][-1] and ep["intervention"].all()  # the expert (teleop) drove every step
    assert store.meta["info"]["robot_config"]["env_name"] == "Lift"


def test_resume_appends_and_refuses_without_flag(recorded, tmp_path):
    tmp, _ = recorded
    import shutil

    shutil.copytree(tmp / "store", tmp_path / "store")
    with pytest.raises(ConfigError, match="record.resume=true"):
        Recorder(record_config(tmp_path / "store", "record.episodes=1"), tmp_path / "run").run()
    Recorder(record_config(tmp_path / "store", "record.episodes=1", "record.resume=true"), tmp_path / "run2").run()
    store = EpisodeStore.open(tmp_path / "store")
    assert store.num_episodes == 3 and store.episodes[2]["seed"] == 2  # the seed sequence continues


def test_unwritable_path_and_no_space_fail_before_recording(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        Recorder(record_config(tmp_path / "file" / "store"), tmp_path / "run").run()
    with pytest.raises(ConfigError, match="GiB free"):
        Recorder(
            record_config(tmp_path / "store", "record.min_free_gb=1000000", "record.episodes=1000000000"),
            tmp_path / "run",
        ).run()
    assert not (tmp_path / "store" / "meta.json").exists()


def test_rerecord_save_and_stop_keys(tmp_path):
    rec = Recorder(
        record_config(tmp_path / "store", "record.episodes=5", "record.stop_on_success=false"), tmp_path / "run"
    )
    # tick 6: rerecord (discard, same seed); tick 16: save the re-recorded one early; tick 30: stop (saves it)
    rec.controls = ScriptedControls({6: "rerecord", 16: "save", 30: "stop"})
    summary = rec.run()
    store = EpisodeStore.open(tmp_path / "store")
    assert summary["discarded"] == 1 and store.num_episodes == 2
    assert [m["seed"] for m in store.episodes] == [0, 1]
    assert [m["length"] for m in store.episodes] == [9, 13]  # steps before each key press


def test_sigkill_recorder_then_resume(tmp_path):
    store_path = tmp_path / "store"
    proc = subprocess.Popen(
        [
            ROBOT_RL,
            "record",
            f"record.path={store_path}",
            "record.episodes=50",
            "record.chunk_steps=8",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once two episodes are saved and the third has rows on disk (pending.json
        try:  # exists from the episode's first step; its rows reach the disk in blocks of chunk_steps)
            commit = json.loads((store_path / "commit.json").read_text())
            pending = json.loads((store_path / "pending.json").read_text())
            if len(commit["episode_ends"]) >= 2 and pending["flushed"] > pending["start"]:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    crashed = EpisodeStore.open(store_path)
    n = crashed.num_episodes
    assert n >= 2 and crashed.pending is not None and crashed.pending["flushed"] > crashed.pending["start"]
    before = [crashed.episode(i) for i in range(n)]
    Recorder(
        record_config(store_path, "record.episodes=1", "record.resume=true", "record.partial=recover"),
        tmp_path / "run2",
    ).run()
    store = EpisodeStore.open(store_path)
    assert store.num_episodes == n + 2  # the recovered partial episode, then one new one
    assert store.episodes[n]["partial"] is True and store.episodes[n + 1]["seed"] == n + 1
    for i in range(n):
        for k, v in before[i].items():
            np.testing.assert_array_equal(store.episode(i)[k], v, err_msg=f"episode {i} {k}")


def test_policy_rollout_with_simulated_intervener_records_who_acted(tmp_path):
    """An untrained policy drives; the simulated intervener (scripted expert) takes over when it goes wrong. The
    policy comes from its checkpoint directory, which carries its own config: no `policy=` to repeat."""
    from hydra import compose, initialize_config_module

    from robot_rl.factory import make_policy, make_robot
    from robot_rl.policies.checkpoint import write_policy

    with initialize_config_module("robot_rl.configs", version_base=None):
        trained = compose("record", overrides=["policy=mlp", "policy.hidden=[32]"])
    write_policy(tmp_path / "policy", make_policy(trained.policy, make_robot(trained.robot)))
    cfg = record_config(
        tmp_path / "store",
        "record.episodes=1",
        "teleop=sim_intervener",
        f"record.policy_weights={tmp_path / 'policy'}",
        "record.max_episode_steps=60",
        "teleop.intervener.min_steps=5",
    )
    summary = Recorder(cfg, tmp_path / "run").run()
    store = EpisodeStore.open(tmp_path / "store")
    ep = store.episode(0)
    assert "policy_action" in store.features and np.isfinite(ep["policy_action"]).all()
    took_over = ep["intervention"]
    assert not took_over[0] and took_over.any()  # the policy started; the intervener stepped in
    # where the policy acted, what it proposed is what was sent (within the safety clip)
    policy_steps = ~took_over
    np.testing.assert_allclose(ep["action"][policy_steps], np.clip(ep["policy_action"][policy_steps], -1, 1), atol=1e-6)
    assert summary["episodes"][0]["interventions"] == int(took_over.sum())
    from robot_rl.commands.record import final_line

    line = final_line(summary, 20, tmp_path / "run")  # what `robot-rl record` ends with
    assert line.startswith("record: 1 episodes saved, success ") and "/20 Hz" in line and " overruns, " in line
    assert line.endswith(f"-> {tmp_path / 'store'} (run: {tmp_path / 'run' / 'summary.json'})")
    assert store.episodes[0]["task"] == "lift the cube"


def test_policy_weights_that_do_not_fit_the_configured_policy_say_so_in_one_line(tmp_path):
    """A bare safetensors file for a policy configured differently: one message pointing to the checkpoint
    directory, not a wall of size mismatches."""
    from safetensors.torch import save_file

    from robot_rl.config import ConfigError
    from robot_rl.factory import make_policy, make_robot

    small = record_config(tmp_path / "store", "policy=mlp", "policy.hidden=[8]")
    policy = make_policy(small.policy, make_robot(small.robot))
    save_file({k: v.contiguous() for k, v in policy.state_dict().items()}, tmp_path / "w.safetensors")
    cfg = record_config(tmp_path / "store", "policy=mlp", f"record.policy_weights={tmp_path / 'w.safetensors'}")
    with pytest.raises(ConfigError, match="does not fit policy=mlp") as e:
        Recorder(cfg, tmp_path / "run")
    assert "give the checkpoint directory" in str(e.value) and str(e.value).count("\n") == 0
