"""Append-only zarr episode store: demos survive a crash, completed episodes are never rewritten.

Layout of a store directory (see docs/episode_store.md):

    meta.json        written once at creation: format version, fps, features (shape/dtype/names), robot
    data/<key>       one zarr array per key, all of length N (steps), chunked along time
    commit.json      the truth: num_steps, episode_ends and per-episode metadata; replaced atomically
    pending.json     only while an episode is being written: the rows of it already on disk

Rows beyond `commit.json`'s `num_steps` are not part of the dataset. An episode is written in chunk-aligned
blocks while it runs (a background thread does the compression, so the control loop never waits on disk) and
becomes part of the store when `commit.json` is replaced at the end. zarr writes every chunk by an atomic rename
and a chunk holding earlier episodes' rows is rewritten with the same bytes for those rows, so a SIGKILL at any
moment leaves every committed episode bit-exact; the episode in progress is either recovered from
`pending.json` (the rows flushed so far) or dropped.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from robot_rl.interfaces import Feature

log = logging.getLogger(__name__)

FORMAT = "robot_rl.episode_store"
FORMAT_VERSION = 1


class StoreError(RuntimeError):
    """A store that cannot be opened/written as asked; the message says what to do."""


def write_json_atomic(path: Path, obj: Any) -> None:
    """tmp file + fsync + rename + directory fsync: after a crash the file is either old or new, never torn."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def feature_from_dict(d: dict) -> Feature:
    low, high = d.get("low"), d.get("high")
    return Feature(
        shape=tuple(d["shape"]),
        dtype=d["dtype"],
        names=tuple(d["names"]) if d.get("names") else None,
        low=None if low is None else np.asarray(low, np.float32),
        high=None if high is None else np.asarray(high, np.float32),
    )


def _compressor(feature: Feature) -> BloscCodec:
    # images: zstd level 1 (2-3x smaller than lz4 on rendered/camera frames, still >100 MB/s); low-dim: lz4
    if feature.is_image:
        return BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle")
    return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


