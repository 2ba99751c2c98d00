"""Deployment artefact: a trained policy in a directory that loads without hydra, omegaconf or the training code.

    robot-rl export-policy outputs/<run> deploy/lift_v1      # run dir, checkpoints/ or checkpoints/step_<n>
    policy = load_artifact("deploy/lift_v1", device="auto")  # imports torch, safetensors, json, the policy module

The directory holds two files:

* `policy.safetensors`: the deployable weights (the EMA copy when the run kept one) with the normalisation
  statistics (buffers of the policy, so they travel with the weights).
* `manifest.json`: format + version, policy class and architecture config, observation keys with shapes/dtypes,
  action names/bounds, obs_horizon / action_horizon / n_action_steps, the noise scheduler and inference steps,
  the data's fps, the robot config it was recorded with (NaN entries written as null), training provenance
  (checkpoint, step, git hash) and the sha256 of `policy.safetensors`.

`load_artifact` checks the format version and the sha256 before it builds anything and fails with a message
that says what to do. Only the policy types named here are built (the manifest cannot name arbitrary code).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from robot_rl.interfaces import Feature

FORMAT = "robot_rl.policy_artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "policy.safetensors"
CLASSES = {"diffusion": "robot_rl.policies.diffusion.DiffusionPolicy", "mlp": "robot_rl.policies.mlp.MLPPolicy"}


class ArtifactError(RuntimeError):
    """An artefact that cannot be used as it is (missing files, other format version, modified weights)."""


def is_artifact(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _device(spec: str | torch.device) -> torch.device:
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(spec).startswith("cuda") and not torch.cuda.is_available():
        raise ArtifactError(f"device={spec!r} but CUDA is not available on this machine: use device=auto or cpu")
    return torch.device(spec)


def _json_safe(x: Any) -> Any:
    """NaN/inf -> None (strict JSON); numpy -> lists/scalars."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return _json_safe(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _feature(d: dict) -> Feature:
    low, high = d.get("low"), d.get("high")
    return Feature(shape=tuple(int(s) for s in d["shape"]), dtype=d.get("dtype", "float32"),
                   names=tuple(d["names"]) if d.get("names") else None,
                   low=None if low is None else np.asarray(low, np.float32),
                   high=None if high is None else np.asarray(high, np.float32))


# -------------------------------------------------------------------------------------------------- loading


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest, with the format and version checked."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{path} is not a policy artefact (no {MANIFEST}); make one with "
                            f"`robot-rl export-policy CHECKPOINT {path}`")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e}); re-export the artefact") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: format {manifest.get('format')!r} is not {FORMAT!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise ArtifactError(f"{mpath}: format_version missing or not an integer ({version!r})")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{path}: artefact format version {version} is newer than this robot_rl reads "
                            f"(up to {FORMAT_VERSION}): upgrade robot_rl on this machine or re-export the policy "
                            f"with the robot_rl installed here")
    if version < 1:
        raise ArtifactError(f"{path}: artefact format version {version} is not supported (expected "
                            f"{FORMAT_VERSION}); re-export the policy")
    return manifest


def verify_artifact(path: str | os.PathLike) -> dict:
    """Manifest checks plus the weights' sha256; returns the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    w = manifest.get("weights") or {}
    wpath = path / w.get("file", WEIGHTS)
    if not wpath.is_file():
        raise ArtifactError(f"{path}: weights file {wpath.name} is missing; copy the whole artefact directory")
    digest = sha256_file(wpath)
    if digest != w.get("sha256"):
        raise ArtifactError(f"{wpath}: sha256 mismatch (file {digest[:16]}..., manifest "
                            f"{str(w.get('sha256'))[:16]}...): the weights were modified or corrupted after "
                            f"export; copy the artefact again or re-export it")
    return manifest


def build_from_manifest(manifest: dict):
    """An untrained policy with the manifest's architecture (only the known policy types)."""
    kind = manifest["policy"]["type"]
    cfg = dict(manifest["policy"]["config"])
    obs = {k: _feature(d) for k, d in manifest["obs"].items()}
    action = _feature(manifest["action"])
    if kind == "diffusion":
        from robot_rl.policies.diffusion import DiffusionConfig, DiffusionPolicy

        cfg["obs_keys"] = list(obs)
        return DiffusionPolicy(DiffusionConfig.from_dict(cfg), obs, action)
    if kind == "mlp":
        from robot_rl.policies.mlp import MLPPolicy

        return MLPPolicy(list(obs), [int(np.prod(f.shape)) for f in obs.values()], int(np.prod(action.shape)),
                         [int(h) for h in cfg["hidden"]])
    raise ArtifactError(f"policy type {kind!r} is not one this robot_rl can build ({', '.join(CLASSES)})")


def load_artifact(path: str | os.PathLike, device: str | torch.device = "auto"):
    """The artefact's policy, in eval mode on `device` (auto | cpu | cuda[:N]); its manifest is attached as
    `policy.artifact_manifest`. Raises ArtifactError on a format/version/sha256 problem."""
    path = Path(path)
    manifest = verify_artifact(path)
    policy = build_from_manifest(manifest)
    state = load_file(str(path / manifest["weights"].get("file", WEIGHTS)))
    try:
        policy.load_state_dict(state)
    except RuntimeError as e:
        raise ArtifactError(f"{path}: the weights do not fit the manifest's architecture: {e}") from None
    policy = policy.to(_device(device)).eval()
    policy.artifact_manifest = manifest
    return policy


# ------------------------------------------------------------------------------------------------ exporting


