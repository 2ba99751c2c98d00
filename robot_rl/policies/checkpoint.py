"""Policy checkpoints: build a policy from its config and features, find and load a checkpoint directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file

from robot_rl.config import ConfigError, resolve_device
from robot_rl.data.episode_store import feature_from_dict
from robot_rl.interfaces import Feature
from robot_rl.policies.diffusion import DiffusionPolicy
from robot_rl.policies.mlp import MLPPolicy

POLICY_TYPES = ("diffusion", "mlp")


def plain_config(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def build_policy(policy_cfg: dict, obs_features: dict[str, Feature], action_feature: Feature):
    """A fresh (untrained) policy from the `policy:` config and the robot-side features (plain names)."""
    kind = policy_cfg.get("type")
    if kind == "diffusion":
        return DiffusionPolicy.from_features(obs_features, action_feature, policy_cfg)
    if kind == "mlp":
        return MLPPolicy.from_features(obs_features, action_feature, policy_cfg["hidden"], policy_cfg.get("obs_keys"))
    raise ConfigError(f"policy.type={kind!r} cannot be trained offline; choose one of: {', '.join(POLICY_TYPES)}")


def policy_features(policy) -> dict:
    """What a checkpoint needs to rebuild the policy: its observation features (plain names) and action."""
    if isinstance(policy, DiffusionPolicy):
        return policy.features_dict()
    return {"obs": {k: Feature((d,)).to_dict() for k, d in zip(policy.obs_keys, policy.obs_dims)},
            "action": Feature((int(policy.action_low.shape[0]),)).to_dict()}


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from itself, a `checkpoints/` directory or a run directory (via `latest`)."""
    path = Path(path)
    if (path / "model.safetensors").exists():
        return path
    for root in (path, path / "checkpoints"):
        pointer = root / "latest"
        if pointer.exists():
            ckpt = root / json.loads(pointer.read_text())["path"]
            if not (ckpt / "model.safetensors").exists():
                raise FileNotFoundError(f"{pointer} points at {ckpt}, which has no model.safetensors")
            return ckpt
    raise FileNotFoundError(f"{path} is neither a checkpoint (no model.safetensors) nor a run/checkpoints "
                            f"directory with a `latest` pointer")


def safetensors_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_policy(checkpoint: str | os.PathLike, device: str | torch.device = "auto", weights: str = "model"):
    """Rebuild a trained policy (DiffusionPolicy or MLPPolicy, in eval mode) from a checkpoint directory.

    `checkpoint`: `.../checkpoints/step_<n>`, `.../checkpoints` or the run directory (latest checkpoint).
    `weights`: "model" (the deployable, EMA weights) or "raw_model" (the optimised weights, when saved).
    `device`: auto (CUDA when present) | cpu | cuda[:N].
    Everything needed comes from the checkpoint: the policy config and features are in the safetensors metadata
    (config.yaml is the fallback for the config), normalisation statistics are buffers in the weights.
    """
    ckpt = resolve_checkpoint(checkpoint)
    path = ckpt / f"{weights}.safetensors"
    meta = safetensors_metadata(path)
    if "policy_config" in meta:
        policy_cfg = json.loads(meta["policy_config"])
    else:
        policy_cfg = plain_config(OmegaConf.load(ckpt / "config.yaml").policy)
    feats = json.loads(meta["features"])
    obs = {k: feature_from_dict(d) for k, d in feats["obs"].items()}
    action = feature_from_dict(feats["action"])
    if policy_cfg.get("type") == "mlp":
        policy = MLPPolicy(list(obs), [int(np.prod(f.shape)) for f in obs.values()], int(np.prod(action.shape)),
                           list(policy_cfg["hidden"]))
    else:
        policy_cfg = dict(policy_cfg, obs_keys=list(obs))
        policy = build_policy(policy_cfg, obs, action)
    policy.load_state_dict(load_file(str(path)))
    device = resolve_device(device) if isinstance(device, str) else device
    return policy.to(device).eval()


