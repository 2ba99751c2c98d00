"""Learning algorithms, by the name used in `algo=<name>` configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from robot_rl.algos.base import Algorithm

# Keys of an algo config that the learner (not the algorithm) reads: how much to train, when to publish.
LEARNER_KEYS = {"name", "updates_per_transition", "publish_every_updates", "log_every_updates"}
ALGORITHMS = ("online_bc", "residual", "sac")


def _config(algo_cfg: dict):
    name = algo_cfg.get("name")
    if name == "online_bc":
        from robot_rl.algos.online_bc import OnlineBC as cls, OnlineBCConfig as cfg_cls
    elif name == "residual":
        from robot_rl.algos.residual import ResidualConfig as cfg_cls, ResidualTD3 as cls
    elif name == "sac":
        from robot_rl.algos.sac import SAC as cls, SACConfig as cfg_cls
    else:
        raise ValueError(f"algo.name={name!r} is not a known algorithm; choose one of: {', '.join(ALGORITHMS)}")
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = set(algo_cfg) - fields - LEARNER_KEYS
    if unknown:
        raise ValueError(f"algo.{sorted(unknown)[0]} is not a setting of algo {name}; known: {sorted(fields | LEARNER_KEYS)}")
    return cls, cfg_cls(**{k: v for k, v in algo_cfg.items() if k in fields})


def check_algorithm(algo_cfg: dict) -> None:
    """Validate an algo config without building it (no data loading): unknown keys, missing inputs."""
    cls, cfg = _config(algo_cfg)
    check = getattr(cls, "check_config", None)
    if check is not None:
        check(cfg)


def make_algorithm(algo_cfg: dict, policy_cfg: dict, device: torch.device, run_dir: Path | None = None) -> Algorithm:
    cls, cfg = _config(algo_cfg)
    if algo_cfg["name"] in ("residual", "sac"):
        return cls(cfg, policy_cfg, device, run_dir)
    return cls(cfg, policy_cfg, device)
