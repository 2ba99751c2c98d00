"""Config checks and run-directory bookkeeping shared by every verb.

A bad value fails here, before any process starts, with one message naming the field.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and what to do."""


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={spec!r} but CUDA is not available on this machine: use device=auto or cpu")
    return torch.device(spec)


def positive(cfg: DictConfig, dotted: str, integer: bool = False) -> None:
    value = OmegaConf.select(cfg, dotted)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        raise ConfigError(f"{dotted} must be {kind}, got {value!r}")


def git_hash() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_info(run_dir: Path, cfg: DictConfig, verb: str) -> None:
    """The resolved config and git hash next to the run's outputs, so any run can be reproduced."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    info = {
        "verb": verb,
        "argv": sys.argv,
        "git": git_hash(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "host": os.uname().nodename,
        "pid": os.getpid(),
    }
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2))


def load_config(path: str | os.PathLike) -> DictConfig:
    return OmegaConf.load(path)


def write_json(path: Path, data: dict) -> None:
    """Write atomically: a reader never sees half a summary."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S", force=True
    )
