"""`robot-rl export STORE OUT_ROOT`: an episode store -> a LeRobotDataset v3 (written by lerobot itself).

    robot-rl export STORE OUT_ROOT [--repo-id ID] [--no-videos] [--episodes 0-4,9] [--vcodec libsvtav1]

Key mapping (docs/interchange.md has the full tables):

    obs.<cam>_image (uint8 HxWx3)  -> observation.images.<cam>   dtype "video" (mp4), or "image" (PNG) with --no-videos
    obs.<name> (low-dim)           -> observation.<name>          every low-dim obs key, as it is (shape () -> (1,));
                                                                  bool obs as float32 0/1 (lerobot normalises
                                                                  every observation.* input; import: bool again)
    float obs.* of <= 1 dimension  -> observation.state           float32, concatenated in sorted key order,
                                                                  names "<name>_<i>"; robosuite's concatenations
                                                                  of other keys (object-state, robot0_proprio-
                                                                  state) are left out (their own columns only)
    action                         -> action                      names from the store's Feature
    success                        -> next.success                bool; also next.reward = float(success) when the
                                                                  store has no `reward` key
    reward / done                  -> next.reward / next.done     (next.done = last step of the episode when absent)
    timestamp (real clock)         -> real_timestamp              float64; lerobot's own `timestamp` is frame_index/fps
    anything else (policy_action, intervention, sim_state, ...) -> same name

Per-episode metadata lerobot has no place for (success, operator, seed, missed ticks, initial sim state, the
model xmls...) and the store's own feature descriptions go to `<root>/meta/robot_rl_episodes.json` and
`<root>/meta/robot_rl_models/<id>.xml`; `robot-rl import lerobot` restores them, so store -> export -> import
gives back every numeric value bit-exact (images too with --no-videos; mp4 is lossy).

The dataset is built in a hidden sibling directory and renamed to OUT_ROOT at the end: an error leaves nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from robot_rl.data.episode_store import EpisodeStore, StoreError
from robot_rl.interfaces import OBS_PREFIX, Feature
from robot_rl.sim.registry import is_concatenation

log = logging.getLogger(__name__)

EXPORT_FORMAT = "robot_rl.lerobot_export"
EXPORT_VERSION = 1
META_FILE = "meta/robot_rl_episodes.json"  # relative to the dataset root
MODELS_DIR = "meta/robot_rl_models"
STATE_KEY = "observation.state"
IMAGES_PREFIX = "observation.images."
# names lerobot fills in itself (DEFAULT_FEATURES) or reserves in a frame dict
LEROBOT_RESERVED = frozenset({"timestamp", "frame_index", "episode_index", "index", "task_index", "task"})
# store keys with a conventional lerobot name (HIL-SERL / lerobot_eval conventions); the rest keep their names
RENAMES = {
    "action": "action",
    "success": "next.success",
    "reward": "next.reward",
    "done": "next.done",
    "timestamp": "real_timestamp",
}


class InterchangeError(StoreError):
    """An export/import that cannot be done as asked; the message says why (the CLI exits 2 with it)."""


# ------------------------------------------------------------------------------------------------ shared helpers
@contextmanager
def staged_output(target: str | Path, what: str) -> Iterator[Path]:
    """Yield a not-yet-existing sibling path to build `target` in; renamed to `target` only on success.

    `target` may not exist or be an empty directory. On any error the staging directory is removed, so a failed
    export/import leaves nothing behind.
    """
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InterchangeError(f"{target} already exists and is not empty; choose a new {what} path or remove it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    try:
        yield staging
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def lerobot_dtype(dtype: str) -> str:
    return str(np.dtype(dtype))


def obs_name(key: str) -> str:
    return key[len(OBS_PREFIX) :] if key.startswith(OBS_PREFIX) else key


def camera_name(key: str) -> str:
    """obs.agentview_image -> agentview (a key without the _image suffix keeps its whole name)."""
    name = obs_name(key)
    return name[: -len("_image")] if name.endswith("_image") and len(name) > len("_image") else name


# ------------------------------------------------------------------------------------------------ key mapping
@dataclass
class ExportPlan:
    """How a store's keys become lerobot features."""

    features: dict[str, dict] = field(default_factory=dict)  # lerobot feature dicts, for LeRobotDataset.create
    key_map: dict[str, str] = field(default_factory=dict)  # store key -> lerobot key (one to one)
    image_keys: list[str] = field(default_factory=list)  # store keys exported as images/videos
    state_parts: list[tuple[str, int]] = field(default_factory=list)  # (store key, entries) in observation.state
    derived: dict[str, str] = field(default_factory=dict)  # lerobot key -> how it is computed (not imported back)


