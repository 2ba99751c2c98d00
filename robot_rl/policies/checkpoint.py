"""One checkpoint format for every policy robot_rl makes (train, distill, every learner algorithm), and one loader.

A policy directory holds what the robot needs and nothing else:

    manifest.json         format + version, kind, architecture config, observation/action features, horizons,
                          sampler, robot config, fps, provenance (source, step or version, git), sha256 of weights
    policy.safetensors    the deployable weights with their normalisation buffers (EMA copy when kept)
    base/                 kind "residual" only: the frozen base policy, itself a policy directory

Training state may sit beside these files (`raw_policy.safetensors`, `optimizer.pt`, `trainer_state.json`,
`algo_state.pt`); the loader never reads it, and `robot-rl export-policy` leaves it behind. A run keeps its
checkpoints as `<run>/checkpoints/<name>/` (`step_<n>` for offline training, `v<n>` for a session's learner) with
`<run>/checkpoints/latest` = {"path": name, ...}; a session's are under `<run>/learner/checkpoints/`.

`load_policy(path)` accepts a policy directory, a run directory (train, distill or session), a `checkpoints/`
directory or a deployment artefact, and still reads the two layouts that came before this one.
Loading imports torch, safetensors and the policy modules only (no hydra, omegaconf, zarr or training code).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from robot_rl.interfaces import Feature
from robot_rl.policies.diffusion import DiffusionConfig, DiffusionPolicy
from robot_rl.policies.mlp import MLPPolicy

FORMAT, FORMAT_VERSION = "robot_rl.policy", 2
MANIFEST, WEIGHTS, BASE_DIR, POINTER = "manifest.json", "policy.safetensors", "base", "latest"
KINDS = ("diffusion", "mlp", "residual", "sac")
POLICY_TYPES = ("diffusion", "mlp")  # what `robot-rl train` can fit offline
_LEGACY_ARTIFACT = "robot_rl.policy_artifact"  # format_version 1, written by export-policy before this format


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as it is; the message says what to do."""


# ------------------------------------------------------------------------------------------------ helpers


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def resolve_device(spec: str | torch.device) -> torch.device:
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(spec).startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"device={spec!r} but CUDA is not available on this machine: use auto or cpu")
    return torch.device(spec)


