"""Behavior retrieval: nearest-neighbour scoring against a brute-force reference (chunked == unchunked), the
selection rules, the β-VAE embedder, `robot-rl retrieve` end to end (selection view, report, pictures, copy),
training on target + selection at 50/50, the embeddings cache (reuse, a changed prior), and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from robot_rl.algos.retrieval import (
    RetrievalConfig,
    StateActionVAE,
    embed,
    nearest_distance,
    scores_from_distances,
    select,
    target_radius,
    vae_loss,
)
from robot_rl.commands.retrieve import main, retrieve
from robot_rl.commands.train import Trainer
from robot_rl.config import ConfigError
from robot_rl.data.episode_store import EpisodeStore
from robot_rl.data.mixture import MixtureSampler, WindowSource
from robot_rl.data.selection import read_selection
from robot_rl.data.sequence import SequenceSampler
from robot_rl.interfaces import Feature

from builders import TOY_GAIN, train_config
from conftest import robot_rl_cli

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_VAE = [
    "retrieve.embedder.steps=60",
    "retrieve.embedder.batch_size=64",
    "retrieve.embedder.hidden=[32,32]",
    "retrieve.embedder.latent_dim=4",
    "retrieve.embedder.progress=false",
    "retrieve.embedder.image.channels=[8,8]",
    "retrieve.embedder.image.strides=[2,1]",
    "retrieve.embedder.image.feature_dim=8",
    "retrieve.embedder.image.num_keypoints=4",
    "retrieve.embedder.image.n_groups=4",
    "retrieve.projection_points=200",
    "retrieve.num_threads=1",
]


def two_task_store(
    path, tasks=("reach", "push"), episodes=4, steps=15, seed=0, action_dim=2, image=False
) -> EpisodeStore:
    """Episodes of two toy tasks with their task string in the episode metadata: "reach" acts tanh(G s) from
    states near 0, "push" acts -tanh(G s) + 0.5 from states near 3 (different states and actions)."""
    feats = {"obs.state": Feature((4,)), "action": Feature((action_dim,))}
    if image:
        feats["obs.cam_image"] = Feature((16, 16, 3), "uint8")
    store = EpisodeStore.create(path, feats, fps=10, info={"task": "unlabelled"})
    w, rng = store.writer(), np.random.default_rng(seed)
    for task in tasks:
        for _ in range(episodes):
            push = task == "push"
            s = (rng.normal(size=4) + (3.0 if push else 0.0)).astype(np.float32)
            w.begin({"task": task})
            for _ in range(steps):
                a = np.tanh(TOY_GAIN @ s) * (-1 if push else 1) + (0.5 if push else 0.0)
                a = np.resize(a, action_dim).astype(np.float32)
                frame = {"obs.state": s, "action": a}
                if image:
                    img = np.zeros((16, 16, 3), np.uint8)
                    img[int(np.clip(4 * s[0] + 8, 0, 15)), int(np.clip(4 * s[1] + 8, 0, 15))] = 255
                    frame["obs.cam_image"] = img
                w.add(frame)
                s = (0.9 * s + 0.1 * np.resize(a, 4) + 0.02 * rng.normal(size=4)).astype(np.float32)
            w.save({"success": True})
    store.close()
    return EpisodeStore.open(path)


def retrieve_cfg(prior, target, *overrides):
    with initialize_config_module("robot_rl.configs", version_base=None):
        return compose(
            "retrieve", overrides=[f"retrieve.prior={prior}", f"retrieve.target={target}", *TINY_VAE, *overrides]
        )


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("retrieval")
    two_task_store(d / "prior", episodes=4, seed=0)
    two_task_store(d / "target", tasks=("reach",), episodes=2, seed=1)
    return d


# ------------------------------------------------------------------------------------------ scoring, selection


def test_nearest_distance_matches_brute_force_chunked_or_not():
    rng = np.random.default_rng(0)
    prior, target = rng.normal(size=(1003, 9)).astype(np.float32), rng.normal(size=(37, 9)).astype(np.float32)
    brute = np.sqrt(((prior[:, None, :].astype(np.float64) - target[None]) ** 2).sum(-1)).min(1)
    whole = nearest_distance(prior, target, chunk_size=len(prior), device=torch.device("cpu"))
    for chunk in (1, 64, 500):
        chunked = nearest_distance(prior, target, chunk_size=chunk, device=torch.device("cpu"))
        np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(whole, brute, rtol=1e-4, atol=1e-4)
    # a prior row equal to a target row is at distance 0 (no negative rounding under the square root)
    assert nearest_distance(target[:3], target, 2, torch.device("cpu")).max() < 1e-3


def test_scores_and_selection_rules():
    d = np.array([0.0, 1.0, 2.0, 4.0, 3.0], np.float32)
    s = scores_from_distances(d)
    np.testing.assert_allclose(s, [1.0, 0.75, 0.5, 0.0, 0.25])
    base = dict(latent_dim=1, hidden=[1], kl_weight=0.0, recon_image_size=1, image={}, chunk_size=1)
    rule = lambda **kw: RetrievalConfig(**{**base, "rule": "threshold", "threshold": 0.8, "top_k": 2,  # noqa: E731
                                            "top_fraction": 0.4, "radius": 1.5, "target_quantile": 0.5,
                                            **kw})  # fmt: skip
    assert select(s, d, rule()).tolist() == [0]
    assert select(s, d, rule(threshold=0.5)).tolist() == [0, 1, 2]
    assert select(s, d, rule(rule="top_k")).tolist() == [0, 1]
    assert select(s, d, rule(rule="top_fraction")).tolist() == [0, 1]
    assert select(s, d, rule(rule="radius")).tolist() == [0, 1]
    assert select(s, d, rule(threshold=1.5)).tolist() == []
    assert select(s, d, rule(rule="target_quantile"), calibrated_radius=2.5).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="calibrated"):
        select(s, d, rule(rule="target_quantile"))


def test_target_quantile_radius_is_leave_one_episode_out():
    """Three 1-d target episodes; each transition's distance to the nearest transition of the OTHER episodes, by
    hand: ep0 {0, 1} -> 2, 1 (nearest 2.0 in ep1); ep1 {2, 2.5} -> 1, 1.5; ep2 {6} -> 3.5. Sorted: 1, 1, 1.5, 2,
    3.5: median 1.5, q = 1 -> 3.5. The radius keeps exactly the prior rows within it, chunked or not."""
    target = np.array([[0.0], [1.0], [2.0], [2.5], [6.0]], np.float32)
    ends = np.array([2, 4, 5])
    cpu = torch.device("cpu")
    for chunk in (1, 2, 100):
        r, loo = target_radius(target, ends, 0.5, chunk, cpu)
        np.testing.assert_allclose(loo, [2.0, 1.0, 1.0, 1.5, 3.5], atol=1e-6)
        assert r == pytest.approx(1.5)
    assert target_radius(target, ends, 1.0, 2, cpu)[0] == pytest.approx(3.5)
    assert target_radius(target, ends, 0.0, 2, cpu)[0] == pytest.approx(1.0)
    prior = np.array([[-1.4], [-1.6], [4.0], [4.1], [7.4], [10.0]], np.float32)
    d = nearest_distance(prior, target, 4, cpu)  # 1.4, 1.6, 1.5, 1.6, 1.4, 4.0
    base = dict(latent_dim=1, hidden=[1], kl_weight=0.0, recon_image_size=1, image={}, chunk_size=4, threshold=0.8,
                top_k=1, top_fraction=0.1, radius=1.0)  # fmt: skip
    cfg = RetrievalConfig(rule="target_quantile", target_quantile=0.5, **base)
    assert select(scores_from_distances(d), d, cfg, r).tolist() == [0, 2, 4]
    # a prior that gains a far-away distractor changes every min-max score, not the calibrated radius or selection
    far = np.concatenate([prior, [[1000.0]]]).astype(np.float32)
    d_far = nearest_distance(far, target, 4, cpu)
    assert select(scores_from_distances(d_far), d_far, cfg, r).tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match="at least 2 target episodes"):
        target_radius(target, np.array([5]), 0.5, 2, cpu)


def test_vae_embedding_is_mean_plus_raw_action_and_loss_is_finite():
    base = dict(rule="threshold", threshold=0.8, top_k=1, top_fraction=0.1, radius=1.0, target_quantile=0.5,
                chunk_size=8)  # fmt: skip
    cfg = RetrievalConfig(latent_dim=3, hidden=[16], kl_weight=1e-4, recon_image_size=4,
                          image={"channels": [4], "strides": [2], "feature_dim": 4, "num_keypoints": 2, "n_groups": 2},
                          **base)  # fmt: skip
    feats = {"obs.state": Feature((4,)), "obs.cam_image": Feature((8, 8, 3), "uint8")}
    vae = StateActionVAE(feats, Feature((2,)), cfg)
    rng = np.random.default_rng(0)
    batch = {
        "obs.state": torch.as_tensor(rng.normal(size=(5, 4)), dtype=torch.float32),
        "obs.cam_image": torch.as_tensor(rng.integers(0, 255, size=(5, 8, 8, 3)), dtype=torch.uint8),
        "action": torch.as_tensor(rng.uniform(-1, 1, size=(5, 2)), dtype=torch.float32),
    }
    loss, parts = vae_loss(vae, batch, 1e-4)
    assert torch.isfinite(loss) and parts["recon"] > 0 and parts["kl"] >= 0
    loss.backward()
    assert vae.obs_encoder.image_encoders["obs__dot__cam_image"].proj[0].weight.grad.abs().sum() > 0
    e = embed(vae.eval(), batch)
    assert e.shape == (5, 3 + 2) and torch.equal(e[:, 3:], batch["action"])


# ------------------------------------------------------------------------------------------ the command, training


def test_retrieve_finds_the_target_task_and_the_selection_trains(stores, tmp_path):
    prior = EpisodeStore.open(stores / "prior")
    rep = retrieve(retrieve_cfg(stores / "prior", stores / "target", "retrieve.select.rule=top_fraction",
                                "retrieve.select.top_fraction=0.5", f"retrieve.copy_to={tmp_path / 'copy'}",
                                f"retrieve.cache_dir={tmp_path / 'cache'}"), tmp_path / "run")  # fmt: skip
    assert rep["kept"] == prior.num_steps // 2
    per_task = rep["per_task"]
    assert per_task["reach"]["kept"] >= 0.8 * rep["kept"], per_task  # chance: 0.5
    assert sum(e["kept"] for e in rep["per_episode"]) == rep["kept"]
    for name in ("retrieve_report.json", "retrieval_scores.png", "retrieval_projection.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    # the view round-trips: its rows are the kept steps with their scores, nothing of the prior copied
    sel, same_prior = read_selection(tmp_path / "run" / "selection")
    assert len(sel) == rep["kept"] and sel.score.min() >= 0 and sel.score.max() <= 1
    assert sorted(p.name for p in (tmp_path / "run" / "selection").iterdir()) == ["rows.npz", "selection.json"]
    rows = sel.rows(same_prior)
    assert len(np.unique(rows)) == len(rows)
    # ... and copy_to copied exactly those steps
    copy = EpisodeStore.open(tmp_path / "copy")
    assert copy.num_steps == rep["kept"]
    np.testing.assert_array_equal(np.sort(copy.array("action"), 0), np.sort(prior.array("action")[np.sort(rows)], 0))
    # retrieval BC: target + selection at 50/50 per batch, through robot-rl train's Trainer
    mix = f"[{stores / 'target'},{tmp_path / 'run' / 'selection'}]"
    cfg = train_config(mix, "policy=mlp", "policy.hidden=[16]", "train.weights=[0.5,0.5]", "train.steps=4",
                       "train.batch_size=9", "train.warmup_steps=1")  # fmt: skip
    tr = Trainer(cfg, tmp_path / "bc")
    assert tr.sampler.counts(9, np.random.default_rng(0)).tolist() in ([5, 4], [4, 5])
    assert len(tr.sampler.sources[1]) == rep["kept"]
    assert tr.run()["finished"]


def test_mixture_shares_and_uniform_concatenation():
    def src(n, value):
        data = {"obs.x": np.full((n, 1), value, np.float32), "action": np.full((n, 1), value, np.float32)}
        return WindowSource(str(value), SequenceSampler(data, [n], ["obs.x"], obs_horizon=1, action_horizon=1))

    rng = np.random.default_rng(0)
    weighted = MixtureSampler([src(10, 0.0), src(1000, 1.0)], [0.5, 0.5])
    b = weighted.sample(256, rng)
    assert (b["action"] == 0).sum() == 128  # exactly half from the small dataset, every batch
    uniform = MixtureSampler([src(10, 0.0), src(1000, 1.0)])
    share = np.mean([(uniform.sample(256, rng)["action"] == 0).mean() for _ in range(50)])
    assert abs(share - 10 / 1010) < 0.01
    assert weighted.get(np.array([1009, 0, 10]))["action"][:, 0, 0].tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="finite"):
        MixtureSampler([src(3, 0.0), src(3, 1.0)], [1.0, float("nan")])
    with pytest.raises(ValueError, match="one weight per dataset"):
        MixtureSampler([src(3, 0.0)], [0.5, 0.5])


def test_cache_is_reused_until_the_prior_changes(tmp_path, caplog):
    two_task_store(tmp_path / "prior", episodes=3, seed=0)
    two_task_store(tmp_path / "target", tasks=("push",), episodes=1, seed=1)
    cfg = retrieve_cfg(tmp_path / "prior", tmp_path / "target", "retrieve.select.rule=threshold",
                       "retrieve.select.threshold=0.7")  # fmt: skip
    first = retrieve(cfg, tmp_path / "r1")
    assert first["embedder"]["reused"] is False and list((tmp_path / "prior" / "retrieval_cache").glob("vae_*"))
    second = retrieve(cfg, tmp_path / "r2")
    assert second["embedder"]["reused"] is True and second["kept"] == first["kept"]
    # the prior gains an episode: refused with on_stale=error (nothing written), recomputed by default
    store = EpisodeStore.open(tmp_path / "prior", "a")
    w = store.writer()
    for t in range(5):
        w.add({"obs.state": np.full(4, t, np.float32), "action": np.zeros(2, np.float32)})
    w.save()
    store.close()
    stale = retrieve_cfg(tmp_path / "prior", tmp_path / "target", "retrieve.on_stale=error",
                         "retrieve.select.rule=threshold")  # fmt: skip
    with pytest.raises(ConfigError, match="changed since its embeddings were cached"):
        retrieve(stale, tmp_path / "r3")
    assert not (tmp_path / "r3" / "selection").exists()
    with caplog.at_level("WARNING"):
        third = retrieve(cfg, tmp_path / "r4")
    assert (
        "changed since its embeddings were cached" in caplog.text
        and "6 episodes / 90 steps then, 7 / 95 now" in caplog.text
    )
    assert third["embedder"]["reused"] is False and third["prior_steps"] == first["prior_steps"] + 5
    assert retrieve(cfg, tmp_path / "r5")["embedder"]["reused"] is True
    # a selection over the old prior is refused by train (its rows would point at other data)
    with pytest.raises(ConfigError, match="changed since the selection was made"):
        Trainer(train_config(f"[{tmp_path / 'target'},{tmp_path / 'r1' / 'selection'}]", "policy=mlp"), tmp_path / "bc")


def test_image_observations(tmp_path):
    two_task_store(tmp_path / "prior", episodes=2, steps=10, image=True)
    two_task_store(tmp_path / "target", tasks=("reach",), episodes=1, steps=10, seed=1, image=True)
    rep = retrieve(retrieve_cfg(tmp_path / "prior", tmp_path / "target", "retrieve.embedder.steps=5",
                                "retrieve.embedder.latent_dim=8", "retrieve.select.rule=threshold"),
                   tmp_path / "run")  # fmt: skip
    assert rep["embedding_dim"] == 8 + 2 and rep["kept"] >= 1


def test_bad_input_is_a_clear_error_and_writes_nothing(stores, tmp_path):
    two_task_store(tmp_path / "wide", tasks=("reach",), episodes=1, action_dim=3)
    with pytest.raises(ConfigError, match=r"does not match the prior.*action is \(3,\), the prior's \(2,\)"):
        retrieve(retrieve_cfg(stores / "prior", tmp_path / "wide"), tmp_path / "r1")
    other = EpisodeStore.create(tmp_path / "other_keys", {"obs.joints": Feature((4,)), "action": Feature((2,))}, 10)
    w = other.writer()
    w.add({"obs.joints": np.zeros(4, np.float32), "action": np.zeros(2, np.float32)})
    w.save()
    other.close()
    with pytest.raises(ConfigError, match="obs.state is missing"):
        retrieve(retrieve_cfg(stores / "prior", tmp_path / "other_keys"), tmp_path / "r2")
    with pytest.raises(ConfigError, match="empty selection.*δ=1.5.*Nothing was written"):
        retrieve(retrieve_cfg(stores / "prior", stores / "target", "retrieve.select.rule=threshold",
                              "retrieve.select.threshold=1.5", f"retrieve.output={tmp_path / 'sel'}"),
                 tmp_path / "r3")  # fmt: skip
    with pytest.raises(ConfigError, match="within radius 0"):
        retrieve(retrieve_cfg(stores / "prior", stores / "target", "retrieve.select.rule=radius",
                              "retrieve.select.radius=0"), tmp_path / "r4")  # fmt: skip
    two_task_store(tmp_path / "push_only", tasks=("push",), episodes=2, seed=3)  # far from the reach demos
    with pytest.raises(ConfigError, match="within the calibrated radius.*q=0.5"):
        retrieve(retrieve_cfg(tmp_path / "push_only", stores / "target", "retrieve.select.chunk_size=7"),
                 tmp_path / "r6")  # fmt: skip
    # target_quantile on a one-episode target: refused before anything is fitted
    two_task_store(tmp_path / "one_demo", tasks=("reach",), episodes=1, seed=1)
    with pytest.raises(ConfigError, match="at least 2 demos"):
        retrieve(retrieve_cfg(stores / "prior", tmp_path / "one_demo", f"retrieve.cache_dir={tmp_path / 'c7'}"),
                 tmp_path / "r7")  # fmt: skip
    assert not (tmp_path / "c7").exists()
    assert not (tmp_path / "sel").exists()
    for run in ("r1", "r2", "r3", "r4", "r6", "r7"):
        assert not (tmp_path / run / "selection").exists() and not (tmp_path / run / "retrieve_report.json").exists()
    with pytest.raises(ConfigError, match="retrieve.target is empty"):
        retrieve(retrieve_cfg(stores / "prior", ""), tmp_path / "r5")


def test_cli(stores, tmp_path, capsys):
    assert main(retrieve_cfg(stores / "prior", stores / "target"), tmp_path / "run") == 0
    line = capsys.readouterr().out
    assert "prior transitions" in line and "reach:" in line and (tmp_path / "run" / "selection").is_dir()
    # the default rule, target_quantile: the report says the calibrated radius, q and what it kept
    rep = json.loads((tmp_path / "run" / "retrieve_report.json").read_text())
    cal = rep["target_calibration"]
    assert rep["rule"] == "target_quantile" and cal["q"] == 0.5 and "q 0.5" in line
    assert cal["radius"] == pytest.approx(cal["radius_at_q"]["0.5"]) and cal["kept_at_q"]["0.5"] == rep["kept"]
    assert (
        json.loads((tmp_path / "run" / "selection" / "selection.json").read_text())["calibrated_radius"]
        == (cal["radius"])
    )
    # the installed verb: a config error is exit 2 with the message, before anything is trained
    two_task_store(tmp_path / "wide", tasks=("reach",), episodes=1, action_dim=3)
    res = robot_rl_cli("retrieve", f"retrieve.prior={stores / 'prior'}", f"retrieve.target={tmp_path / 'wide'}",
                       f"hydra.run.dir={tmp_path / 'cli'}", timeout=120, threads=1)  # fmt: skip
    assert res.returncode == 2 and "does not match the prior" in res.stderr, res.stderr[-2000:]


def test_train_mixes_a_store_and_a_lerobot_dataset(stores, tmp_path):
    interchange = pytest.importorskip("robot_rl.data.interchange")
    ds = interchange.export_lerobot(stores / "target", tmp_path / "ds", repo_id="local/target", use_videos=False)
    mix = f"[{stores / 'prior'},{ds}]"
    cfg = train_config(mix, "train.data_format=auto", "policy=mlp", "policy.hidden=[16]", "train.weights=[0.25,0.75]",
                       "train.steps=2", "train.batch_size=8", "train.warmup_steps=1")  # fmt: skip
    tr = Trainer(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "imported_store_1" / "meta.json").exists()
    assert tr.sampler.counts(8, np.random.default_rng(0)).tolist() == [2, 6]
    assert tr.run()["finished"]
