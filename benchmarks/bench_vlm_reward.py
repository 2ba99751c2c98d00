"""Offline RL from VLM preference feedback on Lift: label quality vs teacher noise, and BC vs IQL+VLM reward vs
IQL+ground-truth sparse reward, on the same evaluation seeds.

    python benchmarks/bench_vlm_reward.py                 # full size (hours on a 2-core CPU; a GPU box helps)
    python benchmarks/bench_vlm_reward.py --size quick    # what fits in ~25 min on a shared 2-core CPU

1. A Lift store with 84x84 agentview images of mixed quality, recorded in MuJoCo: random-ish episodes (temporally
   correlated random actions), fumbling episodes (the scripted expert whose every grasp opens again: it reaches,
   closes, drops, never lifts), poor-expert and expert episodes (cached in --out/store).
2. For each teacher noise (0 / 10 / 25 % mean flip rate, flips more likely for close pairs) with 30 % abstentions:
   `robot-rl label` against sim/vlm_teacher.py (a real loopback HTTP server, the real client), then
   `robot-rl reward-model` and `robot-rl relabel`. Reported: label agreement with ground-truth progress, held-out
   pair accuracy, Spearman(reward, progress).
3. `robot-rl offline-rl` with the 10 %-noise VLM reward (its BC stage is the BC baseline) and with the true sparse
   reward (`success`, terminal at success; the same BC encoder via bc_from); all three policies rolled out on the
   same seeds; Wilson 95 % intervals.
4. Labelling throughput at concurrency 1 and 8 against the local server, side by side in one run, with a simulated
   per-request model latency (--latency) and without; the query cost of labelling this store.

Writes --out/results.json and docs/figures/vlm_benchmark.png, vlm_pairs.png, vlm_reward_progress.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402

from robot_rl.commands.evaluate import wilson_interval  # noqa: E402
from robot_rl.data.episode_store import EpisodeStore  # noqa: E402
from robot_rl.interfaces import OBS_PREFIX, Feature, Teleop  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIGURES = REPO / "docs" / "figures"
SIZES = {
    "full": {
        "random": 40,
        "fumble": 80,
        "poor": 20,
        "expert": 20,
        "max_steps": 150,
        "pairs": 4000,
        "rm_steps": 3000,
        "bc_steps": 5000,
        "iql_steps": 20000,
        "eval_episodes": 50,
        "throughput_pairs": 200,
    },
    "quick": {
        "random": 6,
        "fumble": 12,
        "poor": 3,
        "expert": 3,
        "max_steps": 100,
        "pairs": 600,
        "rm_steps": 400,
        "bc_steps": 1500,
        "iql_steps": 5000,
        "eval_episodes": 10,
        "throughput_pairs": 60,
    },
}


class RandomIsh(Teleop):
    """Temporally correlated random actions (an Ornstein–Uhlenbeck-like walk in [-1, 1]); the gripper flips now
    and then. The 'random data' of Offline RL-VLM-F's tables."""

    name = "random_ish"

    def __init__(self, action_feature: Feature, seed: int):
        self._feature, self.rng = action_feature, np.random.default_rng(seed)
        self.x = np.zeros(action_feature.shape[0] - 1)
        self.grip = -1.0

    @property
    def action_feature(self) -> Feature:
        return self._feature

    def reset(self) -> None:
        self.x[:] = 0.0
        self.grip = -1.0

    def get_action(self, observation) -> np.ndarray:
        self.x = np.clip(0.8 * self.x + 0.35 * self.rng.normal(size=self.x.shape), -1, 1)
        if self.rng.random() < 0.05:
            self.grip = -self.grip
        return np.concatenate([self.x, [self.grip]]).astype(np.float32)