def plan_export(features: dict[str, Feature], use_videos: bool = True) -> ExportPlan:
    plan = ExportPlan()
    used = set(LEROBOT_RESERVED)

    def claim(name: str, store_key: str) -> str:
        if name in used:  # e.g. a store key called "index", or an obs named "state" beside others
            name = f"robot_rl.{store_key}"
        if name in used:
            raise InterchangeError(f"cannot find a lerobot name for store key {store_key!r}")
        used.add(name)
        return name

    obs_keys = [k for k in features if k.startswith(OBS_PREFIX)]
    for k in obs_keys:
        f = features[k]
        if f.is_image and f.shape[-1] == 3:  # other uint8 HxWxC arrays stay numeric features
            lr = claim(IMAGES_PREFIX + camera_name(k), k)
            plan.features[lr] = {
                "dtype": "video" if use_videos else "image",
                "shape": tuple(f.shape),
                "names": ["height", "width", "channels"],
            }
            plan.key_map[k] = lr
            plan.image_keys.append(k)
    low_dim = [k for k in obs_keys if k not in plan.key_map]
    floats = sorted(
        k
        for k in low_dim
        if np.dtype(features[k].dtype).kind == "f" and len(features[k].shape) <= 1 and not is_concatenation(k)
    )  # robosuite's object-state / robot0_proprio-state repeat other keys: their own columns only
    plan.state_parts = [(k, int(np.prod(features[k].shape, dtype=np.int64))) for k in floats]
    if plan.state_parts:
        used.add(STATE_KEY)
        names = [f"{obs_name(k)}_{i}" for k, n in plan.state_parts for i in range(n)]
        plan.features[STATE_KEY] = {"dtype": "float32", "shape": (len(names),), "names": names}
        only = features[floats[0]]
        if len(floats) == 1 and floats[0] == OBS_PREFIX + "state" and len(only.shape) == 1 and only.dtype == "float32":
            plan.key_map[floats[0]] = STATE_KEY  # the state *is* the one obs: no duplicate column
            plan.features[STATE_KEY]["names"] = list(only.names) if only.names else names
    for k in low_dim:
        if k not in plan.key_map:
            plan.key_map[k] = claim("observation." + obs_name(k), k)
            plan.features[plan.key_map[k]] = _numeric_feature(features[k])
            if features[k].dtype == "bool":  # lerobot normalises every observation.* input (max - min): no bools
                plan.features[plan.key_map[k]]["dtype"] = "float32"
    for k, f in features.items():
        if k in plan.key_map:
            continue
        lr = claim(RENAMES.get(k, k), k)
        plan.key_map[k] = lr
        plan.features[lr] = _numeric_feature(f)
    if "success" in features and "next.reward" not in plan.features and "next.reward" not in used:
        used.add("next.reward")
        plan.features["next.reward"] = {"dtype": "float32", "shape": (1,), "names": None}
        plan.derived["next.reward"] = "float(success)"
    if "next.done" not in plan.features and "next.done" not in used:
        used.add("next.done")
        plan.features["next.done"] = {"dtype": "bool", "shape": (1,), "names": None}
        plan.derived["next.done"] = "True on the last step of each episode"
    return plan


def _numeric_feature(f: Feature) -> dict:
    names = list(f.names) if f.names is not None and len(f.shape) == 1 else None
    return {"dtype": lerobot_dtype(f.dtype), "shape": tuple(f.shape) or (1,), "names": names}


