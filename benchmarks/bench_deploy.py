"""Deploying a diffusion policy at 20 Hz: chunks computed ahead on a thread vs select_action in the loop.

    python benchmarks/bench_deploy.py [--quick] [--checkpoint RUN_OR_CKPT] [--episodes N] [--steps K]

The policy: a diffusion policy trained on scripted-expert Lift demos (`--checkpoint`; default /tmp/lc1 when it
exists, otherwise 20 demos are recorded and a small one is trained for 800 steps first, a few minutes on CPU),
sampled with DDIM-10. Each mode runs the same N sim episodes (seeds 0..N-1, until success or 200 ticks) through
`robot-rl deploy`'s loop (robot_rl.commands.deploy.Deployer) at 20 Hz:

* async (AsyncChunkRunner: chunks predicted ahead of need, aligned on absolute ticks, blended): ensemble with
  inference on a thread of the loop's process and in a child process (deploy.executor); without --quick also
  crossfade and switch;
* sync: the naive way, `policy.select_action(obs)` inside the tick (a DDIM-10 chunk every n_action_steps ticks).

Reported side by side: success rate, loop overruns and missed ticks, p99 tick work time, p99 wake-up lateness,
achieved rate, chunk inference latency p50/p99, delay (ticks a chunk's first rows were already past), starved
ticks (safe action sent).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROBOT_RL = str(Path(sys.executable).parent / "robot-rl")


def ensure_checkpoint(path: str | None) -> str:
    if path:
        return path
    if (Path("/tmp/lc1") / "checkpoints" / "latest").exists():
        return "/tmp/lc1"
    tmp = Path(tempfile.mkdtemp(prefix="bench_deploy_"))
    print(f"no checkpoint given: recording 20 Lift demos and training a small policy in {tmp} ...", flush=True)
    subprocess.run(
        [
            ROBOT_RL,
            "record",
            f"record.path={tmp / 'demos'}",
            "record.episodes=20",
            f"hydra.run.dir={tmp / 'demos_run'}",
        ],
        check=True,
    )
    subprocess.run(
        [
            ROBOT_RL,
            "train",
            f"train.data={tmp / 'demos'}",
            "train.steps=800",
            "train.batch_size=64",
            "train.lr=3e-4",
            "train.warmup_steps=100",
            "train.progress=false",
            "train.num_threads=1",
            "policy.down_dims=[32,64,128]",
            f"hydra.run.dir={tmp / 'train'}",
        ],
        check=True,
    )
    return str(tmp / "train")


def run_mode(checkpoint: str, episodes: int, steps: int, rate: float, overrides: list[str], out: Path) -> dict:
    from hydra import compose, initialize_config_module

    from robot_rl.commands.deploy import Deployer

    with initialize_config_module("robot_rl.configs", version_base=None):
        cfg = compose(
            "deploy",
            overrides=[
                f"deploy.checkpoint={checkpoint}",
                f"deploy.episodes={episodes}",
                f"deploy.max_episode_steps={steps}",
                f"deploy.rate_hz={rate}",
                "deploy.num_inference_steps=10",
                *overrides,
            ],
        )
    return Deployer(cfg, out, robot_given=False).run()


def fmt(x, spec=".1f", scale=1.0):
    return "-" if x is None else format(x * scale, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5 episodes, ensemble vs sync only")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--episodes", type=int, default=None)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--json", default=None, help="write the summaries here")
    ap.add_argument(
        "--stress",
        type=int,
        default=0,
        help="run N busy-looping processes beside the deployment (a CPU shared with other work)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    os.environ.setdefault("MUJOCO_GL", "egl")
    episodes = args.episodes or (5 if args.quick else 20)
    checkpoint = ensure_checkpoint(args.checkpoint)
    modes = [
        ("ensemble, thread", ["deploy.blend=ensemble", "deploy.executor=thread"]),
        ("ensemble, process", ["deploy.blend=ensemble", "deploy.executor=process"]),
    ]
    if not args.quick:
        modes += [
            ("crossfade, process", ["deploy.blend=crossfade", "deploy.executor=process"]),
            ("switch, process", ["deploy.blend=switch", "deploy.executor=process"]),
        ]
    modes += [("sync select_action", ["deploy.inference=sync"])]
    tmp = Path(tempfile.mkdtemp(prefix="bench_deploy_runs_"))
    results = {}
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.stress)]
    try:
        for name, ov in modes:
            run_one(name, ov, checkpoint, episodes, args, tmp, results)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    report(results, episodes, args)


def run_one(name, ov, checkpoint, episodes, args, tmp, results) -> None:
    print(f"running {name}: {episodes} episodes ...", flush=True)
    load0 = os.getloadavg()[0]
    results[name] = run_mode(
        checkpoint, episodes, args.steps, args.rate, ov, tmp / name.replace(" ", "_").replace(",", "")
    )
    results[name]["host_load"] = (load0 + os.getloadavg()[0]) / 2  # 1-min load average, other jobs included
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))


def report(results: dict, episodes: int, args) -> None:
    s0 = next(iter(results.values()))
    import torch

    stress = f", {args.stress} busy processes beside it" if args.stress else ""
    print(
        f"\nDeploy at {args.rate:g} Hz ({1e3 / args.rate:.0f} ms ticks), {s0['policy_type']} DDIM-10, "
        f"{s0['robot']}, {episodes} episodes per mode, CPU ({os.cpu_count()} cores, torch threads "
        f"{s0['runner']['torch_threads']}, torch {torch.__version__}{stress}); checkpoint {s0['checkpoint']}\n"
    )
    head = (
        f"{'mode':<20} {'success':>7} {'ticks':>6} {'overruns':>8} {'missed':>6} {'work p99':>9} "
        f"{'late p99':>9} {'rate':>6} {'infer p50':>9} {'infer p99':>9} {'delay max':>9} {'starved':>7} "
        f"{'load':>5}"
    )
    print(head)
    print("-" * len(head))
    for name, s in results.items():
        print(
            f"{name:<20} {s['success_rate']:>7.0%} {s['steps']:>6d} {s['overruns']:>8d} {s['missed_slots']:>6d} "
            f"{fmt(s['work_p99_us'], '.1f', 1e-3):>7} ms {fmt(s['lateness_p99_us'], '.2f', 1e-3):>6} ms "
            f"{s['achieved_rate_hz']:>6.1f} {fmt(s['inference_p50_ms']):>6} ms {fmt(s['inference_p99_ms']):>6} ms "
            f"{'-' if s['delay_ticks_max'] is None else s['delay_ticks_max']:>9} "
            f"{s['starvations']:>7d} {s['host_load']:>5.1f}"
        )
    print(
        "\nwork = a tick's time from the end of one wait to the start of the next (observe, policy, teleop, "
        "safety, sim step); missed = ticks skipped after an overrun; delay = ticks of a chunk already past when "
        "it landed (skipped); starved = ticks with no valid action (safe action sent); load = the host's 1-min load "
        "average during the mode (the CPU is shared with other jobs: compare rows, not machines)."
    )
    for name, s in results.items():
        for w in s["warnings"]:
            print(f"  [{name}] {w}")


if __name__ == "__main__":
    main()
