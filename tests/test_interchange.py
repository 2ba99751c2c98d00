"""Episode store <-> LeRobotDataset v3 (through lerobot itself) and robomimic HDF5 -> episode store."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from robot_rl.cli import main as cli_main
from robot_rl.data.episode_store import EpisodeStore
from robot_rl.data.interchange import InterchangeError, export_lerobot, plan_export
from robot_rl.data.interchange_import import import_lerobot, import_robomimic
from robot_rl.interfaces import Feature

from builders import camera, record_demos
from conftest import robot_rl_cli

H = W = 32  # tiny images: video encoding on CPU is the slow part


# ------------------------------------------------------------------------------------------------ helpers
def synthetic_features() -> dict[str, Feature]:
    return {
        "obs.joint_pos": Feature((3,), "float32", ("j0", "j1", "j2")),
        "obs.gripper": Feature((), "float32"),
        "obs.contact": Feature((), "bool"),  # not a float: its own feature only, not in observation.state
        "obs.cam_image": Feature((H, W, 3), "uint8"),
        "action": Feature((2,), "float32", ("x", "grip"), low=np.array([-1, 0]), high=np.array([1, 1])),
        "policy_action": Feature((2,), "float32", ("x", "grip")),
        "intervention": Feature((), "bool"),
        "success": Feature((), "bool"),
        "timestamp": Feature((), "float64"),
        "sim_state": Feature((5,), "float64"),
    }


def make_store(path: Path, lengths=(7, 5), seed=0) -> EpisodeStore:
    rng = np.random.default_rng(seed)
    info = {"robot": "toy_arm", "task": "default task", "robot_config": {"gains": [1.5, float("nan")]}}
    store = EpisodeStore.create(path, synthetic_features(), 20, chunk_steps=4, info=info)
    model = store.put_model_xml("<mujoco model='toy'/>")
    w = store.writer()
    for e, n in enumerate(lengths):
        w.begin(
            {
                "task": f"task {e}",
                "operator": "ann",
                "seed": 10 + e,
                "robot": "toy_arm",
                "model_id": model,
                "initial_sim_state": rng.standard_normal(5).tolist(),
            }
        )
        for t in range(n):
            pa = np.full(2, np.nan, np.float32) if t % 3 == 0 else rng.standard_normal(2).astype(np.float32)
            w.add(
                {
                    "obs.joint_pos": rng.standard_normal(3).astype(np.float32),
                    "obs.gripper": np.float32(rng.random()),
                    "obs.contact": np.bool_(t % 2),
                    "obs.cam_image": rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
                    "action": rng.uniform(-1, 1, 2).astype(np.float32),
                    "policy_action": pa,
                    "intervention": np.bool_(t % 3 == 1),
                    "success": np.bool_(t == n - 1),
                    "timestamp": np.float64(t * 0.05 + rng.random() * 1e-3),
                    "sim_state": rng.standard_normal(5),
                }
            )
        w.save({"success": True, "missed_ticks": e, "dropped_frames": 0})
    store.close()
    return EpisodeStore.open(path, "r")


def assert_same_store(a: EpisodeStore, b: EpisodeStore, images_exact: bool = True) -> float:
    """Every key, value, boundary and metadata equal; returns the images' mean abs error."""
    assert list(b.features) == list(a.features)
    assert {k: f.to_dict() for k, f in b.features.items()} == {k: f.to_dict() for k, f in a.features.items()}
    assert b.fps == a.fps and b.episode_ends.tolist() == a.episode_ends.tolist()
    assert b.episodes == a.episodes
    assert json.dumps({k: v for k, v in b.meta["info"].items() if k != "imported_from"}) == json.dumps(a.meta["info"])
    for mid in {e["model_id"] for e in a.episodes if "model_id" in e}:
        assert b.model_xml(mid) == a.model_xml(mid)
    errors = []
    for k, f in a.features.items():
        x, y = a.array(k), b.array(k)
        assert y.dtype == x.dtype and y.shape == x.shape, k
        if f.is_image and not images_exact:
            errors.append(np.abs(x.astype(np.int16) - y).mean())
        else:
            assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), k
    return float(np.mean(errors)) if errors else 0.0


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".partial-" in p.name]