def checkpoint_context(ckpt: Path) -> dict:
    """What a checkpoint knows beyond its weights, found next to it: the training data's fps and robot config
    (from the episode store it was trained on), the training step and the run's git hash. Missing pieces are
    None (e.g. the data was moved)."""
    out: dict[str, Any] = {"fps": None, "robot_config": None, "robot": None, "task": None, "data": None,
                           "step": None, "git": None}
    state = ckpt / "trainer_state.json"
    if state.is_file():
        try:
            out["step"] = int(json.loads(state.read_text()).get("step"))
        except (ValueError, TypeError, json.JSONDecodeError):
            pass
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    if run_dir is not None and (run_dir / "run_info.json").is_file():
        try:
            out["git"] = json.loads((run_dir / "run_info.json").read_text()).get("git")
        except json.JSONDecodeError:
            pass
    cfg_path = ckpt / "config.yaml"
    if cfg_path.is_file():
        import yaml

        cfg = yaml.safe_load(cfg_path.read_text()) or {}
        train = cfg.get("train") or {}
        data = train.get("data")
        if train.get("data_format") == "lerobot":
            data = train.get("import_dir") or (str(run_dir / "imported_store") if run_dir is not None else None)
        if data:
            out["data"] = str(data)
            meta_path = Path(data).expanduser() / "meta.json"
            if meta_path.is_file():
                meta = json.loads(meta_path.read_text())
                info = meta.get("info") or {}
                out.update(fps=meta.get("fps"), robot_config=info.get("robot_config"), robot=info.get("robot"),
                           task=info.get("task"))
    return out


def export_artifact(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False) -> dict:
    """Write `policy.safetensors` + `manifest.json` for a checkpoint (run dir, checkpoints/ or step dir) into
    `out_dir`; returns the manifest. The directory is written under a temporary name and renamed."""
    from robot_rl.config import git_hash
    from robot_rl.policies.diffusion import DiffusionPolicy
    from robot_rl.policies.checkpoint import safetensors_metadata, load_policy, resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ArtifactError(f"{out} exists and is not empty: choose a new directory or pass --overwrite")
    policy = load_policy(ckpt, device="cpu")
    meta = safetensors_metadata(ckpt / "model.safetensors")
    ctx = checkpoint_context(ckpt)
    if isinstance(policy, DiffusionPolicy):
        kind, config = "diffusion", {**policy.cfg.to_dict(), "obs_keys": list(policy.obs_keys)}
        feats = policy.features_dict()
        c = policy.cfg
        horizons = {"obs_horizon": c.obs_horizon, "action_horizon": c.action_horizon,
                    "n_action_steps": c.n_action_steps}
        scheduler = {"inference": c.inference_scheduler,
                     "num_inference_steps": c.num_inference_steps or c.num_train_timesteps,
                     "num_train_timesteps": c.num_train_timesteps, "beta_schedule": c.beta_schedule,
                     "prediction_type": c.prediction_type, "clip_sample": c.clip_sample}
    else:
        kind = "mlp"
        config = {k: v for k, v in json.loads(meta.get("policy_config", "{}")).items() if k != "type"}
        config["obs_keys"] = list(policy.obs_keys)
        feats = json.loads(meta["features"])
        horizons = {"obs_horizon": 1, "action_horizon": 1, "n_action_steps": 1}
        scheduler = None
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "policy": {"type": kind, "class": CLASSES[kind], "config": config},
            "obs": {k: {"shape": d["shape"], "dtype": d.get("dtype", "float32")} for k, d in feats["obs"].items()},
            "action": feats["action"],
            **horizons,
            "scheduler": scheduler,
            "fps": ctx["fps"],
            "robot": {"name": ctx["robot"], "config": ctx["robot_config"], "task": ctx["task"]},
            "training": {"checkpoint": str(ckpt.resolve()), "step": ctx["step"], "git": ctx["git"],
                         "data": ctx["data"], "ema": (ckpt / "raw_model.safetensors").exists(),
                         "exported_with_git": git_hash()},
            "weights": {"file": WEIGHTS, "sha256": sha256_file(tmp / WEIGHTS),
                        "bytes": (tmp / WEIGHTS).stat().st_size, "num_tensors": len(state),
                        "num_parameters": int(sum(p.numel() for p in policy.parameters()))},
        }
        manifest = _json_safe(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def main_export(argv: list[str] | None = None) -> int:
    """`robot-rl export-policy CHECKPOINT OUT_DIR [--overwrite]`."""
    import argparse

    ap = argparse.ArgumentParser(prog="robot-rl export-policy",
                                 description="Write a deployment artefact (policy.safetensors + manifest.json) that "
                                             "loads without hydra/omegaconf/the training code.")
    ap.add_argument("checkpoint", help="run directory, its checkpoints/ directory, or checkpoints/step_<n>")
    ap.add_argument("out_dir", help="artefact directory to create")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing artefact directory")
    args = ap.parse_args(argv)
    try:
        m = export_artifact(args.checkpoint, args.out_dir, overwrite=args.overwrite)
    except (ArtifactError, FileNotFoundError) as e:
        print(f"robot-rl export-policy: {e}", file=sys.stderr)
        return 2
    robot = (m.get("robot") or {}).get("name") or "unknown robot (pass robot= when deploying)"
    print(f"exported {m['policy']['type']} policy ({m['weights']['num_parameters']:,} parameters, step "
          f"{m['training']['step']}) for {robot} to {args.out_dir}\n  sha256 {m['weights']['sha256']}\n"
          f"  deploy: robot-rl deploy deploy.checkpoint={args.out_dir}")
    return 0


main = main_export  # so the CLI's plain-verb table can point at this module


if __name__ == "__main__":
    sys.exit(main_export())
