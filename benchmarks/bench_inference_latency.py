"""Inference latency per action chunk: DDPM-100 vs DDIM-10 vs the distilled one-step student, same network.

    python benchmarks/bench_inference_latency.py [--quick] [--threads 1] [--down-dims 256,512,1024]
                                                 [--checkpoint RUN] [--json out.json]

The network is a DiffusionPolicy with the default config sizes (UNet down_dims [256, 512, 1024], step embedding
128, obs_horizon 2, action_horizon 16) on robosuite Lift's low-dim observations (14 keys, 106 values per frame) and
7-D actions, freshly initialised (latency does not depend on the weights) unless --checkpoint gives a trained one.
The student is `robot_rl.commands.distill.make_student(teacher)`: the same weights and shape, config sample prediction +
DDIM with one step, i.e. what `robot-rl distill` produces. Each call is `policy.predict_chunk(window)` for one
observation window (batch 1): encode + normalise the observations, the denoising loop, unnormalise the chunk
(what `select_action` runs whenever its action queue is empty).

Timing: the methods are interleaved round by round (so drifting machine load hits them alike); per round the
one-step student runs 10 times, DDIM-10 twice and DDPM-100 once every other round (every round on CUDA). Medians
and p99 over all calls, on CPU (torch threads: --threads) and, when present, CUDA (synchronised).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from lift_shapes import LIFT_LOWDIM as LIFT_OBS  # noqa: E402 - beside this script


def build(down_dims: list[int] | None, checkpoint: str | None, device: torch.device):
    from robot_rl.commands.distill import make_student
    from robot_rl.interfaces import Feature
    from robot_rl.policies.diffusion import DiffusionPolicy
    from robot_rl.policies.checkpoint import load_policy

    if checkpoint:
        teacher = load_policy(checkpoint, device=device)
    else:
        cfg = {} if down_dims is None else {"down_dims": down_dims}
        obs = {k: Feature((d,)) for k, d in LIFT_OBS.items()}
        teacher = DiffusionPolicy.from_features(obs, Feature((7,)), cfg).to(device).eval()
    student = make_student(teacher).eval()
    return teacher, student


def bench(device: torch.device, down_dims, checkpoint, rounds: int) -> dict:
    teacher, student = build(down_dims, checkpoint, device)
    to = teacher.cfg.obs_horizon
    window = {k: torch.randn(1, to, *f.shape, device=device) for k, f in teacher.obs_features.items()}
    cuda = device.type == "cuda"
    ntt = teacher.cfg.num_train_timesteps
    methods = {
        f"DDPM-{ntt}": lambda: teacher.predict_chunk(window, scheduler="ddpm"),
        "DDIM-10": lambda: teacher.predict_chunk(window, scheduler="ddim", num_inference_steps=10),
        "one-step (distilled)": lambda: student.predict_chunk(window),
    }
    per_round = {f"DDPM-{ntt}": 1, "DDIM-10": 2, "one-step (distilled)": 10}
    ddpm_every = 1 if cuda else 2

    def timed(fn) -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        assert out.shape == (1, teacher.cfg.action_horizon, teacher.action_dim)
        return dt

    for fn in methods.values():  # warm-up (allocator, cuDNN autotuning, diffusers timestep tables)
        timed(fn)
        timed(fn)
    times = {m: [] for m in methods}
    names = list(methods)
    for r in range(rounds):
        order = names[r % 3 :] + names[: r % 3]  # rotate who goes first
        for m in order:
            if m.startswith("DDPM") and r % ddpm_every:
                continue
            for _ in range(per_round[m]):
                times[m].append(timed(methods[m]))
    out = {
        "device": str(device),
        "threads": torch.get_num_threads() if not cuda else None,
        "params_M": sum(p.numel() for p in teacher.parameters()) / 1e6,
        "down_dims": list(teacher.cfg.down_dims),
        "methods": {},
    }
    for m, ts in times.items():
        a = np.asarray(ts) * 1e3
        out["methods"][m] = {
            "p50_ms": float(np.median(a)),
            "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()),
            "n": len(a),
        }
    return out


def report(res: dict) -> None:
    m = res["methods"]
    one = m["one-step (distilled)"]["p50_ms"]
    ddim = m["DDIM-10"]["p50_ms"]
    ddpm_name = next(k for k in m if k.startswith("DDPM"))
    ddpm = m[ddpm_name]["p50_ms"]
    head = f"{res['device']}" + (f", {res['threads']} thread(s)" if res["threads"] else "")
    print(f"\n== {head}: UNet down_dims {res['down_dims']}, {res['params_M']:.1f} M parameters, batch 1 ==")
    print(f"{'method':<22}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}{'calls':>7}{'p50 vs 1-step':>15}")
    for name, s in m.items():
        print(
            f"{name:<22}{s['p50_ms']:>10.2f}{s['p99_ms']:>10.2f}{s['mean_ms']:>10.2f}{s['n']:>7}"
            f"{s['p50_ms'] / one:>14.1f}x"
        )
    print(
        f"ratios (p50): {ddpm_name} / DDIM-10 = {ddpm / ddim:.1f}x, DDIM-10 / one-step = {ddim / one:.2f}x "
        f"(network evaluations: 100 : 10 : 1); target one-step >= 10x faster than DDIM-10: "
        f"{'met' if ddim / one >= 10 else 'not met'}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few rounds (smoke test)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 30, quick 4)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--down-dims", default=None, help="UNet widths, e.g. 64,128,256 (default: the config's)")
    ap.add_argument("--checkpoint", default=None, help="a trained diffusion policy instead of a fresh one")
    ap.add_argument("--device", default="all", choices=["all", "cpu", "cuda"])
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rounds = args.rounds or (4 if args.quick else 30)
    dd = [int(x) for x in args.down_dims.split(",")] if args.down_dims else None
    devices = []
    if args.device in ("all", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    results = []
    for dev in devices:
        t = time.monotonic()
        res = bench(dev, dd, args.checkpoint, rounds)
        res["wall_s"] = time.monotonic() - t
        report(res)
        results.append(res)
    if not torch.cuda.is_available():
        print("\n(no CUDA device here: CPU only)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