# ------------------------------------------------------------------------------------------------ mapping
def test_plan_export_key_mapping():
    plan = plan_export(synthetic_features(), use_videos=True)
    assert plan.key_map == {
        "obs.cam_image": "observation.images.cam",
        "obs.joint_pos": "observation.joint_pos",
        "obs.gripper": "observation.gripper",
        "obs.contact": "observation.contact",
        "action": "action",
        "policy_action": "policy_action",
        "intervention": "intervention",
        "success": "next.success",
        "timestamp": "real_timestamp",
        "sim_state": "sim_state",
    }
    f = plan.features
    assert f["observation.images.cam"] == {
        "dtype": "video",
        "shape": (H, W, 3),
        "names": ["height", "width", "channels"],
    }
    # float low-dim obs, sorted by key: obs.gripper, obs.joint_pos (obs.contact is bool: not in the state)
    assert f["observation.state"]["names"] == ["gripper_0", "joint_pos_0", "joint_pos_1", "joint_pos_2"]
    assert f["action"]["names"] == ["x", "grip"] and f["next.success"]["shape"] == (1,)
    assert f["real_timestamp"]["dtype"] == "float64" and set(plan.derived) == {"next.reward", "next.done"}
    assert plan_export(synthetic_features(), use_videos=False).features["observation.images.cam"]["dtype"] == "image"
    # a store whose only low-dim obs is obs.state keeps it as observation.state, without a duplicate column;
    # beside other obs, and for store keys lerobot reserves, names move out of the way
    plan = plan_export({"obs.state": Feature((4,), "float32"), "action": Feature((2,))})
    assert plan.key_map == {"obs.state": "observation.state", "action": "action"}
    plan = plan_export({"obs.state": Feature((4,)), "obs.x": Feature((1,)), "index": Feature((), "int64")})
    assert plan.key_map["obs.state"] == "robot_rl.obs.state" and plan.key_map["index"] == "robot_rl.index"
    assert plan.features["observation.state"]["shape"] == (5,)
    # depth maps and 1-channel images: plain numeric features, outside observation.state
    plan = plan_export(
        {
            "obs.depth": Feature((8, 8, 1), "float32"),
            "obs.mask_image": Feature((8, 8, 1), "uint8"),
            "obs.q": Feature((2,)),
        }
    )
    assert (
        plan.key_map
        == {"obs.depth": "observation.depth", "obs.mask_image": "observation.mask_image", "obs.q": "observation.q"}
        and not plan.image_keys
    )
    assert plan.features["observation.state"]["names"] == ["q_0", "q_1"]


