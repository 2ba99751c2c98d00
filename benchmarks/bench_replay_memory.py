"""Replay memory: RAM (and disk) per transition of the learner's ReplayBuffer vs lerobot's HIL-SERL ReplayBuffer.

    python benchmarks/bench_replay_memory.py [--rows 5000] [--target 100000]

Ours: the real `robot_rl.learner.replay_buffer.ReplayBuffer.append`, fed `--rows` transitions in batches of 16-64 rows,
with the columns a residual-RL control process sends (robot_rl/control/process.py `_tick`): the Lift low-dim
observation keys (float32, as `RobosuiteRobot` publishes them), two 84x84 RGB cameras (uint8, HxWx3),
action / policy_action / expert_action / base_action / residual (7 float32 each), reward, success,
intervention, forced_safe, episode, step, policy_version, t, plus the store's own _seq / _sender. Observations
are stored once per step (the next observation is the next row). Measured: `memory_bytes()` (the numpy columns'
used and allocated bytes), the zarr directory's size on disk (random images: incompressible, the worst case),
and the process RSS growth. Extrapolated to `--target` transitions under three allocation policies: the old
growth (doubling: next power of two), the new growth (2x up to 64k rows, 1.25x beyond) and a capacity hint.

lerobot (installed version): `lerobot.rl.buffer.ReplayBuffer`, the real class on CPU at a small capacity, filled
through its own `add` with the same state shapes in its layout (observation.images.* 3xHxW, observation.state),
action 7, reward/done/truncated and complementary_info {"discrete_penalty"} as lerobot's actor sends it. Its
storage is float32 for every state key (`torch.empty` default dtype), preallocated for the full capacity at the
first `add`. Reported: the class defaults (optimize_memory=False: next_state stored too) and optimize_memory=True
(what lerobot/rl/learner.py passes), at 84x84 and at lerobot's usual 128x128 crops.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from lift_shapes import CAMERAS, LIFT_LOWDIM  # noqa: E402 - beside this script

ACTION_DIM = 7
GB = 1e9


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def make_rows(rng: np.random.Generator, n: int, ep: int, step0: int, size: int) -> dict[str, np.ndarray]:
    rows = {f"obs.{k}": rng.standard_normal((n, d), dtype=np.float32) for k, d in LIFT_LOWDIM.items()}
    for c in CAMERAS:
        rows[f"obs.{c}_image"] = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    for k in ("action", "policy_action", "expert_action", "base_action", "residual"):
        rows[k] = rng.uniform(-1, 1, (n, ACTION_DIM)).astype(np.float32)
    rows.update(
        {
            "intervention": rng.random(n) < 0.05,
            "forced_safe": np.zeros(n, bool),
            "episode": np.full(n, ep, np.int64),
            "step": np.arange(step0, step0 + n, dtype=np.int64),
            "policy_version": np.full(n, 3, np.int64),
            "t": time.time() + np.arange(n) * 0.05,
            "reward": np.zeros(n, np.float32),
            "success": np.zeros(n, bool),
        }
    )
    return rows


def old_doubling_rows(n: int) -> int:  # the growth rule before the capacity hint
    return max(1024, 1 << (max(n, 1) - 1).bit_length())


def bench_ours(rows: int, target: int, size: int, tmp: Path) -> dict:
    from robot_rl.learner.replay_buffer import MIN_ROWS, ReplayBuffer, next_capacity

    rng = np.random.default_rng(0)
    rss0 = rss_bytes()
    store = ReplayBuffer(tmp / "replay.zarr")
    t0 = time.perf_counter()
    seq, ep, step = 0, 0, 0
    while seq < rows:
        n = min(int(rng.integers(16, 65)), rows - seq)
        batch = make_rows(rng, n, ep, step, size)
        store.append("robot0", np.arange(seq, seq + n), batch)
        seq, step = seq + n, step + n
        if step >= 200:  # 200-step episodes
            ep, step = ep + 1, 0
    append_s = time.perf_counter() - t0
    used, allocated = store.memory_bytes()
    row_bytes = used / store.size
    per_key = {k: store.column(k)[:1].nbytes for k in [*store.keys(), "_seq", "_sender"]}
    rss = rss_bytes() - rss0
    disk = dir_bytes(tmp / "replay.zarr")

    # the capacity hint, for real: exactly `rows` rows allocated, nothing more
    hinted = ReplayBuffer(tmp / "replay.zarr", preallocate_rows=rows)
    h_used, h_alloc = hinted.memory_bytes()
    assert h_used == used and h_alloc == used, (h_used, h_alloc, used)
    del hinted

    return {
        "rows": store.size,
        "row_bytes": row_bytes,
        "used": used,
        "allocated": allocated,
        "allocated_rows": allocated / row_bytes,
        "rss": rss,
        "disk": disk,
        "disk_row": disk / store.size,
        "append_s": append_s,
        "per_key": per_key,
        "target": {
            "old doubling": old_doubling_rows(target) * row_bytes,
            "new growth (no hint)": next_capacity(MIN_ROWS, target) * row_bytes,
            f"capacity={target}": target * row_bytes,
            "rows_old": old_doubling_rows(target),
            "rows_new": next_capacity(MIN_ROWS, target),
        },
    }


def bench_lerobot(size: int, state_dim: int, optimize_memory: bool, capacity: int = 256) -> dict:
    import torch
    from lerobot.rl.buffer import ReplayBuffer

    buf = ReplayBuffer(
        capacity=capacity,
        device="cpu",
        storage_device="cpu",
        optimize_memory=optimize_memory,
        state_keys=["observation.images.front", "observation.images.wrist", "observation.state"],
    )
    g = torch.Generator().manual_seed(0)

    def obs():
        return {
            "observation.images.front": torch.rand(1, 3, size, size, generator=g),
            "observation.images.wrist": torch.rand(1, 3, size, size, generator=g),
            "observation.state": torch.randn(1, state_dim, generator=g),
        }

    state = obs()
    for i in range(capacity):
        nxt = obs()
        buf.add(
            state=state,
            action=torch.rand(1, ACTION_DIM, generator=g) * 2 - 1,
            reward=0.0,
            next_state=nxt,
            done=False,
            truncated=(i % 200 == 199),
            complementary_info={"discrete_penalty": torch.tensor([0.0])},
        )
        state = nxt
    tensors = {
        **{f"states.{k}": v for k, v in buf.states.items()},
        "actions": buf.actions,
        "rewards": buf.rewards,
        "dones": buf.dones,
        "truncateds": buf.truncateds,
        "episode_ends": buf.episode_ends,
        **{f"complementary_info.{k}": v for k, v in buf.complementary_info.items()},
    }
    if buf.next_states is not buf.states:
        tensors.update({f"next_states.{k}": v for k, v in buf.next_states.items()})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert len(buf) == capacity
    return {
        "row_bytes": total / capacity,
        "dtypes": sorted({str(t.dtype) for t in tensors.values()}),
        "image_dtype": str(buf.states["observation.images.front"].dtype),
        "next_states": buf.next_states is not buf.states,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=5000, help="transitions appended to our store")
    ap.add_argument("--target", type=int, default=100_000, help="buffer size to extrapolate to")
    ap.add_argument("--size", type=int, default=84, help="camera height = width")
    ap.add_argument("--lerobot-capacity", type=int, default=256)
    ap.add_argument("--keep", action="store_true", help="keep the temporary zarr store")
    args = ap.parse_args()
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cpus")
    state_dim = sum(LIFT_LOWDIM.values())
    tmp = Path(tempfile.mkdtemp(prefix="bench_replay_mem_"))
    try:
        ours = bench_ours(args.rows, args.target, args.size, tmp)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    pk = ours["per_key"]
    img = sum(v for k, v in pk.items() if k.endswith("_image"))
    low = sum(v for k, v in pk.items() if k.startswith("obs.") and not k.endswith("_image"))
    print(
        f"\nOURS: ReplayBuffer, {ours['rows']} transitions appended in batches of 16-64 "
        f"({ours['append_s']:.1f} s, {ours['rows'] / ours['append_s']:.0f} rows/s incl. zarr + fsync'd commit)"
    )
    print(
        f"  per transition: {ours['row_bytes']:.0f} B in RAM = images {img} B "
        f"(2 x {args.size}x{args.size}x3 uint8) + "
        f"low-dim obs {low} B ({state_dim} float32) + the rest {ours['row_bytes'] - img - low:.0f} B "
        f"({len(pk)} columns)"
    )
    print(
        f"  memory_bytes(): used {ours['used'] / 1e6:.1f} MB, allocated {ours['allocated'] / 1e6:.1f} MB "
        f"({ours['allocated_rows']:.0f} rows of capacity); process RSS grew {ours['rss'] / 1e6:.1f} MB\n"
        f"  (rows allocated but not yet written are np.empty pages: address space, not RSS, until filled)"
    )
    print(
        f"  on disk (zarr, random images = incompressible worst case): {ours['disk'] / 1e6:.1f} MB, "
        f"{ours['disk_row']:.0f} B/transition"
    )
    print(f"  capacity hint check: ReplayBuffer(preallocate_rows={ours['rows']}) reopened -> allocated == used")

    rows = []
    t = ours["target"]
    rows.append((f"ours, {args.target} rows held (used)", ours["row_bytes"], args.target * ours["row_bytes"], ""))
    rows.append(("ours, allocated: old doubling", None, t["old doubling"], f"{t['rows_old']} rows"))
    rows.append(("ours, allocated: new growth", None, t["new growth (no hint)"], f"{t['rows_new']} rows"))
    rows.append((f"ours, allocated: capacity={args.target}", None, t[f"capacity={args.target}"], f"{args.target} rows"))
    rows.append(("ours, on disk (zarr)", ours["disk_row"], args.target * ours["disk_row"], "worst case"))
    for size in (args.size, 128):
        for opt in (False, True):
            le = bench_lerobot(size, state_dim, opt, args.lerobot_capacity)
            label = f"lerobot {size}x{size}, " + (
                "class default (next_state stored)" if not opt else "optimize_memory=True (its learner)"
            )
            rows.append((label, le["row_bytes"], args.target * le["row_bytes"], f"images {le['image_dtype']}"))
    print(f"\nTABLE: replay RAM, {args.target} transitions, 2 cameras + {state_dim}-float state, action {ACTION_DIM}")
    print(f"  {'buffer':<58}{'B/transition':>14}{'GB @ ' + str(args.target):>14}  note")
    for label, per, total, note in rows:
        per_s = f"{per:,.0f}" if per is not None else ""
        print(f"  {label:<58}{per_s:>14}{total / GB:>14.2f}  {note}")
    ours_gb = t[f"capacity={args.target}"] / GB
    worst = t["new growth (no hint)"] / GB
    print(
        f"\ntarget <= 5 GB for {args.target} transitions with two {args.size}x{args.size} cameras: "
        f"{'MET' if max(ours_gb, worst) <= 5 else 'NOT MET'} (capacity hint {ours_gb:.2f} GB, "
        f"no hint {worst:.2f} GB; old doubling would allocate {t['old doubling'] / GB:.2f} GB)"
    )
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
