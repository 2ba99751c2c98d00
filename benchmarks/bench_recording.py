"""Recording health and save latency: our recorder + episode store vs LeRobotDataset on the same frames.

    python benchmarks/bench_recording.py [--quick]

1. `robot-rl record` on sim Lift at 30 Hz with two 96x96 cameras (agentview + wrist), scripted expert, fixed-length
   episodes adding up to 2 minutes (quick: 2 x 5 s): missed ticks, dropped frames, achieved rate, tick lateness, and
   the time from "episode done" to "saved" (our writer compresses in the background while the episode runs).
2. The same frames (read back from our store) fed to lerobot's LeRobotDataset (v3, videos, lerobot's recording
   defaults: 4 image-writer threads per camera): add_frame cost per frame and save_episode time per episode.
Medians over episodes; both on this machine in one run.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def record_ours(tmp: Path, episodes: int, steps: int) -> dict:
    from hydra import compose, initialize_config_module

    from robot_rl.commands.record import Recorder

    overrides = [
        f"record.path={tmp / 'ours'}",
        f"record.episodes={episodes}",
        f"record.max_episode_steps={steps}",
        "record.stop_on_success=false",
        "record.fps=30",
        "robot.control_freq=30",
        "robot.horizon=100000",
        "robot.cameras=[agentview,robot0_eye_in_hand]",
        "robot.camera_height=96",
        "robot.camera_width=96",
        "record.report_every_s=1000",
    ]
    with initialize_config_module("robot_rl.configs", version_base=None):
        cfg = compose("record", overrides=overrides)
    return Recorder(cfg, tmp / "run").run()


def record_lerobot(tmp: Path, store_path: Path) -> dict:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from robot_rl.data.episode_store import EpisodeStore

    store = EpisodeStore.open(store_path)
    cams = [k for k, f in store.features.items() if f.is_image]
    state_keys = [k for k, f in store.features.items() if k.startswith("obs.") and not f.is_image]
    state_dim = sum(int(np.prod(store.features[k].shape)) for k in state_keys)
    feats = {
        f"observation.images.{k[4:]}": {
            "dtype": "video",
            "shape": store.features[k].shape,
            "names": ["height", "width", "channels"],
        }
        for k in cams
    }
    feats["observation.state"] = {"dtype": "float32", "shape": (state_dim,), "names": None}
    feats["action"] = {"dtype": "float32", "shape": store.features["action"].shape, "names": None}
    ds = LeRobotDataset.create(
        "bench/recording",
        fps=30,
        root=tmp / "lerobot",
        features=feats,
        use_videos=True,
        image_writer_threads=4 * len(cams),
    )
    add_per_frame, save_s = [], []
    try:
        for i in range(store.num_episodes):
            ep = store.episode(i)
            frames = [
                {
                    **{f"observation.images.{k[4:]}": ep[k][t] for k in cams},
                    "observation.state": np.concatenate([ep[k][t].reshape(-1) for k in state_keys]),
                    "action": ep["action"][t],
                    "task": "lift the cube",
                }
                for t in range(len(ep["action"]))
            ]
            t0 = time.perf_counter()
            for f in frames:
                ds.add_frame(f)
            add_per_frame.append((time.perf_counter() - t0) / len(frames))
            t0 = time.perf_counter()
            ds.save_episode()
            save_s.append(time.perf_counter() - t0)
    finally:
        ds.finalize()
    disk = sum(f.stat().st_size for f in (tmp / "lerobot").rglob("*") if f.is_file())
    return {"add_per_frame_s": add_per_frame, "save_s": save_s, "disk_bytes": disk}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="2 episodes of 5 s instead of 4 of 30 s")
    args = ap.parse_args()
    episodes, steps = (2, 150) if args.quick else (4, 900)
    tmp = Path(tempfile.mkdtemp(prefix="bench_recording_"))
    try:
        ours = record_ours(tmp, episodes, steps)
        eps = ours["episodes"]
        pace = ours["pacing"]
        ours_disk = sum(f.stat().st_size for f in (tmp / "ours").rglob("*") if f.is_file())
        print(
            f"recorded {len(eps)} episodes x {steps} steps at 30 Hz, 2 cameras 96x96 "
            f"({sum(e['length'] for e in eps) / 30:.0f} s of data)"
        )
        print(
            f"  ours: achieved {pace['rate_hz']:.2f} Hz, missed ticks {ours['missed_ticks']} "
            f"(overruns {pace['overruns']}), dropped frames {ours['dropped_frames']}, tick lateness p50/p99 "
            f"{pace['lateness_p50_us']:.0f}/{pace['lateness_p99_us']:.0f} us, work p99 {pace['work_p99_us'] / 1e3:.1f} ms"
        )
        lr = record_lerobot(tmp, tmp / "ours")
        ours_save = statistics.median(e["save_s"] for e in eps)
        lr_save = statistics.median(lr["save_s"])
        print(
            f"episode done -> saved (median): ours {1e3 * ours_save:.1f} ms vs LeRobotDataset.save_episode "
            f"{1e3 * lr_save:.0f} ms  ({lr_save / ours_save:.0f}x)"
        )
        print(
            f"per-frame cost on the recording thread: ours add() p50/p99 {pace['store_add_p50_us'] / 1e3:.2f}/"
            f"{pace['store_add_p99_us'] / 1e3:.2f} ms vs LeRobotDataset.add_frame "
            f"{1e3 * statistics.median(lr['add_per_frame_s']):.2f} ms/frame (median)"
        )
        print(
            f"  (robot step + render p50/p99 {pace['robot_p50_us'] / 1e3:.1f}/{pace['robot_p99_us'] / 1e3:.1f} ms "
            f"of the {1e3 / 30:.1f} ms tick)"
        )
        print(
            f"disk: ours {ours_disk / 2**20:.1f} MiB (lossless zstd) vs lerobot {lr['disk_bytes'] / 2**20:.1f} MiB "
            f"(AV1 video, lossy)"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