# ------------------------------------------------------------------------------------------------ round trips
def test_roundtrip_png_images_bit_exact(tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    src = make_store(tmp_path / "store")
    out = export_lerobot(src.path, tmp_path / "ds", repo_id="local/toy", use_videos=False)
    side = json.loads((out / "meta" / "robot_rl_episodes.json").read_text())
    assert [e["source_index"] for e in side["episodes"]] == [0, 1] and side["models"] == [src.episodes[0]["model_id"]]
    assert not (out / "images").exists() and no_leftovers(tmp_path)

    ds = LeRobotDataset("local/toy", root=out, video_backend="pyav")
    assert len(ds) == src.num_steps and ds.num_episodes == 2
    item = ds[8]  # episode 1, step 1
    ep1 = src.episode(1)
    assert item["task"] == "task 1" and int(item["frame_index"]) == 1
    assert np.array_equal(item["action"].numpy(), ep1["action"][1])
    assert np.array_equal(item["observation.state"].numpy(), np.r_[ep1["obs.gripper"][1], ep1["obs.joint_pos"][1]])
    assert np.array_equal(
        (item["observation.images.cam"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8),
        ep1["obs.cam_image"][1],
    )

    back = import_lerobot(out, tmp_path / "back")
    assert_same_store(src, back, images_exact=True)
    assert back.meta["info"]["imported_from"]["format"] == "lerobot"


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """A real store: the scripted expert in sim, 2 episodes, one 32x32 camera."""
    tmp = tmp_path_factory.mktemp("rec")
    record_demos(tmp / "store", tmp / "run", "record.episodes=2", *camera(H, W))
    return EpisodeStore.open(tmp / "store", "r")


def test_real_recording_video_export_loads_in_lerobot_and_round_trips(recording, tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    src = recording
    out = export_lerobot(src.path, tmp_path / "ds", repo_id="local/lift")  # videos (AV1 mp4)
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["observation.images.agentview"]

    ds = LeRobotDataset("local/lift", root=out, video_backend="pyav")
    assert len(ds) == src.num_steps and ds.num_episodes == src.num_episodes
    assert ds.meta.total_tasks == 1 and ds.fps == 20
    a, _ = src.episode_bounds(1)
    ep1 = src.episode(1)
    for t in (0, 17, len(ep1["action"]) - 1):
        item = ds[a + t]
        img = item["observation.images.agentview"]
        assert img.shape == (3, H, W) and img.dtype.is_floating_point and 0 <= float(img.min()) <= float(img.max()) <= 1
        assert np.abs(img.permute(1, 2, 0).numpy() * 255 - ep1["obs.agentview_image"][t]).mean() < 20
        assert np.array_equal(item["action"].numpy(), ep1["action"][t])
        assert np.array_equal(item["observation.cube_pos"].numpy(), ep1["obs.cube_pos"][t])
        assert abs(float(item["timestamp"]) - t / 20) < 1e-6 and item["task"] == src.episodes[1]["task"]
        assert bool(item["next.success"]) == bool(ep1["success"][t])
    assert int(ds[a - 1]["next.done"]) == 1 and int(ds[a]["next.done"]) == 0

    back = import_lerobot(out, tmp_path / "back")
    mae = assert_same_store(src, back, images_exact=False)
    for t in (0, 17, len(ep1["action"]) - 1):  # import decodes exactly the frames lerobot's own decoder returns
        lerobot_frame = (ds[a + t]["observation.images.agentview"].permute(1, 2, 0).numpy() * 255).round()
        assert np.array_equal(lerobot_frame.astype(np.uint8), back.episode(1)["obs.agentview_image"][t])
    print(f"video round trip: mean abs error {mae:.2f} / 255 over {src.num_steps} {H}x{W} frames")
    assert mae < 10


def test_import_dataset_made_by_lerobot(tmp_path):
    """Not our export: observation.state + one channel-first video camera + action + HIL-SERL reward/done."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    rng = np.random.default_rng(1)
    feats = {
        "observation.state": {"dtype": "float32", "shape": (4,), "names": {"motors": ["a", "b", "c", "d"]}},
        "observation.images.top": {"dtype": "video", "shape": (3, H, W), "names": ["channels", "height", "width"]},
        "action": {"dtype": "float32", "shape": (2,), "names": ["v", "w"]},
        "next.reward": {"dtype": "float32", "shape": (1,), "names": None},
        "next.done": {"dtype": "bool", "shape": (1,), "names": None},
    }
    ds = LeRobotDataset.create("someone/else", 10, root=tmp_path / "ds", features=feats, use_videos=True)
    states, actions, images = [], [], []
    try:
        for e, (n, task) in enumerate([(6, "push the block"), (4, "wave")]):
            for t in range(n):
                s, act = rng.standard_normal(4).astype(np.float32), rng.standard_normal(2).astype(np.float32)
                img = np.zeros((H, W, 3), np.uint8)
                img[:, :, e] = 40 * t  # a flat colour per frame: nearly lossless through the codec
                ds.add_frame(
                    {
                        "observation.state": s,
                        "observation.images.top": img.transpose(2, 0, 1).copy(),
                        "action": act,
                        "next.reward": np.array([float(e == 0 and t == n - 1)], np.float32),
                        "next.done": np.array([t == n - 1]),
                        "task": task,
                    }
                )
                states.append(s), actions.append(act), images.append(img)
            ds.save_episode()
    finally:
        ds.finalize()

    store = import_lerobot(tmp_path / "ds", tmp_path / "store", repo_id="someone/else")
    assert set(store.features) == {"obs.top_image", "obs.state", "action", "reward", "done", "timestamp"}
    assert store.features["obs.top_image"] == Feature((H, W, 3), "uint8")
    assert store.features["obs.state"].names == ("a", "b", "c", "d") and store.features["reward"].shape == ()
    assert store.fps == 10 and store.episode_ends.tolist() == [6, 10]
    assert np.array_equal(store.array("obs.state"), np.stack(states))
    assert np.array_equal(store.array("action"), np.stack(actions))
    assert np.allclose(store.array("timestamp"), np.r_[np.arange(6), np.arange(4)] / 10)
    assert store.array("done").tolist() == [False] * 5 + [True] + [False] * 3 + [True]
    assert np.abs(store.array("obs.top_image").astype(int) - np.stack(images)).max() <= 3
    assert [m["task"] for m in store.episodes] == ["push the block", "wave"]
    assert [m["success"] for m in store.episodes] == [True, False]
    assert store.meta["info"]["imported_from"]["repo_id"] == "someone/else"


# ------------------------------------------------------------------------------------------------ robomimic
def write_robomimic(path: Path, store: EpisodeStore, demo_names: list[str], flip: bool = True) -> None:
    """robosuite/robomimic layout, from a real recording (images stored upside down, floats as float64)."""
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1, "env_kwargs": {"robots": ["Panda"]}})
        total = 0
        for i, name in enumerate(demo_names):
            ep, meta = store.episode(i), store.episodes[i]
            g = data.create_group(name)
            n = len(ep["action"])
            g.attrs["num_samples"] = n
            g.attrs["model_file"] = store.model_xml(meta["model_id"])
            g.create_dataset("actions", data=ep["action"].astype(np.float64))
            g.create_dataset("states", data=ep["sim_state"])
            g.create_dataset("rewards", data=ep["success"].astype(np.float64))
            g.create_dataset("dones", data=(np.arange(n) == n - 1).astype(np.int64))
            for k, v in ep.items():
                if k.startswith("obs."):
                    v = v[:, ::-1] if k.endswith("_image") and flip else v.astype(np.float64)
                    g.create_dataset(f"obs/{k[4:]}", data=v)
                    g.create_dataset(f"next_obs/{k[4:]}", data=np.concatenate([v[1:], v[-1:]]))
            total += n
        data.attrs["total"] = total
        f.create_dataset("mask/train", data=np.array([demo_names[1].encode()]))


def test_import_robomimic(recording, tmp_path):
    src = recording
    # demo_10 holds episode 0 and demo_2 episode 1: numeric order puts demo_2 first (text order would not)
    write_robomimic(tmp_path / "demo.hdf5", src, ["demo_10", "demo_2"])
    store = import_robomimic(tmp_path / "demo.hdf5", tmp_path / "store", flip_images=True)
    assert [m["source"]["demo"] for m in store.episodes] == ["demo_2", "demo_10"]
    assert store.meta["info"]["env_args"]["env_name"] == "Lift" and store.fps == 20
    # the robot config comes from env_args: replay and eval need no --sim-robot / robot=
    robot_config = store.meta["info"]["robot_config"]
    assert (
        robot_config["type"] == "robosuite" and robot_config["env_name"] == "Lift" and robot_config["robots"] == "Panda"
    )
    assert store.meta["info"]["robot"] == "robosuite_Lift_Panda"
    from robot_rl.commands.replay import replay_robot_config

    assert replay_robot_config(store)["env_name"] == "Lift"
    obs_keys = [k for k in src.features if k.startswith("obs.")]
    assert set(store.features) == {*obs_keys, "action", "reward", "done", "success", "timestamp", "sim_state"}
    assert store.features["obs.agentview_image"] == Feature((H, W, 3), "uint8")
    for new, old in ((0, 1), (1, 0)):
        a, b = store.episode(new), src.episode(old)
        for k in [*obs_keys, "action", "sim_state", "success"]:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k  # images flipped back: exact
        assert np.array_equal(a["timestamp"], np.arange(len(b["action"])) / 20)
        m, mo = store.episodes[new], src.episodes[old]
        assert m["initial_sim_state"] == mo["initial_sim_state"] and m["success"] is True
        assert m["model_id"] == mo["model_id"] and store.model_xml(m["model_id"]) == src.model_xml(mo["model_id"])
        assert m["task"] == "Lift" and m["length"] == len(b["action"])

    train = import_robomimic(
        tmp_path / "demo.hdf5", tmp_path / "train", obs_keys=["cube_pos", "robot0_eef_pos"], filter_key="train"
    )
    assert train.num_episodes == 1 and train.episodes[0]["source"]["demo"] == "demo_2"
    assert {k for k in train.features if k.startswith("obs.")} == {"obs.cube_pos", "obs.robot0_eef_pos"}

    with pytest.raises(InterchangeError, match=r"data/demo_2/obs has no 'nope'; available obs keys: .*cube_pos"):
        import_robomimic(tmp_path / "demo.hdf5", tmp_path / "bad", obs_keys=["cube_pos", "nope"])
    with pytest.raises(InterchangeError, match=r"no filter key 'valid'; available: train"):
        import_robomimic(tmp_path / "demo.hdf5", tmp_path / "bad", filter_key="valid")
    with h5py.File(tmp_path / "demo.hdf5", "a") as f:
        del f["data/demo_10/actions"]
    with pytest.raises(InterchangeError, match=r"data/demo_10 has no 'actions' dataset"):
        import_robomimic(tmp_path / "demo.hdf5", tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and no_leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_export_import_subset(tmp_path, capsys):
    src = make_store(tmp_path / "store", lengths=(3, 4, 2))
    assert (
        cli_main(
            ["export", str(src.path), str(tmp_path / "ds"), "--no-videos", "--episodes", "1-2", "--repo-id", "me/toy"]
        )
        == 0
    )
    assert cli_main(["import", "lerobot", str(tmp_path / "ds"), str(tmp_path / "back")]) == 0
    back = EpisodeStore.open(tmp_path / "back")
    assert back.episode_ends.tolist() == [4, 6] and back.episodes == src.episodes[1:]
    for k in src.features:
        nan_ok = src.features[k].dtype.startswith("float")
        assert np.array_equal(back.episode(0)[k], src.episode(1)[k], equal_nan=nan_ok)


def test_cli_errors_leave_nothing_behind(tmp_path, capsys, monkeypatch):
    src = make_store(tmp_path / "store", lengths=(3,))

    def run(*args):
        capsys.readouterr()
        code = cli_main(list(args))
        return code, capsys.readouterr().err

    code, err = run("export", str(tmp_path / "missing"), str(tmp_path / "ds"))
    assert code == 2 and "missing does not exist" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    code, err = run("export", str(src.path), str(tmp_path / "full"))
    assert code == 2 and "already exists and is not empty" in err
    code, err = run("export", str(src.path), str(tmp_path / "ds"), "--episodes", "5")
    assert code == 2 and "out of range" in err
    code, err = run("import", "parquet", "a", "b")
    assert code == 2 and "invalid choice: 'parquet'" in err
    code, err = run("import", "lerobot", str(tmp_path / "store"), str(tmp_path / "s2"))
    assert code == 2 and "is not a LeRobotDataset (no meta/info.json)" in err
    code, err = run("import", "robomimic", str(tmp_path / "none.hdf5"), str(tmp_path / "s2"))
    assert code == 2 and "none.hdf5 does not exist" in err
    code, err = run("import", "lerobot", str(tmp_path / "store"), str(tmp_path / "full"))
    assert code == 2

    # a failure half-way through (disk full, codec error...) removes the half-written dataset
    import robot_rl.data.interchange as interchange

    calls = []

    def failing(ds, plan, ep, task):
        calls.append(task)
        if len(calls) == 1:
            raise OSError("No space left on device")

    monkeypatch.setattr(interchange, "_write_episode", failing)
    code, err = run("export", str(src.path), str(tmp_path / "ds"), "--no-videos")
    assert code == 2 and "No space left on device" in err
    assert not (tmp_path / "ds").exists() and not (tmp_path / "s2").exists() and no_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "store"]


def test_cli_wiring_in_a_subprocess(tmp_path):
    proc = robot_rl_cli("import", "robomimic", str(tmp_path / "nope.hdf5"), str(tmp_path / "store"), timeout=120)
    assert proc.returncode == 2 and "robot-rl import robomimic:" in proc.stderr and "does not exist" in proc.stderr
    assert not (tmp_path / "store").exists()


def test_robosuites_concatenated_keys_are_not_duplicated_in_state_or_policy_inputs():
    """robosuite's object-state and robot0_proprio-state concatenate other keys: LeRobot's observation.state and
    the MLP's default inputs hold each value once; the concatenations keep their own columns (round trip)."""
    from robot_rl.policies.mlp import lowdim_keys

    feats = {
        "obs.cube_pos": Feature((3,)),
        "obs.robot0_eef_pos": Feature((3,)),
        "obs.object-state": Feature((3,)),
        "obs.robot0_proprio-state": Feature((3,)),
        "action": Feature((2,)),
    }
    plan = plan_export(feats)
    assert [k for k, _ in plan.state_parts] == ["obs.cube_pos", "obs.robot0_eef_pos"]
    assert plan.features["observation.state"]["shape"] == (6,)
    assert plan.key_map["obs.object-state"] == "observation.object-state"  # still exported, once
    robot_feats = {k.removeprefix("obs."): f for k, f in feats.items() if k.startswith("obs.")}
    assert lowdim_keys(robot_feats) == ["cube_pos", "robot0_eef_pos"]
    assert lowdim_keys(robot_feats, ["object-state"]) == ["object-state"]  # named on purpose: allowed
