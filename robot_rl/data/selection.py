"""A selection: a view over some steps of an episode store (what `robot-rl retrieve` keeps), plus the store's
content fingerprint that says whether a view, or anything cached from a store, still matches it.

A selection directory holds

    selection.json   format + version, the store it views (absolute path) and that store's fingerprint when the
                     selection was made, how the rows were chosen, counts
    rows.npz         episode (int64), step within that episode (int64), score (float32): one row per kept step

Nothing of the store is copied. `write_selection` builds the directory under a temporary name and renames it
into place, so a reader sees the old selection or the new one, never half of one. `read_selection` refuses a
selection whose store has changed since (episodes added, removed or edited): its rows would point at other data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from robot_rl.data.episode_store import EpisodeStore, StoreError

FORMAT, VERSION = "robot_rl.selection", 1
META, ROWS = "selection.json", "rows.npz"


class SelectionError(StoreError):
    """A selection that cannot be used as it is; the message says what to do."""


def store_fingerprint(store: EpisodeStore) -> dict:
    """What identifies a store's committed content: episode count, steps, per-episode lengths (hashed) and a
    sha256 over every committed row of every key (compression settings do not enter it)."""
    h = hashlib.sha256()
    ends = np.asarray(store.episode_ends, np.int64)
    h.update(json.dumps({k: f.to_dict() for k, f in sorted(store.features.items())}, sort_keys=True).encode())
    h.update(ends.tobytes())
    for key in sorted(store.features):
        for block in _key_blocks(store, key):
            h.update(np.ascontiguousarray(block).tobytes())
    lengths = np.diff(np.concatenate([[0], ends]))
    return {
        "episodes": int(store.num_episodes),
        "steps": int(store.num_steps),
        "lengths_sha256": hashlib.sha256(lengths.tobytes()).hexdigest()[:16],
        "content_sha256": h.hexdigest(),
    }


def _key_blocks(store: EpisodeStore, key: str):
    """The committed rows of one key in order: at once for low-dim keys, episode by episode for images."""
    if not store.features[key].is_image:
        yield store.array(key)
        return
    for i in range(store.num_episodes):
        yield store.episode(i, [key])[key]


def describe_change(then: dict, now: dict) -> str:
    """One line saying how a store changed between two fingerprints."""
    if then == now:
        return "unchanged"
    parts = [
        f"{then.get('episodes')} episodes / {then.get('steps')} steps then, {now['episodes']} / {now['steps']} now"
    ]
    if then.get("episodes") == now["episodes"] and then.get("lengths_sha256") == now["lengths_sha256"]:
        parts.append("same episode lengths, different content")
    return "; ".join(parts)


@dataclass
class Selection:
    """Rows of a selection and what it was made from. `episode`/`step` index the store's committed episodes."""

    path: Path
    store_path: Path
    fingerprint: dict
    episode: np.ndarray
    step: np.ndarray
    score: np.ndarray
    info: dict

    def __len__(self) -> int:
        return len(self.episode)

    def rows(self, store: EpisodeStore) -> np.ndarray:
        """Global row indices into the store (episode start + step)."""
        starts = np.concatenate([[0], store.episode_ends[:-1]]).astype(np.int64)
        return starts[self.episode] + self.step


def is_selection(path: str | os.PathLike) -> bool:
    return (Path(path) / META).is_file()


def write_selection(
    path: str | os.PathLike,
    store: EpisodeStore,
    fingerprint: dict,
    episode: np.ndarray,
    step: np.ndarray,
    score: np.ndarray,
    info: dict,
) -> Path:
    """Write (or replace) a selection directory atomically: built as `<path>.tmp`, then renamed into place."""
    path = Path(path)
    episode, step = np.asarray(episode, np.int64), np.asarray(step, np.int64)
    score = np.asarray(score, np.float32)
    if not (len(episode) == len(step) == len(score)) or len(episode) == 0:
        raise SelectionError(f"a selection needs equally long, non-empty rows; got {len(episode)} rows")
    lengths = np.diff(np.concatenate([[0], store.episode_ends]))
    if episode.min() < 0 or episode.max() >= store.num_episodes or (step < 0).any() or (step >= lengths[episode]).any():
        raise SelectionError(f"selection rows point outside {store.path} ({store.num_episodes} episodes)")
    if not np.isfinite(score).all():
        raise SelectionError("selection scores must be finite")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "store": str(Path(store.path).resolve()),
        "store_fingerprint": fingerprint,
        "rows": int(len(episode)),
        "episodes": int(len(np.unique(episode))),
        "created": time.time(),
        **info,
    }
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    tmp.mkdir(parents=True)
    with open(tmp / ROWS, "wb") as f:
        np.savez(f, episode=episode, step=step, score=score)
        f.flush()
        os.fsync(f.fileno())
    (tmp / META).write_text(json.dumps(meta, indent=1))
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)
    return path


def read_selection(path: str | os.PathLike, check_store: bool = True) -> tuple[Selection, EpisodeStore]:
    """The selection at `path` and its store, opened read-only. With `check_store` the store's fingerprint must
    still be the one recorded (else SelectionError saying to re-run retrieve)."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        raise SelectionError(f"{path} is not a selection (no {META}); make one with robot-rl retrieve") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise SelectionError(f"{path}: unsupported selection format {meta.get('format')!r} v{meta.get('version')}")
    with np.load(path / ROWS) as z:
        episode, step, score = z["episode"], z["step"], z["score"]
    store = EpisodeStore.open(meta["store"])
    if check_store:
        now = store_fingerprint(store)
        if now != meta["store_fingerprint"]:
            raise SelectionError(
                f"{path}: the store it views ({meta['store']}) changed since the selection was made "
                f"({describe_change(meta['store_fingerprint'], now)}); run robot-rl retrieve again"
            )
    sel = Selection(path, Path(meta["store"]), meta["store_fingerprint"], episode, step, score, meta)
    return sel, store


def copy_selection(selection: Selection, store: EpisodeStore, dest: str | os.PathLike) -> EpisodeStore:
    """Copy the selected steps into a new episode store at `dest` (only when asked: a selection is a view).
    Each run of consecutive selected steps of one source episode becomes one episode, its metadata saying where
    it came from. Built at `<dest>.tmp` and renamed into place."""
    dest = Path(dest)
    if dest.exists():
        raise SelectionError(f"{dest} exists; choose a new path for the copy")
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    new = EpisodeStore.create(
        tmp, store.features, store.fps, chunk_steps=store.chunk_steps, info=store.meta.get("info")
    )
    order = np.lexsort((selection.step, selection.episode))
    ep, st = selection.episode[order], selection.step[order]
    breaks = np.flatnonzero((np.diff(ep) != 0) | (np.diff(st) != 1)) + 1
    w = new.writer()
    for e_run, s_run in zip(np.split(ep, breaks), np.split(st, breaks)):
        e, a, b = int(e_run[0]), int(s_run[0]), int(s_run[-1]) + 1
        data = store.episode(e)
        w.begin({**store.episodes[e], "source_episode": e, "source_steps": [a, b]})
        for t in range(a, b):
            w.add({k: v[t] for k, v in data.items()})
        w.save()
    new.close()
    os.replace(tmp, dest)
    return EpisodeStore.open(dest)
