"""Image success classifier on MuJoCo Lift: how well it separates success frames, and what it costs per tick.

    python benchmarks/bench_success_classifier.py [--episodes 20] [--steps 80] [--size 84] [--train-steps 1500]

Records `--episodes` Lift episodes (agentview camera, `--size` px square) with the scripted expert at mixed quality
(episode i uses preset expert / mediocre / poor in turn, so some episodes retry grasps, drop the cube or run out of
`--steps` without lifting it: failures and near-misses as negatives), labelling each frame with the simulator's
success for the state that frame shows. Then trains the classifier (configs/classifier.yaml defaults: ObsEncoder
conv + spatial softmax, random shift, class-balanced BCE) with a seeded by-episode train/val split and prints
train/val accuracy, precision and recall at threshold 0.85, the positive/negative frame counts, and the median
single-frame inference time (`predict_proba` on one uint8 frame, as `ClassifierSuccess` calls it every tick).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PRESETS = ("expert", "mediocre", "poor")


def record(path: Path, episodes: int, steps: int, size: int, seed: int) -> dict:
    """Scripted Lift episodes into an episode store; returns per-episode success counts."""
    from omegaconf import OmegaConf

    from robot_rl.data.episode_store import EpisodeStore
    from robot_rl.factory import make_robot
    from robot_rl.interfaces import OBS_PREFIX, Feature
    from robot_rl.sim.experts import make_expert

    repo = Path(__file__).resolve().parents[1]
    cfg = OmegaConf.load(repo / "configs" / "robot" / "lift.yaml")
    cfg.cameras, cfg.camera_height, cfg.camera_width = ["agentview"], size, size
    robot = make_robot(cfg)
    robot.connect()
    experts = {q: make_expert("Lift", seed=seed, quality=q) for q in PRESETS}
    lifted = []
    try:
        feats = {OBS_PREFIX + k: f for k, f in robot.observation_features.items()}
        feats["action"] = robot.action_feature
        feats["success"] = Feature((), "bool")
        store = EpisodeStore.create(path, feats, fps=20)
        writer = store.writer()
        for ep in range(episodes):
            quality = PRESETS[ep % len(PRESETS)]
            expert = experts[quality]
            obs = robot.reset(seed=seed + ep)
            expert.reset()
            writer.begin({"seed": seed + ep, "quality": quality})
            n_success = 0
            for _ in range(steps):
                action = expert.get_action(obs)
                success = bool(robot.is_success())  # the state this frame shows
                n_success += success
                writer.add(
                    {**{OBS_PREFIX + k: v for k, v in obs.items()}, "action": action, "success": np.bool_(success)}
                )
                robot.send_action(action)
                obs = robot.get_observation()
            writer.save({"success": n_success > 0})
            lifted.append((quality, n_success))
        store.close()
    finally:
        robot.disconnect()
    return {"episodes": lifted}


def inference_ms(clf, frames: np.ndarray, key: str, n: int) -> float:
    times = []
    for i in range(n):
        frame = {key: frames[i % len(frames)]}
        t0 = time.perf_counter()
        clf.predict_proba(frame)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--steps", type=int, default=80, help="steps per episode (expert lifts at ~35, poor much later)")
    ap.add_argument("--size", type=int, default=84, help="camera height = width (px)")
    ap.add_argument("--train-steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--val-fraction", type=float, default=0.25)
    ap.add_argument("--threshold", type=float, default=0.85)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--inference-frames", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None, help="keep the store and classifier here (default: temp)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    from omegaconf import OmegaConf

    from robot_rl.data.episode_store import EpisodeStore
    from robot_rl.reward.classifier import format_metrics, load_classifier, train_classifier

    defaults = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "classifier.yaml").classifier
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        rec = record(out / "store", args.episodes, args.steps, args.size, args.seed)
        rec_s = time.perf_counter() - t0
        failed = sum(n == 0 for _, n in rec["episodes"])
        print(
            f"recorded {args.episodes} Lift episodes x {args.steps} steps, agentview {args.size}x{args.size}, "
            f"expert/mediocre/poor in turn, in {rec_s:.0f} s; {failed} episodes never lifted the cube"
        )
        result = train_classifier(
            out / "store",
            out / "classifier",
            ["agentview_image"],
            steps=args.train_steps,
            batch_size=args.batch_size,
            lr=args.lr,
            val_fraction=args.val_fraction,
            seed=args.seed,
            device="cpu",
            threshold=args.threshold,
            weight_decay=float(defaults.weight_decay),
            encoder=OmegaConf.to_container(defaults.encoder),
            hidden=list(defaults.hidden),
            dropout=float(defaults.dropout),
            log_every=max(1, args.train_steps // 5),
        )
        print(format_metrics(result))
        clf = load_classifier(out / "classifier")
        frames = EpisodeStore.open(out / "store").array("obs.agentview_image")[: args.inference_frames]
        ms = inference_ms(clf, frames, "agentview_image", args.inference_frames)
        params = sum(p.numel() for p in clf.parameters())
        print(
            f"inference: {ms:.2f} ms per frame (median of {args.inference_frames}, 1 frame, {args.threads} CPU "
            f"thread(s)); {params} parameters; training {result['train_s']:.0f} s for {args.train_steps} steps "
            f"of {args.batch_size}"
        )
        print(
            json.dumps(
                {
                    "val_accuracy": (result["val"] or {}).get("accuracy"),
                    "train_accuracy": result["train"]["accuracy"],
                    "frames": result["frames"],
                    "inference_ms": ms,
                }
            )
        )


if __name__ == "__main__":
    main()
