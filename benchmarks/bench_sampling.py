"""Training-batch throughput: our SequenceSampler over the episode store vs LeRobotDataset on the same data.

    python benchmarks/bench_sampling.py [--quick]

Data: scripted-expert Lift demos recorded with two 96x96 cameras, exported to LeRobotDataset v3 by our exporter
(once with AV1 videos, lerobot's default, once with PNG images), in lerobot's usual layout (observation.state,
observation.images.*, action). Batches of 256 windows, observation horizon 2 and
action horizon 16 (lerobot: `delta_timestamps` for the same offsets), returned as torch tensors. lerobot is read
through a torch DataLoader (shuffle, num_workers 0 and 2); ours samples from memory in the calling thread.
Reported: batches/s (median of repeats), state-only and with both cameras.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

BATCH, TO, HA = 256, 2, 16


def record(tmp: Path, episodes: int) -> Path:
    from hydra import compose, initialize_config_module

    from robot_rl.commands.record import Recorder

    with initialize_config_module("robot_rl.configs", version_base=None):
        cfg = compose(
            "record",
            overrides=[
                f"record.path={tmp / 'store'}",
                f"record.episodes={episodes}",
                "robot.cameras=[agentview,robot0_eye_in_hand]",
                "robot.camera_height=96",
                "robot.camera_width=96",
                "record.report_every_s=1000",
            ],
        )
    Recorder(cfg, tmp / "run").run()
    return tmp / "store"


def lerobot_layout(src: Path, dst: Path) -> Path:
    """The recording as lerobot datasets usually look: one `obs.state` vector, the cameras, the action (so the
    export has observation.state / observation.images.* / action and no per-key extras to slow lerobot down)."""
    from robot_rl.data.episode_store import EpisodeStore
    from robot_rl.interfaces import Feature

    store = EpisodeStore.open(src)
    low = [k for k, f in store.features.items() if k.startswith("obs.") and not f.is_image]
    cams = [k for k, f in store.features.items() if f.is_image]
    dim = sum(int(np.prod(store.features[k].shape)) for k in low)
    feats = {
        "obs.state": Feature((dim,)),
        **{k: store.features[k] for k in cams},
        **{k: store.features[k] for k in ("action", "success", "timestamp")},
    }
    out = EpisodeStore.create(dst, feats, store.fps)
    w = out.writer()
    for i in range(store.num_episodes):
        ep = store.episode(i)
        state = np.concatenate([ep[k].reshape(len(ep[k]), -1) for k in low], axis=1)
        w.begin({"task": store.episodes[i].get("task", "")})
        for t in range(len(state)):
            w.add({"obs.state": state[t], **{k: ep[k][t] for k in feats if k != "obs.state"}})
        w.save()
    out.close()
    return dst


def rate(fn, batches: int, repeats: int) -> float:
    fn()  # warm-up (first decode, worker start)
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(batches):
            fn()
        runs.append(batches / (time.perf_counter() - t))
    return statistics.median(runs)


def ours(store_path: Path, images: bool, batches: int, repeats: int) -> float:
    from robot_rl.data.episode_store import EpisodeStore
    from robot_rl.data.sequence import SequenceSampler

    store = EpisodeStore.open(store_path)
    keys = [k for k, f in store.features.items() if k.startswith("obs.") and (images or not f.is_image)]
    sampler = SequenceSampler.from_store(store, keys, obs_horizon=TO, action_horizon=HA)
    rng = np.random.default_rng(0)

    def batch():
        return {k: torch.from_numpy(v) for k, v in sampler.sample(BATCH, rng).items()}

    return rate(batch, batches, repeats)


def lerobot(root: Path, images: bool, workers: int, batches: int, repeats: int) -> float:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    meta_ds = LeRobotDataset("bench/sampling", root=root, video_backend="pyav")
    fps = meta_ds.fps
    keys = [k for k in meta_ds.features if k.startswith("observation.") and (images or "images" not in k)]
    delta = {k: [i / fps for i in range(-TO + 1, 1)] for k in keys}
    delta["action"] = [i / fps for i in range(-TO + 1, -TO + 1 + HA)]
    ds = LeRobotDataset("bench/sampling", root=root, video_backend="pyav", delta_timestamps=delta)
    if not images:  # do not decode frames we do not use
        ds.meta.info["features"] = {k: v for k, v in ds.meta.features.items() if "images" not in k}
    loader = torch.utils.data.DataLoader(
        ds, batch_size=BATCH, shuffle=True, num_workers=workers, persistent_workers=workers > 0
    )
    it = iter(loader)

    def batch():
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            it = iter(loader)
            return next(it)

    return rate(batch, batches, repeats)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    episodes, batches, repeats = (6, 3, 2) if args.quick else (30, 10, 3)
    from robot_rl.data.interchange import export_lerobot

    tmp = Path(tempfile.mkdtemp(prefix="bench_sampling_"))
    try:
        store = lerobot_layout(record(tmp, episodes), tmp / "store_lerobot_layout")
        export_lerobot(store, tmp / "lr_video", repo_id="bench/sampling", use_videos=True)
        export_lerobot(store, tmp / "lr_png", repo_id="bench/sampling", use_videos=False)
        from robot_rl.data.episode_store import EpisodeStore

        n = EpisodeStore.open(store).num_steps
        print(
            f"{episodes} Lift demos, {n} steps, 2 cameras 96x96; batch {BATCH}, obs horizon {TO}, action "
            f"horizon {HA}; batches/s (median of {repeats})"
        )
        for images in (False, True):
            label = "state + 2 cameras" if images else "state only"
            o = ours(store, images, batches * (20 if not images else 5), repeats)
            print(f"  {label:<18} ours (memory)          {o:9.1f}")
            for name, root in (("AV1 video", tmp / "lr_video"), ("PNG", tmp / "lr_png")):
                if not images and name == "PNG":
                    continue
                for w in (0, 2):
                    lr = lerobot(root, images, w, batches, repeats)
                    print(f"  {label:<18} LeRobotDataset {name:<9} workers={w} {lr:9.2f}   (ours {o / lr:,.0f}x)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
