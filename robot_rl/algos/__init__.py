"""Learning algorithms, by the name used in `algo=<name>` configs."""

from __future__ import annotations

import dataclasses

import torch

from robot_rl.algos.base import Algorithm

# Keys of an algo config that the learner (not the algorithm) reads: how much to train, when to publish.
LEARNER_KEYS = {"name", "updates_per_transition", "publish_every_updates", "log_every_updates"}


def make_algorithm(algo_cfg: dict, policy_cfg: dict, device: torch.device) -> Algorithm:
    name = algo_cfg.get("name")
    if name == "online_bc":
        from robot_rl.algos.online_bc import OnlineBC as cls, OnlineBCConfig as cfg_cls
    else:
        raise ValueError(f"algo.name={name!r} is not a known algorithm; choose one of: online_bc")
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = set(algo_cfg) - fields - LEARNER_KEYS
    if unknown:
        raise ValueError(f"algo.{sorted(unknown)[0]} is not a setting of algo {name}; known: {sorted(fields | LEARNER_KEYS)}")
    return cls(cfg_cls(**{k: v for k, v in algo_cfg.items() if k in fields}), policy_cfg, device)
