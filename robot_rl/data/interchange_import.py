"""`robot-rl import lerobot|robomimic ...`: other datasets -> an episode store.

    robot-rl import lerobot ROOT STORE [--repo-id ID] [--tolerance-s 1e-4]
    robot-rl import robomimic FILE.hdf5 STORE [--filter-key K] [--flip-images] [--obs-keys K ...] [--fps 20]

LeRobotDataset v3 (any dataset lerobot wrote, read straight from its parquet files and mp4s with PyAV):

    observation.images.<cam> (video/image) -> obs.<cam>_image   uint8 HxWx3
    observation.<name>                     -> obs.<name>        (observation.state -> obs.state)
    action                                 -> action
    next.reward / next.done / next.success -> reward / done / success   (shape (1,) -> ())
    timestamp                              -> timestamp         float64 (lerobot's frame_index / fps)
    other numeric keys                     -> same name;  frame_index, episode_index, index, task_index: dropped
    episode task(s)                        -> episode meta "task" (several tasks: joined with " | ", and "tasks")

A dataset made by `robot-rl export` carries meta/robot_rl_episodes.json: then the store's own keys, shapes,
dtypes, names, per-episode metadata, info and model xmls come back exactly (timestamp is our real clock again).

robomimic / robosuite HDF5 (`data/demo_<i>/...`, demos in numeric order, or those of `mask/<filter key>`):

    obs/<key>      -> obs.<key>     float -> float32; *_image stay uint8 (--flip-images: flip them upside down)
    actions        -> action        float32
    states         -> sim_state     float64 (robomimic's flattened MuJoCo state); states[0] -> initial_sim_state
    rewards, dones -> reward (float32), done (bool);  success = rewards > 0 (dones if there are no rewards)
    attrs model_file -> the store's models/ (episode meta model_id);  data.attrs env_args -> info["env_args"]
    timestamp      =  step / fps    (robomimic has no clock; --fps, default 20 = robosuite's control_freq)

The store is built in a hidden sibling directory and renamed to STORE at the end: an error leaves nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Iterable

import numpy as np

from robot_rl.data.episode_store import EpisodeStore, feature_from_dict
from robot_rl.data.interchange import (
    EXPORT_FORMAT,
    LEROBOT_RESERVED,
    META_FILE,
    MODELS_DIR,
    InterchangeError,
    run_cli,
    staged_output,
)
from robot_rl.interfaces import OBS_PREFIX, Feature

log = logging.getLogger(__name__)

SCALAR_SIGNALS = {"next.reward": "reward", "next.done": "done", "next.success": "success"}


# ================================================================================================ LeRobotDataset
class _LeRobotReader:
    """Reads a LeRobotDataset v3 directory: info/tasks/episodes metadata, per-episode columns and video frames."""

    def __init__(self, root: Path, tolerance_s: float):
        self.root, self.tolerance_s = root, tolerance_s
        info_path = root / "meta" / "info.json"
        if not info_path.exists():
            raise InterchangeError(f"{root} is not a LeRobotDataset (no meta/info.json)")
        self.info = json.loads(info_path.read_text())
        version = str(self.info.get("codebase_version", "?"))
        if not version.startswith("v3"):
            raise InterchangeError(
                f"{root} is a LeRobotDataset {version}; only v3 is supported (convert it with "
                f"lerobot's lerobot/datasets/v30/convert_dataset_v21_to_v30.py)"
            )
        self.fps = int(self.info["fps"])
        self.features: dict[str, dict] = self.info["features"]
        import pyarrow.parquet as pq

        ep_files = sorted((root / "meta" / "episodes").glob("*/*.parquet"))
        if not ep_files:
            raise InterchangeError(
                f"{root}: no meta/episodes/*/*.parquet; the dataset is incomplete (was "
                f"LeRobotDataset.finalize() called when it was written?)"
            )
        rows: list[dict] = []
        for f in ep_files:
            cols = [c for c in pq.read_schema(f).names if not c.startswith("stats/")]
            rows.extend(pq.read_table(f, columns=cols).to_pylist())
        self.episodes = sorted(rows, key=lambda r: r["episode_index"])
        self.tasks: dict[int, str] = {}
        tasks_path = root / "meta" / "tasks.parquet"
        if tasks_path.exists():
            import pandas as pd

            df = pd.read_parquet(tasks_path)
            self.tasks = {int(i): str(t) for t, i in zip(df.index, df["task_index"])}
        self._table_path: Path | None = None
        self._table = None

    @property
    def video_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f["dtype"] == "video"]

    def episode_table(self, ep: dict):
        """The parquet rows of one episode, in frame order."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        path = self.root / self.info["data_path"].format(
            chunk_index=ep["data/chunk_index"], file_index=ep["data/file_index"]
        )
        if path != self._table_path:
            if not path.exists():
                raise InterchangeError(f"{self.root}: episode {ep['episode_index']}'s data file {path} is missing")
            self._table, self._table_path = pq.read_table(path), path
        t = self._table.filter(pc.equal(self._table["episode_index"], ep["episode_index"]))
        if "frame_index" in t.column_names:
            t = t.sort_by("frame_index")
        if t.num_rows != ep["length"]:
            raise InterchangeError(
                f"{self.root}: episode {ep['episode_index']} has {t.num_rows} rows in {path}, "
                f"its metadata says {ep['length']}"
            )
        return t

    def column(self, table, key: str, shape: tuple, dtype: str) -> np.ndarray:
        import pyarrow as pa

        arr = table[key].combine_chunks()
        n = len(arr)
        while pa.types.is_fixed_size_list(arr.type) or pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
            arr = arr.flatten()
        flat = arr.to_numpy(zero_copy_only=False)
        if flat.size != n * int(np.prod(shape, dtype=np.int64)):
            raise InterchangeError(
                f"{self.root}: column {key!r} holds {flat.size // max(n, 1)} values per frame, expected shape {shape}"
            )
        return flat.reshape((n, *shape)).astype(dtype, copy=False)

    def images(self, table, key: str, ep: dict, shape: tuple) -> np.ndarray:
        if self.features[key]["dtype"] == "video":
            ts = self.column(table, "timestamp", (), "float64")
            frames = self._decode_video(key, ep, ts)
        else:
            frames = [self._decode_png(v) for v in table[key].to_pylist()]
        out = np.stack(frames)
        if out.shape[1:] != tuple(shape):
            raise InterchangeError(f"{self.root}: {key} frames are {out.shape[1:]}, info.json says {shape}")
        return out

    def _decode_png(self, value: dict) -> np.ndarray:
        import io

        import PIL.Image

        if value.get("bytes"):
            img = PIL.Image.open(io.BytesIO(value["bytes"]))
        else:
            path = Path(value.get("path") or "")
            img = PIL.Image.open(path if path.is_absolute() else self.root / path)
        return np.asarray(img.convert("RGB"))

    def _decode_video(self, key: str, ep: dict, timestamps: np.ndarray) -> list[np.ndarray]:
        path = self.root / self.info["video_path"].format(
            video_key=key, chunk_index=ep[f"videos/{key}/chunk_index"], file_index=ep[f"videos/{key}/file_index"]
        )
        if not path.exists():
            raise InterchangeError(f"{self.root}: episode {ep['episode_index']}'s video {path} is missing")
        query = float(ep[f"videos/{key}/from_timestamp"]) + timestamps
        worst = float("inf")
        for seek in (True, False):  # seeking lands on the key frame before the episode; decode from 0 if it did not
            ts, frames = _decode_range(path, float(query.min()), float(query.max()), self.tolerance_s, seek)
            if len(ts):
                dist = np.abs(query[:, None] - ts[None, :])
                idx = dist.argmin(1)
                worst = float(dist[np.arange(len(query)), idx].max())
                if worst < self.tolerance_s:
                    return [frames[i] for i in idx]
        raise InterchangeError(
            f"{path}: no frame within {self.tolerance_s} s of some of episode "
            f"{ep['episode_index']}'s timestamps (closest is {worst:.4g} s away); pass a larger "
            f"--tolerance-s if the video timing is known to be loose"
        )


