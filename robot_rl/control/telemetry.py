"""Live session telemetry on the robot side: one JSON line per episode and per evaluation block, a status line.

`episodes.jsonl` and `evals.jsonl` are appended and flushed as they happen, so a crashed session keeps its
learning curve and a resumed one continues the episode numbering (and so the seeds) where it stopped.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("robot_rl.control")


def write_json_safely(path: Path, data: dict) -> str | None:
    """Write JSON atomically (temporary file renamed into place); on failure (a full disk) nothing is left behind
    (no .tmp, the previous file intact) and the problem is returned in words, else None."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=2, default=float))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        return f"could not write {path}: {e.strerror or e}"
    return None


def save_npz_atomic(path: Path, arrays: dict) -> str | None:
    """np.savez through a temporary file renamed into place; the problem in words on failure, else None."""
    import numpy as np

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        return f"could not write {path}: {e.strerror or e}"
    return None


def read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when it is missing or torn (a summary read while it is being written)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file; a torn last line (crash mid-write) is ignored."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


class EpisodeLog:
    """`episodes.jsonl` / `evals.jsonl` of one control process, plus `episode_started.json`: the episode being
    streamed right now and the seq of its first transition, so that a control process restarted after a kill
    knows that episode was cut short and how many of its transitions reached the outbox (`interrupted`).

    A write that fails (a full disk) is logged once and counted in `write_errors`; the robot keeps being driven
    safely and the episode is still in memory (the summary has it)."""

    def __init__(self, run_dir: Path, resume: bool = False, window: int = 20):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.episodes_path, self.evals_path = run_dir / "episodes.jsonl", run_dir / "evals.jsonl"
        self.started_path = run_dir / "episode_started.json"
        past = read_jsonl(self.episodes_path) if resume else []
        evals = read_jsonl(self.evals_path) if resume else []
        if not resume:
            for path in (self.episodes_path, self.evals_path, self.started_path):
                path.unlink(missing_ok=True)
        self.past = past
        self.next_episode = max((r["episode"] for r in past), default=-1) + 1
        self.env_steps = sum(r["steps"] for r in past)
        self.recent = collections.deque((r["success"] for r in past), maxlen=window)
        self.base_eval = next((r for r in evals if r["mode"] == "base"), None)
        self.write_errors = 0
        self._write_error: str | None = None
        self._episodes = self._open(self.episodes_path)
        self._evals = self._open(self.evals_path)

    def _open(self, path: Path):
        try:
            return path.open("a")
        except OSError as e:
            self._failed(path, e)
            return None

    def _failed(self, path: Path, e: OSError) -> None:
        self.write_errors += 1
        if self._write_error is None:
            self._write_error = f"{path}: {e}"
            log.error(
                "could not write %s (%s): the robot keeps being driven safely; the summary keeps the episodes "
                "(further write errors are only counted)",
                path,
                e.strerror or e,
            )

    def _append(self, f, path: Path, row: dict) -> None:
        if f is None:
            self.write_errors += 1
            return
        try:
            f.write(json.dumps(row) + "\n")
            f.flush()
        except OSError as e:
            self._failed(path, e)

    # --------------------------------------------------------------------------- interrupted episodes
    def started(self, episode: int, first_seq: int | None) -> None:
        """Episode `episode` starts streaming at seq `first_seq` (atomically replaced, one small file)."""
        tmp = self.started_path.with_name(self.started_path.name + ".tmp")
        try:
            tmp.write_text(json.dumps({"episode": episode, "first_seq": first_seq, "t": time.time()}))
            os.replace(tmp, self.started_path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            self._failed(self.started_path, e)

    def interrupted(self) -> dict | None:
        """The episode a killed predecessor had started but not finished ({episode, first_seq}), or None."""
        try:
            started = json.loads(self.started_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return started if started.get("episode", -1) >= self.next_episode else None

    # ------------------------------------------------------------------------------------------- rows
    def episode(self, ep: dict) -> None:
        self.env_steps += ep["steps"]
        self.recent.append(ep["success"])
        row = {**ep, "env_steps": self.env_steps, "t": time.time()}
        self._append(self._episodes, self.episodes_path, row)
        self.next_episode = max(self.next_episode, ep["episode"] + 1)
        if ep.get("interrupted"):
            log.warning(
                "episode %d was cut short by a restart of this control process: %d of its transitions "
                "reached the outbox and are kept (logged as an interrupted episode)",
                ep["episode"],
                ep["steps"],
            )
            return
        res = "" if ep.get("residual_abs") is None else f", |residual| {ep['residual_abs']:.3f}"
        hz = "" if ep.get("achieved_hz") is None else f", {ep['achieved_hz']:.1f} Hz"
        explore = f" ({ep['exploration']})" if ep.get("exploration") else ""
        driven = f" | driven by {ep['driven_by']}" if ep.get("driven_by") else ""
        log.info(
            "episode %d: %s in %d steps, return %.1f | last %d: success %.2f | env steps %d%s%s | weights v%d%s%s",
            ep["episode"],
            "success" if ep["success"] else "failure",
            ep["steps"],
            ep["return"],
            len(self.recent),
            sum(self.recent) / len(self.recent),
            self.env_steps,
            res,
            hz,
            ep["policy_version"],
            explore,
            driven,
        )

    def evaluation(self, mode: str, after_episode: int, version: int, results: list[dict]) -> dict:
        n = len(results)
        row = {
            "mode": mode,
            "after_episode": after_episode,
            "env_steps": self.env_steps,
            "policy_version": version,
            "episodes": n,
            "success_rate": sum(r["success"] for r in results) / n if n else None,
            "mean_steps": sum(r["steps"] for r in results) / n if n else None,
            "successes": [bool(r["success"]) for r in results],
            "t": time.time(),
        }
        if mode == "base":
            self.base_eval = row
        self._append(self._evals, self.evals_path, row)
        base = "" if self.base_eval is None or mode == "base" else f" (base alone {self.base_eval['success_rate']:.2f})"
        log.info(
            "evaluation after episode %d, %s, weights v%d: success %.2f over %d seeded episodes%s",
            after_episode,
            mode,
            version,
            row["success_rate"],
            n,
            base,
        )
        return row

    def close(self) -> None:
        for f in (self._episodes, self._evals):
            if f is not None:
                try:
                    f.close()
                except OSError as e:
                    self._failed(self.episodes_path, e)