def json_safe(x: Any) -> Any:
    """NaN/inf (e.g. unbounded action limits) become null: the manifest stays strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
    if isinstance(x, np.generic):
        return json_safe(x.item())
    return x


def feature(d: dict) -> Feature:
    def arr(v):
        return None if v is None else np.asarray([np.nan if e is None else e for e in v], dtype=np.float64)

    return Feature(
        tuple(int(s) for s in d["shape"]),
        str(d.get("dtype", "float32")),
        names=d.get("names"),
        low=arr(d.get("low")),
        high=arr(d.get("high")),
    )


def plain_config(cfg) -> dict:
    if isinstance(cfg, dict):
        return dict(cfg)
    from omegaconf import OmegaConf  # only configs built by hydra need it

    return OmegaConf.to_container(cfg, resolve=True)


def build_policy(policy_cfg: dict, obs_features: dict[str, Feature], action_feature: Feature):
    """A fresh (untrained) policy from the `policy:` config and the robot-side features (plain names)."""
    kind = policy_cfg.get("type")
    if kind == "diffusion":
        return DiffusionPolicy.from_features(obs_features, action_feature, policy_cfg)
    if kind == "mlp":
        return MLPPolicy.from_features(obs_features, action_feature, policy_cfg["hidden"], policy_cfg.get("obs_keys"))
    raise ValueError(f"policy.type={kind!r} cannot be trained offline; choose one of: {', '.join(POLICY_TYPES)}")


def policy_features(policy) -> dict:
    """The observation features (plain names) a BC policy reads and its action feature."""
    if isinstance(policy, DiffusionPolicy):
        return policy.features_dict()
    return {
        "obs": {k: Feature((d,)).to_dict() for k, d in zip(policy.obs_keys, policy.obs_dims)},
        "action": Feature((int(policy.action_low.shape[0]),)).to_dict(),
    }


# ----------------------------------------------------------------------------------- what a policy is (kinds)


def _residual_and_sac():
    from robot_rl.policies.residual import ResidualModel, ResidualPolicy

    try:
        from robot_rl.policies.sac import SACModel, SACPolicy
    except ImportError:  # while SAC's robot side still lives with the algorithm
        SACModel = SACPolicy = None  # noqa: N806
    return ResidualModel, ResidualPolicy, SACModel, SACPolicy


def describe(policy) -> dict:
    """kind, architecture config, features and horizons of a policy object: everything `build` needs."""
    _, ResidualPolicy, _, SACPolicy = _residual_and_sac()  # noqa: N806
    if isinstance(policy, DiffusionPolicy):
        c = policy.cfg
        return {
            "kind": "diffusion",
            "config": {**c.to_dict(), "obs_keys": list(policy.obs_keys)},
            **policy.features_dict(),
            "obs_horizon": c.obs_horizon,
            "action_horizon": c.action_horizon,
            "n_action_steps": c.n_action_steps,
            "scheduler": {
                "inference": c.inference_scheduler,
                "num_inference_steps": c.num_inference_steps or c.num_train_timesteps,
                "num_train_timesteps": c.num_train_timesteps,
                "beta_schedule": c.beta_schedule,
                "prediction_type": c.prediction_type,
                "clip_sample": c.clip_sample,
            },
        }
    if isinstance(policy, MLPPolicy):
        hidden = [m.out_features for m in policy.net if isinstance(m, torch.nn.Linear)][:-1]
        return {
            "kind": "mlp",
            "config": {"hidden": hidden, "obs_keys": list(policy.obs_keys)},
            **policy_features(policy),
            "obs_horizon": 1,
            "action_horizon": 1,
            "n_action_steps": 1,
            "scheduler": None,
        }
    kind = (
        "residual"
        if isinstance(policy, ResidualPolicy)
        else "sac"
        if SACPolicy and isinstance(policy, SACPolicy)
        else None
    )
    if kind is None:
        raise CheckpointError(
            f"{type(policy).__name__} is not a policy this checkpoint format knows ({', '.join(KINDS)})"
        )
    model = policy.model
    cfg = dict(model.config)
    out = {
        "kind": kind,
        "config": cfg,
        "obs": {k: f.to_dict() for k, f in model.obs_features.items()},
        "action": Feature((cfg["action_dim"],)).to_dict(),
        "obs_horizon": 1,
        "action_horizon": 1,
        "n_action_steps": 1,
        "scheduler": None,
    }
    if kind == "residual":  # the robot runs base + residual: the base's own horizons and observations count too
        base = describe(policy.base)
        out.update(
            obs={**base["obs"], **out["obs"]},
            action=base["action"],
            obs_horizon=base["obs_horizon"],
            action_horizon=base["action_horizon"],
            n_action_steps=base["n_action_steps"],
        )
    return out


def _build(manifest: dict, directory: Path, device: torch.device):
    """An untrained policy object with the manifest's architecture (only the kinds named here: the manifest
    cannot name arbitrary code)."""
    kind, cfg = manifest["kind"], dict(manifest["config"])
    obs = {k: feature(d) for k, d in manifest["obs"].items()}
    action = feature(manifest["action"])
    if kind == "diffusion":
        cfg["obs_keys"] = [k for k in cfg.get("obs_keys") or obs]
        return DiffusionPolicy(DiffusionConfig.from_dict(cfg), {k: obs[k] for k in cfg["obs_keys"]}, action)
    if kind == "mlp":
        keys = list(cfg.get("obs_keys") or obs)
        return MLPPolicy(
            keys,
            [int(np.prod(obs[k].shape)) for k in keys],
            int(np.prod(action.shape)),
            [int(h) for h in cfg["hidden"]],
        )
    ResidualModel, ResidualPolicy, SACModel, SACPolicy = _residual_and_sac()  # noqa: N806
    if kind == "residual":
        base = load_policy(directory / manifest.get("base", {}).get("dir", BASE_DIR), device)
        model = ResidualModel(obs, cfg["obs_keys"], int(cfg["action_dim"]), cfg)
        policy = ResidualPolicy(base, model)
        policy.exploration = "none"  # a loaded result acts deterministically on top of its base
        return policy
    if kind == "sac" and SACModel is not None:
        policy = SACPolicy(SACModel(obs, cfg["obs_keys"], int(cfg["action_dim"]), cfg))
        policy.exploration = "none"  # the mean action
        return policy
    raise CheckpointError(f"{directory}: policy kind {kind!r} is not one this robot_rl can build ({', '.join(KINDS)})")


def _weights_module(policy) -> torch.nn.Module:
    """The module whose state_dict is the policy's weights (residual/SAC: only the robot-side model)."""
    return policy if isinstance(policy, torch.nn.Module) else policy.model