class EpisodeStore:
    """Open with `EpisodeStore.create(path, features, fps)` or `EpisodeStore.open(path, mode)`."""

    def __init__(self, path: Path, meta: dict, mode: str):
        self.path = Path(path)
        self.mode = mode
        self.meta = meta
        self.fps = float(meta["fps"])
        self.features: dict[str, Feature] = {k: feature_from_dict(v) for k, v in meta["features"].items()}
        self.chunk_steps = int(meta["chunk_steps"])
        self._root = zarr.open_group(
            zarr.storage.LocalStore(self.path, read_only=mode == "r"), mode="r" if mode == "r" else "r+"
        )
        self._arrays = {k: self._root[f"data/{k}"] for k in self.features}
        self._load_commit()
        self._writer: EpisodeWriter | None = None

    # ------------------------------------------------------------------------------------------- create / open
    @classmethod
    def create(
        cls,
        path: str | Path,
        features: dict[str, Feature],
        fps: float,
        *,
        chunk_steps: int = 64,
        info: dict | None = None,
    ) -> EpisodeStore:
        """A new empty store. `features` maps each per-step key to its Feature; `info` (robot, task defaults...)
        is kept in meta.json."""
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise StoreError(
                f"{path} already exists and is not empty; pass resume (open it in append mode) or choose a new path"
            )
        if not features:
            raise StoreError("an episode store needs at least one feature")
        path.mkdir(parents=True, exist_ok=True)
        root = zarr.open_group(zarr.storage.LocalStore(path), mode="w")
        for key, f in features.items():
            root.create_array(
                f"data/{key}",
                shape=(0, *f.shape),
                chunks=(chunk_steps, *f.shape),
                dtype=f.dtype,
                compressors=[_compressor(f)],
                fill_value=0,
            )
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "fps": float(fps),
            "chunk_steps": int(chunk_steps),
            "features": {k: f.to_dict() for k, f in features.items()},
            "info": info or {},
            "created": time.time(),
        }
        write_json_atomic(path / "meta.json", meta)
        write_json_atomic(path / "commit.json", {"num_steps": 0, "episode_ends": [], "episodes": []})
        return cls(path, meta, "a")

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> EpisodeStore:
        """mode "r": read only; "a": append (resume recording) and edit."""
        path = Path(path)
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        try:
            meta = json.loads((path / "meta.json").read_text())
        except FileNotFoundError:
            raise StoreError(
                f"{path} is not an episode store (no meta.json); create one with robot-rl record"
            ) from None
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise StoreError(f"{path}: unsupported store format {meta.get('format')!r} v{meta.get('version')}")
        return cls(path, meta, mode)

    def _load_commit(self) -> None:
        c = json.loads((self.path / "commit.json").read_text())
        self.num_steps = int(c["num_steps"])
        self.episode_ends = np.asarray(c["episode_ends"], dtype=np.int64)
        self.episodes: list[dict] = list(c["episodes"])
        for k, a in self._arrays.items():
            if a.shape[0] < self.num_steps:
                raise StoreError(
                    f"{self.path}: array {k!r} has {a.shape[0]} rows but {self.num_steps} are committed; "
                    f"the store is damaged (was it edited by hand?)"
                )

    def _commit(self, num_steps: int, episode_ends: list[int], episodes: list[dict]) -> None:
        write_json_atomic(
            self.path / "commit.json",
            {"num_steps": int(num_steps), "episode_ends": [int(e) for e in episode_ends], "episodes": episodes},
        )
        self.num_steps, self.episode_ends, self.episodes = num_steps, np.asarray(episode_ends, np.int64), episodes

    # ---------------------------------------------------------------------------------------------- reading
    @property
    def num_episodes(self) -> int:
        return len(self.episode_ends)

    def __len__(self) -> int:
        return self.num_episodes

    def episode_bounds(self, index: int) -> tuple[int, int]:
        index = self._check_index(index)
        start = int(self.episode_ends[index - 1]) if index > 0 else 0
        return start, int(self.episode_ends[index])

    def episode(self, index: int, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """All steps of one episode, as numpy arrays."""
        a, b = self.episode_bounds(index)
        return {k: self._arrays[k][a:b] for k in (keys or self.features)}

    def array(self, key: str) -> np.ndarray:
        """The committed rows of one key, loaded into memory."""
        if key not in self._arrays:
            raise KeyError(f"no key {key!r} in {self.path}; keys: {', '.join(self.features)}")
        return self._arrays[key][: self.num_steps]

    def _check_index(self, index: int) -> int:
        n = self.num_episodes
        if not isinstance(index, (int, np.integer)) or not -n <= index < n:
            raise IndexError(f"episode index {index} out of range: the store has {n} episodes (0..{n - 1})")
        return int(index) % n

    # ---------------------------------------------------------------------------------------------- writing
    def _require_writable(self) -> None:
        if self.mode != "a":
            raise StoreError(f"{self.path} is open read-only; open it with mode='a' to write")

    @property
    def pending(self) -> dict | None:
        """What pending.json says about an episode a crashed writer left behind (None if there is none)."""
        p = self.path / "pending.json"
        return json.loads(p.read_text()) if p.exists() else None

    def recover_pending(self) -> int | None:
        """Commit the rows a crashed writer had flushed as an episode marked `partial`; returns its index."""
        self._require_writable()
        p = self.pending
        if p is None:
            return None
        start, end = int(p["start"]), int(p["flushed"])
        if start != self.num_steps or end <= start:
            self.drop_pending()
            return None
        meta = {**p.get("meta", {}), "partial": True, "success": False, "length": end - start}
        self._commit(end, [*self.episode_ends.tolist(), end], [*self.episodes, meta])
        (self.path / "pending.json").unlink()
        log.info("recovered a partial episode of %d steps as episode %d", end - start, self.num_episodes - 1)
        return self.num_episodes - 1

    def drop_pending(self) -> None:
        self._require_writable()
        (self.path / "pending.json").unlink(missing_ok=True)

    def writer(self) -> EpisodeWriter:
        """The (single) writer that appends episodes; the background thread starts here."""
        self._require_writable()
        if self.pending is not None:
            raise StoreError(
                f"{self.path} has a partial episode left by a crash ({self.pending['flushed'] - self.pending['start']} "
                f"steps on disk): recover it (recover_pending / --recover-partial) or drop it first"
            )
        if self._writer is None:
            self._writer = EpisodeWriter(self)
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def put_model_xml(self, xml: str) -> str:
        """Store a simulator model once (many episodes share one) and return the id episodes refer to."""
        import hashlib

        self._require_writable()
        sha = hashlib.sha256(xml.encode()).hexdigest()[:16]
        path = self.path / "models" / f"{sha}.xml"
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(xml)
            os.replace(tmp, path)
        return sha

    def model_xml(self, model_id: str) -> str:
        return (self.path / "models" / f"{model_id}.xml").read_text()

    # ---------------------------------------------------------------------------------------------- editing
    def keep_episodes(self, indices: Iterable[int]) -> None:
        """Keep only these episodes (in store order). Validates every index before touching anything; the new
        store is built beside the old one and swapped in by renames, so a crash leaves one of the two intact."""
        self._require_writable()
        if self._writer is not None and self._writer.in_episode:
            raise StoreError("cannot edit the store while an episode is being recorded")
        keep = sorted({self._check_index(i) for i in indices})
        tmp = self.path.with_name(self.path.name + ".editing")
        old = self.path.with_name(self.path.name + ".old")
        for p in (tmp, old):
            if p.exists():
                shutil.rmtree(p)
        new = EpisodeStore.create(
            tmp, self.features, self.fps, chunk_steps=self.chunk_steps, info=self.meta.get("info")
        )
        ends, metas, n = [], [], 0
        for key in self.features:
            parts = [self._arrays[key][slice(*self.episode_bounds(i))] for i in keep]
            data = (
                np.concatenate(parts) if parts else np.zeros((0, *self.features[key].shape), self.features[key].dtype)
            )
            new._arrays[key].resize(data.shape)
            if len(data):
                new._arrays[key][:] = data
        for i in keep:
            a, b = self.episode_bounds(i)
            n += b - a
            ends.append(n)
            metas.append(self.episodes[i])
        new._commit(n, ends, metas)
        if (self.path / "models").exists():
            shutil.copytree(self.path / "models", tmp / "models")
        os.replace(self.path, old)
        os.replace(tmp, self.path)
        shutil.rmtree(old)
        reopened = EpisodeStore.open(self.path, "a")
        self.__dict__.update(reopened.__dict__)

    def delete_episodes(self, indices: Iterable[int]) -> None:
        drop = {self._check_index(i) for i in indices}
        self.keep_episodes([i for i in range(self.num_episodes) if i not in drop])

    # ------------------------------------------------------------------------------------- derived columns
    # Per-step values computed from the recorded data afterwards (a learned reward, a relabelled return): kept
    # apart from the recorded features under derived/<name> and listed in derived.json, so the episode writer
    # and meta.json never change and every version stays (a new relabel writes a new name, never over an old
    # one). Editing episodes (keep/delete) drops them: their rows would no longer line up.
    DERIVED = "derived.json"

    def derived_columns(self) -> dict[str, dict]:
        """name -> {feature, num_steps, created, info} of every derived column, oldest first."""
        p = self.path / self.DERIVED
        return json.loads(p.read_text()) if p.exists() else {}

    def add_derived(self, name: str, values: np.ndarray, info: dict | None = None) -> None:
        """Write a new derived column with one row per committed step. Refuses an existing name (versions are
        new names) and a row count that is not num_steps; the column becomes visible only once derived.json is
        replaced, so a crash leaves the old list intact."""
        self._require_writable()
        if not name or "/" in name or name.startswith("."):
            raise StoreError(f"derived column name {name!r} is not a plain name")
        columns = self.derived_columns()
        if name in columns or name in self.features:
            raise StoreError(f"{self.path} already has a column {name!r}: derived columns are never overwritten")
        values = np.asarray(values)
        if values.shape[0] != self.num_steps:
            raise StoreError(f"derived column {name!r} has {values.shape[0]} rows, the store {self.num_steps} steps")
        if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
            raise StoreError(f"derived column {name!r} holds non-finite values; nothing was written")
        feature = Feature(tuple(values.shape[1:]), str(values.dtype))
        root = zarr.open_group(zarr.storage.LocalStore(self.path), mode="r+")
        if f"derived/{name}" in root:  # an orphan of a crash before derived.json named it
            del root[f"derived/{name}"]
        arr = root.create_array(
            f"derived/{name}",
            shape=values.shape,
            chunks=(self.chunk_steps, *values.shape[1:]),
            dtype=values.dtype,
            compressors=[_compressor(feature)],
            fill_value=0,
        )
        arr[:] = values
        columns[name] = {
            "feature": feature.to_dict(),
            "num_steps": int(self.num_steps),
            "created": time.time(),
            "info": dict(info or {}),
        }
        write_json_atomic(self.path / self.DERIVED, columns)

    def derived(self, name: str) -> np.ndarray:
        """A derived column's rows (as many as the store had steps when it was written)."""
        columns = self.derived_columns()
        if name not in columns:
            raise KeyError(f"no derived column {name!r} in {self.path}; it has: {', '.join(columns) or 'none'}")
        root = zarr.open_group(zarr.storage.LocalStore(self.path, read_only=True), mode="r")
        return root[f"derived/{name}"][: columns[name]["num_steps"]]

    # ------------------------------------------------------------------------------------------------- info
    def summary(self) -> dict:
        lengths = np.diff(np.concatenate([[0], self.episode_ends])) if self.num_episodes else np.zeros(0, int)
        succ = [e.get("success") for e in self.episodes if e.get("success") is not None]
        disk = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        return {
            "path": str(self.path),
            "episodes": self.num_episodes,
            "steps": self.num_steps,
            "fps": self.fps,
            "success_rate": float(np.mean(succ)) if succ else None,
            "length_mean": float(lengths.mean()) if len(lengths) else None,
            "length_min": int(lengths.min()) if len(lengths) else None,
            "length_max": int(lengths.max()) if len(lengths) else None,
            "features": {k: f.to_dict() for k, f in self.features.items()},
            "disk_bytes": disk,
            "pending": self.pending,
        }

    def stats(self, keys: Iterable[str] | None = None) -> dict[str, dict]:
        """Per-key mean/std/min/max over committed steps (per entry for vectors, per channel for images)."""
        out = {}
        for k in keys or self.features:
            x = self.array(k)
            if len(x) == 0:
                continue
            axes = (0, 1, 2) if self.features[k].is_image else (0,)
            xf = x.astype(np.float64)
            out[k] = {
                "mean": xf.mean(axes).tolist(),
                "std": xf.std(axes).tolist(),
                "min": xf.min(axes).tolist(),
                "max": xf.max(axes).tolist(),
            }
        return out


class EpisodeWriter:
    """Appends episodes: `add(frame)` each step (cheap: validate + buffer), `save(meta)` or `discard()` at the end.

    Compression and disk writes run on one background thread in chunk-aligned blocks, so the loop calling `add`
    never waits on disk. A write error (disk full, permission) is kept and raised by the next `add`/`save`,
    with the episode in progress discarded and every committed episode untouched.
    """

    def __init__(self, store: EpisodeStore):
        self.store = store
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._buffer: dict[str, list[np.ndarray]] = {k: [] for k in store.features}
        self._next_row = store.num_steps  # where the next episode starts (saves may still be in flight)
        self._start = self._queued_upto = self._next_row  # first row of the episode; rows handed to the thread
        self._rows = 0  # rows of the current episode added so far
        self._meta: dict = {}
        self.in_episode = False
        self._thread = threading.Thread(target=self._work, name="episode-writer", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------------------- loop-side API
    def begin(self, meta: dict | None = None) -> None:
        """Start an episode; `meta` (task, seed, initial sim state...) is stored in pending.json and, merged
        with `save`'s, in commit.json."""
        self._raise_error()
        if self.in_episode:
            raise StoreError("begin() called twice: save() or discard() the episode in progress first")
        self._start = self._queued_upto = self._next_row
        self._rows, self._meta, self.in_episode = 0, dict(meta or {}), True
        for v in self._buffer.values():
            v.clear()

    def add(self, frame: dict[str, np.ndarray]) -> None:
        self._raise_error()
        if not self.in_episode:
            self.begin()
        feats = self.store.features
        if frame.keys() != feats.keys():
            missing, extra = sorted(feats.keys() - frame.keys()), sorted(frame.keys() - feats.keys())
            raise ValueError(f"frame keys do not match the store: missing {missing}, unexpected {extra}")
        for k, f in feats.items():
            v = np.asarray(frame[k])
            if v.shape != f.shape:
                raise ValueError(f"frame[{k!r}] has shape {v.shape}, the store expects {f.shape}")
            self._buffer[k].append(v.astype(f.dtype, copy=True))
        self._rows += 1
        row = self._start + self._rows
        if row % self.store.chunk_steps == 0:  # a chunk boundary: hand the finished block to the writer thread
            self._queue_block(row)

    def save(self, meta: dict | None = None, wait: bool = True) -> Future:
        """Commit the episode in progress; the Future's result is its index. `wait=False` returns at once."""
        self._raise_error()
        if not self.in_episode or self._rows == 0:
            raise StoreError("save(): no steps were added to this episode")
        end = self._start + self._rows
        self._queue_block(end)
        fut: Future = Future()
        self._jobs.put(("commit", end, _jsonable({**self._meta, **(meta or {}), "length": self._rows}), fut))
        self._next_row = end
        self.in_episode = False
        if wait:
            try:
                fut.result()
            except BaseException as e:  # noqa: BLE001 - reported below with what it means for the data
                self._error = self._error or e
            self._raise_error()
        return fut

    def discard(self) -> None:
        """Drop the episode in progress (re-record); rows already flushed are simply not committed."""
        if self.in_episode:
            fut: Future = Future()
            self._jobs.put(("discard", None, None, fut))
            fut.result()
        self.in_episode = False
        self._rows = 0
        for v in self._buffer.values():
            v.clear()

    @property
    def steps(self) -> int:
        return self._rows

    def flush(self) -> None:
        """Wait until everything handed to the writer thread is on disk."""
        fut: Future = Future()
        self._jobs.put(("sync", None, None, fut))
        fut.result()
        self._raise_error()

    def flush_quietly(self) -> None:
        fut: Future = Future()
        self._jobs.put(("sync", None, None, fut))
        try:
            fut.result(timeout=60)
        except Exception:  # noqa: BLE001 - only used while already reporting an error
            pass

    def close(self) -> None:
        if self.in_episode:
            log.warning("closing the store with an unsaved episode of %d steps: discarded", self._rows)
            self.discard()
        self._jobs.put(("stop", None, None, None))
        self._thread.join(timeout=30)

    def _queue_block(self, upto: int) -> None:
        n = upto - self._queued_upto
        if n <= 0:
            return
        block = {k: np.stack(v[:n]) for k, v in self._buffer.items()}
        for v in self._buffer.values():
            del v[:n]
        self._jobs.put(("write", (self._queued_upto, upto, block, self._start, self._meta), None, None))
        self._queued_upto = upto

    def _raise_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            self.flush_quietly()
            self._next_row = self.store.num_steps
            self.in_episode = False
            for v in self._buffer.values():
                v.clear()
            raise StoreError(
                f"writing {self.store.path} failed: {err}. The episode in progress was discarded; "
                f"the {self.store.num_episodes} saved episodes are intact. Free disk space or fix the "
                f"path, then resume."
            ) from err

    # ----------------------------------------------------------------------------------------- writer thread
    def _work(self) -> None:
        failed = False  # a block of the episode in progress failed: skip its other blocks, fail its commit
        while True:
            kind, arg, meta, fut = self._jobs.get()
            if kind == "stop":
                return
            try:
                if kind == "write":
                    if not failed:
                        self._write_block(*arg)
                elif kind == "commit":
                    if failed:
                        failed = False
                        fut.set_exception(StoreError("an earlier block of this episode could not be written"))
                        continue
                    store = self.store
                    store._commit(arg, [*store.episode_ends.tolist(), arg], [*store.episodes, meta])
                    (store.path / "pending.json").unlink(missing_ok=True)
                    fut.set_result(store.num_episodes - 1)
                else:  # discard | sync
                    if kind == "discard":
                        failed = False
                        (self.store.path / "pending.json").unlink(missing_ok=True)
                    fut.set_result(None)
            except BaseException as e:  # noqa: BLE001 - handed to the loop thread, which reports it
                log.error("episode store write failed: %s", e)
                self._error = e
                failed = kind == "write"
                if fut is not None and not fut.done():
                    fut.set_exception(e)

    def _write_block(self, a: int, b: int, block: dict[str, np.ndarray], start: int, meta: dict) -> None:
        for k, arr in self.store._arrays.items():
            if arr.shape[0] != b:
                arr.resize((b, *arr.shape[1:]))
            arr[a:b] = block[k]
        write_json_atomic(self.store.path / "pending.json", {"start": start, "flushed": b, "meta": _jsonable(meta)})


def _jsonable(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}
