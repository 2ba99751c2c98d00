"""What a session's run dir says happened, for the session's summary.json and its final line: the episodes in the
learner's replay, a fleet's robots side by side, and the one line printed at the end."""

from __future__ import annotations

import logging
from pathlib import Path

from robot_rl.control.telemetry import read_json

log = logging.getLogger(__name__)


def replay_episodes(learner_dir: Path) -> dict[str, set[int]] | None:
    """{sender: episode numbers} over the learner's committed replay (read straight from zarr, int columns only),
    or None without one."""
    path = learner_dir / "replay.zarr"
    commit = read_json(path / "commit.json")
    if not commit or not int(commit.get("rows", 0)):
        return {} if commit else None
    try:
        import numpy as np
        import zarr

        group = zarr.open_group(zarr.storage.LocalStore(str(path)), mode="r")
        n = int(commit["rows"])
        episode, sender = np.asarray(group["episode"][:n]), np.asarray(group["_sender"][:n])
    except Exception as e:  # noqa: BLE001 - a report, not a failure of the session
        log.warning("could not read the learner's replay episodes: %s", e)
        return None
    return {name: {int(e) for e in np.unique(episode[sender == i])} for i, name in enumerate(commit["senders"])}


def robots_summary(names: list[str], controls: dict[str, dict | None], learner: dict | None) -> dict[str, dict]:
    """A fleet's robots side by side: each control's episodes, success rate and seed beside what the learner saw
    of it (stored, rate while it sent, ack p99, health at the end; robot_rl/learner/process.py `robots()`)."""
    seen = (learner or {}).get("robots") or {}
    out = {}
    for name in names:
        c, r = controls.get(name) or {}, seen.get(name) or {}
        out[name] = {
            "episodes": c.get("episodes"),
            "success_rate": c.get("success_rate"),
            "seed": c.get("seed"),
            "sent": (c.get("transitions") or {}).get("stream_sent"),
            "stored": r.get("stored"),
            "rate_hz": r.get("rate_hz"),
            "ack_p99_ms": r.get("ack_p99_ms"),
            "streams": r.get("streams"),
            "health": r.get("health", "not seen by the learner" if learner else "no learner"),
        }
    return out


def final_line(summary: dict, top: dict) -> str:
    t = top["transitions"]
    head = "session done" if top["status"] == "ok" else "session FAILED"
    if summary.get("interrupted"):
        head += f" (stopped by {summary['interrupted']})"
    parts = [f"{head} in {summary['wall_s']:.0f} s: {summary['episodes'] or 0} episodes"]
    if summary.get("success_rate") is not None:
        rate = summary["policy_success_rate"]
        rate = "no policy-driven episodes" if rate is None else f"policy-driven: {rate:.2f}"
        parts[0] += f", success rate {summary['success_rate']:.2f} ({rate})"
    if summary.get("robots"):
        parts.append(
            "robots "
            + ", ".join(
                f"{n} {r['success_rate'] if r['success_rate'] is not None else float('nan'):.2f} {r['health']}"
                + (f" {r['rate_hz']:.1f} Hz" if r["rate_hz"] else "")
                for n, r in summary["robots"].items()
            )
        )
    parts.append(
        f"weights v{summary['final_policy_version']}"
        + ("" if top["weights_loaded"] else " (the robot never loaded learner weights)")
        + f", {summary['learner_updates']} learner updates"
    )
    parts.append(
        f"transitions {t['sent']} sent / {t['stored']} stored / {t['unacknowledged']} unacknowledged"
        + (f" / {t['quarantined']} quarantined" if t["quarantined"] else "")
        + (f" / {t['lost']} LOST" if t["lost"] else "")
        + (f" / {t['duplicates']} DUPLICATED" if t["duplicates"] else "")
    )
    drains = set(top["drain"].values())
    parts.append(f"drain {', '.join(sorted(map(str, drains))) or 'n/a'}")
    restarts = ", ".join(f"{k} {v}" for k, v in top["restarts"].items()) or "none"
    parts.append(f"restarts {restarts}")
    parts.append(f"storage errors {top['storage_errors']}")
    o = top["watchdog_outages"]
    parts.append(
        f"watchdog outages {o['count']}"
        + (f" ({o['total_s']:.1f} s, longest {o['longest_s']:.1f} s)" if o["count"] else "")
    )
    line = "; ".join(parts)
    for w in top["warnings"]:
        line += f"\n  WARNING: {w}"
    for p in top["problems"]:
        line += f"\n  ERROR: {p}"
    return line + f"\nsummary: {summary['run_dir']}/summary.json (exit code {top['exit_code']})"