def record_store(path: Path, counts: dict, max_steps: int, image: int) -> Path:
    """The mixed-quality Lift store (one seed per episode; success stops an episode 5 steps later)."""
    from omegaconf import OmegaConf

    from robot_rl.factory import make_robot
    from robot_rl.rollout import Rollout
    from robot_rl.sim.experts import make_expert

    robot_cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "robot" / "lift.yaml"), resolve=True)
    robot_cfg.update(cameras=["agentview"], camera_height=image, camera_width=image, horizon=max_steps)
    robot = make_robot(robot_cfg)
    robot.connect()
    feats = {OBS_PREFIX + k: f for k, f in robot.observation_features.items()}
    feats["action"] = robot.action_feature
    feats["success"] = Feature((), "bool")
    info = {"robot": robot.name, "robot_config": robot_cfg, "task": robot_cfg["task"]}
    store = EpisodeStore.create(path, feats, fps=robot_cfg["control_freq"], info=info)
    writer = store.writer()
    seed = 0
    try:
        for kind in ("random", "fumble", "poor", "expert"):
            for _ in range(int(counts[kind])):
                if kind == "random":
                    teleop = RandomIsh(robot.action_feature, seed)
                elif kind == "fumble":
                    teleop = make_expert("Lift", noise_std=0.1, failed_grasp=1.0, seed=seed)
                else:
                    teleop = make_expert("Lift", quality=kind, seed=seed)
                rollout = Rollout(robot, teleop=teleop, success_extra_steps=5)
                writer.begin({"seed": seed, "kind": kind, "task": robot_cfg["task"]})

                def hook(step):
                    frame = {OBS_PREFIX + k: v for k, v in step.obs.items()}
                    frame.update(action=np.asarray(step.action, np.float32), success=np.bool_(step.success))
                    writer.add(frame)

                result = rollout.episode(rollout.reset(seed), max_steps, teleop_drives=True, hooks=[hook])
                writer.save({"success": bool(result["success"])})
                print(f"  recorded {kind} episode seed {seed}: {result['steps']} steps, success {result['success']}")
                seed += 1
    finally:
        store.close()
        robot.disconnect()
    return path


def cfg_of(name: str, overrides: list[str]):
    with initialize_config_module("robot_rl.configs", version_base=None):
        return compose(name, overrides=overrides)


def run_verb(module: str, name: str, run_dir: Path, overrides: list[str]) -> dict:
    """A verb's main(cfg, run_dir) in this process (what the CLI runs), with its resolved config written."""
    import importlib

    from robot_rl.config import write_run_info

    cfg = cfg_of(name, overrides)
    write_run_info(run_dir, cfg, name)
    code = importlib.import_module(f"robot_rl.commands.{module}").main(cfg, run_dir)
    if code != 0:
        raise RuntimeError(f"robot-rl {name} exited {code}")
    for f in ("label_summary.json", "reward_model_summary.json", "relabel_summary.json", "offline_rl.json"):
        if (run_dir / f).exists():
            return json.loads((run_dir / f).read_text())
    return {}


def label(store: Path, out: Path, file: Path, noise: float, args, pairs: int, concurrency: int, latency: float) -> dict:
    from robot_rl.sim.vlm_teacher import TeacherServer

    with TeacherServer(store, noise=noise, abstain=args.abstain, seed=args.seed, latency_s=latency) as server:
        return run_verb(
            "label",
            "label",
            out,
            [
                f"label.data={store}",
                f"label.url={server.url}",
                "label.model=sim-vlm",
                "label.api_key_env=null",
                f"label.out={file}",
                f"label.budget={pairs}",
                f"label.concurrency={concurrency}",
                "label.progress_every=0",
                f"label.seed={args.seed}",
            ],
        )


