"""Live session telemetry on the robot side: one JSON line per episode and per evaluation block, a status line.

`episodes.jsonl` and `evals.jsonl` are appended and flushed as they happen, so a crashed session keeps its
learning curve and a resumed one continues the episode numbering (and so the seeds) where it stopped.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from pathlib import Path

log = logging.getLogger("robot_rl.control")


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
    def __init__(self, run_dir: Path, resume: bool = False, window: int = 20):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.episodes_path, self.evals_path = run_dir / "episodes.jsonl", run_dir / "evals.jsonl"
        past = read_jsonl(self.episodes_path) if resume else []
        evals = read_jsonl(self.evals_path) if resume else []
        if not resume:
            for path in (self.episodes_path, self.evals_path):
                path.unlink(missing_ok=True)
        self.next_episode = max((r["episode"] for r in past), default=-1) + 1
        self.env_steps = sum(r["steps"] for r in past)
        self.recent = collections.deque((r["success"] for r in past), maxlen=window)
        self.base_eval = next((r for r in evals if r["mode"] == "base"), None)
        self._episodes = self.episodes_path.open("a")
        self._evals = self.evals_path.open("a")

    def episode(self, ep: dict) -> None:
        self.env_steps += ep["steps"]
        self.recent.append(ep["success"])
        row = {**ep, "env_steps": self.env_steps, "t": time.time()}
        self._episodes.write(json.dumps(row) + "\n")
        self._episodes.flush()
        res = "" if ep.get("residual_abs") is None else f", |residual| {ep['residual_abs']:.3f}"
        hz = "" if ep.get("achieved_hz") is None else f", {ep['achieved_hz']:.1f} Hz"
        explore = f" ({ep['exploration']})" if ep.get("exploration") else ""
        log.info("episode %d: %s in %d steps, return %.1f | last %d: success %.2f | env steps %d%s%s | weights v%d%s",
                 ep["episode"], "success" if ep["success"] else "failure", ep["steps"], ep["return"],
                 len(self.recent), sum(self.recent) / len(self.recent), self.env_steps, res, hz,
                 ep["policy_version"], explore)

    def evaluation(self, mode: str, after_episode: int, version: int, results: list[dict]) -> dict:
        n = len(results)
        row = {"mode": mode, "after_episode": after_episode, "env_steps": self.env_steps, "policy_version": version,
               "episodes": n, "success_rate": sum(r["success"] for r in results) / n if n else None,
               "mean_steps": sum(r["steps"] for r in results) / n if n else None,
               "successes": [bool(r["success"]) for r in results], "t": time.time()}
        if mode == "base":
            self.base_eval = row
        self._evals.write(json.dumps(row) + "\n")
        self._evals.flush()
        base = "" if self.base_eval is None or mode == "base" else f" (base alone {self.base_eval['success_rate']:.2f})"
        log.info("evaluation after episode %d, %s, weights v%d: success %.2f over %d seeded episodes%s",
                 after_episode, mode, version, row["success_rate"], n, base)
        return row

    def close(self) -> None:
        self._episodes.close()
        self._evals.close()


def plot_learning_curve(run_dirs: list[Path], out: Path, window: int = 20) -> Path | None:
    """Success rate against environment steps: training episodes (moving average over `window`) and evaluation
    blocks (policy vs base alone when present). Returns the png path, or None without data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    drew = False
    for run_dir in run_dirs:
        eps = read_jsonl(Path(run_dir) / "episodes.jsonl")
        if eps:
            steps = np.array([r["env_steps"] for r in eps])
            succ = np.array([float(r["success"]) for r in eps])
            k = min(window, len(succ))
            avg = np.convolve(succ, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1:], avg, label=f"{Path(run_dir).name}: training episodes (avg of {k})", alpha=0.8)
            drew = True
        evals = read_jsonl(Path(run_dir) / "evals.jsonl")
        for mode, style in (("residual", "o-"), ("policy", "o-")):
            rows = [r for r in evals if r["mode"] == mode]
            if rows:
                ax.plot([r["env_steps"] for r in rows], [r["success_rate"] for r in rows], style,
                        label=f"{Path(run_dir).name}: evaluation ({'base + residual' if mode == 'residual' else mode})")
                drew = True
        base = next((r for r in evals if r["mode"] == "base"), None)
        if base is not None:
            ax.axhline(base["success_rate"], linestyle="--", color="gray", label="base alone (evaluation)")
    if not drew:
        plt.close(fig)
        return None
    ax.set_xlabel("environment steps")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
