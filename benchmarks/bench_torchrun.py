"""`robot-rl train` under torchrun on CPU: 1 process vs 2 processes (DDP, gloo) at the same global batch.

    python benchmarks/bench_torchrun.py [--quick] [--steps 400] [--batch 64] [--repeats 2] [--device cpu|cuda]

The real CLI, started the documented way (`torchrun --standalone --nproc_per_node=N --no-python robot-rl train
... hydra.run.dir=<run>`), on a generated episode store (a Lift-sized low-dim task: 19-d state, 7-d action, the
action a fixed nonlinear function of the state, so the loss has something to fall to). Configurations, interleaved
`--repeats` times so the shared machine's load hits them alike:

    1 proc x 1 thread      the baseline
    1 proc x 2 threads     one process using both cores
    2 procs x 1 thread     DDP: each rank trains on half of every global batch

Printed side by side: training samples/s (from train_summary.json: the loop's wall time, process start excluded),
the whole command's wall time, the mean of the last 50 step losses, and the largest gap between the 2-process and
the 1-process loss curves (moving average of 25 steps). The loss curves are overlaid in
docs/figures/bench_torchrun.png. Both runs see the same global batches (the ranks draw the same data stream and
split it); only each rank's own torch stream (diffusion noise and timesteps) differs, so the curves agree within
noise, not bit for bit.

`--device cuda` (a GPU machine, benchmarks/gpu_check.sh): `1 GPU` vs `N GPUs` (every visible GPU, NCCL), one
process per GPU, the same global batch; the figure goes to --figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's scripts; else the PATH's (a python whose scripts live elsewhere)


def script(name: str) -> str:
    return str(BIN / name) if (BIN / name).exists() else shutil.which(name) or str(BIN / name)


S, A = 19, 7  # Lift-sized low-dim state and action
CONFIGS = (("1 proc x 1 thread", 1, 1), ("1 proc x 2 threads", 1, 2), ("2 procs x 1 thread", 2, 1))
SMOOTH, TAIL = 25, 50


def make_store(path: Path, episodes: int = 40, steps: int = 100) -> Path:
    """Episodes of a deterministic nonlinear task: a = tanh(G s), s drifts with a."""
    from robot_rl.data.episode_store import EpisodeStore
    from robot_rl.interfaces import Feature

    if (path / "meta.json").exists():
        return path
    rng = np.random.default_rng(0)
    gain = rng.normal(size=(A, S)).astype(np.float32) / np.sqrt(S)
    mix = rng.normal(size=(S, A)).astype(np.float32) / np.sqrt(A)
    feats = {"obs.state": Feature((S,)), "action": Feature((A,), low=-np.ones(A), high=np.ones(A))}
    store = EpisodeStore.create(path, feats, fps=20)
    w = store.writer()
    for e in range(episodes):
        w.begin({"seed": e})
        s = rng.normal(size=S).astype(np.float32)
        for _ in range(steps):
            a = np.tanh(gain @ s).astype(np.float32)
            w.add({"obs.state": s, "action": a})
            s = (0.95 * s + 0.3 * np.tanh(mix @ a)).astype(np.float32)
        w.save()
    store.close()
    return path


def configs(device: str, skip_threads: bool = False) -> tuple:
    if device == "cpu":
        return tuple(c for c in CONFIGS if not (skip_threads and c[1] == 1 and c[2] > 1))
    import torch

    n = torch.cuda.device_count()
    return (("1 GPU", 1, 1),) + ((f"{n} GPUs", n, 1),) if n > 1 else (("1 GPU", 1, 1),)


def run_one(store: Path, run_dir: Path, nproc: int, threads: int, args) -> dict:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [
        script("torchrun"),
        "--standalone",
        f"--nproc_per_node={nproc}",
        "--no-python",
        script("robot-rl"),
        "train",
        f"train.data={store}",
        f"hydra.run.dir={run_dir}",
        "policy=diffusion",
        f"policy.down_dims=[{','.join(map(str, args.down_dims))}]",
        "policy.diffusion_step_embed_dim=64",
        f"train.steps={args.steps}",
        f"train.batch_size={args.batch}",
        f"train.checkpoint_every={args.steps}",
        "train.warmup_steps=20",
        "train.lr=3e-4",
        f"train.num_threads={threads}",
        "train.progress=false",
        "train.tensorboard=false",
        "train.seed=0",
        f"train.device={args.device}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=1800)
    wall = time.monotonic() - t0
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)}\nexited {res.returncode}:\n{res.stderr[-4000:]}")
    summary = json.loads((run_dir / "train_summary.json").read_text())
    state = json.loads((run_dir / "checkpoints" / f"step_{args.steps}" / "trainer_state.json").read_text())
    extra = sorted(p.name for p in run_dir.parent.iterdir() if p.name.startswith(run_dir.name + "_"))
    return {
        "samples_per_s": summary["samples_per_s"],
        "train_wall_s": summary["wall_s"],
        "command_wall_s": wall,
        "losses": state["losses"],
        "processes": summary.get("processes", 1),
        "stray_dirs": extra,
    }


def smooth(x, k: int = SMOOTH) -> np.ndarray:
    x = np.asarray(x, float)
    return np.convolve(x, np.ones(k) / k, mode="valid")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="150 steps, a smaller UNet, one repeat")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--down-dims", type=int, nargs="+", default=None)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--skip-threads", action="store_true", help="leave out 1 proc x 2 threads (OpenMP crawls on a loaded machine)"
    )
    ap.add_argument("--work", type=Path, default=REPO / "outputs" / "bench_torchrun")
    ap.add_argument("--figure", type=Path, default=REPO / "docs" / "figures" / "bench_torchrun.png")
    args = ap.parse_args()
    args.steps = args.steps or (150 if args.quick else 400)
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.down_dims = args.down_dims or ([32, 64] if args.quick else [64, 128, 256])

    runs = configs(args.device, args.skip_threads)
    args.work.mkdir(parents=True, exist_ok=True)
    store = make_store(args.work / "store")
    print(
        f"robot-rl train under torchrun on {args.device} ({os.cpu_count()} cores, shared): diffusion UNet {args.down_dims}, "
        f"global batch {args.batch}, {args.steps} steps, {args.repeats} interleaved repeat(s)",
        flush=True,
    )
    results: dict[str, list[dict]] = {name: [] for name, _, _ in runs}
    for r in range(args.repeats):
        for name, nproc, threads in runs:
            out = run_one(store, args.work / f"run_{nproc}p{threads}t_{r}", nproc, threads, args)
            results[name].append(out)
            print(
                f"  [{r}] {name:20s} {out['samples_per_s']:8.0f} samples/s  train {out['train_wall_s']:6.1f} s  "
                f"command {out['command_wall_s']:6.1f} s",
                flush=True,
            )

    base = statistics.median(o["samples_per_s"] for o in results[runs[0][0]])
    ref = smooth(results[runs[0][0]][0]["losses"])
    print(
        f"\n{'configuration':22s} {'samples/s':>10s} {'vs 1x1':>7s} {'command s':>10s} {'final loss':>11s} {'max gap':>8s}"
    )
    rows = {}
    for name, _, _ in runs:
        done = results[name]
        sps = statistics.median(o["samples_per_s"] for o in done)
        final = statistics.median(float(np.mean(o["losses"][-TAIL:])) for o in done)
        gap = max(float(np.max(np.abs(smooth(o["losses"]) - ref))) for o in done)
        cmd = statistics.median(o["command_wall_s"] for o in done)
        rows[name] = {"samples_per_s": sps, "ratio": sps / base, "command_s": cmd, "final_loss": final, "gap": gap}
        print(f"{name:22s} {sps:10.0f} {sps / base:7.2f} {cmd:10.1f} {final:11.4f} {gap:8.4f}")
    stray = [d for done in results.values() for o in done for d in o["stray_dirs"]]
    print(f"run directories other than the one given: {stray or 'none'} (only rank 0 writes)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    for (name, _, _), color in zip(runs, ("tab:blue", "tab:green", "tab:red")):
        for i, o in enumerate(results[name]):
            y = smooth(o["losses"])
            ax.plot(
                np.arange(len(y)) + SMOOTH, y, color=color, alpha=0.9 if i == 0 else 0.4, label=name if i == 0 else None
            )
    ax.set_yscale("log")
    ax.set_xlabel("step (global batch %d)" % args.batch)
    ax.set_ylabel(f"training loss (moving average of {SMOOTH})")
    ax.set_title("loss curves: 1 process vs 2 DDP processes")
    ax.legend()
    names = [n for n, _, _ in runs]
    bx.bar(range(len(names)), [rows[n]["samples_per_s"] for n in names], color=["tab:blue", "tab:green", "tab:red"])
    bx.set_xticks(range(len(names)), [n.replace(" x ", "\nx ") for n in names])
    bx.set_ylabel("training samples/s (median)")
    bx.set_title(f"CPU, {os.cpu_count()} shared cores" if args.device == "cpu" else args.device)
    fig.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=110)
    print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