def figures(store_path: Path, label_file: Path, rm_dir: Path, progress: np.ndarray, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from robot_rl.reward.preference import load_reward_model
    from robot_rl.reward.vlm_client import load_labels

    FIGURES.mkdir(parents=True, exist_ok=True)
    store = EpisodeStore.open(store_path)
    images = store.array("obs.agentview_image")
    records = load_labels(label_file)
    rng = np.random.default_rng(0)
    picks = [records[k] for k in rng.choice(len(records), size=min(6, len(records)), replace=False)]
    fig, axes = plt.subplots(len(picks), 2, figsize=(4.2, 2.2 * len(picks)), gridspec_kw={"hspace": 0.5})
    for row, r in zip(np.atleast_2d(axes), picks):
        for ax, key, side in ((row[0], "i", "Image 1"), (row[1], "j", "Image 2")):
            ax.imshow(images[r[key]])
            ax.set_title(f"{side}: progress {progress[r[key]]:.2f}", fontsize=7)
            ax.axis("off")
        answer = {0: "Image 1 better", 1: "Image 2 better", -1: "no preference"}[r["label"]]
        truth = "Image 2" if progress[r["j"]] > progress[r["i"]] else "Image 1"
        row[0].text(
            1.1, -0.12, f"model: {answer}  (truth: {truth})", transform=row[0].transAxes, fontsize=7, ha="center"
        )
    fig.suptitle("simulated VLM (10 % noise) answers on sample pairs", fontsize=8)
    fig.subplots_adjust(top=0.95, bottom=0.03, left=0.03, right=0.97)
    fig.savefig(FIGURES / "vlm_pairs.png", dpi=110)
    plt.close(fig)

    model, _ = load_reward_model(rm_dir)
    reward = model.rewards(images)
    kinds = [e.get("kind") for e in store.episodes]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3), sharey=False)
    for ax, kind in zip(axes, ("random", "fumble", "poor", "expert")):
        if kind not in kinds:
            ax.axis("off")
            continue
        e = kinds.index(kind)
        a, b = store.episode_bounds(e)
        ax.plot(progress[a:b], label="ground-truth progress", color="k")
        ax2 = ax.twinx()
        ax2.plot(reward[a:b], label="learned reward", color="tab:red")
        ax.set_title(f"{kind} episode {e}", fontsize=9)
        ax.set_xlabel("step")
    axes[0].set_ylabel("progress (black)")
    fig.suptitle(
        "reward model (10 % noise labels, red, standardised) vs ground-truth progress along episodes", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(FIGURES / "vlm_reward_progress.png", dpi=100)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    noises = sorted(results["labels"], key=float)
    a1.bar([f"{float(n):.0%}" for n in noises], [results["labels"][n]["spearman"] for n in noises], color="tab:blue")
    a1.axhline(0.8, ls="--", color="gray", label="target 0.8")
    a1.set_ylabel("Spearman(reward, progress)")
    a1.set_xlabel("teacher flip noise (30 % abstentions)")
    a1.set_ylim(0, 1)
    a1.legend(fontsize=7)
    names = [m for m in ("bc", "iql_vlm", "iql_gt") if m in results["success"]]
    rates = [results["success"][m]["rate"] for m in names]
    lo = [results["success"][m]["rate"] - results["success"][m]["ci95"][0] for m in names]
    hi = [results["success"][m]["ci95"][1] - results["success"][m]["rate"] for m in names]
    a2.bar(names, rates, yerr=[lo, hi], capsize=4, color=["gray", "tab:red", "tab:green"][: len(names)])
    a2.set_ylim(0, 1)
    a2.set_ylabel("Lift success (Wilson 95 %)")
    a2.set_title(f"same {results['config']['eval_episodes']} seeded episodes each", fontsize=8)
    fig.suptitle(f"VLM-feedback offline RL on mixed-quality Lift data ({results['config']['size']} size)", fontsize=9)
    fig.tight_layout()
    fig.savefig(FIGURES / "vlm_benchmark.png", dpi=100)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--out", type=Path, default=Path("/tmp/robot_rl_bench/vlm_reward"))
    p.add_argument("--image", type=int, default=84)
    p.add_argument("--noises", type=float, nargs="+", default=[0.0, 0.1, 0.25])
    p.add_argument("--abstain", type=float, default=0.3)
    p.add_argument("--latency", type=float, default=0.05, help="simulated model seconds per request (throughput)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--figures-only", action="store_true", help="redraw the figures from an earlier run's results")
    p.add_argument("--bc-batch", type=int, default=64, help="BC batch size (the encoder is trained here)")
    p.add_argument(
        "--encoder",
        choices=["config", "small"],
        default="config",
        help="image encoder: configs/offline_rl.yaml's, or a cheaper 3-layer [16, 32, 32] one for CPU runs",
    )
    for key in SIZES["full"]:
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help="override the size's value")
    args = p.parse_args()
    from robot_rl.config import setup_logging

    setup_logging()
    size = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in SIZES[args.size].items()}
    out = args.out / args.size
    out.mkdir(parents=True, exist_ok=True)
    if args.figures_only:
        from robot_rl.sim.vlm_teacher import store_progress

        results = json.loads((out / "results.json").read_text())
        progress = store_progress(EpisodeStore.open(out / "store"))
        figures(out / "store", out / "store" / "labels" / "sim-vlm-n10.jsonl", out / "rm_n10", progress, results)
        return 0
    t_start = time.monotonic()
    results = {
        "config": {
            "size": args.size,
            **size,
            "image": args.image,
            "abstain": args.abstain,
            "noises": args.noises,
            "bc_batch": args.bc_batch,
            "encoder": args.encoder,
            "argv": sys.argv[1:],
        }
    }
    timing = results.setdefault("wall_s", {})

    store = out / "store"
    if not (store / "commit.json").exists():
        print(f"recording the mixed-quality Lift store into {store}")
        t = time.monotonic()
        record_store(store, size, size["max_steps"], args.image)
        timing["record"] = time.monotonic() - t
    s = EpisodeStore.open(store)
    kinds = [e.get("kind") for e in s.episodes]
    results["store"] = {
        "episodes": s.num_episodes,
        "steps": s.num_steps,
        "by_kind": {
            k: {"episodes": kinds.count(k), "success": sum(e["success"] for e in s.episodes if e.get("kind") == k)}
            for k in set(kinds)
        },
    }
    from robot_rl.sim.vlm_teacher import store_progress

    progress = store_progress(s)

    # ---- labels, reward models, relabelled columns per teacher noise
    results["labels"] = {}
    for noise in args.noises:
        tag = f"n{round(noise * 100):02d}"
        file = store / "labels" / f"sim-vlm-{tag}.jsonl"
        t = time.monotonic()
        lab = label(store, out / f"label_{tag}", file, noise, args, size["pairs"], 8, 0.0)
        rm = run_verb(
            "reward_model",
            "reward_model",
            out / f"rm_{tag}",
            [
                f"reward_model.data={store}",
                f"reward_model.labels={file}",
                f"reward_model.steps={size['rm_steps']}",
                "reward_model.batch_size=32",
                "reward_model.progress=false",
                "reward_model.tensorboard=false",
                "reward_model.num_threads=1",
                f"reward_model.seed={args.seed}",
            ],
        )
        existing = s.derived_columns()
        column = f"reward_vlm_{tag}"
        if not any(k.startswith(column + "_v") for k in existing):
            run_verb(
                "relabel",
                "relabel",
                out / f"relabel_{tag}",
                [f"relabel.data={store}", f"relabel.reward_model={out / f'rm_{tag}'}", f"relabel.column={column}"],
            )
        results["labels"][str(noise)] = {
            "pairs": lab["in_file"],
            "abstain_rate": rm["abstained"] / max(rm["records"], 1),
            "label_agreement": rm.get("label_agreement_with_progress"),
            "val_accuracy": rm["val_accuracy"],
            "spearman": rm["spearman_reward_progress"],
            "abstained": rm["abstained"],
            "records": rm["records"],
            "wall_s": time.monotonic() - t,
        }
        print(f"noise {noise:.0%}: {results['labels'][str(noise)]}")

    # ---- throughput: concurrency 1 vs 8, with and without a simulated model latency, side by side
    results["throughput"] = {}
    for latency in (args.latency, 0.0):
        for conc in (1, 8):
            f = out / "throughput" / f"lat{latency}_c{conc}.jsonl"
            f.unlink(missing_ok=True)
            r = label(store, out / "throughput_run", f, 0.1, args, size["throughput_pairs"], conc, latency)
            results["throughput"][f"latency_{latency}s_concurrency_{conc}"] = r["pairs_per_s"]
    from robot_rl.reward.vlm_client import load_labels

    recs = load_labels(store / "labels" / "sim-vlm-n10.jsonl")
    tokens = float(np.mean([r["tokens"]["total_tokens"] for r in recs]))
    results["query_cost"] = {
        "pairs": len(recs),
        "requests": 2 * len(recs),
        "tokens_per_pair": tokens,
        "tokens_total": tokens * len(recs),
        "note": "tokens as the simulated server counts them (request bytes / 4); a real VLM counts image tokens its own way",
    }

    # ---- offline RL: BC, IQL + VLM reward (10 % noise), IQL + true sparse reward; same seeds
    common = [
        f"offline_rl.data={store}",
        f"offline_rl.bc.steps={size['bc_steps']}",
        f"offline_rl.iql.steps={size['iql_steps']}",
        f"offline_rl.eval_episodes={size['eval_episodes']}",
        f"offline_rl.eval_max_steps={size['max_steps']}",
        "offline_rl.bc.progress=false",
        "offline_rl.bc.tensorboard=false",
        "offline_rl.num_threads=1",
        f"offline_rl.seed={args.seed}",
        f"offline_rl.bc.batch_size={args.bc_batch}",
        *(
            ["offline_rl.image_encoder.channels=[16,32,32]", "offline_rl.image_encoder.strides=[2,2,2]"]
            if args.encoder == "small"
            else []
        ),
    ]
    t = time.monotonic()
    vlm = run_verb("offline_rl", "offline_rl", out / "iql_vlm", [*common, "offline_rl.reward=reward_vlm_n10"])
    timing["iql_vlm"] = time.monotonic() - t
    t = time.monotonic()
    gt = run_verb(
        "offline_rl",
        "offline_rl",
        out / "iql_gt",
        [
            *common,
            "offline_rl.reward=success",
            "offline_rl.done_key=success",
            "offline_rl.reward_norm=none",
            f"offline_rl.bc_from={out / 'iql_vlm'}",
            "offline_rl.eval_bc=false",
        ],
    )
    timing["iql_gt"] = time.monotonic() - t
    results["success"] = {}
    for name, e in (("bc", vlm["eval_bc"]), ("iql_vlm", vlm["eval_iql"]), ("iql_gt", gt["eval_iql"])):
        results["success"][name] = {
            "rate": e["success_rate"],
            "successes": e["successes"],
            "episodes": e["episodes"],
            "ci95": list(wilson_interval(e["successes"], e["episodes"])),
        }
    results["offline_rl"] = {"vlm": vlm, "gt": gt}
    timing["total"] = time.monotonic() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    figures(store, store / "labels" / "sim-vlm-n10.jsonl", out / "rm_n10", progress, results)

    print(
        "\n== VLM-feedback rewards on Lift ({} size, {} episodes, {} steps) ==".format(
            args.size, s.num_episodes, s.num_steps
        )
    )
    for noise, r in results["labels"].items():
        print(
            f"noise {float(noise):4.0%}: Spearman {r['spearman']:.3f}  held-out pair acc {r['val_accuracy']:.3f}  label agreement {r['label_agreement']:.3f}  abstain {r['abstain_rate']:.2f}"
        )
    for name, r in results["success"].items():
        print(
            f"{name:8s} success {r['rate']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] ({r['successes']}/{r['episodes']})"
        )
    for k, v in results["throughput"].items():
        print(f"throughput {k}: {v:.2f} pairs/s")
    print(f"query cost: {results['query_cost']}")
    print(f"wall: {timing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
