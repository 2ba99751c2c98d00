"""VLM preference rewards end to end: the label client against the real loopback teacher server (labels written,
resume asks only what is missing, 429 retried, 401/404 explained, budget), the Bradley–Terry fit ranking
progress, relabel keeping old columns, and the offline-RL verb writing a loadable policy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from builders import camera, record_demos
from hydra import compose, initialize_config_module

from robot_rl.config import ConfigError
from robot_rl.data.episode_store import EpisodeStore
from robot_rl.interfaces import Feature
from robot_rl.reward.vlm_client import (
    PROMPT_VERSION,
    ChatClient,
    LabelLog,
    VLMError,
    image_sha,
    load_labels,
    parse_label,
    stage1_messages,
)
from robot_rl.sim.vlm_teacher import TeacherServer, store_progress

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_RM = [
    "reward_model.members=2",
    "reward_model.channels=[8,16]",
    "reward_model.kernels=[3,3]",
    "reward_model.strides=[2,2]",
    "reward_model.hidden=32",
    "reward_model.progress=false",
    "reward_model.tensorboard=false",
    "reward_model.device=cpu",
]


def cfg(name: str, *overrides: str):
    with initialize_config_module("robot_rl.configs", version_base=None):
        return compose(name, overrides=list(overrides))


def run(module: str, name: str, run_dir: Path, *overrides: str) -> int:
    import importlib

    return importlib.import_module(f"robot_rl.commands.{module}").main(cfg(name, *overrides), run_dir)


@pytest.fixture(scope="module")
def lift_store(tmp_path_factory) -> Path:
    """Two scripted Lift episodes (expert, then poor) with a 32x32 agentview camera."""
    root = tmp_path_factory.mktemp("vlm_lift")
    for i, quality in enumerate(("expert", "poor")):
        summary = record_demos(
            root / "store",
            root / f"rec{i}",
            "robot=lift",
            "record.episodes=1",
            f"record.resume={str(i > 0).lower()}",
            "record.max_episode_steps=60",
            f"teleop.quality={quality}",
            "teleop.seed=0",
            f"seed={i}",
            *camera(32),
            paced=False,
        )
        assert summary["saved"] == 1
    return root / "store"


def label_args(store: Path, url: str, out: Path, budget: int, *extra: str) -> list[str]:
    return [
        f"label.data={store}",
        f"label.url={url}",
        "label.model=sim-vlm",
        "label.api_key_env=VLM_TEST_KEY",
        f"label.out={out}",
        f"label.budget={budget}",
        "label.concurrency=4",
        "label.backoff_s=0.01",
        "label.min_gap=3",
        "label.progress_every=0",
        *extra,
    ]


def test_parse_label_and_prompt():
    assert parse_label("0") == 0 and parse_label(" 1.\n") == 1 and parse_label("-1") == -1
    assert parse_label("Reasoning...\n1") == 1 and parse_label("Image 2") == -1 and parse_label("") == -1
    msg = stage1_messages("to lift the cube", np.zeros((4, 4, 3), np.uint8), np.ones((4, 4, 3), np.uint8))
    parts = msg[0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text", "image_url", "text"]
    assert "The goal is to lift the cube." in parts[-1]["text"]


def test_label_against_teacher_server_resume_retry_budget(lift_store, tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_TEST_KEY", "secret")
    out = tmp_path / "labels.jsonl"
    with TeacherServer(lift_store, api_key="secret", noise=0.0, abstain=0.3, fail_first=3) as server:
        assert run("label", "label", tmp_path / "r1", *label_args(lift_store, server.url, out, 12)) == 0
        first = json.loads((tmp_path / "r1" / "label_summary.json").read_text())
        assert server.rejected == 3 and first["retries"] >= 3  # the 429s were retried, nothing lost
        records = load_labels(out)
        assert len(records) == 12 and first["asked"] == 12
        store = EpisodeStore.open(lift_store)
        images, progress = store.array("obs.agentview_image"), store_progress(store)
        for r in records:
            assert r["label"] in (0, 1, -1) and r["prompt_version"] == PROMPT_VERSION and r["model"] == "sim-vlm"
            assert r["stage1"].startswith("1. ") and r["stage2"].strip() in ("0", "1", "-1")
            assert r["latency_s"] > 0 and r["tokens"]["total_tokens"] > 0
            assert r["a"]["sha"] == image_sha(images[r["i"]]) and r["b"]["sha"] == image_sha(images[r["j"]])
            if r["label"] != -1:  # noise 0: every preference agrees with the ground truth
                assert (r["label"] == 1) == (progress[r["j"]] > progress[r["i"]])
        # a crash mid-line: the torn line is skipped and its pair asked again; a bigger budget asks only the rest
        with open(out, "a") as f:
            f.write('{"i": 1, "j"')
        before = server.requests
        assert run("label", "label", tmp_path / "r2", *label_args(lift_store, server.url, out, 20)) == 0
        second = json.loads((tmp_path / "r2" / "label_summary.json").read_text())
        assert second["asked"] == 8 and server.requests - before == 16  # two stages per pair
        assert len(load_labels(out)) == 20
        assert [(r["i"], r["j"]) for r in load_labels(out)[:12]] == [(r["i"], r["j"]) for r in records]
        before = server.requests
        assert run("label", "label", tmp_path / "r3", *label_args(lift_store, server.url, out, 20)) == 0
        assert server.requests == before  # nothing missing: nothing asked


def test_label_ctrl_c_keeps_every_answer_and_rerun_asks_the_rest(lift_store, tmp_path):
    """A real SIGINT to the CLI while requests are in flight: exit 130, every line complete, rerun completes."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    out = tmp_path / "labels.jsonl"
    with TeacherServer(lift_store, latency_s=0.1) as server:
        args = [
            *label_args(lift_store, server.url, out, 30, "label.api_key_env=null"),
            f"hydra.run.dir={tmp_path / 'r'}",
        ]
        proc = subprocess.Popen(
            [sys.executable, "-m", "robot_rl.cli", "label", *args],
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr[-2000:]
        kept = load_labels(out)
        assert 3 <= len(kept) < 30 and len(out.read_text().splitlines()) == len(kept)  # no torn line
        assert "interrupted" in stdout
        before = server.requests
        assert (
            run(
                "label",
                "label",
                tmp_path / "r2",
                *label_args(lift_store, server.url, out, 30, "label.api_key_env=null"),
            )
            == 0
        )
        assert server.requests - before == 2 * (30 - len(kept)) and len(load_labels(out)) == 30


def test_label_auth_and_not_found_are_clear(lift_store, tmp_path, monkeypatch, capsys):
    with TeacherServer(lift_store, api_key="secret") as server:
        monkeypatch.setenv("VLM_TEST_KEY", "wrong")
        code = run("label", "label", tmp_path / "r", *label_args(lift_store, server.url, tmp_path / "l.jsonl", 4))
        assert code == 3 and "API key" in capsys.readouterr().out
        kw = dict(timeout_s=5, max_retries=0, backoff_s=0.01, backoff_max_s=0.01, max_tokens=16, temperature=0.0)
        with pytest.raises(VLMError, match="label.model='other'"):
            ChatClient(server.url, "other", "secret", **kw).complete([{"role": "user", "content": "hi"}])
    assert not (tmp_path / "l.jsonl").exists() or load_labels(tmp_path / "l.jsonl") == []
    with pytest.raises(ConfigError, match="label.model"):
        run("label", "label", tmp_path / "r", f"label.data={lift_store}")


def progress_store(path: Path, n_episodes: int = 4, steps: int = 25) -> tuple[Path, np.ndarray]:
    """16x16 frames whose filled rows grow with a hidden progress value (the ground truth)."""
    feats = {"obs.cam_image": Feature((16, 16, 3), "uint8"), "action": Feature((2,))}
    store = EpisodeStore.create(path, feats, fps=10)
    w = store.writer()
    rng = np.random.default_rng(0)
    progress = []
    for e in range(n_episodes):
        w.begin()
        for t in range(steps):
            p = (t / (steps - 1)) * (0.5 + 0.5 * e / n_episodes)
            img = rng.integers(0, 40, (16, 16, 3)).astype(np.uint8)
            img[16 - int(round(p * 15)) - 1 :, :, 1] = 220
            w.add({"obs.cam_image": img, "action": np.zeros(2, np.float32)})
            progress.append(p)
        w.save()
    store.close()
    return path, np.asarray(progress)


def oracle_labels(store_path: Path, progress: np.ndarray, out: Path, n: int) -> None:
    store = EpisodeStore.open(store_path)
    images = store.array("obs.cam_image")
    log = LabelLog(out)
    rng = np.random.default_rng(1)
    for _ in range(n):
        i, j = (int(x) for x in rng.choice(len(progress), 2, replace=False))
        label = -1 if abs(progress[i] - progress[j]) < 0.02 else int(progress[j] > progress[i])
        log.append(
            {"i": i, "j": j, "a": {"sha": image_sha(images[i])}, "b": {"sha": image_sha(images[j])}, "label": label}
        )


def test_bradley_terry_ranks_progress_and_relabel_keeps_old_columns(tmp_path):
    from scipy.stats import spearmanr

    from robot_rl.reward.preference import load_reward_model

    store_path, progress = progress_store(tmp_path / "store")
    labels = tmp_path / "labels.jsonl"
    oracle_labels(store_path, progress, labels, 300)
    rm_args = [
        f"reward_model.data={store_path}",
        f"reward_model.labels={labels}",
        "reward_model.image_key=cam_image",
        "reward_model.steps=150",
        "reward_model.val_every=50",
        "reward_model.batch_size=32",
        "reward_model.random_shift_pad=0",
        *TINY_RM,
    ]
    assert run("reward_model", "reward_model", tmp_path / "rm", *rm_args) == 0
    summary = json.loads((tmp_path / "rm" / "reward_model_summary.json").read_text())
    assert summary["val_accuracy"] > 0.8 and summary["train_pairs"] + summary["val_pairs"] <= 300
    model, _ = load_reward_model(tmp_path / "rm")
    images = EpisodeStore.open(store_path).array("obs.cam_image")
    assert spearmanr(model.rewards(images), progress).statistic > 0.8

    relabel = [f"relabel.data={store_path}", f"relabel.reward_model={tmp_path / 'rm'}"]
    assert run("relabel", "relabel", tmp_path / "rl1", *relabel) == 0
    first = EpisodeStore.open(store_path).derived("reward_vlm_v1").copy()
    assert run("relabel", "relabel", tmp_path / "rl2", *relabel, "relabel.next_frame=false") == 0
    store = EpisodeStore.open(store_path)
    assert list(store.derived_columns()) == ["reward_vlm_v1", "reward_vlm_v2"]
    np.testing.assert_array_equal(store.derived("reward_vlm_v1"), first)  # the old version is untouched
    assert set(store.features) == {"obs.cam_image", "action"}  # recorded columns unchanged
    # next_frame: step t carries r(frame t+1), the last step of an episode its own frame
    v2 = store.derived("reward_vlm_v2")
    np.testing.assert_allclose(first[:24], v2[1:25], rtol=1e-5)
    assert first[24] == pytest.approx(v2[24])


def test_offline_rl_end_to_end_writes_a_loadable_policy(lift_store, tmp_path):
    from robot_rl.policies.checkpoint import load_policy

    with TeacherServer(lift_store, noise=0.1, abstain=0.3) as server:
        out = lift_store / "labels" / "e2e.jsonl"
        args = label_args(lift_store, server.url, out, 40, "label.api_key_env=null", "label.concurrency=8")
        assert run("label", "label", tmp_path / "label", *args) == 0
    rm = [f"reward_model.data={lift_store}", f"reward_model.labels={out}", "reward_model.steps=20", *TINY_RM]
    assert run("reward_model", "reward_model", tmp_path / "rm", *rm) == 0
    assert (
        run(
            "relabel",
            "relabel",
            tmp_path / "rl",
            f"relabel.data={lift_store}",
            f"relabel.reward_model={tmp_path / 'rm'}",
        )
        == 0
    )
    orl = [
        f"offline_rl.data={lift_store}",
        "offline_rl.bc.steps=8",
        "offline_rl.bc.batch_size=16",
        "offline_rl.bc.warmup_steps=0",
        "offline_rl.bc.progress=false",
        "offline_rl.bc.tensorboard=false",
        "offline_rl.image_encoder.channels=[8,8]",
        "offline_rl.image_encoder.strides=[2,2]",
        "offline_rl.image_encoder.num_keypoints=4",
        "offline_rl.image_encoder.n_groups=4",
        "offline_rl.actor_hidden=[32]",
        "offline_rl.iql.q_hidden=[32]",
        "offline_rl.iql.v_hidden=[32]",
        "offline_rl.iql.steps=20",
        "offline_rl.iql.batch_size=16",
        "offline_rl.eval_episodes=1",
        "offline_rl.eval_max_steps=3",
        "offline_rl.device=cpu",
    ]
    assert run("offline_rl", "offline_rl", tmp_path / "orl", *orl) == 0
    summary = json.loads((tmp_path / "orl" / "offline_rl.json").read_text())
    assert summary["reward"] == "reward_vlm_v1" and summary["iql"]["steps"] == 20
    assert summary["eval_iql"]["episodes"] == 1 and summary["eval_bc"]["episodes"] == 1
    policy = load_policy(tmp_path / "orl" / "policy", "cpu")
    assert policy.manifest["kind"] == "sac" and policy.manifest["training"]["source"] == "offline-rl/iql"
    store = EpisodeStore.open(lift_store)
    obs = {k[len("obs.") :]: v[5] for k, v in store.episode(0).items() if k.startswith("obs.")}
    action = policy.select_action(obs)
    assert action.shape == (7,) and np.all(np.isfinite(action))
    # the ground-truth sparse reward with the same BC encoder (bc_from)
    gt = [*orl, "offline_rl.reward=success", "offline_rl.done_key=success", "offline_rl.reward_norm=none"]
    assert (
        run(
            "offline_rl",
            "offline_rl",
            tmp_path / "gt",
            *gt,
            f"offline_rl.bc_from={tmp_path / 'orl'}",
            "offline_rl.eval_episodes=0",
        )
        == 0
    )
    with pytest.raises(ConfigError, match="derived column"):
        run("offline_rl", "offline_rl", tmp_path / "bad", *orl, "offline_rl.reward=nope")
