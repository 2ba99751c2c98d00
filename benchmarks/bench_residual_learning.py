"""Residual RL (ResFiT) from a weak BC base vs the base alone vs SAC/RLPD from scratch, same env-step budget.

    python benchmarks/bench_residual_learning.py --task lift --steps 50000 --methods residual,sac
    python benchmarks/bench_residual_learning.py --task pick_place_can --steps 50000

What runs: the weak chunked diffusion base from `benchmarks/residual_base.py` (recorded poor-expert demos, small
UNet, deliberately under-trained; cached in --bases), then for each method one synchronous loop in this process
— the same parts a session uses (MuJoCo robot, SafetyFilter bounds, ResidualPolicy / SACPolicy on the robot side,
ResidualTD3 / SAC learner updates, the learner's on-disk ReplayBuffer, 50/50 demo/online batches), minus the ZMQ
hop: env steps and updates alternate at a fixed update-to-data ratio (as ResFiT's own single-process runs), so
the figure does not depend on how two processes share this machine's two cores. Weights reach the policy every
`publish_every` updates and swap at base-chunk boundaries, exactly as over the wire.

Every `--eval-every` env steps: `--eval-episodes` seeded episodes (seeds 10000..) without exploration noise;
the base alone is evaluated once on the same seeds. Prints a table and writes curves.json + learning_curves.png.
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
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from residual_base import make_weak_base  # noqa: E402

from robot_rl.algos import algo_config  # noqa: E402
from robot_rl.algos.residual import ResidualTD3  # noqa: E402
from robot_rl.algos.sac import SAC  # noqa: E402
from robot_rl.control.safety import SafetyFilter  # noqa: E402
from robot_rl.factory import make_robot  # noqa: E402
from robot_rl.interfaces import OBS_PREFIX  # noqa: E402
from robot_rl.learner.replay_buffer import ReplayBuffer  # noqa: E402
from robot_rl.policies.residual import ResidualModel, ResidualPolicy  # noqa: E402
from robot_rl.policies.sac import SACModel, SACPolicy  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EVAL_SEED = 10_000


def robot_for(task: str):
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / "robot" / f"{task}.yaml"), resolve=True)
    return make_robot(cfg)


def algo_cfg(method: str, args, base: dict) -> dict:
    common = {
        "demos": base["store"],
        "critic_hidden": args.critic_hidden,
        "actor_hidden": args.actor_hidden,
        "batch_size": args.batch_size,
        "learning_starts": args.learning_starts,
        "n_step": args.n_step,
        "gamma": args.gamma,
    }
    if method == "residual":
        return {
            **common,
            "base_checkpoint": base["checkpoint"],
            "critic_warmup": args.critic_warmup,
            "scale": args.scale,
            "actor_lr": args.actor_lr,
            "explore_std": args.explore_std,
            "actor_every": args.actor_every,
        }
    return common


class Run:
    """One method: robot-side policy + learner algorithm + replay, stepped alternately."""

    def __init__(self, method: str, args, base: dict, out: Path):
        self.method, self.args = method, args
        self.robot = robot_for(args.task)
        self.robot.connect()
        feat = self.robot.action_feature
        self.safety = SafetyFilter(feat.low, feat.high)
        cfg = algo_cfg(method, args, base)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if method == "residual":
            self.algo = ResidualTD3(algo_config("residual", **cfg), {}, device, out / "cache")
            model = ResidualModel(
                self.robot.observation_features,
                self.algo.obs_keys,
                feat.shape[0],
                cfg | {"scale": args.scale, "actor_hidden": args.actor_hidden},
            )
            from robot_rl.algos.residual import load_base

            self.policy = ResidualPolicy(
                load_base(base["checkpoint"]), model, seed=args.seed, explore_std=args.explore_std
            )
        else:
            self.algo = SAC(algo_config("sac", **cfg), {}, device, out / "cache")
            model = SACModel(self.robot.observation_features, self.algo.obs_keys, feat.shape[0], cfg)
            self.policy = SACPolicy(model, seed=args.seed)
        self.replay = ReplayBuffer(out / method / "replay.zarr")
        self.rng = np.random.default_rng(args.seed)
        self.updates = self.env_steps = self.episode = 0
        self.published = 0
        self.train_success: list[tuple[int, bool]] = []
        self.evals: list[dict] = []
        self.wall = {"env": 0.0, "update": 0.0, "eval": 0.0}

    def sync(self) -> None:
        self.policy.load_state_dict(self.algo.policy_state())
        self.policy.apply_meta(self.algo.publish_meta(self.replay))

    def rollout(self, seed: int, evaluating: bool) -> tuple[bool, int, dict]:
        obs = self.robot.reset(seed=seed)
        self.policy.seed_episode(seed)  # matched noise: base alone and base + residual see the same samples
        self.policy.reset()
        self.safety.reset()
        rows: dict[str, list] = {}
        success = False
        for step in range(self.args.horizon):
            proposal = self.policy.select_action(obs)
            sent, _ = self.safety(proposal)
            self.robot.send_action(sent)
            row = {OBS_PREFIX + k: np.asarray(v) for k, v in obs.items()}
            obs = self.robot.get_observation()
            success = bool(self.robot.is_success())
            if not evaluating:
                row.update(
                    {
                        "action": sent.astype(np.float32),
                        "reward": np.float32(success),
                        "success": np.bool_(success),
                        "intervention": np.bool_(False),
                        "episode": np.int64(self.episode),
                        "step": np.int64(step),
                    }
                )
                row.update(self.policy.transition_extras(acted=True))  # residual: base_action for the critic
                for k, v in row.items():
                    rows.setdefault(k, []).append(v)
            if success:
                break
        return success, step + 1, rows

    def train_episode(self) -> None:
        t0 = time.perf_counter()
        success, steps, rows = self.rollout(self.args.seed * 1_000_003 + self.episode, evaluating=False)
        seqs = np.arange(self.env_steps, self.env_steps + steps)
        self.replay.append("robot0", seqs, {k: np.stack(v) for k, v in rows.items()})
        self.wall["env"] += time.perf_counter() - t0
        self.env_steps += steps
        self.episode += 1
        self.train_success.append((self.env_steps, success))
        t0 = time.perf_counter()
        owed = int(self.args.utd * self.algo.trainable_transitions(self.replay)) - self.updates
        if owed > 0 and self.algo.ready(self.replay):
            for _ in range(owed):
                self.algo.update(self.replay, self.rng)
                self.updates += 1
                if self.updates % self.args.publish_every == 0:
                    self.sync()
        self.wall["update"] += time.perf_counter() - t0
        if self.policy.exploration != self.algo.exploration(self.replay):
            self.sync()

    def evaluate(self, mode: str) -> dict:
        t0 = time.perf_counter()
        with self.policy.evaluating(mode):  # exploration off; "base" switches the residual off
            results = [self.rollout(EVAL_SEED + j, evaluating=True) for j in range(self.args.eval_episodes)]
        self.wall["eval"] += time.perf_counter() - t0
        rate = float(np.mean([r[0] for r in results]))
        row = {
            "mode": mode,
            "env_steps": self.env_steps,
            "updates": self.updates,
            "success": rate,
            "mean_steps": float(np.mean([r[1] for r in results])),
            "wall_s": sum(self.wall.values()),
        }
        print(
            f"  [{self.method}] {mode:8s} eval after {self.env_steps:6d} env steps, {self.updates:6d} updates: "
            f"success {rate:.2f} (mean length {row['mean_steps']:.0f}); wall {row['wall_s']:.0f} s",
            flush=True,
        )
        return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="lift", choices=["lift", "pick_place_can"])
    p.add_argument("--steps", type=int, default=50_000, help="env-step budget per method")
    p.add_argument("--methods", default="residual,sac")
    p.add_argument("--bases", default="/tmp/robot_rl_bench/weak_bases", help="cache of the weak bases")
    p.add_argument("--out", default="/tmp/robot_rl_bench/residual_learning")
    p.add_argument("--horizon", type=int, default=200)
    p.add_argument("--utd", type=float, default=1.0, help="updates per env step [ResFiT: 4]")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--critic-hidden", type=int, nargs="+", default=[256, 256])
    p.add_argument("--actor-hidden", type=int, nargs="+", default=[256, 256])
    p.add_argument("--learning-starts", type=int, default=1000)
    p.add_argument("--critic-warmup", type=int, default=1000)
    p.add_argument("--scale", type=float, default=0.2)
    p.add_argument("--actor-lr", type=float, default=1e-4)
    p.add_argument("--actor-every", type=int, default=2)
    p.add_argument("--explore-std", type=float, default=0.05)
    p.add_argument("--n-step", type=int, default=3)
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--publish-every", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=5000)
    p.add_argument("--eval-episodes", type=int, default=20)
    p.add_argument(
        "--stop-at",
        type=float,
        default=None,
        help="stop a method once two evaluations in a row reach this success rate",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-dir", default=None, help="use this make_weak_base output dir as is (no re-make)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out) / args.task
    out.mkdir(parents=True, exist_ok=True)

    if args.base_dir:
        base = json.loads((Path(args.base_dir) / "result.json").read_text())
    else:
        base = make_weak_base(args.task, Path(args.bases) / args.task)
    print(
        f"weak base ({args.task}): success {base['success']:.2f} {base.get('ci')} on its own eval; "
        f"demos {base['store']}",
        flush=True,
    )
    curves = {
        "task": args.task,
        "args": vars(args),
        "base": {k: base[k] for k in ("success", "ci", "checkpoint")},
        "methods": {},
    }
    for method in args.methods.split(","):
        print(
            f"== {method}: {args.steps} env steps, UTD {args.utd}, critic {args.critic_hidden} x 10 heads", flush=True
        )
        run = Run(method, args, base, out)
        if method == "residual":
            curves["base_eval"] = run.evaluate("base")
        run.evals.append(run.evaluate(method))
        next_eval = args.eval_every
        while run.env_steps < args.steps:
            run.train_episode()
            if run.env_steps >= next_eval or run.env_steps >= args.steps:
                run.evals.append(run.evaluate(method))
                next_eval += args.eval_every
                curves["methods"][method] = {
                    "evals": run.evals,
                    "wall": run.wall,
                    "updates": run.updates,
                    "partial": True,
                }  # readable while the run goes on
                (out / "curves.json").write_text(json.dumps(curves, indent=1))
                last = [e["success"] for e in run.evals[-2:]]
                if args.stop_at is not None and len(last) == 2 and min(last) >= args.stop_at:
                    print(f"  [{method}] reached {args.stop_at:.2f} twice in a row: stopping", flush=True)
                    break
        hit = next((e["env_steps"] for e in run.evals if e["success"] >= 0.9), None)
        curves["methods"][method] = {
            "evals": run.evals,
            "train_success": run.train_success,
            "wall": run.wall,
            "env_steps_to_90": hit,
            "updates": run.updates,
        }
        (out / "curves.json").write_text(json.dumps(curves, indent=1))

    print("\n== result (" + args.task + f", seeds {EVAL_SEED}..{EVAL_SEED + args.eval_episodes - 1})")
    if "base_eval" in curves:
        print(f"  base alone (frozen BC)      : success {curves['base_eval']['success']:.2f}")
    for method, r in curves["methods"].items():
        best = max(r["evals"], key=lambda e: e["success"])
        final = r["evals"][-1]
        w = r["wall"]
        print(
            f"  {method:10s} final {final['success']:.2f} after {final['env_steps']} env steps "
            f"(best {best['success']:.2f} at {best['env_steps']}); first >= 0.90 at "
            f"{r['env_steps_to_90'] or 'never'} env steps; wall env {w['env']:.0f} s + updates {w['update']:.0f} s "
            f"+ eval {w['eval']:.0f} s ({r['updates']} updates, {'cuda' if torch.cuda.is_available() else 'cpu'})"
        )
    plot(curves, out / "learning_curves.png")
    print(f"curves: {out / 'curves.json'}, plot: {out / 'learning_curves.png'}")
    return 0


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, r in curves["methods"].items():
        ax.plot(
            [e["env_steps"] for e in r["evals"]],
            [e["success"] for e in r["evals"]],
            "o-",
            label="base + residual (ResFiT)" if method == "residual" else "SAC/RLPD, no base",
        )
    if "base_eval" in curves:
        ax.axhline(curves["base_eval"]["success"], ls="--", color="gray", label="base alone")
    ax.set_xlabel("environment steps")
    ax.set_ylabel(f"success ({curves['args']['eval_episodes']} seeded eval episodes)")
    ax.set_title(curves["task"])
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