# ------------------------------------------------------------------------------------------------ export
def export_lerobot(
    store_path: str | Path,
    out_root: str | Path,
    repo_id: str | None = None,
    use_videos: bool = True,
    episodes: Iterable[int] | None = None,
    vcodec: str = "libsvtav1",
) -> Path:
    """Write the store's episodes (all, or `episodes` in the given order) as a LeRobotDataset v3 at `out_root`.

    Returns `out_root`. Loads with `LeRobotDataset(repo_id, root=out_root, video_backend="pyav")`.
    """
    store_path, out_root = Path(store_path), Path(out_root)
    if not store_path.exists():
        raise InterchangeError(f"{store_path} does not exist")
    store = EpisodeStore.open(store_path, "r")
    repo_id = repo_id or f"local/{out_root.name}"
    if "/" not in repo_id:
        raise InterchangeError(f"repo id {repo_id!r} must look like owner/name (e.g. local/{out_root.name})")
    fps = int(round(store.fps))
    if abs(store.fps - fps) > 1e-6 or fps <= 0:
        raise InterchangeError(f"LeRobotDataset needs an integer fps; the store was recorded at {store.fps:g}")
    indices = list(range(store.num_episodes)) if episodes is None else [store._check_index(i) for i in episodes]
    if not indices:
        raise InterchangeError(f"{store_path} has no episodes to export")
    plan = plan_export(store.features, use_videos)
    for k in plan.image_keys:
        h, w, _ = store.features[k].shape
        if use_videos and (h % 2 or w % 2):
            raise InterchangeError(
                f"{k}: {h}x{w} images cannot be encoded as yuv420p video (odd size); export with --no-videos"
            )

    from lerobot.configs.video import RGBEncoderConfig  # lerobot >= 0.5: encoder settings in one config
    from lerobot.datasets.lerobot_dataset import LeRobotDataset  # heavy (torch): only when really exporting
    from lerobot.utils.utils import SuppressProgressBars  # one "Map" bar per episode otherwise

    info = store.meta.get("info", {})
    t0 = time.perf_counter()
    with staged_output(out_root, "dataset") as staging:
        ds = LeRobotDataset.create(
            repo_id,
            fps,
            root=staging,
            features=plan.features,
            use_videos=use_videos,
            robot_type=info.get("robot"),
            video_backend="pyav",
            rgb_encoder=RGBEncoderConfig(vcodec=vcodec),
        )
        exported = []
        try:
            with SuppressProgressBars():
                for n, i in enumerate(indices):
                    meta = store.episodes[i]
                    task = str(meta.get("task") or info.get("task") or "unspecified")
                    length = _write_episode(ds, plan, store.episode(i), task)
                    exported.append({"source_index": i, "length": length, "meta": meta})
                    log.info("exported episode %d (%d/%d): %d steps", i, n + 1, len(indices), length)
        finally:
            ds.finalize()  # closes the parquet writers: without it the files have no footer and cannot be read
        _drop_empty_dirs(staging / "images")
        _write_sidecar(staging, store, plan, exported, repo_id, use_videos)
    log.info("exported %d episodes of %s to %s in %.1f s", len(indices), store_path, out_root, time.perf_counter() - t0)
    return out_root


