"""How tests/data/lerobot_v044/ was made: a tiny LeRobotDataset v3 written by lerobot 0.4.4 (Python 3.11).

lerobot 0.4.4 cannot be installed beside 0.6 (it needs Python 3.11; 0.5+ need 3.12), so the dataset it wrote is
checked in. Re-make it (only if the format ever needs it) with the old 3.11 venv of robot_rl 0.1 / lerobot 0.4.4:

    python tests/data/make_lerobot_v044.py tests/data/lerobot_v044

It writes our store (2 episodes x 5 steps, one 32x32 camera, seeded) through `robot-rl export` (video, AV1 mp4)
and `expected.npz` beside it: the store's arrays, for the import test to compare against.
"""

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from robot_rl.data.episode_store import EpisodeStore
from robot_rl.data.interchange import export_lerobot
from robot_rl.interfaces import Feature

H = W = 32
LENGTHS = (5, 5)


def make_store(path: Path) -> EpisodeStore:
    rng = np.random.default_rng(44)
    feats = {
        "obs.joint_pos": Feature((3,), "float32", ("j0", "j1", "j2")),
        "obs.gripper": Feature((), "float32"),
        "obs.cam_image": Feature((H, W, 3), "uint8"),
        "action": Feature((2,), "float32", ("x", "grip"), low=np.array([-1, 0]), high=np.array([1, 1])),
        "intervention": Feature((), "bool"),
        "success": Feature((), "bool"),
        "timestamp": Feature((), "float64"),
    }
    store = EpisodeStore.create(path, feats, 10, chunk_steps=5, info={"robot": "toy_arm", "task": "default"})
    w = store.writer()
    for e, n in enumerate(LENGTHS):
        w.begin({"task": f"task {e}", "operator": "ann", "seed": 10 + e, "robot": "toy_arm"})
        for t in range(n):
            img = np.zeros((H, W, 3), np.uint8)
            img[:, :, e] = 40 * t + 20  # flat colours: nearly lossless through the codec
            w.add(
                {
                    "obs.joint_pos": rng.standard_normal(3).astype(np.float32),
                    "obs.gripper": np.float32(rng.random()),
                    "obs.cam_image": img,
                    "action": rng.uniform(-1, 1, 2).astype(np.float32),
                    "intervention": np.bool_(t % 3 == 1),
                    "success": np.bool_(e == 0 and t == n - 1),
                    "timestamp": np.float64(t * 0.1 + 1e-4 * t),
                }
            )
        w.save({"success": e == 0, "missed_ticks": 0, "dropped_frames": 0})
    store.close()
    return EpisodeStore.open(path, "r")


def main(out: str) -> None:
    import lerobot

    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp) / "store")
        shutil.rmtree(out, ignore_errors=True)
        export_lerobot(store.path, out / "dataset", repo_id="local/robot_rl_v044", use_videos=True)
        np.savez_compressed(
            out / "expected.npz", episode_ends=store.episode_ends, **{k: store.array(k) for k in store.features}
        )
    (out / "WRITTEN_BY").write_text(f"lerobot {lerobot.__version__}, Python {sys.version.split()[0]}\n")


if __name__ == "__main__":
    main(sys.argv[1])
