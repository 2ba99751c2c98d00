"""robot_rl.training.loop: the offline loop knows nothing of policies — a tiny regression MLP trains, checkpoints,
measures and resumes bit-exactly through it (the way a reward model, VAE or critic will)."""

from __future__ import annotations

import copy
import json
import os
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from robot_rl.config import ConfigError
from robot_rl.training.loop import Hook, LoopConfig, TrainingLoop, seed_everything, to_device

from builders import loop_config

X = np.random.default_rng(0).normal(size=(256, 3)).astype(np.float32)
Y = np.tanh(X @ np.array([[1.0], [-2.0], [0.5]], np.float32)).astype(np.float32)

pytestmark = pytest.mark.usefixtures("one_thread")


def config(**over) -> LoopConfig:
    return loop_config(**over)


def regression_loop(run_dir, cfg: LoopConfig) -> TrainingLoop:
    """A 2-layer MLP fitting y(x) with dropout (torch RNG inside the loss) on batches from the loop's numpy RNG,
    plus a Polyak-averaged target copy (as IQL's critics keep), checkpointed with it."""
    seed_everything(cfg.seed)
    net = nn.Sequential(nn.Linear(3, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))
    model = nn.ModuleDict({"net": net, "target": copy.deepcopy(net).requires_grad_(False)})

    @torch.no_grad()
    def polyak():
        for t, p in zip(model["target"].parameters(), net.parameters()):
            t.lerp_(p, 0.1)

    def batches(rng):
        idx = rng.integers(0, len(X), cfg.batch_size)
        return to_device({"x": X[idx], "y": Y[idx]}, torch.device("cpu"))

    def step_fn(batch):
        err = net(batch["x"]) - batch["y"]
        return (err**2).mean(), {"abs_err": float(err.detach().abs().mean())}

    def val():
        deployed = loop.deployable["net"].eval()
        with torch.no_grad():
            mse = float(((deployed(torch.as_tensor(X)) - torch.as_tensor(Y)) ** 2).mean())
        return {"mse": mse, "noise": float(torch.randn(()))}  # draws from torch's RNG: must not disturb training

    loop = TrainingLoop(
        run_dir,
        model,
        step_fn,
        batches,
        cfg,
        name="fit",
        hooks=[Hook("val", 10, val, at_start=True)],
        weights_file="model.safetensors",
        config_yaml="fit: {}\n",
        after_step=polyak,
        state=lambda: {"dataset": "toy"},
        summary=lambda: {"kind": "regression"},
    )
    return loop


def test_regression_trains_checkpoints_and_resumes_bit_exactly(tmp_path):
    straight = regression_loop(tmp_path / "a", config())
    s = straight.run()
    assert s["finished"] and s["step"] == 40 and s["kind"] == "regression"
    assert np.mean(straight.losses[-5:]) < 0.5 * np.mean(straight.losses[:5]), straight.losses
    assert [st for st, _ in straight.history["val"]] == [0, 10, 20, 30, 40]
    assert straight.history["val"][-1][1]["mse"] < straight.history["val"][0][1]["mse"]
    ckpt = tmp_path / "a" / "checkpoints" / "step_40"
    for name in ("model.safetensors", "raw_model.safetensors", "optimizer.pt", "trainer_state.json", "config.yaml"):
        assert (ckpt / name).is_file(), name
    assert json.loads((tmp_path / "a" / "checkpoints" / "latest").read_text()) == {"path": "step_40", "step": 40}
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["dataset"] == "toy" and len(state["losses"]) == 40
    assert json.loads((tmp_path / "a" / "fit_summary.json").read_text())["val"]["mse"] == s["val"]["mse"]

    first = regression_loop(tmp_path / "b", config())
    assert first.run(stop_after=20)["step"] == 20  # as if killed right after the step-20 checkpoint
    resumed = regression_loop(tmp_path / "b", config())
    assert resumed.resume()["dataset"] == "toy" and resumed.step == 20
    assert resumed.run()["finished"]
    assert resumed.losses == straight.losses
    assert resumed.history["val"] == straight.history["val"]
    for name in ("model.safetensors", "raw_model.safetensors"):
        a, b = load_file(ckpt / name), load_file(tmp_path / "b" / "checkpoints" / "step_40" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ema, raw = load_file(ckpt / "model.safetensors"), load_file(ckpt / "raw_model.safetensors")
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if k.startswith("net."))
    assert not torch.equal(raw["target.0.weight"], raw["net.0.weight"])  # the target lags, and is checkpointed


def test_without_ema_keep_last_and_stop_request(tmp_path):
    loop = regression_loop(tmp_path / "run", config(ema=False, checkpoint_every=10, keep_last=2))
    inner = loop.step_fn

    def ctrl_c_at_step_3(batch):
        if loop.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 3: it finishes, is checkpointed, stop
        return inner(batch)

    loop.step_fn = ctrl_c_at_step_3
    s = loop.run()
    assert s["step"] == 3 and not s["finished"] and loop.stopped
    assert json.loads((tmp_path / "run" / "checkpoints" / "latest").read_text())["step"] == 3
    loop.step_fn = inner
    loop._stop.clear()
    loop.run()
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step_30", "step_40"]
    assert not (tmp_path / "run" / "checkpoints" / "step_40" / "raw_model.safetensors").exists()
    again = regression_loop(tmp_path / "run", config(ema=False))
    again.resume()
    assert again.step == 40 and all(
        torch.equal(a, b) for a, b in zip(again.model.parameters(), loop.model.parameters())
    )


def test_config_errors_name_the_section(tmp_path):
    section = {**config().__dict__, "steps": 0}
    with pytest.raises(ConfigError, match="distill.steps"):
        LoopConfig.from_section(section, "distill")
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        LoopConfig.from_section({**config().__dict__, "lr_schedule": "step"}, "train")
    with pytest.raises(ConfigError, match="nothing to resume"):
        regression_loop(tmp_path / "empty", config()).resume()
    with pytest.raises(FloatingPointError, match="lower fit.lr"):
        loop = regression_loop(tmp_path / "nan", config())
        loop.step_fn = lambda batch: (torch.tensor(float("nan"), requires_grad=True), {})
        loop.run()