# ---------------------------------------------------------------------------------------------- writing


def write_policy(
    directory: str | os.PathLike,
    policy,
    *,
    robot: dict | None = None,
    fps: float | None = None,
    provenance: dict | None = None,
) -> dict:
    """Write `policy.safetensors` + `manifest.json` (+ `base/` for a residual policy) into `directory`.

    `robot`: {"name", "config", "task"} of the robot the policy drives; `provenance`: where it came from
    (source: train | distill | session, step or version, updates, data, git...). Returns the manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = describe(policy)
    state = {k: v.detach().cpu().contiguous() for k, v in _weights_module(policy).state_dict().items()}
    save_file(state, str(directory / WEIGHTS), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    base = None
    if info["kind"] == "residual":
        base_src = getattr(policy.base, "checkpoint_dir", None)  # set by load_policy: copy it as it was written
        has_manifest = base_src is not None and (Path(base_src) / MANIFEST).is_file()
        base_manifest = (
            copy_policy(base_src, directory / BASE_DIR, link=True)
            if has_manifest
            else write_policy(directory / BASE_DIR, policy.base, robot=robot, fps=fps)
        )
        base = {"dir": BASE_DIR, "kind": base_manifest["kind"], "sha256": base_manifest["weights"]["sha256"]}
    manifest = json_safe(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **info,
            "base": base,
            "fps": fps,
            "robot": {"name": None, "config": None, "task": None, **(robot or {})},
            "training": dict(provenance or {}),
            "weights": {
                "file": WEIGHTS,
                "sha256": sha256_file(directory / WEIGHTS),
                "bytes": (directory / WEIGHTS).stat().st_size,
                "num_tensors": len(state),
                "num_parameters": int(sum(p.numel() for p in _weights_module(policy).parameters())),
            },
        }
    )
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, allow_nan=False))
    os.replace(tmp, directory / MANIFEST)
    return manifest


def copy_policy(src: str | os.PathLike, dst: str | os.PathLike, link: bool = False) -> dict:
    """Copy the policy files of a policy directory (manifest, weights, base/; no training state). `link`: hard
    links where the filesystem allows (a session writes its frozen base with every version; an export must copy,
    or editing the artefact would change the run it came from). Returns the manifest."""
    src, dst = Path(src), Path(dst)
    manifest = verify(src)
    dst.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS, MANIFEST):
        target = dst / name
        if target.exists():
            target.unlink()
        try:
            if not link:
                raise OSError
            os.link(src / name, target)
        except OSError:
            shutil.copy2(src / name, target)
    if manifest.get("base"):
        copy_policy(src / manifest["base"]["dir"], dst / manifest["base"]["dir"], link)
    return manifest


def save_checkpoint(
    root: str | os.PathLike,
    name: str,
    write: Callable[[Path], None],
    pointer: dict | None = None,
    keep_last: int | None = None,
) -> Path:
    """`write(tmp)` fills `root/.<name>.tmp`, which is renamed to `root/<name>`; then `root/latest` is replaced
    atomically. A crash never leaves `latest` pointing at a half-written checkpoint. Older checkpoints beyond
    `keep_last` (by modification order of their names in `latest` history) are removed."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / name, root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_json_atomic(root / POINTER, {"path": name, **(pointer or {})})
    if keep_last:
        done = sorted(
            (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.stat().st_mtime
        )
        for old in done[: max(0, len(done) - int(keep_last))]:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    return final


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    pointer = Path(root) / POINTER
    if not pointer.is_file():
        return None
    return Path(root) / json.loads(pointer.read_text())["path"]


# ---------------------------------------------------------------------------------------------- reading


def _is_legacy_train_dir(path: Path) -> bool:
    return (path / "model.safetensors").is_file() and not (path / MANIFEST).is_file()


def _checkpoint_roots(path: Path) -> list[Path]:
    """Where a run keeps checkpoints: the path itself, its checkpoints/, a session's learner/checkpoints/."""
    return [path, path / "checkpoints", path / "learner" / "checkpoints"]


def find_policy_dir(path: str | os.PathLike, version: int | None = None) -> Path:
    """The policy directory meant by `path`: itself, or the newest checkpoint (or `version`: `v<version>` of a
    session, `step_<version>` of a training run) of a run or checkpoints directory."""
    path = Path(path).expanduser()
    if version is None and ((path / MANIFEST).is_file() or _is_legacy_train_dir(path)):
        return path
    for root in _checkpoint_roots(path):
        if version is not None:
            for name in (f"v{version}", f"step_{version}"):
                if (root / name / MANIFEST).is_file() or _is_legacy_train_dir(root / name):
                    return root / name
            continue
        if (root / POINTER).is_file():
            target = latest_checkpoint(root)
            if not ((target / MANIFEST).is_file() or _is_legacy_train_dir(target)):
                raise CheckpointError(f"{root / POINTER} points at {target}, which is not a policy directory")
            return target
        if (root / "latest.json").is_file() and (root / WEIGHTS).is_file():
            raise CheckpointError(
                f"{root} is a session checkpoint written before robot_rl's one checkpoint format (weights without a "
                f"manifest cannot be rebuilt alone). Convert it by resuming the session for one episode: "
                f"`robot-rl session hydra.run.dir=<that run> session.resume=true session.episodes=<done + 1>`; "
                f"its next publish writes learner/checkpoints/v<n>/ in the current format"
            )
    if version is not None:
        available = sorted(
            p.name
            for root in _checkpoint_roots(path)
            if root.is_dir()
            for p in root.iterdir()
            if (p / MANIFEST).is_file() or _is_legacy_train_dir(p)
        )
        raise CheckpointError(f"{path} has no checkpoint for version {version}; available: {available or 'none'}")
    raise CheckpointError(
        f"{path} is not a policy checkpoint: no {MANIFEST} there, and no checkpoints/latest, "
        f"learner/checkpoints/latest under it (a `robot-rl train`/`distill`/`session` run dir, "
        f"its checkpoints/ or an export-policy artefact)"
    )


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a policy directory, format and version checked; version-1 artefacts are read as v2."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(
            f"{path} is not a policy directory (no {MANIFEST}); make one with "
            f"`robot-rl export-policy CHECKPOINT {path}`"
        )
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath} is not valid JSON ({e}); re-export the policy") from None
    fmt, version = manifest.get("format"), manifest.get("format_version")
    if fmt == _LEGACY_ARTIFACT and version == 1:
        return {**manifest, "kind": manifest["policy"]["type"], "config": manifest["policy"]["config"], "base": None}
    if fmt not in (FORMAT, _LEGACY_ARTIFACT):
        raise CheckpointError(f"{mpath}: format {fmt!r} is not {FORMAT!r}")
    if not isinstance(version, int):
        raise CheckpointError(f"{mpath}: format_version missing or not an integer ({version!r})")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version} is newer than this robot_rl reads (up to "
            f"{FORMAT_VERSION}): upgrade robot_rl here, or export the policy with this robot_rl"
        )
    if version < 1:
        raise CheckpointError(f"{path}: checkpoint format version {version} is not supported; re-export the policy")
    return manifest


