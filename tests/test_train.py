"""robot_rl.commands.train: offline BC on the shared training loop — learning, checkpoints (one policy format),
load_policy, exact resume, MLP, LeRobot input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from robot_rl.config import ConfigError
from robot_rl.data.episode_store import EpisodeStore
from robot_rl.policies.diffusion import DiffusionPolicy
from robot_rl.policies.mlp import MLPPolicy
from robot_rl.commands.train import Trainer, main
from robot_rl.policies.checkpoint import load_policy

from builders import TINY_IMAGE, tiny_diffusion, toy_store, train_config

pytestmark = pytest.mark.usefixtures("one_thread")


def train_cfg(data, *overrides):
    return train_config(
        data,
        "train.batch_size=16",
        "train.warmup_steps=5",
        "train.lr=1e-3",
        "train.log_every=5",
        *tiny_diffusion(num_inference_steps=5, image=TINY_IMAGE),
        *overrides,
    )


def test_loss_decreases_checkpoint_and_load_policy(tmp_path):
    toy_store(tmp_path / "store")
    cfg = train_cfg(
        tmp_path / "store",
        "train.steps=60",
        "train.val_ratio=0.34",
        "train.val_every=30",
        "train.lr=3e-3",
        "train.batch_size=64",
        "policy.down_dims=[32,64]",
        "train.tensorboard=true",
    )
    tr = Trainer(cfg, tmp_path / "run")
    assert len(tr.val_episodes) == 2 and len(tr.train_episodes) == 4
    s = tr.run()
    assert s["step"] == 60 and s["finished"] and s["val"]["loss"] is not None
    assert np.mean(tr.losses[-10:]) < 0.6 * np.mean(tr.losses[:10]), tr.losses
    ckpt = tmp_path / "run" / "checkpoints" / "step_60"
    for name in (
        "manifest.json",
        "policy.safetensors",
        "raw_policy.safetensors",
        "optimizer.pt",
        "trainer_state.json",
        "config.yaml",
    ):
        assert (ckpt / name).exists(), name
    assert json.loads((tmp_path / "run" / "checkpoints" / "latest").read_text()) == {"step": 60, "path": "step_60"}
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["kind"] == "diffusion" and manifest["fps"] == 10 and manifest["training"]["step"] == 60
    assert manifest["training"]["source"] == "train" and manifest["training"]["ema"] is True
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    # the EMA weights (deployed) differ from the optimised ones; normaliser stats are inside the safetensors
    ema, raw = load_file(ckpt / "policy.safetensors"), load_file(ckpt / "raw_policy.safetensors")
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if "unet" in k)
    assert any(k.startswith("normalizer.") and "action" in k for k in ema)
    # round trip: the same chunk from the same starting noise, from any path form
    for where in (ckpt, tmp_path / "run"):
        pol = load_policy(where)
        assert isinstance(pol, DiffusionPolicy) and not pol.training
        window = tr.sampler.get(np.arange(5))
        obs = {k: v for k, v in window.items() if k.startswith("obs.")}
        noise = torch.randn(5, 8, 2)
        assert torch.equal(pol.predict_chunk(obs, init_noise=noise), tr.model.predict_chunk(obs, init_noise=noise))
    raw_pol = load_policy(ckpt, weights="raw")
    assert torch.equal(raw_pol.unet.final[1].weight, tr.policy.unet.final[1].weight)


def test_image_observations_train(tmp_path):
    toy_store(tmp_path / "store", episodes=3, steps=12, image=True)
    tr = Trainer(train_cfg(tmp_path / "store", "train.steps=4"), tmp_path / "run")
    assert tr.policy.obs_keys == ["state", "cam_image"]
    tr.run()
    pol = load_policy(tmp_path / "run")
    pol.reset()
    a = pol.select_action({"state": np.zeros(4, np.float32), "cam_image": np.zeros((16, 16, 3), np.uint8)})
    assert a.shape == (2,) and np.isfinite(a).all()


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    toy_store(tmp_path / "store")
    over = ["train.steps=10", "train.checkpoint_every=5"]
    straight = Trainer(train_cfg(tmp_path / "store", *over), tmp_path / "a")
    straight.run()

    first = Trainer(train_cfg(tmp_path / "store", *over), tmp_path / "b")
    s = first.run(stop_after=5)  # as if killed right after the step-5 checkpoint
    assert s["step"] == 5 and not s["finished"]
    del first
    resumed = Trainer(train_cfg(tmp_path / "store", *over, "train.resume=true"), tmp_path / "b")
    assert resumed.step == 5
    s = resumed.run()
    assert s["step"] == 10 and s["finished"]

    # same batches, same noise, same optimiser/EMA/LR state: on CPU the runs are bit-identical
    assert resumed.losses == straight.losses and len(straight.losses) == 10
    for name in ("policy.safetensors", "raw_policy.safetensors"):
        a = load_file(tmp_path / "a" / "checkpoints" / "step_10" / name)
        b = load_file(tmp_path / "b" / "checkpoints" / "step_10" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_resume_without_checkpoint_and_bad_config(tmp_path):
    toy_store(tmp_path / "store", episodes=2, steps=10)
    with pytest.raises(ConfigError, match="nothing to resume"):
        Trainer(train_cfg(tmp_path / "store", "train.resume=true"), tmp_path / "run")
    with pytest.raises(ConfigError, match="data_format"):
        Trainer(train_cfg(tmp_path / "store", "train.data_format=zip"), tmp_path / "run")
    with pytest.raises(ConfigError, match="not an episode store"):
        Trainer(train_cfg(tmp_path / "nowhere"), tmp_path / "run")
    with pytest.raises(ConfigError, match="policy.type"):
        Trainer(train_cfg(tmp_path / "store", "policy.type=none"), tmp_path / "run")


def test_mlp_policy_trains_through_the_same_trainer(tmp_path):
    toy_store(tmp_path / "store")
    cfg = train_config(
        tmp_path / "store",
        "policy=mlp",
        "policy.hidden=[32]",
        "train.steps=80",
        "train.lr=3e-3",
        "train.batch_size=32",
        "train.warmup_steps=0",
        "train.ema=false",
    )
    assert main(cfg, tmp_path / "run") == 0
    pol = load_policy(tmp_path / "run")
    assert isinstance(pol, MLPPolicy) and pol.obs_keys == ["state"]
    store = EpisodeStore.open(tmp_path / "store")
    s, a = store.array("obs.state"), store.array("action")
    pred = np.stack([pol.select_action({"state": x}) for x in s[:50]])
    baseline = np.mean((a[:50] - a.mean(0)) ** 2)
    assert np.mean((pred - a[:50]) ** 2) < 0.5 * baseline


def test_lerobot_input_is_imported_once(tmp_path):
    interchange = pytest.importorskip("robot_rl.data.interchange")
    toy_store(tmp_path / "store", episodes=2, steps=10)
    ds = interchange.export_lerobot(tmp_path / "store", tmp_path / "ds", repo_id="local/toy", use_videos=False)
    cfg = train_cfg(ds, "train.data_format=lerobot", "train.steps=2")
    tr = Trainer(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "imported_store" / "meta.json").exists()
    assert tr.store.num_episodes == 2
    tr.run()
    assert isinstance(load_policy(tmp_path / "run"), DiffusionPolicy)
