"""`robot-rl reward-model`: fit the Bradley–Terry reward ensemble (robot_rl/reward/preference.py) to a label file.

    robot-rl reward-model reward_model.data=data/lift [reward_model.labels=data/lift/labels/sim-vlm.jsonl]

Pairs labelled -1 are dropped; a seeded `val_fraction` of the rest is held out. Training runs in the offline
training loop (checkpoints, resume-safe, tensorboard) and stops early when the held-out pair accuracy has not
improved for `patience` evaluations; the best ensemble is standardised over the store's frames and written to
`<run>/reward_model/`. On a sim store with known ground-truth progress the summary also reports how often the
labels agree with it and the Spearman correlation of reward and progress.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from robot_rl.config import ConfigError, resolve_device, write_json

log = logging.getLogger("robot_rl.commands.reward_model")


def label_file(store_path: Path, given) -> Path:
    if given:
        p = Path(str(given)).expanduser()
        if not p.is_file():
            raise ConfigError(f"reward_model.labels={str(p)!r} does not exist; run robot-rl label first")
        return p
    files = sorted((store_path / "labels").glob("*.jsonl"))
    if len(files) != 1:
        raise ConfigError(
            f"{store_path}/labels holds {len(files)} label files ({[f.name for f in files]}); "
            f"choose one with reward_model.labels=... (or label the store with robot-rl label first)"
        )
    return files[0]


def labelled_pairs(records: list[dict], images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, label) of the records with a preference; each frame's hash must still match the store."""
    from robot_rl.reward.vlm_client import image_sha

    rows = [(r["i"], r["j"], r["label"]) for r in records if r["label"] in (0, 1)]
    for r in records[:: max(1, len(records) // 50)]:  # a sample is enough to catch an edited store
        if r["i"] >= len(images) or image_sha(images[r["i"]]) != r["a"]["sha"]:
            raise ConfigError(
                f"the label file's frame {r['i']} is not the store's frame {r['i']} any more (was the store edited "
                f"after labelling?); label it again into a new file"
            )
    if not rows:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0, int)
    a = np.asarray(rows, np.int64)
    return a[:, 0], a[:, 1], a[:, 2]


def ground_truth(store) -> np.ndarray | None:
    """Per-step ground-truth progress of a sim store (None when the store's task has none)."""
    from robot_rl.sim.vlm_teacher import store_progress

    try:
        return store_progress(store)
    except ValueError:
        return None


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def main(cfg: DictConfig, run_dir: str | os.PathLike) -> int:
    from robot_rl.commands.label import store_image_key
    from robot_rl.data.episode_store import EpisodeStore, StoreError
    from robot_rl.reward.preference import RewardEnsemble, save_reward_model
    from robot_rl.reward.vlm_client import load_labels
    from robot_rl.training.loop import Hook, LoopConfig, TrainingLoop, seed_everything

    c = cfg.get("reward_model")
    if c is None or not c.get("data"):
        raise ConfigError(
            "reward_model.data is empty: give the labelled episode store, e.g. reward_model.data=data/lift"
        )
    run_dir = Path(run_dir)
    loop_cfg = LoopConfig.from_section(c, "reward_model")
    try:
        store = EpisodeStore.open(Path(str(c.data)).expanduser())
    except StoreError as e:
        raise ConfigError(f"reward_model.data: {e}") from None
    labels_path = label_file(store.path, c.get("labels"))
    key = store_image_key(store, str(c.image_key))
    images = store.array(key)
    records = load_labels(labels_path)
    i, j, y = labelled_pairs(records, images)
    if len(y) < 4:
        raise ConfigError(f"{labels_path} has {len(y)} pairs with a preference; label more pairs (robot-rl label)")
    rng = np.random.default_rng(int(c.seed))
    order = rng.permutation(len(y))
    n_val = max(1, int(round(float(c.val_fraction) * len(y))))
    val, train = order[:n_val], order[n_val:]
    device = resolve_device(str(c.get("device", "auto")))
    seed_everything(int(c.seed), c.get("num_threads"))
    model = RewardEnsemble(
        {
            "image_key": key,
            "image_shape": list(images.shape[1:]),
            "members": int(c.members),
            "channels": list(c.channels),
            "kernels": list(c.kernels),
            "strides": list(c.strides),
            "hidden": int(c.hidden),
            "random_shift_pad": int(c.random_shift_pad),
        }
    ).to(device)
    m = int(c.members)

    def batches(g: np.random.Generator) -> dict:
        pick = train[g.integers(len(train), size=(m, loop_cfg.batch_size))]
        return {"first": images[i[pick]], "second": images[j[pick]], "label": y[pick]}

    def step(batch: dict):
        t = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in batch.items()}
        return model.bt_loss(t["first"], t["second"], t["label"])

    best = {"accuracy": -1.0, "step": 0, "state": None, "since": 0}

    def validate() -> dict:
        acc = model.pair_accuracy(images[i[val]], images[j[val]], y[val])
        model.train()
        if acc > best["accuracy"]:
            best.update(accuracy=acc, step=loop.step, state=copy.deepcopy(model.state_dict()), since=0)
        else:
            best["since"] += 1
            if best["since"] >= int(c.patience):
                log.info(
                    "held-out accuracy %.3f has not improved for %d evaluations: stopping",
                    best["accuracy"],
                    best["since"],
                )
                loop.request_stop()
        return {"pair_accuracy": acc, "best": best["accuracy"]}

    loop = TrainingLoop(
        run_dir,
        model,
        step,
        batches,
        loop_cfg,
        name="reward_model",
        hooks=[Hook("val", int(c.val_every), validate, at_end=True)],
        weights_file="reward_model.safetensors",
    )
    model.train()
    fit = loop.run()
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.fit_standardisation(images)
    train_acc = model.pair_accuracy(images[i[train]], images[j[train]], y[train])
    summary = {
        "store": str(store.path),
        "labels": str(labels_path),
        "records": len(records),
        "abstained": int(sum(r["label"] == -1 for r in records)),
        "train_pairs": int(len(train)),
        "val_pairs": int(len(val)),
        "val_accuracy": best["accuracy"],
        "best_step": best["step"],
        "train_accuracy": train_acc,
        "steps": fit["step"],
        "wall_s": fit["wall_s"],
    }
    progress = ground_truth(store)
    if progress is not None:
        agree = [(progress[r["j"]] > progress[r["i"]]) == (r["label"] == 1) for r in records if r["label"] in (0, 1)]
        summary["label_agreement_with_progress"] = float(np.mean(agree)) if agree else None
        summary["spearman_reward_progress"] = spearman(model.rewards(images), progress)
    out = save_reward_model(run_dir / "reward_model", model, summary)
    write_json(run_dir / "reward_model_summary.json", summary)
    line = f"reward model: held-out pair accuracy {best['accuracy']:.3f} ({len(val)} pairs), train {train_acc:.3f}"
    if "spearman_reward_progress" in summary:
        line += f"; Spearman with ground-truth progress {summary['spearman_reward_progress']:.3f}"
    print(f"{line}; written to {out}", flush=True)
    return 0
