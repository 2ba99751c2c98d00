"""The session's learning curve (`learning_curve.png`): success against environment steps, read from the control
processes' `episodes.jsonl` and `evals.jsonl`, with who drove each episode kept apart so a hand-over from expert to
policy does not read as learning made it worse."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from robot_rl.control.telemetry import read_jsonl

log = logging.getLogger(__name__)


def _who_drove(row: dict) -> str:
    """'expert', 'policy' or 'nobody' for one episodes.jsonl row (rows without step counts: 'policy')."""
    if str(row.get("driven_by", "")).startswith("expert (expert episode"):
        return "expert"
    policy, teleop = row.get("policy_steps"), row.get("teleop_steps")
    if policy is None and teleop is None:
        return "policy"
    if policy:
        return "policy"
    return "expert" if teleop else "nobody"


def _moving_average(x, window: int):
    """Trailing mean over the last `window` values (fewer at the start, so the line covers every episode)."""

    c = np.cumsum(np.concatenate([[0.0], np.asarray(x, dtype=float)]))
    i = np.arange(1, len(x) + 1)
    lo = np.maximum(0, i - window)
    return (c[i] - c[lo]) / (i - lo), min(window, len(x))


def _wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre, half = p + z * z / (2 * n), z * ((p * (1 - p) + z * z / (4 * n)) / n) ** 0.5
    d = 1 + z * z / n
    return max(0.0, (centre - half) / d), min(1.0, (centre + half) / d)


def _version_marks(ax, eps: list[dict], most: int = 8) -> None:
    """A faint vertical line where the robot first ran each new weights version; at most `most` labelled."""
    marks, last = [], None
    for r in eps:
        v = r.get("policy_version")
        if v is not None and v >= 0 and v != last:
            marks.append((r["env_steps"] - r.get("steps", 0), v))
        last = v if v is not None else last
    stride = max(1, -(-len(marks) // most))
    for i, (x, v) in enumerate(marks):
        ax.axvline(x, color="tab:purple", alpha=0.25, linewidth=0.8)
        if i % stride == 0 or i == len(marks) - 1:
            ax.annotate(
                f"v{v}",
                (x, 1.0),
                xycoords=("data", "axes fraction"),
                fontsize=6,
                color="tab:purple",
                xytext=(1, -8),
                textcoords="offset points",
            )


def _dots_and_mean(ax, x, y, window: int, colour: str, alpha: float, label: str) -> None:
    """Each episode a faint dot, and its trailing mean as a line (with markers while it has few points);
    `label` may name the window as {k}."""
    ax.plot(x, y, "o", color=colour, alpha=alpha, markersize=3)
    avg, k = _moving_average(y, window)
    ax.plot(x, avg, "-o" if len(avg) < 3 else "-", color=colour, markersize=4, label=label.replace("{k}", str(k)))


def learning_curve(
    run_dirs: list[Path], out: Path, window: int = 20, title: str | None = None
) -> tuple[Path | None, str | None]:
    """The session's learning curve: success against environment steps, policy-driven episodes (moving average
    over `window`, each outcome a dot), expert-driven episodes and evaluation blocks (95 % Wilson intervals) as
    separate series, a mark where each weights version reached the robot, and, when episodes.jsonl carries
    `interventions` (takeovers per episode), a panel of interventions per episode. Returns (png path, None), or
    (None, why it was skipped). Written atomically (temporary file renamed into place): never a 0-byte `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    per_dir = []
    for run_dir in map(Path, run_dirs):
        eps = [r for r in read_jsonl(run_dir / "episodes.jsonl") if not r.get("interrupted") and "env_steps" in r]
        per_dir.append((run_dir, eps, read_jsonl(run_dir / "evals.jsonl")))
    if not any(eps or evals for _, eps, evals in per_dir):
        return None, "no finished episodes or evaluation blocks to plot"
    with_interventions = any(r.get("interventions") for _, eps, _ in per_dir for r in eps)  # some takeover
    fig, axes = plt.subplots(
        2 if with_interventions else 1, 1, figsize=(8, 6.5 if with_interventions else 4.5), sharex=True, squeeze=False
    )
    ax = axes[0][0]
    several = len(per_dir) > 1
    for i, (run_dir, eps, evals) in enumerate(per_dir):
        tag = f"{run_dir.name}: " if several else ""
        colour = f"C{i}"
        policy = [r for r in eps if _who_drove(r) == "policy"]
        if policy:
            x = [r["env_steps"] for r in policy]
            y = [float(r["success"]) for r in policy]
            _dots_and_mean(
                ax, x, y, window, colour, 0.25, f"{tag}policy-driven episodes (mean of the last {{k}}, n={len(policy)})"
            )
        for who, marker, colour2 in (("expert", "x", "tab:gray"), ("nobody", "v", "tab:red")):
            rows = [r for r in eps if _who_drove(r) == who]
            if rows:
                label = "expert/teleop-driven episodes" if who == "expert" else "nobody drove (safe actions)"
                ax.plot(
                    [r["env_steps"] for r in rows],
                    [float(r["success"]) for r in rows],
                    marker,
                    color=colour2,
                    markersize=5,
                    label=f"{tag}{label} (n={len(rows)})",
                )
        for mode in ("policy", "residual"):
            rows = [r for r in evals if r.get("mode") == mode and r.get("success_rate") is not None]
            if rows:
                bounds = [_wilson(round(r["success_rate"] * r["episodes"]), r["episodes"]) for r in rows]
                ys = [r["success_rate"] for r in rows]
                ax.errorbar(
                    [r["env_steps"] for r in rows],
                    ys,
                    yerr=[[y - lo for y, (lo, _) in zip(ys, bounds)], [hi - y for y, (_, hi) in zip(ys, bounds)]],
                    fmt="s-",
                    color="tab:green" if not several else colour,
                    capsize=3,
                    markersize=5,
                    label=f"{tag}evaluation blocks ({'base + residual' if mode == 'residual' else mode}, "
                    f"{rows[-1]['episodes']} seeded episodes, 95 % CI)",
                )
        base = next((r for r in evals if r.get("mode") == "base"), None)
        if base is not None and base.get("success_rate") is not None:
            ax.axhline(base["success_rate"], linestyle="--", color="gray", label=f"{tag}base alone (evaluation)")
        _version_marks(ax, eps)
        if with_interventions:
            bx = axes[1][0]
            rows = [r for r in eps if r.get("interventions") is not None and _who_drove(r) != "expert"]
            if rows:
                x, y = [r["env_steps"] for r in rows], [r["interventions"] for r in rows]
                _dots_and_mean(
                    bx, x, y, window, colour, 0.3, f"{tag}interventions per episode (mean of the last {{k}})"
                )
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.05, 1.08)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    if with_interventions:
        bx = axes[1][0]
        bx.set_ylabel("interventions per episode")
        bx.set_ylim(bottom=0)
        bx.grid(alpha=0.3)
        bx.legend(fontsize=7, loc="best")
    axes[-1][0].set_xlabel("environment steps (a purple line: the robot's first episode on weights v<n>)")
    fig.suptitle(title or f"session {Path(run_dirs[0]).parent.name}", fontsize=10)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        log.error("learning curve not written (%s): %s", out, e.strerror or e)
        return None, f"could not write {out.name}: {e.strerror or e}"
    finally:
        plt.close(fig)
    return out, None
