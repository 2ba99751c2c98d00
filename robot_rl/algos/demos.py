"""Demonstrations as an off-policy RL buffer: sparse rewards, cut at success, relabelled with the base action.

Relabelling (ResFiT): the frozen base is run over each demo episode, step by step as it would run on the robot
— `reset()` at every episode start, so a chunked base never carries a queue across episodes — and its action is
stored beside the demonstrated one. The critic then sees (s, a_demo) and the actor learns the residual
a_demo - a_base implicitly. Relabelled base actions are cached on disk, keyed by the data and the base weights.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from robot_rl.data.episode_store import EpisodeStore
from robot_rl.interfaces import OBS_PREFIX

log = logging.getLogger(__name__)


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_demos(
    store_path: str | Path, obs_keys: list[str], max_episodes: int | None = None, successful_only: bool = True
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Episodes of a store as back-to-back rows: `obs.<k>`, `action`, `reward`, `success`; returns the arrays
    and the episode end offsets. Each episode is cut right after its first success (the task ends there)."""
    store = EpisodeStore.open(store_path, "r")
    missing = [k for k in obs_keys if OBS_PREFIX + k not in store.features]
    if missing or "action" not in store.features:
        raise ValueError(
            f"demonstrations {store_path} lack {[OBS_PREFIX + k for k in missing] or ['action']}; "
            f"they hold {sorted(store.features)} (record them with the robot the base was trained on)"
        )
    cols = {OBS_PREFIX + k: store.array(OBS_PREFIX + k) for k in obs_keys}
    cols["action"] = store.array("action")
    success = store.array("success") if "success" in store.features else np.zeros(len(cols["action"]), bool)
    parts: dict[str, list] = {k: [] for k in [*cols, "success"]}
    ends, total = [], 0
    for i in range(store.num_episodes):
        a, b = store.episode_bounds(i)
        hit = np.flatnonzero(success[a:b])
        if successful_only and not hit.size:
            continue
        b = a + int(hit[0]) + 1 if hit.size else b
        for k in cols:
            parts[k].append(cols[k][a:b])
        parts["success"].append(success[a:b].astype(bool))
        total += b - a
        ends.append(total)
        if max_episodes and len(ends) >= max_episodes:
            break
    if not ends:
        raise ValueError(f"demonstrations {store_path}: no {'successful ' if successful_only else ''}episodes")
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    arrays["reward"] = arrays["success"].astype(np.float32)
    return arrays, np.asarray(ends, dtype=np.int64)


def relabel_base_actions(
    base, arrays: dict[str, np.ndarray], episode_ends: np.ndarray, obs_keys: list[str]
) -> np.ndarray:
    """The base policy's action at every demo step, run episode by episode exactly as on the robot."""
    out = np.empty_like(arrays["action"], dtype=np.float32)
    start = 0
    for end in episode_ends:
        base.reset()
        for t in range(start, int(end)):
            out[t] = base.select_action({k: arrays[OBS_PREFIX + k][t] for k in obs_keys})
        start = int(end)
    return out


def cached_base_actions(
    cache_dir: Path | None,
    store_path: str | Path,
    base_checkpoint_file: Path | None,
    base,
    arrays: dict[str, np.ndarray],
    episode_ends: np.ndarray,
    obs_keys: list[str],
) -> np.ndarray:
    """`relabel_base_actions`, reusing a cache file when the store's commit and the base weights are unchanged."""
    key = hashlib.sha256()
    key.update((Path(store_path) / "commit.json").read_bytes())
    if base_checkpoint_file is not None and base_checkpoint_file.exists():
        key.update(_sha(base_checkpoint_file).encode())
    key.update(repr((len(episode_ends), obs_keys)).encode())
    cache = Path(cache_dir) / f"demo_base_actions_{key.hexdigest()[:16]}.npy" if cache_dir else None
    if cache is not None and cache.exists():
        cached = np.load(cache)
        if cached.shape == arrays["action"].shape:
            log.info("demo base actions from cache %s", cache)
            return cached
    log.info("relabelling %d demo steps with the base policy", len(arrays["action"]))
    out = relabel_base_actions(base, arrays, episode_ends, obs_keys)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npy")
        np.save(tmp, out)
        tmp.replace(cache)
    return out
