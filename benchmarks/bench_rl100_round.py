"""Wall clock of one RL-100 round's learning stages on each device, side by side in one run (issue 15).

    python benchmarks/bench_rl100_round.py                              # full size, cpu and (if present) cuda
    python benchmarks/bench_rl100_round.py --size quick --devices cpu
    python benchmarks/bench_rl100_round.py --policy <diffusion checkpoint> --data <store> [<store> ...]

A round of `robot-rl rl100` is: collect K episodes on the robot (robot time, the same on any learner), then the
learner's work, which this script times: `fit` (IQL critics over chunk transitions + the latent-dynamics ensemble)
and `ppo` (PPO through the denoising chain, then the AM-Q gate against the accepted policy). Every device runs
the same command (`robot_rl.commands.rl100.main`, rounds=1, no collection, no simulated evaluation, no
distillation) on the same policy and data, with the sizes of `bench_rl100.py` (full: IQL 10k steps [256, 256],
dynamics 3k steps, PPO 200 iterations × 256 chains, AM-Q on 512 start states).

Inputs: `--policy` / `--data`, or by default `bench_rl100.py`'s own: the weak Lift base of `residual_base.py` and
the mixed-quality expert stores, made and cached under --out. Prints one row per device (fit, ppo, round seconds,
and the speed-up over the first device) and writes --out/round_<size>.json. Timings on a shared machine are
noisy: read the ratio of devices measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rl100 import SIZES, learning_overrides, mixed_data  # noqa: E402
from residual_base import compose, make_weak_base  # noqa: E402


def time_round(run_dir: Path, policy: str, data: list[str], size: dict, device: str, threads: int | None) -> dict:
    """One rl100 round (fit + ppo + gate) on `device` in a fresh run dir; the stages' wall clock from its state."""
    from robot_rl.commands.rl100 import STATE, main

    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [
        f"rl100.policy={policy}",
        f"rl100.data=[{','.join(data)}]",
        "rl100.rounds=1",
        "rl100.collect.episodes=0",
        f"rl100.device={device}",
        f"rl100.num_threads={threads if threads else 'null'}",
        *learning_overrides(size),
        "rl100.report.eval_episodes=0",
        "rl100.distill.enabled=false",
    ]
    t0 = time.monotonic()
    code = main(compose("rl100", overrides), run_dir)
    if code != 0:
        raise RuntimeError(f"rl100 on {device} in {run_dir} exited with {code}")
    done = json.loads((run_dir / STATE).read_text())["finished"]
    fit, ppo = done["r1/fit"], done["r1/ppo"]
    return {
        "device": device,
        "fit_s": fit["wall_s"],
        "critics_s": fit.get("critics_s"),
        "ppo_s": ppo["wall_s"],
        "round_s": fit["wall_s"] + ppo["wall_s"],
        "transitions": fit.get("transitions"),
        "total_s": time.monotonic() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--devices", default=None, help="comma-separated (default: cpu, and cuda when present)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    ap.add_argument("--policy", default=None, help="a diffusion-policy checkpoint (default: the weak Lift base)")
    ap.add_argument("--data", nargs="+", default=None, help="episode stores (default: the base's demos + mixed)")
    ap.add_argument("--mixed", type=int, default=None, help="episodes per expert preset (default: the size's)")
    ap.add_argument("--out", default="/tmp/robot_rl_bench/rl100_round")
    args = ap.parse_args(argv)

    import torch

    size = SIZES[args.size]
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = Path(args.out)
    policy, data = args.policy, args.data
    per_quality = args.mixed or 0  # explicit inputs: only the stores named, unless --mixed asks for more
    if policy is None:
        base = make_weak_base("lift", out / "lift_base", eval_episodes=50)
        policy, data = base["checkpoint"], data or [base["store"]]
        per_quality = size["mixed"] if args.mixed is None else args.mixed
    if per_quality:
        data = [*(data or []), *mixed_data("lift", out / "mixed", per_quality, 1000)]
    if not data:
        ap.error("--policy without --data: name the episode stores, or --mixed N to record expert ones")
    rows = [time_round(out / f"run_{d.replace(':', '_')}", policy, data, size, d, args.threads) for d in devices]
    first = rows[0]
    print(f"RL-100 round, {args.size} size, {rows[0]['transitions']} chunk transitions (collection not timed):")
    for r in rows:
        print(
            f"  {r['device']:>6}: fit {r['fit_s']:7.1f} s (IQL {r['critics_s']:.1f} s)  ppo+gate {r['ppo_s']:7.1f} s"
            f"  round {r['round_s']:7.1f} s  = {first['round_s'] / r['round_s']:.2f}x {first['device']}'s speed"
        )
    result = {
        "size": args.size,
        "settings": size,
        "policy": policy,
        "data": data,
        "threads": args.threads,
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"round_{args.size}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
