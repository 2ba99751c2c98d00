"""End to end: scripted demos -> diffusion policy (BC) -> one-step distillation, success in simulation.

    python benchmarks/bench_bc_learning.py [--quick] [--task lift|pick_place_can] [--train-steps N]
                                           [--distill-steps N] [--demos N] [--episodes N] [--workdir DIR] [--reuse]

Stages, each timed (wall clock):
1. record `--demos` episodes of the scripted expert (low-dim observations, `robot-rl record`'s Recorder, paced at
   the robot's 20 Hz like a real recording; seeds 0..demos-1);
2. train the diffusion policy (`robot-rl train`'s Trainer): UNet down_dims [64, 128, 256], batch 64, lr 3e-4
   (cosine, 100 warm-up steps), EMA, `--train-steps` steps on CPU with one thread;
3. evaluate the teacher with DDIM-10 on `--episodes` seeded episodes (seeds 10000..);
4. distil it into a one-step student (`robot-rl distill`'s Distiller: same-noise MSE to the DDIM-10 chunk,
   warm start, frozen encoder), `--distill-steps` steps;
5. evaluate the student on the same seeds.
Printed: teacher vs student success with Wilson 95 % intervals, mean episode length, per-chunk latency, and the
wall clock of every stage; `<workdir>/results.json` keeps it all. `--reuse` skips stages whose outputs are already
in `--workdir` (a store with enough episodes, a finished training / distillation run).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

TASKS = {"lift": "lift", "pick_place_can": "pick_place_can"}
TRAIN = [
    "policy.down_dims=[64,128,256]",
    "train.batch_size=64",
    "train.lr=3e-4",
    "train.warmup_steps=100",
    "train.num_threads=1",
    "train.progress=false",
    "train.log_every=50",
]


def compose(name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("robot_rl.configs", version_base=None):
        return hydra_compose(name, overrides=overrides)


def finished(run: Path, steps: int) -> bool:
    pointer = run / "checkpoints" / "latest"
    return pointer.exists() and json.loads(pointer.read_text()).get("step") == steps


def stage_record(work: Path, task: str, demos: int, reuse: bool) -> tuple[Path, float]:
    from robot_rl.data.episode_store import EpisodeStore
    from robot_rl.commands.record import Recorder

    store = work / "demos"
    if reuse and (store / "meta.json").exists() and EpisodeStore.open(store).num_episodes >= demos:
        return store, 0.0
    shutil.rmtree(store, ignore_errors=True)
    cfg = compose(
        "record",
        [
            f"robot={task}",
            f"record.path={store}",
            f"record.episodes={demos}",
            "record.report_every_s=1000",
            "teleop.seed=0",
        ],
    )
    t = time.monotonic()
    Recorder(cfg, work / "record_run").run()
    wall = time.monotonic() - t
    print(f"recorded {EpisodeStore.open(store).num_episodes} demos in {wall:.0f} s")
    return store, wall


def stage_train(work: Path, store: Path, steps: int, reuse: bool) -> tuple[Path, float, dict | None]:
    from robot_rl.commands.train import Trainer

    run = work / "train"
    if reuse and finished(run, steps):
        return run, 0.0, None
    shutil.rmtree(run, ignore_errors=True)
    cfg = compose(
        "train", [f"train.data={store}", f"train.steps={steps}", f"train.checkpoint_every={max(steps // 2, 1)}", *TRAIN]
    )
    t = time.monotonic()
    summary = Trainer(cfg, run).run()
    wall = time.monotonic() - t
    print(f"trained {steps} steps in {wall:.0f} s, final loss {summary['final_loss']:.4f}")
    return run, wall, summary


def stage_distill(work: Path, teacher: Path, steps: int, reuse: bool) -> tuple[Path, float, dict | None]:
    from robot_rl.commands.distill import Distiller

    run = work / "distill"
    if reuse and finished(run, steps):
        return run, 0.0, None
    shutil.rmtree(run, ignore_errors=True)
    cfg = compose(
        "distill",
        [
            f"distill.teacher={teacher}",
            f"distill.steps={steps}",
            "distill.num_threads=1",
            "distill.progress=false",
            "distill.eval_episodes=0",
            f"distill.checkpoint_every={max(steps // 2, 1)}",
            f"distill.val_every={max(steps // 4, 1)}",
        ],
    )
    t = time.monotonic()
    summary = Distiller(cfg, run).run()
    wall = time.monotonic() - t
    print(
        f"distilled {steps} steps in {wall:.0f} s, final loss {summary['final_loss']:.5f}, "
        f"student-teacher chunk MSE {summary['probe']['mse']:.5f}"
    )
    return run, wall, summary


def stage_eval(run: Path, robot_cfg: dict, episodes: int, seed: int, label: str) -> tuple[dict, float]:
    from robot_rl.commands.evaluate import evaluate, set_sampler, summary_line
    from robot_rl.policies.checkpoint import load_policy

    policy = load_policy(run, device="cpu")
    sampler = set_sampler(policy, "ddim", 10) if label == "teacher" else set_sampler(policy)
    t = time.monotonic()
    res = evaluate(policy, robot_cfg, episodes=episodes, seed=seed)
    wall = time.monotonic() - t
    res["sampler"] = sampler
    print(f"{label} ({sampler}): {summary_line(res)}  [{wall:.0f} s]")
    return res, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny run: 5 demos, 200 train / 50 distill steps, 5 eval episodes (a smoke test, not a result)",
    )
    ap.add_argument("--task", default="lift", choices=sorted(TASKS))
    ap.add_argument("--demos", type=int, default=None, help="expert demos to record (default 50)")
    ap.add_argument("--train-steps", type=int, default=None, help="BC steps (default 2500)")
    ap.add_argument("--distill-steps", type=int, default=None, help="distillation steps (default 1000)")
    ap.add_argument("--episodes", type=int, default=None, help="eval episodes per policy (default 50)")
    ap.add_argument("--seed", type=int, default=10_000, help="first eval seed")
    ap.add_argument("--workdir", default=None, help="keep everything here (default: a temporary directory)")
    ap.add_argument("--reuse", action="store_true", help="skip stages whose outputs exist in --workdir")
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    q = args.quick
    demos = args.demos or (5 if q else 50)
    train_steps = args.train_steps or (200 if q else 2500)
    distill_steps = args.distill_steps or (50 if q else 1000)
    episodes = args.episodes or (5 if q else 50)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_bc_"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"task {args.task}: {demos} demos, {train_steps} train steps, {distill_steps} distill steps, "
        f"{episodes} eval episodes from seed {args.seed}; work dir {work}"
    )

    from robot_rl.data.episode_store import EpisodeStore

    walls = {}
    store, walls["record"] = stage_record(work, TASKS[args.task], demos, args.reuse)
    robot_cfg = EpisodeStore.open(store).meta["info"]["robot_config"]
    teacher, walls["train"], train_summary = stage_train(work, store, train_steps, args.reuse)
    t_res, walls["eval_teacher"] = stage_eval(teacher, robot_cfg, episodes, args.seed, "teacher")
    student, walls["distill"], distill_summary = stage_distill(work, teacher, distill_steps, args.reuse)
    s_res, walls["eval_student"] = stage_eval(student, robot_cfg, episodes, args.seed, "student")

    from robot_rl.commands.evaluate import summary_line

    print(f"\n== {args.task}: {demos} scripted demos, {episodes} eval episodes (same seeds) ==")
    for label, res in (("teacher", t_res), ("student", s_res)):
        print(f"{label:<8} {res['sampler']:<9} {summary_line(res)}")
    diff = 100 * (s_res["success_rate"] - t_res["success_rate"])
    speed = t_res["latency"]["chunk"]["p50_ms"] / s_res["latency"]["chunk"]["p50_ms"]
    print(f"student - teacher: {diff:+.0f} points; student chunk {speed:.1f}x faster (p50)")
    print("wall clock: " + ", ".join(f"{k} {v:.0f} s" + (" (reused)" if v == 0 else "") for k, v in walls.items()))
    out = {
        "task": args.task,
        "demos": demos,
        "train_steps": train_steps,
        "distill_steps": distill_steps,
        "episodes": episodes,
        "seed": args.seed,
        "wall_s": walls,
        "teacher": t_res,
        "student": s_res,
        "train_summary": train_summary,
        "distill_summary": distill_summary,
    }
    (work / "results.json").write_text(json.dumps(out, indent=2, default=float))
    print(f"results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
