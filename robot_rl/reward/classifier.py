"""Image success classifier: the sparse reward on hardware, where nothing computes `robot.is_success()`.

As HIL-SERL's reward classifier: a few hundred labelled frames (operator-marked successes, `success` in an episode
store), binary cross-entropy, class-balanced batches, DrQ random-shift augmentation, and at run time "success"
when the probability passes a high threshold (0.85 by default) for a few ticks, optionally gated on proprio.

* `SuccessClassifier`: uint8 camera images (HxWxC) and optional low-dim vectors -> one logit. Images are scaled to
  [0, 1] and made channels-first inside the module and low-dim keys are standardised with mean/std buffers stored
  in it, so the robot side feeds raw observations. The encoder is the policies' `ObsEncoder` (conv + spatial
  softmax; its random shift is active only in train mode).
* `train_classifier(store, out_dir, image_keys, ...)`: split by episode (seeded), train, write
  `classifier.safetensors` (weights + config in the metadata, enough to rebuild) and `classifier.json` (metrics).
* `load_classifier(path_or_dir)`: rebuilt from the safetensors metadata alone, in eval mode.
* `main(cfg, run_dir)`: `robot-rl train-classifier` (configs/classifier.yaml).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robot_rl.interfaces import OBS_PREFIX
from robot_rl.policies.encoders import ObsEncoder

log = logging.getLogger("robot_rl.reward.classifier")

FORMAT = "robot_rl.success_classifier"
FORMAT_VERSION = 1
WEIGHTS_FILE = "classifier.safetensors"
METRICS_FILE = "classifier.json"
DEFAULT_THRESHOLD = 0.85  # HIL-SERL's success threshold on the classifier probability
MIN_STD = 1e-3  # low-dim entries that never vary are divided by this instead of ~0

# The encoder a new classifier gets unless told otherwise: three strided convs keep 84x84 inference at a few ms on
# one CPU core; spatial softmax (keypoints) localises the object, which is what "lifted / placed" is about.
DEFAULT_ENCODER: dict[str, Any] = {
    "feature_dim": 64,
    "channels": [32, 64, 64],
    "strides": [2, 2, 2],
    "pool": "spatial_softmax",
    "num_keypoints": 32,
    "n_groups": 8,
    "random_shift_pad": 4,
}


class ClassifierDataError(ValueError):
    """The episode store cannot train a classifier as asked (missing keys, one class only); says what to do."""


def _bare(key: str) -> str:
    """Observation name as the robot produces it (`agentview_image`), whether or not given with `obs.`."""
    return key[len(OBS_PREFIX) :] if key.startswith(OBS_PREFIX) else key


# ================================================================================================== the model
class SuccessClassifier(nn.Module):
    """Observation dict -> success logit. `image_shapes`: {key: (H, W, C)}; `lowdim_dims`: {key: size}."""

    def __init__(
        self,
        image_shapes: Mapping[str, Sequence[int]],
        lowdim_dims: Mapping[str, int] | None = None,
        encoder: Mapping[str, Any] | None = None,
        hidden: Sequence[int] = (256,),
        dropout: float = 0.0,
        threshold: float = DEFAULT_THRESHOLD,
    ):
        super().__init__()
        if not image_shapes:
            raise ValueError("a success classifier needs at least one image key")
        self.image_shapes = {_bare(k): tuple(int(s) for s in v) for k, v in image_shapes.items()}
        for k, s in self.image_shapes.items():
            if len(s) != 3:
                raise ValueError(f"image {k!r}: shape must be (H, W, C), got {s}")
        self.lowdim_dims = {_bare(k): int(v) for k, v in (lowdim_dims or {}).items()}
        self.encoder_cfg = {**DEFAULT_ENCODER, **dict(encoder or {})}
        unknown = set(self.encoder_cfg) - set(DEFAULT_ENCODER)
        if unknown:
            raise ValueError(f"encoder: unknown entries {sorted(unknown)}; known: {', '.join(DEFAULT_ENCODER)}")
        self.hidden = [int(h) for h in hidden]
        self.dropout = float(dropout)
        self.threshold = float(threshold)
        self.image_keys = list(self.image_shapes)
        self.lowdim_keys = list(self.lowdim_dims)
        e = self.encoder_cfg
        self.encoder = ObsEncoder(
            self.lowdim_dims,
            self.image_shapes,
            feature_dim=int(e["feature_dim"]),
            channels=list(e["channels"]),
            strides=list(e["strides"]),
            pool=str(e["pool"]),
            num_keypoints=int(e["num_keypoints"]),
            n_groups=int(e["n_groups"]),
            random_shift_pad=int(e["random_shift_pad"]),
        )
        layers: list[nn.Module] = []
        last = self.encoder.out_dim
        for h in self.hidden:
            layers += [nn.Linear(last, h), nn.LayerNorm(h), nn.Mish()]
            if self.dropout > 0:
                layers.append(nn.Dropout(self.dropout))
            last = h
        layers.append(nn.Linear(last, 1))
        self.head = nn.Sequential(*layers)
        dim = sum(self.lowdim_dims.values())
        self.register_buffer("lowdim_mean", torch.zeros(dim))
        self.register_buffer("lowdim_std", torch.ones(dim))

    # ------------------------------------------------------------------------------------------- config
    @property
    def config(self) -> dict:
        """Everything needed to rebuild the module (stored in the safetensors metadata)."""
        return {
            "image_shapes": {k: list(v) for k, v in self.image_shapes.items()},
            "lowdim_dims": dict(self.lowdim_dims),
            "encoder": dict(self.encoder_cfg),
            "hidden": list(self.hidden),
            "dropout": self.dropout,
            "threshold": self.threshold,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SuccessClassifier:
        return cls(
            config["image_shapes"],
            config.get("lowdim_dims"),
            config.get("encoder"),
            config.get("hidden", (256,)),
            config.get("dropout", 0.0),
            config.get("threshold", DEFAULT_THRESHOLD),
        )

    def set_lowdim_stats(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Standardisation of the concatenated low-dim keys (in `lowdim_keys` order), from the training frames."""
        mean = torch.as_tensor(np.asarray(mean, np.float32).reshape(-1))
        std = torch.as_tensor(np.maximum(np.asarray(std, np.float32).reshape(-1), MIN_STD))
        if mean.shape != self.lowdim_mean.shape or std.shape != self.lowdim_std.shape:
            raise ValueError(
                f"low-dim stats have {mean.numel()} entries, the classifier has {self.lowdim_mean.numel()}"
            )
        self.lowdim_mean.copy_(mean)
        self.lowdim_std.copy_(std)

    # ------------------------------------------------------------------------------------------- inputs
    def prepare(self, obs: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], bool]:
        """Raw observations (one frame or a batch; numpy or torch) -> normalised (N, ...) tensors on the
        module's device, and whether the input was batched. Images: uint8 HxWxC (divided by 255) or float in
        [0, 1]; a frame of another resolution than trained on is refused rather than silently misread."""
        device = self.lowdim_mean.device
        missing = [k for k in (*self.image_keys, *self.lowdim_keys) if k not in obs]
        if missing:
            raise KeyError(f"success classifier: observation lacks {missing}; it has {sorted(obs)}")
        out: dict[str, torch.Tensor] = {}
        batched: bool | None = None
        for k in self.image_keys:
            x = torch.as_tensor(np.asarray(obs[k]) if not isinstance(obs[k], torch.Tensor) else obs[k])
            single = x.dim() == 3
            if single:
                x = x.unsqueeze(0)
            if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shapes[k]:
                raise ValueError(
                    f"success classifier: image {k!r} has shape {tuple(np.shape(obs[k]))}, it was "
                    f"trained on {self.image_shapes[k]} (H, W, C, optionally batched): set the camera "
                    f"to that resolution or retrain"
                )
            batched = not single if batched is None else batched
            x = x.to(device)
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
            out[k] = x.permute(0, 3, 1, 2).contiguous()
        offset = 0
        for k in self.lowdim_keys:
            d = self.lowdim_dims[k]
            x = torch.as_tensor(np.asarray(obs[k]) if not isinstance(obs[k], torch.Tensor) else obs[k])
            x = x.to(device=device, dtype=torch.float32)
            x = x.reshape(1, -1) if not batched else x.reshape(x.shape[0], -1)
            if x.shape[1] != d:
                raise ValueError(f"success classifier: {k!r} has {x.shape[1]} entries, it was trained on {d}")
            out[k] = (x - self.lowdim_mean[offset : offset + d]) / self.lowdim_std[offset : offset + d]
            offset += d
        return out, bool(batched)

    # ------------------------------------------------------------------------------------------- outputs
    def forward(self, obs: Mapping[str, Any]) -> torch.Tensor:
        """Logits, shape (N,) (N = 1 for a single frame)."""
        x, _ = self.prepare(obs)
        return self.head(self.encoder(x)).squeeze(-1)

    @torch.no_grad()
    def predict_proba(self, obs: Mapping[str, Any]) -> float | np.ndarray:
        """P(success): a float for one frame, a float32 array for a batch. Always without augmentation (eval
        behaviour), whatever mode the module is in."""
        was_training = self.training
        self.eval()
        try:
            x, batched = self.prepare(obs)
            p = torch.sigmoid(self.head(self.encoder(x)).squeeze(-1)).float().cpu().numpy()
        finally:
            self.train(was_training)
        return p if batched else float(p[0])