def verify(path: str | os.PathLike) -> dict:
    """Manifest checks plus the sha256 of the weights (and of the base's); returns the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    w = manifest.get("weights") or {}
    wpath = path / w.get("file", WEIGHTS)
    if not wpath.is_file():
        raise CheckpointError(f"{path}: weights file {wpath.name} is missing; copy the whole policy directory")
    digest = sha256_file(wpath)
    if digest != w.get("sha256"):
        raise CheckpointError(
            f"{wpath}: sha256 mismatch (file {digest[:16]}..., manifest {str(w.get('sha256'))[:16]}"
            f"...): the weights were modified or corrupted after they were written; copy the "
            f"policy again or re-export it"
        )
    if manifest.get("base"):
        base = verify(path / manifest["base"]["dir"])
        if base["weights"]["sha256"] != manifest["base"]["sha256"]:
            raise CheckpointError(f"{path}: its base/ is not the base it was trained on (sha256 differs)")
    return manifest


def _load_legacy_train_dir(ckpt: Path, device: torch.device, weights: str):
    """Checkpoints of `robot-rl train`/`distill` from before this format: config + features in safetensors
    metadata (or config.yaml beside them)."""
    path = ckpt / f"{weights}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if "policy_config" in meta:
        policy_cfg = json.loads(meta["policy_config"])
    else:
        import yaml

        policy_cfg = (yaml.safe_load((ckpt / "config.yaml").read_text()) or {}).get("policy") or {}
    feats = json.loads(meta["features"])
    kind = meta.get("policy_type") or policy_cfg.get("type") or "diffusion"
    manifest = {
        "kind": kind,
        "config": {k: v for k, v in policy_cfg.items() if k != "type"},
        "obs": feats["obs"],
        "action": feats["action"],
        "base": None,
        "legacy": True,
    }
    policy = _build(manifest, ckpt, device)
    policy.load_state_dict(load_file(str(path)))
    return policy, manifest


def load_policy(
    checkpoint: str | os.PathLike,
    device: str | torch.device = "auto",
    version: int | None = None,
    weights: str = "policy",
):
    """Rebuild a policy in eval mode from any checkpoint: a policy directory, artefact, run or checkpoints dir
    (the newest, or `version`). The manifest is attached as `policy.manifest`, the directory as
    `policy.checkpoint_dir`. `weights="raw"` loads the optimised (non-EMA) weights a training checkpoint kept."""
    directory = find_policy_dir(checkpoint, version)
    dev = resolve_device(device)
    if _is_legacy_train_dir(directory):
        policy, manifest = _load_legacy_train_dir(directory, dev, "raw_model" if weights == "raw" else "model")
    else:
        manifest = verify(directory)
        policy = _build(manifest, directory, dev)
        file = "raw_policy.safetensors" if weights == "raw" else manifest["weights"].get("file", WEIGHTS)
        state = load_file(str(directory / file))
        try:
            _weights_module(policy).load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{directory}: the weights do not fit the manifest's architecture: {e}") from None
    module = _weights_module(policy)
    module.to(dev).eval()
    if hasattr(policy, "base") and hasattr(policy.base, "to"):
        policy.base.to(dev)
    policy.manifest, policy.checkpoint_dir = manifest, directory
    return policy


# kept for the verbs and tests that used these names before the one format
resolve_checkpoint = find_policy_dir
