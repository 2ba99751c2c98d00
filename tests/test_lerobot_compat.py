"""lerobot compatibility across versions: datasets lerobot 0.4.4 wrote still import, and lerobot's own trainer
(0.6) trains its diffusion policy on what we export, offline, without any conversion."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from robot_rl.data.interchange import export_lerobot
from robot_rl.data.interchange_import import import_lerobot

from test_interchange import make_store

V044 = Path(__file__).parent / "data" / "lerobot_v044"  # written by lerobot 0.4.4 (make_lerobot_v044.py)


def test_dataset_written_by_lerobot_044_imports(tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    assert (V044 / "WRITTEN_BY").read_text().startswith("lerobot 0.4.4")
    root = shutil.copytree(V044 / "dataset", tmp_path / "ds")  # lerobot may write caches beside the data
    want = np.load(V044 / "expected.npz")

    store = import_lerobot(root, tmp_path / "store")
    assert store.episode_ends.tolist() == want["episode_ends"].tolist() == [5, 10]
    for k in ("obs.joint_pos", "obs.gripper", "action", "intervention", "success", "timestamp"):
        assert np.array_equal(store.array(k), want[k]), k
    err = np.abs(store.array("obs.cam_image").astype(int) - want["obs.cam_image"]).max()
    assert err <= 3  # AV1 mp4, flat colours
    assert [m["task"] for m in store.episodes] == ["task 0", "task 1"]

    ds = LeRobotDataset("local/robot_rl_v044", root=root, video_backend="pyav")  # lerobot 0.6 reads it too
    assert len(ds) == 10 and ds.num_episodes == 2 and ds.meta.info["codebase_version"] == "v3.0"
    item = ds[7]
    assert np.array_equal(item["action"].numpy(), want["action"][7])
    assert item["task"] == "task 1"


def test_lerobot_trains_its_diffusion_policy_on_our_export(tmp_path):
    """`lerobot-train` (lerobot's entry point, a separate process) on a dataset `robot-rl export` wrote: video
    camera, observation.state, action, our extra columns. Tiny sizes, CPU, offline, random backbone."""
    src = make_store(tmp_path / "store", lengths=(12, 10))
    export_lerobot(src.path, tmp_path / "ds", repo_id="local/ours")
    out = tmp_path / "train"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "HF_HOME": str(tmp_path / "hf"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    args = [
        "--dataset.repo_id=local/ours",
        f"--dataset.root={tmp_path / 'ds'}",
        "--dataset.video_backend=pyav",
        "--policy.type=diffusion",
        "--policy.pretrained_backbone_weights=null",
        "--policy.device=cpu",
        "--policy.push_to_hub=false",
        "--policy.horizon=8",
        "--policy.n_action_steps=4",
        "--policy.drop_n_last_frames=1",
        "--policy.down_dims=[16,32]",
        "--policy.diffusion_step_embed_dim=16",
        "--policy.spatial_softmax_num_keypoints=4",
        "--policy.use_group_norm=true",
        "--steps=3",
        "--batch_size=2",
        "--num_workers=0",
        "--save_checkpoint=false",
        "--wandb.enable=false",
        "--log_freq=1",
        f"--output_dir={out}",
    ]
    r = subprocess.run(
        [sys.executable, "-m", "lerobot.scripts.lerobot_train", *args],
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
        cwd=tmp_path,
    )
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "End of training" in log, log[-4000:]
    assert "loss:" in log and "loss:nan" not in log.replace(" ", ""), log[-4000:]