def _decode_range(path: Path, first: float, last: float, tolerance_s: float, seek: bool):
    import av

    ts, frames = [], []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if seek and first > 0:
            container.seek(int(first / stream.time_base), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            t = float(frame.pts * stream.time_base)
            if t < first - tolerance_s:
                continue
            ts.append(t)
            frames.append(frame.to_ndarray(format="rgb24"))
            if t >= last - tolerance_s:
                break
    return np.asarray(ts, np.float64), frames


def _image_hw(feature: dict) -> tuple[int, int]:
    shape, names = tuple(feature["shape"]), feature.get("names") or []
    if len(shape) != 3:
        raise InterchangeError(f"image feature with shape {shape}: expected 3 dimensions")
    if isinstance(names, list) and "height" in names and "width" in names:
        return int(shape[names.index("height")]), int(shape[names.index("width")])
    if shape[-1] in (1, 3, 4) and shape[0] not in (1, 3, 4):
        return int(shape[0]), int(shape[1])
    if shape[0] in (1, 3, 4):
        return int(shape[1]), int(shape[2])
    return int(shape[0]), int(shape[1])


def _flat_names(names, shape: tuple) -> tuple[str, ...] | None:
    if isinstance(names, dict) and len(names) == 1:
        names = next(iter(names.values()))
    if (
        isinstance(names, list)
        and len(shape) == 1
        and len(names) == shape[0]
        and all(isinstance(n, str) for n in names)
    ):
        return tuple(names)
    return None


def _generic_plan(features: dict[str, dict]) -> tuple[dict[str, Feature], dict[str, str]]:
    """Store features and store key -> lerobot key for a dataset without our sidecar."""
    feats: dict[str, Feature] = {}
    source: dict[str, str] = {}

    def add(store_key: str, lr: str, f: Feature):
        base, n = store_key, 1
        while store_key in feats:
            n += 1
            store_key = f"{base}_{n}"
        feats[store_key], source[store_key] = f, lr

    for lr, f in features.items():  # cameras first, then low-dim observations, then the rest
        if f["dtype"] in ("image", "video"):
            name = lr[len("observation.") :] if lr.startswith("observation.") else lr
            name = (name[len("images.") :] if name.startswith("images.") else name).replace(".", "_")
            h, w = _image_hw(f)
            add(OBS_PREFIX + name + ("" if name.endswith("image") else "_image"), lr, Feature((h, w, 3), "uint8"))
    for lr, f in features.items():
        if f["dtype"] in ("image", "video", "string") or lr in LEROBOT_RESERVED:
            if f["dtype"] == "string":
                log.warning("skipping string feature %r", lr)
            continue
        shape = tuple(f["shape"])
        if lr in SCALAR_SIGNALS:
            key, shape = SCALAR_SIGNALS[lr], () if shape == (1,) else shape
        elif lr.startswith("observation."):
            key = OBS_PREFIX + lr[len("observation.") :]
        else:
            key = lr
        add(key, lr, Feature(shape, str(np.dtype(f["dtype"])), _flat_names(f.get("names"), shape)))
    feats["timestamp"], source["timestamp"] = Feature((), "float64"), "timestamp"
    return feats, source


def _load_sidecar(reader: _LeRobotReader) -> dict | None:
    path = reader.root / META_FILE
    if not path.exists():
        return None
    side = json.loads(path.read_text())
    if side.get("format") != EXPORT_FORMAT:
        log.warning("%s is not a robot_rl export sidecar; importing %s as a plain LeRobotDataset", path, reader.root)
        return None
    missing = [lr for lr in side["key_map"].values() if lr not in reader.features]
    if missing:
        log.warning(
            "%s: the dataset lacks %s that %s names (edited after export?); importing it as a plain LeRobotDataset",
            reader.root,
            missing,
            META_FILE,
        )
        return None
    lengths = [e["length"] for e in side["episodes"]]
    if lengths != [e["length"] for e in reader.episodes]:
        log.warning(
            "%s: episodes differ from %s (edited after export?); keeping the store's keys but not its "
            "per-episode metadata",
            reader.root,
            META_FILE,
        )
        side = {**side, "episodes": None}
    return side


def import_lerobot(
    root: str | Path, store_path: str | Path, repo_id: str | None = None, *, tolerance_s: float = 1e-4
) -> EpisodeStore:
    """A LeRobotDataset v3 at `root` -> a new episode store at `store_path` (returned, open read-only).

    `repo_id` is only recorded (the dataset is read from `root`, never downloaded). Video frames are matched to
    each row's timestamp within `tolerance_s`, as lerobot itself does.
    """
    root, store_path = Path(root), Path(store_path)
    if not root.exists():
        raise InterchangeError(f"{root} does not exist")
    reader = _LeRobotReader(root, tolerance_s)
    side = _load_sidecar(reader)
    if side is not None:
        features = {k: feature_from_dict(d) for k, d in side["features"].items()}
        source = dict(side["key_map"])
        fps, chunk_steps, info = side["fps"], int(side.get("chunk_steps", 64)), dict(side["info"])
    else:
        features, source = _generic_plan(reader.features)
        fps, chunk_steps = reader.fps, 64
        first = reader.episodes[0].get("tasks") if reader.episodes else None
        info = {"robot": reader.info.get("robot_type"), "task": first[0] if first else None}
    info["imported_from"] = {
        "format": "lerobot",
        "root": str(root.resolve()),
        "repo_id": repo_id,
        "codebase_version": reader.info.get("codebase_version"),
        "fps": reader.fps,
    }
    if not reader.episodes:
        raise InterchangeError(f"{root} has no episodes")
    with staged_output(store_path, "store") as staging:
        store = EpisodeStore.create(staging, features, fps, chunk_steps=chunk_steps, info=info)
        try:
            model_ids = {}
            if side is not None and (root / MODELS_DIR).is_dir():
                for xml in sorted((root / MODELS_DIR).glob("*.xml")):
                    model_ids[xml.stem] = store.put_model_xml(xml.read_text())
            writer = store.writer()
            for n, ep in enumerate(reader.episodes):
                table = reader.episode_table(ep)
                data = {}
                for key, f in features.items():
                    lr = source[key]
                    if f.is_image and reader.features[lr]["dtype"] in ("image", "video"):
                        data[key] = reader.images(table, lr, ep, f.shape)
                    else:
                        data[key] = reader.column(table, lr, f.shape, f.dtype)
                if side is not None and side.get("episodes"):
                    meta = dict(side["episodes"][n]["meta"])
                    if meta.get("model_id") in model_ids:
                        meta["model_id"] = model_ids[meta["model_id"]]
                else:
                    meta = _generic_episode_meta(reader, ep, table, data)
                writer.begin(meta)
                for t in range(int(ep["length"])):
                    writer.add({k: v[t] for k, v in data.items()})
                writer.save()
                log.info(
                    "imported episode %d (%d/%d): %d steps",
                    ep["episode_index"],
                    n + 1,
                    len(reader.episodes),
                    ep["length"],
                )
        finally:
            store.close()
    return EpisodeStore.open(store_path, "r")


def _generic_episode_meta(reader: _LeRobotReader, ep: dict, table, data: dict) -> dict:
    tasks = [str(t) for t in (ep.get("tasks") or [])]
    if not tasks and "task_index" in table.column_names:
        idx = sorted(set(table["task_index"].to_pylist()))
        tasks = [reader.tasks.get(int(i), str(i)) for i in idx]
    meta: dict = {"task": " | ".join(tasks), "lerobot_episode_index": int(ep["episode_index"])}
    if len(tasks) > 1:
        meta["tasks"] = tasks
    if "success" in data:
        meta["success"] = bool(np.asarray(data["success"][-1]).any())
    elif "reward" in data:
        meta["success"] = bool(np.asarray(data["reward"][-1]).max() > 0)
    return meta


# ================================================================================================ robomimic HDF5
def _demo_order(name: str) -> tuple:
    m = re.fullmatch(r"demo_(\d+)", name)
    return (0, int(m.group(1)), name) if m else (1, 0, name)


def _attr_str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def import_robomimic(
    hdf5_path: str | Path,
    store_path: str | Path,
    obs_keys: Iterable[str] | None = None,
    fps: float = 20,
    *,
    filter_key: str | None = None,
    flip_images: bool = False,
) -> EpisodeStore:
    """A robomimic/robosuite HDF5 file -> a new episode store at `store_path` (returned, open read-only).

    `obs_keys`: the obs/<key> datasets to import (default: all of the first demo's). `filter_key`: only the demos
    listed in mask/<filter_key> (e.g. "train", "valid"). `flip_images`: flip *_image observations upside down
    (robosuite renders with OpenGL's bottom-left origin, and many robomimic files hold the images that way).
    """
    import h5py

    hdf5_path, store_path = Path(hdf5_path), Path(store_path)
    if not hdf5_path.exists():
        raise InterchangeError(f"{hdf5_path} does not exist")
    with h5py.File(hdf5_path, "r") as f:
        if "data" not in f:
            raise InterchangeError(
                f"{hdf5_path} is not a robomimic dataset: it has no 'data' group "
                f"(top-level keys: {', '.join(f.keys()) or 'none'})"
            )
        data = f["data"]
        if filter_key is not None:
            masks = list(f["mask"].keys()) if "mask" in f else []
            if filter_key not in masks:
                raise InterchangeError(
                    f"{hdf5_path}: no filter key {filter_key!r}; available: "
                    f"{', '.join(masks) or 'none (the file has no mask group)'}"
                )
            demos = [_attr_str(d) for d in f["mask"][filter_key][()]]
            for d in demos:
                if d not in data:
                    raise InterchangeError(f"{hdf5_path}: mask/{filter_key} lists {d!r}, which is not in data/")
        else:
            demos = [k for k in data.keys() if isinstance(data[k], h5py.Group)]
        demos = sorted(demos, key=_demo_order)
        if not demos:
            where = f" for mask/{filter_key}" if filter_key else ""
            raise InterchangeError(f"{hdf5_path}: no demos in data/{where}")
        env_args = json.loads(_attr_str(data.attrs["env_args"])) if "env_args" in data.attrs else {}
        first = data[demos[0]]
        available = list(first["obs"].keys()) if "obs" in first else []
        keys = list(obs_keys) if obs_keys is not None else available
        features = _robomimic_features(hdf5_path, data, demos, keys)
        env_name = env_args.get("env_name")
        robot_config = robot_config_from_env_args(env_args)
        info = {
            "robot": _robot_name(robot_config) if robot_config else env_name,
            "robot_config": robot_config,
            "task": env_name,
            "env_args": env_args,
            "imported_from": {
                "format": "robomimic",
                "file": str(hdf5_path.resolve()),
                "filter_key": filter_key,
                "flip_images": flip_images,
                "fps": fps,
            },
        }
        with staged_output(store_path, "store") as staging:
            store = EpisodeStore.create(staging, features, fps, info=info)
            try:
                writer = store.writer()
                for n, name in enumerate(demos):
                    ep, meta = _read_demo(hdf5_path, store, data[name], name, keys, features, fps, flip_images)
                    meta.update(task=env_name or "", source={"format": "robomimic", "demo": name})
                    writer.begin(meta)
                    for t in range(meta["length"]):
                        writer.add({k: v[t] for k, v in ep.items()})
                    writer.save()
                    log.info("imported %s (%d/%d): %d steps", name, n + 1, len(demos), meta["length"])
            finally:
                store.close()
    return EpisodeStore.open(store_path, "r")


def _robot_name(config: dict) -> str:
    robots = config["robots"]
    return f"robosuite_{config['env_name']}_{'_'.join([robots] if isinstance(robots, str) else robots)}"


def robot_config_from_env_args(env_args: dict) -> dict | None:
    """The robot config (configs/robot/*.yaml's shape) of the robosuite env a robomimic file was recorded in, from
    its data.attrs env_args, so that replay and eval need no --sim-robot / robot=; None when it names no env.
    The controller is robosuite's default for the robot (a custom controller_configs is not carried over)."""
    env_name = env_args.get("env_name")
    if not env_name:
        return None
    kw = env_args.get("env_kwargs") or {}
    robots = kw.get("robots", "Panda")
    robots = [robots] if isinstance(robots, str) else list(robots)
    cameras = list(kw.get("camera_names") or []) if kw.get("use_camera_obs") else []
    size = kw.get("camera_heights", 84), kw.get("camera_widths", 84)
    config = {
        "type": "robosuite",
        "task": env_name,
        "env_name": env_name,
        "robots": robots[0] if len(robots) == 1 else robots,
        "control_freq": kw.get("control_freq", 20),
        "cameras": cameras,
        "camera_height": int(size[0][0] if isinstance(size[0], list) else size[0]),
        "camera_width": int(size[1][0] if isinstance(size[1], list) else size[1]),
        "reward_shaping": bool(kw.get("reward_shaping", False)),
    }
    if kw.get("horizon"):
        config["horizon"] = int(kw["horizon"])  # else the robot's default
    return config


def _robomimic_features(path: Path, data, demos: list[str], keys: list[str]) -> dict[str, Feature]:
    first_name = demos[0]
    first = data[first_name]
    if "actions" not in first:
        raise InterchangeError(
            f"{path}: data/{first_name} has no 'actions' dataset (it has: {', '.join(first.keys())})"
        )
    for name in demos:
        obs = data[name]["obs"] if "obs" in data[name] else {}
        for k in keys:
            if k not in obs:
                raise InterchangeError(
                    f"{path}: data/{name}/obs has no {k!r}; available obs keys: {', '.join(obs.keys()) or 'none'}"
                )
    feats: dict[str, Feature] = {}
    for k in keys:
        ds = first["obs"][k]
        if k.endswith("_image"):
            if ds.dtype != np.uint8 or ds.ndim != 4 or ds.shape[-1] != 3:
                raise InterchangeError(f"{path}: obs/{k} is {ds.dtype} {ds.shape[1:]}; images must be uint8 HxWx3")
            feats[OBS_PREFIX + k] = Feature(tuple(ds.shape[1:]), "uint8")
        else:
            dtype = "float32" if ds.dtype.kind == "f" else str(ds.dtype)
            feats[OBS_PREFIX + k] = Feature(tuple(ds.shape[1:]), dtype)
    feats["action"] = Feature(tuple(first["actions"].shape[1:]), "float32")
    if "rewards" in first:
        feats["reward"] = Feature((), "float32")
    if "dones" in first:
        feats["done"] = Feature((), "bool")
    feats["success"] = Feature((), "bool")
    feats["timestamp"] = Feature((), "float64")
    if "states" in first:
        feats["sim_state"] = Feature(tuple(first["states"].shape[1:]), "float64")
    return feats


def _read_demo(
    path: Path,
    store: EpisodeStore,
    demo,
    name: str,
    keys: list[str],
    features: dict[str, Feature],
    fps: float,
    flip_images: bool,
) -> tuple[dict[str, np.ndarray], dict]:
    where = f"{path}: data/{name}"
    needed = {"actions": "action", "rewards": "reward", "dones": "done", "states": "sim_state"}
    for required in [name for name, key in needed.items() if key in features]:
        if required not in demo:
            raise InterchangeError(f"{where} has no {required!r} dataset (the first demo has one)")
    actions = np.asarray(demo["actions"][()], np.float32)
    n = len(actions)
    if "num_samples" in demo.attrs and int(demo.attrs["num_samples"]) != n:
        raise InterchangeError(f"{where}: attrs num_samples={int(demo.attrs['num_samples'])} but actions has {n} rows")
    ep: dict[str, np.ndarray] = {}
    for k in keys:
        x = demo["obs"][k][()]
        if k.endswith("_image") and flip_images:
            x = x[:, ::-1]
        ep[OBS_PREFIX + k] = np.asarray(x, features[OBS_PREFIX + k].dtype)
    ep["action"] = actions
    if "reward" in features:
        ep["reward"] = np.asarray(demo["rewards"][()], np.float32).reshape(-1)
    if "done" in features:
        ep["done"] = np.asarray(demo["dones"][()]).reshape(-1).astype(bool)
    ep["success"] = ep["reward"] > 0 if "reward" in ep else ep.get("done", np.zeros(n, bool)).copy()
    ep["timestamp"] = np.arange(n, dtype=np.float64) / float(fps)
    if "sim_state" in features:
        ep["sim_state"] = np.asarray(demo["states"][()], np.float64)
    for k, v in ep.items():
        if len(v) != n:
            raise InterchangeError(f"{where}: {k} has {len(v)} rows, actions has {n}")
        if v.shape[1:] != features[k].shape:
            raise InterchangeError(f"{where}: {k} has shape {v.shape[1:]}, the first demo's is {features[k].shape}")
    success = bool(ep["reward"][-1] > 0) if "reward" in ep else bool(ep["done"][-1]) if "done" in ep else None
    meta: dict = {"length": n, "success": success}
    if "model_file" in demo.attrs:
        meta["model_id"] = store.put_model_xml(_attr_str(demo.attrs["model_file"]))
    if "sim_state" in ep:
        meta["initial_sim_state"] = ep["sim_state"][0].tolist()
    extra = {
        a: _attr_str(v) if isinstance(v, (bytes, str)) else v.item() if hasattr(v, "item") else v
        for a, v in demo.attrs.items()
        if a not in ("model_file", "num_samples")
    }
    extra = {a: v for a, v in extra.items() if isinstance(v, (str, int, float, bool))}
    if extra:
        meta["demo_attrs"] = extra
    return ep, meta


# ================================================================================================ CLI
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="robot-rl import", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="format", required=True, metavar="{lerobot,robomimic}")
    lr = sub.add_parser("lerobot", help="LeRobotDataset v3 directory -> episode store")
    lr.add_argument("root", help="dataset root (the directory holding meta/info.json)")
    lr.add_argument("store", help="episode store to create (must not exist, or be empty)")
    lr.add_argument("--repo-id", help="recorded as provenance; the dataset is always read from ROOT")
    lr.add_argument("--tolerance-s", type=float, default=1e-4, help="video frame timing tolerance (lerobot's: 1e-4)")
    rm = sub.add_parser("robomimic", help="robomimic/robosuite HDF5 file -> episode store")
    rm.add_argument("file", help="the .hdf5 file")
    rm.add_argument("store", help="episode store to create (must not exist, or be empty)")
    rm.add_argument("--filter-key", help="only the demos of mask/<KEY> (e.g. train, valid)")
    rm.add_argument(
        "--flip-images",
        action="store_true",
        help="flip *_image observations upside down (robosuite's OpenGL convention)",
    )
    rm.add_argument("--obs-keys", nargs="+", help="obs/<key> datasets to import (default: all)")
    rm.add_argument("--fps", type=float, default=20.0, help="the demos' control rate (default 20)")

    def import_store(args) -> str:
        if args.format == "lerobot":
            store = import_lerobot(args.root, args.store, repo_id=args.repo_id, tolerance_s=args.tolerance_s)
        else:
            store = import_robomimic(
                args.file,
                args.store,
                obs_keys=args.obs_keys,
                fps=args.fps,
                filter_key=args.filter_key,
                flip_images=args.flip_images,
            )
        return f"wrote {store.path}: {store.num_episodes} episodes, {store.num_steps} steps"

    return run_cli(p, argv, import_store, name=lambda args: f"{p.prog} {args.format}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
