"""`robot-rl dataset <command> STORE ...`: look at and edit an episode store.

list STORE                       one line per episode (length, success, operator, seed, timing health)
inspect STORE [EPISODE]          the store's keys/shapes, or one episode's metadata and per-key ranges
stats STORE [--keys K ...]       per-key min/max/mean/std over all steps: a table (one line per key; per entry
                                 with --keys), --json for every number as JSON
delete STORE INDICES             drop episodes, e.g. 3  or 0-4,9  (validated first: a bad index changes nothing)
keep STORE [INDICES] [filters]   keep only matching episodes: --success / --failed / --min-length N /
                                 --max-length N / --operator NAME (filters combine with AND)
recover STORE                    commit the steps a crashed recorder left behind as a partial episode
drop-partial STORE               forget them instead
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import numpy as np

from robot_rl.data.episode_store import EpisodeStore, StoreError


def parse_indices(text: str, n: int) -> list[int]:
    """'0-4,9' -> [0, 1, 2, 3, 4, 9]; every index must exist (negative counts from the end)."""
    out: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*|\s*(-?\d+)\s*", part)
        if m is None or (m.group(1) is not None and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"bad episode index/range {part!r}: use e.g. 3, -1, 0-4 or 0-4,9; nothing was changed")
        out.extend(range(int(m.group(1)), int(m.group(2)) + 1) if m.group(1) is not None else [int(m.group(3))])
    for i in out:
        if not -n <= i < n:
            raise IndexError(
                f"episode index {i} out of range: the store has {n} episodes (0..{n - 1}); nothing was changed"
            )
    return [i % n for i in out]


def select(store: EpisodeStore, args) -> list[int]:
    idx = parse_indices(args.indices, store.num_episodes) if args.indices else list(range(store.num_episodes))
    keep = []
    for i in idx:
        m = store.episodes[i]
        a, b = store.episode_bounds(i)
        if args.success and not m.get("success"):
            continue
        if args.failed and m.get("success"):
            continue
        if args.min_length is not None and b - a < args.min_length:
            continue
        if args.max_length is not None and b - a > args.max_length:
            continue
        if args.operator is not None and m.get("operator") != args.operator:
            continue
        keep.append(i)
    return keep


def _list(store: EpisodeStore) -> None:
    s = store.summary()
    print(
        f"{s['path']}: {s['episodes']} episodes, {s['steps']} steps at {s['fps']:g} fps, "
        f"{s['disk_bytes'] / 2**20:.1f} MiB, success rate {s['success_rate']}"
    )
    print(
        f"{'#':>4} {'steps':>6} {'success':>7} {'missed':>6} {'dropped':>7} {'interv':>6} {'seed':>6}  operator  task"
    )
    for i, m in enumerate(store.episodes):
        a, b = store.episode_bounds(i)
        flag = " (partial)" if m.get("partial") else ""
        print(
            f"{i:>4} {b - a:>6} {str(m.get('success')):>7} {m.get('missed_ticks', '-'):>6} "
            f"{m.get('dropped_frames', '-'):>7} {m.get('interventions', '-'):>6} {m.get('seed', '-'):>6}  "
            f"{m.get('operator', '-')}  {m.get('task', '')}{flag}"
        )
    if s["pending"]:
        p = s["pending"]
        print(
            f"pending: {p['flushed'] - p['start']} steps of an unfinished episode (robot-rl dataset recover|drop-partial)"
        )


def _inspect(store: EpisodeStore, episode: int | None) -> None:
    if episode is None:
        print(json.dumps({k: v for k, v in store.summary().items()}, indent=1))
        return
    ep = store.episode(episode)
    meta = {k: v for k, v in store.episodes[store._check_index(episode)].items() if k != "initial_sim_state"}
    print(json.dumps(meta, indent=1))
    for k, v in ep.items():
        rng = "" if v.dtype == bool else f" min {np.min(v):.4g} max {np.max(v):.4g}"
        print(f"  {k:<32} {str(v.dtype):<8} {str(v.shape):<18}{rng}")


def _num(x: float) -> str:
    return f"{x:.4g}"


def stats_table(stats: dict, store, per_entry: bool = False) -> str:
    """The stats as a table: one line per key (its entries' smallest min, largest max, and the range of their
    means and stds), or one line per entry of each key (`per_entry`, named by the feature's names when it has
    them)."""
    rows = [("key", "shape", "min", "max", "mean", "std")]
    for key, st in stats.items():
        arrays = {k: np.atleast_1d(np.asarray(v, dtype=np.float64)) for k, v in st.items()}
        feature = store.features.get(key)
        shape = "x".join(map(str, feature.shape)) if feature is not None and feature.shape else "1"
        if per_entry:
            names = list(feature.names) if feature is not None and feature.names else None
            for i in range(arrays["mean"].size):
                label = f"{key}[{names[i] if names and i < len(names) else i}]"
                rows.append((label, "", *(_num(arrays[k].flat[i]) for k in ("min", "max", "mean", "std"))))
            continue
        spread = {
            k: _num(arrays[k].min())
            if arrays[k].size == 1 or arrays[k].min() == arrays[k].max()
            else f"{_num(arrays[k].min())}..{_num(arrays[k].max())}"
            for k in ("mean", "std")
        }
        rows.append((key, shape, _num(arrays["min"].min()), _num(arrays["max"].max()), spread["mean"], spread["std"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    steps = sum(m.get("length", 0) for m in store.episodes)
    lines.append(
        f"{len(stats)} keys over {steps} steps of {store.num_episodes} episodes; --keys K for each entry, --json for all numbers"
    )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="robot-rl dataset", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("list", "inspect", "stats", "delete", "keep", "recover", "drop-partial"):
        sp = sub.add_parser(name)
        sp.add_argument("store")
        if name == "inspect":
            sp.add_argument("episode", nargs="?", type=int)
        if name == "stats":
            sp.add_argument("--keys", nargs="*", help="only these keys, one line per entry")
            sp.add_argument("--json", action="store_true", help="every number as JSON instead of a table")
        if name == "delete":
            sp.add_argument("indices")
        if name == "keep":
            sp.add_argument("indices", nargs="?")
            sp.add_argument("--success", action="store_true")
            sp.add_argument("--failed", action="store_true")
            sp.add_argument("--min-length", type=int)
            sp.add_argument("--max-length", type=int)
            sp.add_argument("--operator")
    args = p.parse_args(argv)
    try:
        write = args.cmd in ("delete", "keep", "recover", "drop-partial")
        store = EpisodeStore.open(args.store, "a" if write else "r")
        if args.cmd == "list":
            _list(store)
        elif args.cmd == "inspect":
            _inspect(store, args.episode)
        elif args.cmd == "stats":
            stats = store.stats(args.keys)
            print(json.dumps(stats, indent=1) if args.json else stats_table(stats, store, per_entry=bool(args.keys)))
        elif args.cmd == "delete":
            drop = parse_indices(args.indices, store.num_episodes)
            store.delete_episodes(drop)
            print(f"deleted {len(set(drop))} episodes; {store.num_episodes} remain")
        elif args.cmd == "keep":
            keep = select(store, args)
            before = store.num_episodes
            store.keep_episodes(keep)
            print(f"kept {len(keep)} of {before} episodes")
        elif args.cmd == "recover":
            i = store.recover_pending()
            print("nothing to recover" if i is None else f"recovered the partial episode as episode {i}")
        elif args.cmd == "drop-partial":
            store.drop_pending()
            print("dropped")
    except (StoreError, IndexError, ValueError, KeyError) as e:
        print(f"robot-rl dataset {args.cmd}: {e}", file=sys.stderr)
        return 2
    return 0
