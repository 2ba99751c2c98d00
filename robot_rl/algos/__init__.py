"""Learning algorithms by the name used in `algo=<name>` configs: the one place either process looks one up.

An entry is an `Algorithm` class (robot_rl/algos/base.py: the learner's side and `build_robot_policy`, the robot's)
and its config dataclass. Settings have one source of defaults, configs/algo/<name>.yaml (the dataclasses declare
fields without defaults); an `algo:` dict overrides any of them and may not name anything else.
"""

from __future__ import annotations

import dataclasses
from importlib.resources import files
from pathlib import Path

import torch
from omegaconf import OmegaConf

from robot_rl.algos.base import Algorithm
from robot_rl.algos.online_bc import OnlineBC, OnlineBCConfig
from robot_rl.algos.residual import ResidualConfig, ResidualTD3
from robot_rl.algos.rl100_online import RL100Online, RL100OnlineConfig
from robot_rl.algos.rlif import RLIF, RLIFConfig
from robot_rl.algos.sac import SAC, SACConfig
from robot_rl.interfaces import Policy, Robot

# Keys of an algo config that the learner (not the algorithm) reads: how much to train, when to publish.
LEARNER_KEYS = {"name", "updates_per_transition", "publish_every_updates", "log_every_updates"}


@dataclasses.dataclass(frozen=True)
class Entry:
    algorithm: type[Algorithm]
    config: type
    defaults: Path | None  # YAML file with every setting's default (None: every setting must be given)


REGISTRY: dict[str, Entry] = {}


def register(name: str, algorithm: type[Algorithm], config: type, defaults: Path | None = None) -> None:
    """Make `algo.name=<name>` mean `algorithm`, configured by the dataclass `config`. `defaults`: a YAML file of
    every setting (by default configs/algo/<name>.yaml when it exists)."""
    if defaults is None:
        shipped = Path(str(files("robot_rl.configs") / "algo" / f"{name}.yaml"))
        defaults = shipped if shipped.is_file() else None
    REGISTRY[name] = Entry(algorithm, config, defaults)


register("online_bc", OnlineBC, OnlineBCConfig)
register("residual", ResidualTD3, ResidualConfig)
register("sac", SAC, SACConfig)
register("rlif", RLIF, RLIFConfig)
register("rl100_online", RL100Online, RL100OnlineConfig)


def _entry(algo_cfg: dict) -> Entry:
    name = algo_cfg.get("name")
    if name not in REGISTRY:
        raise ValueError(f"algo.name={name!r} is not a known algorithm; choose one of: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def with_defaults(algo_cfg: dict) -> dict:
    """The algo config with every unset setting taken from the algorithm's YAML defaults."""
    entry = _entry(algo_cfg)
    if entry.defaults is None:
        return dict(algo_cfg)
    raw = OmegaConf.to_container(OmegaConf.load(entry.defaults), resolve=True)
    raw = raw.get("algo", raw)  # a `# @package _global_` file keeps the algo settings under `algo:`
    return {**{k: v for k, v in raw.items() if k != "defaults"}, **algo_cfg}


def _config(algo_cfg: dict):
    entry = _entry(algo_cfg)
    name, merged = algo_cfg["name"], with_defaults(algo_cfg)
    fields = {f.name for f in dataclasses.fields(entry.config)}
    unknown = set(algo_cfg) - fields - LEARNER_KEYS
    if unknown:
        raise ValueError(
            f"algo.{sorted(unknown)[0]} is not a setting of algo {name}; known: {sorted(fields | LEARNER_KEYS)}"
        )
    missing = fields - set(merged)
    if missing:
        raise ValueError(
            f"algo.{sorted(missing)[0]} has no value: algo {name} takes its defaults from "
            f"{entry.defaults or 'nowhere (it has no defaults file)'}"
        )
    return entry.algorithm, entry.config(**{k: merged[k] for k in fields})


def check_algorithm(algo_cfg: dict) -> None:
    """Validate an algo config without building it (no data loading): unknown keys, missing inputs."""
    cls, cfg = _config(algo_cfg)
    cls.check_config(cfg)


def make_algorithm(algo_cfg: dict, policy_cfg: dict, device: torch.device, run_dir: Path | None = None) -> Algorithm:
    """The learner's side of the configured algorithm."""
    cls, cfg = _config(algo_cfg)
    return cls(cfg, policy_cfg, device, run_dir)


def make_robot_policy(algo_cfg: dict, policy_cfg: dict, robot: Robot, seed: int) -> Policy:
    """The control process's side of the configured algorithm: the policy it runs, before any weights arrive."""
    cls, cfg = _config(algo_cfg)
    return cls.build_robot_policy(cfg, policy_cfg, robot, seed)


def algo_config(name: str, **settings):
    """The config dataclass of algorithm `name`: its YAML defaults with `settings` over them (tests, benchmarks)."""
    return _config({"name": name, **settings})[1]
