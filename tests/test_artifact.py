"""Deployment artefacts: export from a checkpoint, load without hydra/omegaconf/training code, integrity checks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from robot_rl.interfaces import Feature
from robot_rl.policies.artifact import (
    FORMAT_VERSION,
    ArtifactError,
    export_artifact,
    load_artifact,
    main_export,
    read_manifest,
)
from robot_rl.policies.checkpoint import load_policy

from builders import random_store, tiny_diffusion, train_policy

pytestmark = pytest.mark.usefixtures("one_thread")
ROBOT_CFG = {"type": "robosuite", "env_name": "Lift", "safety": {"safe_action": [0.0, float("nan")]}}


def make_store(path):
    feats = {
        "obs.state": Feature((4,)),
        "obs.vel": Feature((3,)),
        "action": Feature((2,), names=("a0", "a1"), low=-np.ones(2), high=np.ones(2)),
    }
    random_store(
        path, feats, episodes=3, steps=12, fps=15, info={"robot": "toy", "robot_config": ROBOT_CFG, "task": "t"}
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("art")
    make_store(tmp / "store")
    out = {}
    policies = {"diffusion": tiny_diffusion(num_inference_steps=4), "mlp": ["policy=mlp", "policy.hidden=[16]"]}
    for kind, extra in policies.items():
        out[kind] = train_policy(
            tmp / "store", tmp / kind, "train.steps=3", "train.batch_size=8", "train.warmup_steps=1", *extra
        )
    return tmp, out


def test_round_trip_gives_identical_chunks(runs):
    tmp, r = runs
    m = export_artifact(r["diffusion"], tmp / "art_d")
    assert sorted(p.name for p in (tmp / "art_d").iterdir()) == ["manifest.json", "policy.safetensors"]
    assert m["format_version"] == FORMAT_VERSION and m["kind"] == "diffusion"
    assert m["obs"] == {"state": {"shape": [4], "dtype": "float32"}, "vel": {"shape": [3], "dtype": "float32"}}
    assert m["action"]["names"] == ["a0", "a1"] and m["action"]["low"] == [-1.0, -1.0]
    assert (m["obs_horizon"], m["action_horizon"], m["n_action_steps"]) == (2, 8, 4)
    assert m["scheduler"]["inference"] == "ddim" and m["scheduler"]["num_inference_steps"] == 4
    assert m["fps"] == 15 and m["training"]["step"] == 3 and m["training"]["ema"] is True
    assert m["robot"]["config"]["safety"]["safe_action"] == [0.0, None]  # NaN (hold) as strict-JSON null
    assert len(m["weights"]["sha256"]) == 64
    json.loads((tmp / "art_d" / "manifest.json").read_text())  # strict JSON (no NaN literals)

    ckpt_policy = load_policy(r["diffusion"], device="cpu")
    art_policy = load_artifact(tmp / "art_d", device="cpu")
    assert not art_policy.training and art_policy.artifact_manifest["fps"] == 15
    window = {"state": torch.randn(3, 2, 4), "vel": torch.randn(3, 2, 3)}
    noise = torch.randn(3, 8, 2)
    a = ckpt_policy.predict_chunk(window, init_noise=noise)
    b = art_policy.predict_chunk(window, init_noise=noise)
    assert torch.equal(a, b)
    sa, sb = ckpt_policy.state_dict(), art_policy.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # EMA weights + normaliser


def test_mlp_round_trip(runs):
    tmp, r = runs
    export_artifact(r["mlp"], tmp / "art_m")
    p1, p2 = load_policy(r["mlp"], device="cpu"), load_artifact(tmp / "art_m", device="cpu")
    o = {"state": np.ones(4, np.float32), "vel": np.zeros(3, np.float32)}
    np.testing.assert_array_equal(p1.select_action(o), p2.select_action(o))


def test_tampered_weights_and_versions_fail_clearly(runs, tmp_path):
    tmp, r = runs
    art = tmp_path / "art"
    export_artifact(r["diffusion"], art)
    w = art / "policy.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        load_artifact(art, device="cpu")
    export_artifact(r["diffusion"], art, overwrite=True)
    load_artifact(art, device="cpu")
    m = json.loads((art / "manifest.json").read_text())
    (art / "manifest.json").write_text(json.dumps({**m, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ArtifactError, match="newer than this robot_rl reads"):
        load_artifact(art, device="cpu")
    with pytest.raises(ArtifactError, match="not a policy directory"):
        read_manifest(tmp_path)
    with pytest.raises(ArtifactError, match="exists and is not empty"):
        export_artifact(r["diffusion"], art)


def test_export_cli(runs, tmp_path, capsys):
    _, r = runs
    assert main_export([str(r["diffusion"] / "checkpoints" / "step_3"), str(tmp_path / "a")]) == 0
    assert "sha256" in capsys.readouterr().out
    assert main_export([str(r["diffusion"]), str(tmp_path / "a")]) == 2  # exists
    assert main_export([str(tmp_path / "nothing"), str(tmp_path / "b")]) == 2


def test_loading_needs_no_hydra_omegaconf_or_training_code(runs):
    tmp, r = runs
    art = tmp / "art_sub"
    if not art.exists():
        export_artifact(r["diffusion"], art)
    code = f"""
import sys, torch
from robot_rl.policies.artifact import load_artifact
p = load_artifact({str(art)!r}, device="cpu")
chunk = p.predict_chunk({{"state": torch.zeros(1, 2, 4), "vel": torch.zeros(1, 2, 3)}})
assert chunk.shape == (1, 8, 2) and torch.isfinite(chunk).all()
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("hydra", "omegaconf", "zarr")
             or m in ("robot_rl.commands.train", "robot_rl.config", "robot_rl.data.episode_store"))
print("LOADED_MODULES_OK" if not bad else f"UNWANTED {{bad}}")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "LOADED_MODULES_OK" in out.stdout, out.stdout + out.stderr
