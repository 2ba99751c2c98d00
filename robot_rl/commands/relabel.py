"""`robot-rl relabel`: write a learned reward for every step of an episode store, as a new versioned column.

    robot-rl relabel relabel.data=data/lift relabel.reward_model=outputs/<run>_reward_model

The reward of step t is the reward model's value of the frame the action led to (frame t+1; the episode's last
step keeps its own frame), standardised as the model was. The column is a derived column of the store
(`<column>_v<n>`, n one more than the newest): earlier versions and every recorded column stay as they were. On a
sim store with known ground-truth progress it reports the Spearman correlation of reward and progress.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from robot_rl.config import ConfigError, resolve_device, write_json

log = logging.getLogger("robot_rl.commands.relabel")


def next_frame_index(episode_ends: np.ndarray) -> np.ndarray:
    """For each step, the index of the next step in its episode (the last step: itself)."""
    ends = np.asarray(episode_ends, np.int64)
    n = int(ends[-1]) if len(ends) else 0
    nxt = np.arange(1, n + 1)
    nxt[ends - 1] = ends - 1
    return nxt


def next_version(columns: dict, prefix: str) -> str:
    versions = [int(m.group(1)) for k in columns if (m := re.fullmatch(re.escape(prefix) + r"_v(\d+)", k))]
    return f"{prefix}_v{max(versions, default=0) + 1}"


def relabel(store, model, *, column: str, next_frame: bool, batch_size: int, source: dict) -> tuple[str, np.ndarray]:
    """Compute and write the reward column; returns (its name, per-frame rewards r(frame t))."""
    images = store.array(model.config["image_key"])
    frame_reward = model.rewards(images, batch_size)
    reward = frame_reward[next_frame_index(store.episode_ends)] if next_frame else frame_reward
    name = next_version(store.derived_columns(), column)
    info = {"kind": "reward", "next_frame": bool(next_frame), "mean": float(reward.mean()), "std": float(reward.std())}
    store.add_derived(name, reward.astype(np.float32), {**info, **source})
    return name, frame_reward


def main(cfg: DictConfig, run_dir: str | os.PathLike) -> int:
    from robot_rl.commands.reward_model import ground_truth, spearman
    from robot_rl.data.episode_store import EpisodeStore, StoreError
    from robot_rl.reward.preference import load_reward_model

    c = cfg.get("relabel")
    if c is None or not c.get("data") or not c.get("reward_model"):
        raise ConfigError("relabel.data and relabel.reward_model are required (the store and a reward-model run)")
    if c.get("num_threads"):
        torch.set_num_threads(int(c.num_threads))
    device = resolve_device(str(c.get("device", "auto")))
    try:
        model, info = load_reward_model(str(c.reward_model), device)
    except FileNotFoundError as e:
        raise ConfigError(f"relabel.reward_model: {e}") from None
    try:
        store = EpisodeStore.open(Path(str(c.data)).expanduser(), "a")
    except StoreError as e:
        raise ConfigError(f"relabel.data: {e}") from None
    key = model.config["image_key"]
    if key not in store.features or list(store.features[key].shape) != list(model.config["image_shape"]):
        raise ConfigError(
            f"the reward model reads {key} of shape {model.config['image_shape']}, which {store.path} does not have"
        )
    source = {"reward_model": str(Path(str(c.reward_model)).resolve()), "labels": info.get("labels")}
    name, frame_reward = relabel(
        store, model, column=str(c.column), next_frame=bool(c.next_frame), batch_size=int(c.batch_size), source=source
    )
    summary = {
        "store": str(store.path),
        "column": name,
        "steps": store.num_steps,
        "columns": list(store.derived_columns()),
    }
    progress = ground_truth(store)
    if progress is not None:
        summary["spearman_reward_progress"] = spearman(frame_reward, progress)
    write_json(Path(run_dir) / "relabel_summary.json", summary)
    line = f"wrote {name} ({store.num_steps} steps) to {store.path}"
    if "spearman_reward_progress" in summary:
        line += f"; Spearman with ground-truth progress {summary['spearman_reward_progress']:.3f}"
    print(line, flush=True)
    return 0