def _write_episode(ds, plan: ExportPlan, ep: dict[str, np.ndarray], task: str) -> int:
    import PIL.Image

    n = len(next(iter(ep.values())))
    state = None
    if plan.state_parts:
        state = np.concatenate([ep[k].reshape(n, -1).astype(np.float32) for k, _ in plan.state_parts], axis=1)
    # obs.state exported as observation.state itself (plan_export's special case) is `state` already
    copies = [
        (k, lr, plan.features[lr]["shape"], plan.features[lr]["dtype"])
        for k, lr in plan.key_map.items()
        if k not in plan.image_keys and lr != STATE_KEY
    ]
    success = ep.get("success")
    for t in range(n):
        frame: dict = {"task": task}
        for k in plan.image_keys:  # PIL: lerobot would take an HxWx3 array with H == 3 for CxHxW
            frame[plan.key_map[k]] = PIL.Image.fromarray(np.ascontiguousarray(ep[k][t]))
        if state is not None:
            frame[STATE_KEY] = state[t]
        for k, lr, shape, dtype in copies:
            frame[lr] = np.asarray(ep[k][t]).reshape(shape).astype(dtype, copy=False)
        if "next.reward" in plan.derived:
            frame["next.reward"] = np.asarray([float(success[t])], np.float32)
        if "next.done" in plan.derived:
            frame["next.done"] = np.asarray([t == n - 1], bool)
        ds.add_frame(frame)
    ds.save_episode()
    return n


def _drop_empty_dirs(path: Path) -> None:
    """lerobot leaves the (emptied) per-episode PNG directories behind."""
    if path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
        shutil.rmtree(path)


def _write_sidecar(
    root: Path, store: EpisodeStore, plan: ExportPlan, exported: list[dict], repo_id: str, use_videos: bool
) -> None:
    model_ids = sorted({e["meta"]["model_id"] for e in exported if e["meta"].get("model_id")})
    if model_ids:
        (root / MODELS_DIR).mkdir(parents=True, exist_ok=True)
        for mid in model_ids:
            (root / MODELS_DIR / f"{mid}.xml").write_text(store.model_xml(mid))
    offset, parts = 0, []
    for k, size in plan.state_parts:
        parts.append({"key": k, "start": offset, "stop": offset + size})
        offset += size
    sidecar = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "repo_id": repo_id,
        "exported": time.time(),
        "source_store": str(store.path.resolve()),
        "fps": store.fps,
        "chunk_steps": store.chunk_steps,
        "use_videos": use_videos,
        "info": store.meta.get("info", {}),
        "features": {k: f.to_dict() for k, f in store.features.items()},
        "key_map": plan.key_map,
        "state_parts": parts,
        "derived": plan.derived,
        "models": model_ids,
        "episodes": exported,
    }
    (root / META_FILE).write_text(json.dumps(sidecar, indent=1))


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="robot-rl export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("store", help="episode store directory")
    p.add_argument("out_root", help="dataset directory to create (must not exist, or be empty)")
    p.add_argument("--repo-id", help="lerobot repo id (default: local/<OUT_ROOT name>)")
    p.add_argument(
        "--no-videos", action="store_true", help="store camera frames as PNG images (lossless) instead of mp4 videos"
    )
    p.add_argument("--episodes", help="episodes to export, e.g. 0-4,9 (default: all)")
    p.add_argument(
        "--vcodec",
        default="libsvtav1",
        help="video codec lerobot encodes with (default libsvtav1; 'auto': a hardware encoder when there is one)",
    )

    def export(args) -> str:
        episodes = None
        if args.episodes:
            from robot_rl.data.tool import parse_indices

            if not Path(args.store).exists():
                raise InterchangeError(f"{args.store} does not exist")
            episodes = parse_indices(args.episodes, EpisodeStore.open(args.store, "r").num_episodes)
        out = export_lerobot(
            args.store,
            args.out_root,
            repo_id=args.repo_id,
            use_videos=not args.no_videos,
            episodes=episodes,
            vcodec=args.vcodec,
        )
        return f"wrote {out}"

    return run_cli(p, argv, export)


def run_cli(
    parser: argparse.ArgumentParser,
    argv: list[str],
    work: Callable[[argparse.Namespace], str],
    name: Callable[[argparse.Namespace], str] | None = None,
) -> int:
    """The exit code of one export/import command line: a usage error's (argparse printed the message); 2 with
    `<name>: <error>` on stderr (name: the parser's prog by default) for what cannot be done; else 0, having
    printed what `work(args)` returns."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        done = work(args)
    except (StoreError, OSError, ValueError, KeyError, IndexError) as e:
        print(f"{name(args) if name else parser.prog}: {e}", file=sys.stderr)
        return 2
    print(done)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