# ================================================================================================== save / load
def save_classifier(model: SuccessClassifier, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Weights + config (JSON in the safetensors metadata) in one file; `extra` (provenance) is kept beside."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    meta = {
        "format": FORMAT,
        "version": str(FORMAT_VERSION),
        "config": json.dumps(cfg),
        "image_keys": json.dumps(model.image_keys),
        "lowdim_keys": json.dumps(model.lowdim_keys),
        "shapes": json.dumps({**cfg["image_shapes"], **{k: [d] for k, d in cfg["lowdim_dims"].items()}}),
        "threshold": str(model.threshold),
        "extra": json.dumps(dict(extra or {}), default=str),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_classifier(path_or_dir: str | os.PathLike, device: str | torch.device = "cpu") -> SuccessClassifier:
    """A trained classifier (a `classifier.safetensors` file or the directory holding one), in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path_or_dir).expanduser()
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no success classifier at {path}: give the {WEIGHTS_FILE} written by "
            f"robot-rl train-classifier (or its run directory)"
        )
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a success classifier (format {meta.get('format')!r}, expected {FORMAT!r})")
    if int(meta.get("version", -1)) != FORMAT_VERSION:
        raise ValueError(
            f"{path}: success classifier format v{meta.get('version')} is not supported "
            f"(this code reads v{FORMAT_VERSION}); retrain it"
        )
    model = SuccessClassifier.from_config(json.loads(meta["config"]))
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


# ================================================================================================== metrics
def binary_metrics(prob: np.ndarray, label: np.ndarray, threshold: float) -> dict:
    """Accuracy, precision, recall and confusion counts of `prob >= threshold` against boolean labels.
    Precision (recall) is None when nothing was predicted (is) positive."""
    pred = np.asarray(prob) >= threshold
    label = np.asarray(label, bool)
    tp, fp = int(np.sum(pred & label)), int(np.sum(pred & ~label))
    tn, fn = int(np.sum(~pred & ~label)), int(np.sum(~pred & label))
    n = tp + fp + tn + fn
    return {
        "frames": n,
        "positive": tp + fn,
        "negative": tn + fp,
        "threshold": float(threshold),
        "accuracy": (tp + tn) / n if n else None,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "majority_rate": max(tp + fn, tn + fp) / n if n else None,
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
    }


def _predict_rows(
    model: SuccessClassifier, data: Mapping[str, np.ndarray], rows: np.ndarray, batch_size: int
) -> np.ndarray:
    out = [
        model.predict_proba({k: v[rows[i : i + batch_size]] for k, v in data.items()})
        for i in range(0, len(rows), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


# ================================================================================================== training
def _episode_split(n_episodes: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Whole episodes go to train or val (frames of one episode are near-duplicates, a frame split would leak)."""
    order = np.random.default_rng(seed).permutation(n_episodes)
    if val_fraction <= 0 or n_episodes < 2:
        if val_fraction > 0:
            log.warning("only %d episode: no validation split (record more episodes to measure accuracy)", n_episodes)
        return sorted(order.tolist()), []
    n_val = int(np.clip(round(val_fraction * n_episodes), 1, n_episodes - 1))
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def _load_frames(store, image_keys: Sequence[str], lowdim_keys: Sequence[str], label_key: str):
    """Arrays by bare observation name, labels, and a clear error for anything the store does not have."""
    feats = store.features
    obs_keys = sorted(k[len(OBS_PREFIX) :] for k in feats if k.startswith(OBS_PREFIX))
    missing = [k for k in (*image_keys, *lowdim_keys) if OBS_PREFIX + k not in feats]
    if missing:
        raise ClassifierDataError(
            f"{store.path} has no observation key(s) {missing}; its observation keys are: {', '.join(obs_keys)}"
        )
    if label_key not in feats:
        raise ClassifierDataError(f"{store.path} has no label key {label_key!r}; its keys are: {', '.join(feats)}")
    for k in image_keys:
        if not feats[OBS_PREFIX + k].is_image:
            raise ClassifierDataError(
                f"{k!r} is not an image (uint8 HxWxC) in {store.path}: put it in lowdim_keys; "
                f"image keys there: {[n for n in obs_keys if feats[OBS_PREFIX + n].is_image]}"
            )
    for k in lowdim_keys:
        if feats[OBS_PREFIX + k].is_image:
            raise ClassifierDataError(f"{k!r} is an image: put it in image_keys, not lowdim_keys")
    if int(np.prod(feats[label_key].shape, dtype=np.int64)) != 1:
        raise ClassifierDataError(
            f"label key {label_key!r} has shape {feats[label_key].shape}; it must be one value per step"
        )
    if store.num_steps == 0:
        raise ClassifierDataError(f"{store.path} holds no episodes")
    labels = np.asarray(store.array(label_key)).reshape(-1).astype(np.float32) > 0.5
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        which = "positive (success)" if n_pos == 0 else "negative (not yet successful)"
        raise ClassifierDataError(
            f"{store.path}: all {len(labels)} frames are labelled {label_key}="
            f"{bool(n_pos)}, there are no {which} frames to learn from. Record episodes with "
            f"both (press the success key once the task is solved, keep recording a while; see "
            f"docs/rewards.md)"
        )
    data = {k: np.asarray(store.array(OBS_PREFIX + k)) for k in (*image_keys, *lowdim_keys)}
    return data, labels


def train_classifier(
    store_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    image_keys: Sequence[str],
    lowdim_keys: Sequence[str] = (),
    label_key: str = "success",
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 3e-4,
    val_fraction: float = 0.2,
    seed: int = 0,
    device: str | torch.device = "auto",
    balance: bool = True,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    weight_decay: float = 1e-4,
    encoder: Mapping[str, Any] | None = None,
    hidden: Sequence[int] = (256,),
    dropout: float = 0.0,
    eval_batch_size: int = 256,
    log_every: int = 100,
) -> dict:
    """Train a success classifier on an episode store; write `classifier.safetensors` + `classifier.json` into
    `out_dir` and return the metrics dict (also in the json).

    Episodes are split (seeded) into train / val; batches are drawn half positive, half negative with `balance`
    (successes are rare in recordings, and an unbalanced BCE learns "never"), uniformly otherwise. Metrics are at
    `threshold`, the probability the robot side will require.
    """
    from robot_rl.config import resolve_device
    from robot_rl.data.episode_store import EpisodeStore

    t_start = time.perf_counter()
    image_keys = [_bare(k) for k in image_keys]
    lowdim_keys = [_bare(k) for k in lowdim_keys]
    if not image_keys:
        raise ClassifierDataError("image_keys is empty: give the camera key(s) to classify, e.g. [agentview_image]")
    if int(steps) < 1 or int(batch_size) < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    store = EpisodeStore.open(store_path, "r")
    data, labels = _load_frames(store, image_keys, lowdim_keys, label_key)
    train_eps, val_eps = _episode_split(store.num_episodes, float(val_fraction), int(seed))

    def rows_of(eps: list[int]) -> np.ndarray:
        parts = [np.arange(*store.episode_bounds(i)) for i in eps]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    train_rows, val_rows = rows_of(train_eps), rows_of(val_eps)
    pos_rows, neg_rows = train_rows[labels[train_rows]], train_rows[~labels[train_rows]]
    if len(pos_rows) == 0 or len(neg_rows) == 0:
        raise ClassifierDataError(
            f"the training episodes {train_eps} have {len(pos_rows)} positive and "
            f"{len(neg_rows)} negative frames (the others went to validation): record more "
            f"episodes with both, or change seed / val_fraction"
        )

    torch.manual_seed(int(seed))
    rng = np.random.default_rng(int(seed))
    model = SuccessClassifier(
        {k: data[k].shape[1:] for k in image_keys},
        {k: int(np.prod(data[k].shape[1:], dtype=np.int64)) for k in lowdim_keys},
        encoder=encoder,
        hidden=hidden,
        dropout=dropout,
        threshold=threshold,
    )
    if lowdim_keys:
        flat = np.concatenate(
            [data[k][train_rows].reshape(len(train_rows), -1).astype(np.float64) for k in lowdim_keys], axis=1
        )
        model.set_lowdim_stats(flat.mean(0), flat.std(0))
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=float(lr), weight_decay=float(weight_decay))
    log.info(
        "training a success classifier on %s: %d train episodes (%d pos / %d neg frames), %d val episodes "
        "(%d frames), %d steps of %d on %s",
        store.path,
        len(train_eps),
        len(pos_rows),
        len(neg_rows),
        len(val_eps),
        len(val_rows),
        steps,
        batch_size,
        device,
    )
    losses: list[float] = []
    curve: list[dict] = []
    t_train = time.perf_counter()
    for step in range(1, int(steps) + 1):
        if balance:
            n_pos = int(batch_size) // 2
            rows = np.concatenate([rng.choice(pos_rows, n_pos), rng.choice(neg_rows, int(batch_size) - n_pos)])
        else:
            rows = rng.choice(train_rows, int(batch_size))
        logits = model({k: v[rows] for k, v in data.items()})
        target = torch.as_tensor(labels[rows], dtype=torch.float32, device=device)
        loss = F.binary_cross_entropy_with_logits(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(1, int(log_every)) == 0 or step == int(steps):
            mean_loss = float(np.mean(losses[-max(1, int(log_every)) :]))
            curve.append({"step": step, "loss": mean_loss})
            log.info("step %d/%d: loss %.4f", step, steps, mean_loss)
    train_s = time.perf_counter() - t_train

    model.eval()
    train_prob = _predict_rows(model, data, train_rows, int(eval_batch_size))
    val_prob = _predict_rows(model, data, val_rows, int(eval_batch_size))
    result = {
        "data": str(store.path),
        "image_keys": image_keys,
        "lowdim_keys": lowdim_keys,
        "label_key": label_key,
        "threshold": float(threshold),
        "steps": int(steps),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "balance": bool(balance),
        "seed": int(seed),
        "device": str(device),
        "frames": {"positive": int(labels.sum()), "negative": int((~labels).sum())},
        "episodes": {"train": train_eps, "val": val_eps},
        "train": binary_metrics(train_prob, labels[train_rows], threshold),
        "val": binary_metrics(val_prob, labels[val_rows], threshold) if len(val_rows) else None,
        "loss_curve": curve,
        "final_loss": curve[-1]["loss"] if curve else None,
        "train_s": train_s,
        "wall_s": time.perf_counter() - t_start,
    }
    out_dir = Path(out_dir)
    save_classifier(
        model,
        out_dir / WEIGHTS_FILE,
        extra={
            "data": result["data"],
            "label_key": label_key,
            "steps": int(steps),
            "val_accuracy": (result["val"] or {}).get("accuracy"),
        },
    )
    from robot_rl.config import write_json

    write_json(out_dir / METRICS_FILE, result)
    return result


def format_metrics(result: dict) -> str:
    """Operator-facing summary lines of `train_classifier`'s result."""

    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"

    lines = [
        f"frames: {result['frames']['positive']} positive / {result['frames']['negative']} negative; "
        f"episodes: {len(result['episodes']['train'])} train / {len(result['episodes']['val'])} val; "
        f"{result['steps']} steps in {result['train_s']:.1f} s"
    ]
    for split in ("train", "val"):
        m = result.get(split)
        if m is None:
            lines.append(f"{split}: no frames")
            continue
        c = m["confusion"]
        lines.append(
            f"{split}: accuracy {fmt(m['accuracy'])} (majority class {fmt(m['majority_rate'])}), precision "
            f"{fmt(m['precision'])}, recall {fmt(m['recall'])} at threshold {m['threshold']:.2f}; "
            f"tp {c['tp']} fp {c['fp']} tn {c['tn']} fn {c['fn']}"
        )
    return "\n".join(lines)


# ================================================================================================== CLI
def main(cfg, run_dir: str | os.PathLike) -> int:
    """Entry point of `robot-rl train-classifier` (the CLI passes hydra's run directory). Returns an exit code."""
    from omegaconf import OmegaConf

    from robot_rl.config import ConfigError
    from robot_rl.data.episode_store import StoreError

    c = cfg.classifier
    if not c.get("data"):
        raise ConfigError(
            "classifier.data is empty: give the episode store of labelled frames "
            "(robot-rl train-classifier classifier.data=data/success_frames)"
        )
    image_keys = list(c.get("image_keys") or [])
    if not image_keys:
        raise ConfigError("classifier.image_keys is empty: give the camera key(s), e.g. [agentview_image]")
    for field in ("steps", "batch_size"):
        v = c.get(field)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"classifier.{field} must be a positive integer, got {v!r}")
    if not 0.0 < float(c.threshold) < 1.0:
        raise ConfigError(f"classifier.threshold must be in (0, 1), got {c.threshold}")
    if not 0.0 <= float(c.val_fraction) < 1.0:
        raise ConfigError(f"classifier.val_fraction must be in [0, 1), got {c.val_fraction}")
    if c.get("num_threads"):
        torch.set_num_threads(int(c.num_threads))
    run_dir = Path(run_dir)
    encoder = OmegaConf.to_container(c.encoder, resolve=True) if c.get("encoder") is not None else None
    try:
        result = train_classifier(
            str(c.data),
            c.get("out_dir") or run_dir,
            image_keys,
            list(c.get("lowdim_keys") or []),
            label_key=str(c.get("label_key", "success")),
            steps=int(c.steps),
            batch_size=int(c.batch_size),
            lr=float(c.lr),
            val_fraction=float(c.val_fraction),
            seed=int(c.seed),
            device=str(c.get("device", "auto")),
            balance=bool(c.get("balance", True)),
            threshold=float(c.threshold),
            weight_decay=float(c.get("weight_decay", 1e-4)),
            encoder=encoder,
            hidden=list(c.get("hidden") or [256]),
            dropout=float(c.get("dropout", 0.0)),
            log_every=int(c.get("log_every", 100)),
        )
    except (ClassifierDataError, StoreError) as e:
        raise ConfigError(f"classifier.data: {e}") from None
    out = Path(c.get("out_dir") or run_dir)
    print(format_metrics(result), flush=True)
    print(f"classifier: {out / WEIGHTS_FILE}  (success source `classifier`, see docs/rewards.md)", flush=True)
    return 0
