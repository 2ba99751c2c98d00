"""`robot-rl label`: ask a vision-language model which of two frames of an episode store is closer to the goal.

    robot-rl label label.data=data/lift label.url=http://127.0.0.1:8000/v1 label.model=sim-vlm label.budget=2000

Samples a seeded plan of frame pairs (across and within episodes, near-identical pairs skipped), asks RL-VLM-F's
two-stage prompt with the store's task string for each pair not yet in the label file, and appends every answer
there (robot_rl/reward/vlm_client.py). Writes `label_summary.json` in the run directory; prints one line.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from robot_rl.config import ConfigError, write_json
from robot_rl.interfaces import OBS_PREFIX

log = logging.getLogger("robot_rl.commands.label")


def store_image_key(store, image_key: str) -> str:
    """The store key of a camera given by its robot name (`agentview_image` -> `obs.agentview_image`)."""
    for key in (OBS_PREFIX + image_key, image_key):
        if key in store.features and store.features[key].is_image:
            return key
    images = [k for k, f in store.features.items() if f.is_image]
    raise ConfigError(f"{store.path} has no camera {image_key!r}; its image keys: {images or 'none'}")


def default_label_file(store_path: str | os.PathLike, model: str) -> Path:
    return Path(store_path) / "labels" / (re.sub(r"[^A-Za-z0-9._-]+", "_", model) + ".jsonl")


def task_phrase(store, task: str | None, template: str) -> str:
    if task:
        return str(task)
    stored = (store.meta.get("info") or {}).get("task")
    if not stored and store.episodes:
        stored = store.episodes[0].get("task")
    if not stored or stored == "unspecified":
        raise ConfigError(f"{store.path} records no task string; give the goal, e.g. label.task='to open the drawer'")
    return template.format(task=stored)


def validate(cfg: DictConfig) -> None:
    c = cfg.get("label")
    if c is None:
        raise ConfigError("the config has no `label:` section")
    if not c.get("data"):
        raise ConfigError("label.data is empty: give the episode store to label, e.g. label.data=data/lift")
    if not c.get("model"):
        raise ConfigError("label.model is empty: name the model the endpoint serves, e.g. label.model=sim-vlm")
    if not str(c.get("url") or "").startswith(("http://", "https://")):
        raise ConfigError(f"label.url must be an http(s) base URL such as http://127.0.0.1:8000/v1, got {c.url!r}")
    for key in ("budget", "concurrency", "min_gap", "max_tokens"):
        v = c.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"label.{key} must be a positive integer, got {v!r}")
    if not 0.0 <= float(c.within_fraction) <= 1.0:
        raise ConfigError(f"label.within_fraction must be in [0, 1], got {c.within_fraction!r}")


def main(cfg: DictConfig, run_dir: str | os.PathLike) -> int:
    from robot_rl.data.episode_store import EpisodeStore, StoreError
    from robot_rl.reward.vlm_client import ChatClient, LabelLog, VLMError, label_pairs, sample_pairs

    validate(cfg)
    c = cfg.label
    try:
        store = EpisodeStore.open(Path(str(c.data)).expanduser())
    except StoreError as e:
        raise ConfigError(f"label.data: {e}") from None
    key = store_image_key(store, str(c.image_key))
    task = task_phrase(store, c.get("task"), str(c.task_template))
    images = store.array(key)
    out = Path(str(c.out)).expanduser() if c.get("out") else default_label_file(store.path, str(c.model))
    label_log = LabelLog(out)
    existing = label_log.read()
    plan = sample_pairs(
        images,
        store.episode_ends,
        int(c.budget),
        int(c.seed),
        within_fraction=float(c.within_fraction),
        min_gap=int(c.min_gap),
        min_pixel_diff=float(c.min_pixel_diff),
    )
    done = {(r["i"], r["j"]) for r in existing}
    room = max(0, int(c.budget) - len(existing))
    todo = [p for p in plan if p not in done][:room]
    api_key = os.environ.get(str(c.api_key_env)) if c.get("api_key_env") else None
    client = ChatClient(
        str(c.url),
        str(c.model),
        api_key,
        timeout_s=float(c.timeout_s),
        max_retries=int(c.max_retries),
        backoff_s=float(c.backoff_s),
        backoff_max_s=float(c.backoff_max_s),
        max_tokens=int(c.max_tokens),
        temperature=float(c.temperature),
        seed=int(c.seed),
    )
    ends = store.episode_ends

    def describe(i: int) -> dict:
        e = int(np.searchsorted(ends, i, side="right"))
        return {"episode": e, "step": int(i - (ends[e - 1] if e else 0))}

    log.info(
        "labelling %d pairs of %s (%d already in %s, budget %d) with %s at %s, task %r",
        len(todo),
        store.path,
        len(existing),
        out,
        int(c.budget),
        c.model,
        c.url,
        task,
    )
    try:
        summary = label_pairs(
            client,
            images,
            todo,
            describe,
            task=task,
            log_file=label_log,
            concurrency=int(c.concurrency),
            stage2_model=c.get("stage2_model"),
            progress_every=int(c.progress_every),
        )
    except VLMError as e:
        print(f"robot-rl label: {e}", flush=True)
        return 3
    total = label_log.read()
    summary = {"store": str(store.path), "label_file": str(out), "task": task, **summary, "in_file": len(total)}
    summary["already_labelled"] = len(existing)
    write_json(Path(run_dir) / "label_summary.json", summary)
    valid = sum(r["label"] != -1 for r in total)
    if summary["interrupted"]:
        print(f"robot-rl label: interrupted; {len(total)} answers are kept in {out}, rerun to ask the rest", flush=True)
        return 130
    print(
        f"labelled {summary['asked']} pairs ({summary['already_labelled']} were already done); {out} holds "
        f"{len(total)} answers, {valid} with a preference; {summary['pairs_per_s'] or 0:.2f} pairs/s",
        flush=True,
    )
    return 0
