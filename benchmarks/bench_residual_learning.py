"""Residual RL (ResFiT) from a weak BC base vs the trust- and outcome-gated residuals vs SAC/RLPD, same budget.

    python benchmarks/bench_residual_learning.py --task lift --steps 50000 --methods residual,residual_outcome,sac
    python benchmarks/bench_residual_learning.py --task pick_place_can --steps 50000
    python benchmarks/bench_residual_learning.py --task lift --plot-only   # redraw from curves_<method>.json

Methods: `residual` is ResFiT's update (actor maximises the heads' mean Q, full residual bound from the first actor
update: trust_k 0, gate_init 1, gate_rate 0, outcome_levels 0); `residual_trust` is the critic-side gate (actor
maximises a lower bound on the advantage over the base, robot residual behind a gate that opens only while the
heads agree the residual is better, capped by the critic's calibration; outcome_levels 0); `residual_outcome` is
configs/algo/residual.yaml's default (the same actor objective; the executed gate opens in steps once the robot's
own noise-free test episodes at a step succeed at least as often as the base's, or early when clearly not worse, and
closes, restoring the actor that passed the step below, when they are significantly worse); `sac` is SAC with
RLPD's recipe and the same demos, no base.

What runs: the weak chunked diffusion base from `benchmarks/residual_base.py` (recorded poor-expert demos, small
UNet, deliberately under-trained; cached in --bases), then for each method one synchronous loop in this process
— the same parts a session uses (MuJoCo robot, SafetyFilter bounds, ResidualPolicy / SACPolicy on the robot side,
ResidualTD3 / SAC learner updates, the learner's on-disk ReplayBuffer, 50/50 demo/online batches), minus the ZMQ
hop: env steps and updates alternate at a fixed update-to-data ratio (as ResFiT's own single-process runs), so
the figure does not depend on how two processes share this machine's two cores. Weights reach the policy every
`publish_every` updates and swap at base-chunk boundaries, exactly as over the wire. Methods run one after the other
(or in separate processes with different --methods: each writes its own curves_<method>.json; the figure merges
every method found in the output directory that ran on the same base and evaluation seeds).

Every `--eval-every` env steps: `--eval-episodes` seeded episodes (seeds 10000..) without exploration noise,
`--final-eval-episodes` at the last point; the base alone once on the final point's seeds. At each evaluation
of a residual method, diagnostics of the critic and the residual (`diagnose`): |residual| proposed / executed on a
batch and on the last training episodes, Q of the executed action vs Q of the base action on the same states and
the heads' spread of both, the critic's Q of the executed actions vs their Monte-Carlo returns (over-estimation),
the gate, and the env steps where updates and the actor started. Writes curves_<method>.json,
docs-ready figures residual_<task>.png (success, Wilson 95 % intervals, the base's interval as a band) and
residual_<task>_diagnostics.png in --out/<task>, and prints the issue-20 targets met or missed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
from robot_rl.algos.residual import ResidualTD3, load_base  # noqa: E402
from robot_rl.algos.sac import SAC  # noqa: E402
from robot_rl.commands.evaluate import wilson_interval  # noqa: E402
from robot_rl.control.safety import SafetyFilter  # noqa: E402
from robot_rl.factory import make_robot  # noqa: E402
from robot_rl.interfaces import OBS_PREFIX  # noqa: E402
from robot_rl.learner.replay_buffer import ReplayBuffer  # noqa: E402
from robot_rl.policies.residual import ResidualModel, ResidualPolicy  # noqa: E402
from robot_rl.policies.sac import SACModel, SACPolicy  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EVAL_SEED = 10_000
RESIDUAL = ("residual", "residual_trust", "residual_outcome")
LABELS = {
    "residual": "base + residual (ResFiT update)",
    "residual_trust": "base + trust-gated residual (critic-side gate)",
    "residual_outcome": "base + outcome-gated residual (default: test episodes, early opening)",
    # earlier runs kept for the figure (curves renamed by hand; docs/residual_rl.md says which rule made them)
    "residual_outcome_v1": "outcome gate, first rule (opens when not significantly worse)",
    "residual_outcome_v1_k0": "outcome gate, first rule, actor on the heads' mean (trust_k 0)",
    "residual_outcome_v2": "outcome gate, second rule, counting training episodes (with exploration noise)",
    "residual_outcome_tests": "outcome gate, second rule, counting noise-free test episodes (no early opening)",
    "sac": "SAC/RLPD, no base",
}


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
    if method in RESIDUAL:
        cfg = {
            **common,
            "base_checkpoint": base["checkpoint"],
            "critic_warmup": args.critic_warmup,
            "scale": args.scale,
            "actor_lr": args.actor_lr,
            "explore_std": args.explore_std,
            "actor_every": args.actor_every,
        }
        if method == "residual":  # ResFiT's update: no lower bound, no gate
            return cfg | {"trust_k": 0.0, "gate_init": 1.0, "gate_rate": 0.0, "outcome_levels": 0}
        given = {"trust_k": args.trust_k, "gate_init": args.gate_init, "gate_rate": args.gate_rate}
        if method == "residual_trust":  # the critic-side gate alone
            given["outcome_levels"] = 0
        else:
            given |= {
                "outcome_levels": args.outcome_levels,
                "outcome_episodes": args.outcome_episodes,
                "outcome_z": args.outcome_z,
                "outcome_early_episodes": args.outcome_early_episodes,
                "outcome_margin": args.outcome_margin,
                "outcome_test_every": args.outcome_test_every,
            }
        return cfg | {k: v for k, v in given.items() if v is not None}  # else configs/algo/residual.yaml
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
        if method in RESIDUAL:
            self.algo = ResidualTD3(algo_config("residual", **cfg), {}, device, out / "cache")
            model = ResidualModel(
                self.robot.observation_features, self.algo.obs_keys, feat.shape[0], vars(self.algo.cfg)
            )
            self.policy = ResidualPolicy(
                load_base(base["checkpoint"]),
                model,
                seed=args.seed,
                explore_std=args.explore_std,
                test_every=self.algo.cfg.outcome_test_every if self.algo.cfg.outcome_levels else 0,
            )
        else:
            self.algo = SAC(algo_config("sac", **cfg), {}, device, out / "cache")
            model = SACModel(self.robot.observation_features, self.algo.obs_keys, feat.shape[0], cfg)
            self.policy = SACPolicy(model, seed=args.seed)
        shutil.rmtree(out / method, ignore_errors=True)  # a fresh replay: never the rows of an earlier (killed) run
        self.replay = ReplayBuffer(out / method / "replay.zarr")
        self.rng = np.random.default_rng(args.seed)
        self.updates = self.env_steps = self.episode = 0
        self.published = 0
        self.train_success: list[tuple[int, bool]] = []
        self.evals: list[dict] = []
        self.wall = {"env": 0.0, "update": 0.0, "eval": 0.0}
        self.phases: dict[str, int] = {}  # env steps at which updates / actor updates started
        self.recent: list[dict] = []  # the last training episodes' rows (diagnostics: MC returns, |residual|)
        self.metrics: dict[str, list[float]] = {}  # update metrics since the last evaluation
        if method in RESIDUAL:
            self.sync()  # the learner's starting gate (closed for residual_trust) before the first episode

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
        executed = []  # |executed residual| per step (normalised units, before exploration noise)
        for step in range(self.args.horizon):
            proposal = self.policy.select_action(obs)
            if self.method in RESIDUAL:
                executed.append(float(np.abs(self.policy.last_residual).mean()))
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
                        "done": np.bool_(success or step == self.args.horizon - 1),
                    }
                )
                row.update(self.policy.transition_extras(acted=True))  # residual: base_action for the critic
                for k, v in row.items():
                    rows.setdefault(k, []).append(v)
            if success:
                break
        return success, step + 1, rows, float(np.mean(executed)) if executed else 0.0

    def train_episode(self) -> None:
        t0 = time.perf_counter()
        success, steps, rows, _ = self.rollout(self.args.seed * 1_000_003 + self.episode, evaluating=False)
        seqs = np.arange(self.env_steps, self.env_steps + steps)
        arrays = {k: np.stack(v) for k, v in rows.items()}
        self.replay.append("robot0", seqs, arrays)
        self.recent = [*self.recent, arrays][-self.args.diag_episodes :]
        self.wall["env"] += time.perf_counter() - t0
        self.env_steps += steps
        self.episode += 1
        self.train_success.append((self.env_steps, success))
        t0 = time.perf_counter()
        owed = int(self.args.utd * self.algo.trainable_transitions(self.replay)) - self.updates
        if owed > 0 and self.algo.ready(self.replay):
            self.phases.setdefault("updates_start", self.env_steps)
            for _ in range(owed):
                m = self.algo.update(self.replay, self.rng)
                if "actor/loss" in m:
                    self.phases.setdefault("actor_start", self.env_steps)
                for k, v in m.items():
                    self.metrics.setdefault(k, []).append(float(v))
                self.updates += 1
                if self.updates % self.args.publish_every == 0:
                    self.sync()
        self.wall["update"] += time.perf_counter() - t0
        if self.policy.exploration != self.algo.exploration(self.replay):
            self.sync()

    def evaluate(self, mode: str, episodes: int) -> dict:
        t0 = time.perf_counter()
        with self.policy.evaluating(mode):  # exploration off; "base" switches the residual off
            results = [self.rollout(EVAL_SEED + j, evaluating=True) for j in range(episodes)]
        self.wall["eval"] += time.perf_counter() - t0
        k = int(sum(r[0] for r in results))
        row = {
            "mode": mode,
            "env_steps": self.env_steps,
            "updates": self.updates,
            "success": k / episodes,
            "episodes": episodes,
            "ci": list(wilson_interval(k, episodes)),
            "mean_steps": float(np.mean([r[1] for r in results])),
            "wall_s": sum(self.wall.values()),
            "per_episode": [bool(r[0]) for r in results],  # seed EVAL_SEED + j: compare with the base seed by seed
        }
        if self.method in RESIDUAL and mode != "base":
            row["eval_residual_abs"] = float(np.mean([r[3] for r in results]))
            row["diag"] = self.diagnose()
            row["train_metrics"] = {k: float(np.mean(v)) for k, v in self.metrics.items()}
            self.metrics = {}
        print(
            f"  [{self.method}] {mode:8s} eval after {self.env_steps:6d} env steps, {self.updates:6d} updates: "
            f"success {row['success']:.2f} [{row['ci'][0]:.2f}, {row['ci'][1]:.2f}] of {episodes} "
            f"(mean length {row['mean_steps']:.0f}); wall {row['wall_s']:.0f} s",
            flush=True,
        )
        if "diag" in row:
            print("      " + "  ".join(f"{k} {v:.3f}" for k, v in row["diag"].items()), flush=True)
        return row

    @torch.no_grad()
    def diagnose(self) -> dict[str, float]:
        """What the critic believes about the residual vs what happened (see the module docstring)."""
        algo, actor = self.algo, self.algo.model.actor
        gate = float(actor.gate)
        out = {"gate": gate, "replay": float(self.replay.size), "critic_calibration": algo.critic_calibration()}
        if algo.cfg.outcome_levels:  # the outcome gate's books: the base's reference, the current level, closes
            g = algo.outcome
            out |= {
                "outcome_reference": g.reference[0] / max(g.reference[1], 1),
                "outcome_reference_episodes": g.reference[1],
            }
            out |= {"outcome_level_episodes": g.current[1], "outcome_closes": g.closes, "outcome_epoch": g.epoch}
        if self.replay.size == 0:
            return out
        norm = algo.model.scaler.normalize

        def q_stats(features, base, action, tag):
            q = algo.critic(features, action.clamp(-1, 1))  # (heads, states)
            q_base = algo.critic(features, base)
            adv = q - q_base
            out[f"{tag}_q_base"] = q_base.mean().item()
            out[f"{tag}_q_base_head_std"] = q_base.std(dim=0).mean().item()
            out[f"{tag}_q_exec"] = q.mean().item()
            out[f"{tag}_q_exec_head_std"] = q.std(dim=0).mean().item()
            out[f"{tag}_adv_exec"] = adv.mean().item()
            out[f"{tag}_adv_exec_head_std"] = adv.std(dim=0).mean().item()

        # a batch as the learner samples it (half demos, half online; its own rng: training is not perturbed)
        if algo.ready(self.replay):
            rng = np.random.default_rng(12345)
            b = {k: torch.cat(v) for k, v in _stack([algo.sample(self.replay, rng) for _ in range(4)]).items()}
            f = algo.model.featurizer({k: b["obs." + k] for k in algo.obs_keys})
            base = norm(b["base_action"]).clamp(-1, 1)
            proposed = actor.propose(f, base)
            out["batch_residual_proposed"] = proposed.abs().mean().item()
            out["batch_residual_exec"] = (gate * proposed).abs().mean().item()
            q_stats(f, base, base + gate * proposed, "batch")
            adv_prop = algo.critic(f, (base + proposed).clamp(-1, 1)) - algo.critic(f, base)
            out["batch_adv_proposed"] = adv_prop.mean().item()
            out["batch_adv_proposed_head_std"] = adv_prop.std(dim=0).mean().item()

        # the last training episodes: executed residuals, and Q of the executed actions vs their MC returns
        rows = {k: np.concatenate([e[k] for e in self.recent]) for k in self.recent[0]}
        out["online_residual_exec"] = float(np.nanmean(np.abs(rows["residual"])))
        returns = np.concatenate([_mc_returns(e["success"], algo.cfg.gamma) for e in self.recent])
        f = algo.model.featurizer({k: torch.as_tensor(rows["obs." + k]) for k in algo.obs_keys})
        base = norm(torch.as_tensor(rows["base_action"])).clamp(-1, 1)
        taken = norm(torch.as_tensor(rows["action"])).clamp(-1, 1)
        q_taken = algo.critic(f, taken)
        out["online_q_taken"] = q_taken.mean().item()
        out["online_mc_return"] = float(returns.mean())
        out["online_overestimation"] = out["online_q_taken"] - out["online_mc_return"]
        q_stats(f, base, base + actor(f, base), "online")
        return out


def _stack(batches: list[dict]) -> dict[str, list]:
    return {k: [b[k] for b in batches] for k in batches[0]}


def _mc_returns(success: np.ndarray, gamma: float) -> np.ndarray:
    """Discounted return of each step of one episode under the sparse reward (1 at the success step, terminal)."""
    n = len(success)
    return np.where(success.any(), gamma ** (n - 1 - np.arange(n)), 0.0)


def targets(r: dict, base: dict) -> dict:
    """Issue 20's targets for one method's evaluations."""
    evals = r["evals"]
    below = [e["env_steps"] for e in evals if e["ci"][1] < base["success"]]
    seeds = base.get("per_episode") or []
    same = {  # the base on exactly the evaluation's seeds (when the base's eval covered them)
        e["env_steps"]: float(np.mean(seeds[: e["episodes"]])) for e in evals if len(seeds) >= e["episodes"]
    }
    first = next((i for i, e in enumerate(evals) if e["success"] >= 0.9), None)
    drops = (
        [evals[i]["success"] - evals[i + 1]["success"] for i in range(first, len(evals) - 1)]
        if first is not None
        else []
    )
    gates = [e["diag"]["gate"] if "diag" in e else None for e in evals]  # the executed fraction of the bound
    return {
        "gate_at_each_eval": gates,
        "env_steps_gate_fully_open": next((e["env_steps"] for e, g in zip(evals, gates) if g == 1.0), None),
        "evals_whose_interval_is_below_the_base": below,
        "env_steps_to_90": evals[first]["env_steps"] if first is not None else None,
        "largest_drop_after_90": max(drops, default=0.0),
        "final": evals[-1]["success"],
        "final_episodes": evals[-1]["episodes"],
        "base_on_the_same_seeds": same,
    }


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
    p.add_argument("--final-eval-episodes", type=int, default=50, help="episodes at the last point (and the base)")
    p.add_argument("--trust-k", type=float, default=None, help="residual_trust: else configs/algo/residual.yaml")
    p.add_argument("--gate-init", type=float, default=None, help="residual_trust: else configs/algo/residual.yaml")
    p.add_argument("--gate-rate", type=float, default=None, help="residual_trust: else configs/algo/residual.yaml")
    p.add_argument("--outcome-levels", type=int, default=None, help="residual_outcome: else the YAML")
    p.add_argument("--outcome-episodes", type=int, default=None, help="residual_outcome: else the YAML")
    p.add_argument("--outcome-z", type=float, default=None, help="residual_outcome: else the YAML")
    p.add_argument("--outcome-early-episodes", type=int, default=None, help="residual_outcome: else the YAML")
    p.add_argument("--outcome-margin", type=float, default=None, help="residual_outcome: else the YAML")
    p.add_argument("--outcome-test-every", type=int, default=None, help="residual_outcome: else the YAML")
    p.add_argument("--diag-episodes", type=int, default=10, help="training episodes behind the online diagnostics")
    p.add_argument(
        "--stop-at",
        type=float,
        default=None,
        help="stop a method once two evaluations in a row reach this success rate",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-dir", default=None, help="use this make_weak_base output dir as is (no re-make)")
    p.add_argument("--plot-only", action="store_true", help="redraw the figures from the curves_*.json in --out")
    p.add_argument("--figures", default=None, help="also copy the figures into this directory (docs/figures)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out) / args.task
    out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        return report(out, args)

    if args.base_dir:
        base = json.loads((Path(args.base_dir) / "result.json").read_text())
    else:
        base = make_weak_base(args.task, Path(args.bases) / args.task)
    print(
        f"weak base ({args.task}): success {base['success']:.2f} {base.get('ci')} on its own eval; "
        f"demos {base['store']}",
        flush=True,
    )
    for method in args.methods.split(","):
        print(
            f"== {method}: {args.steps} env steps, UTD {args.utd}, critic {args.critic_hidden} x 10 heads", flush=True
        )
        run = Run(method, args, base, out)
        curves = {
            "task": args.task,
            "method": method,
            "args": vars(args),
            "base": {k: base[k] for k in ("success", "ci", "checkpoint")},
        }
        if method in RESIDUAL:
            curves["algo_config"] = vars(run.algo.cfg)
            base_file = out / "base_eval.json"  # the frozen base on the final point's seeds, once per out dir
            if not base_file.exists():
                tmp = base_file.with_suffix(".tmp")
                tmp.write_text(json.dumps(run.evaluate("base", args.final_eval_episodes), indent=1))
                tmp.replace(base_file)
        else:  # a residual method starts as the base exactly (the band); SAC starts from nothing
            run.evals.append(run.evaluate(method, args.eval_episodes))
        next_eval = args.eval_every
        while run.env_steps < args.steps:
            run.train_episode()
            if run.env_steps >= next_eval or run.env_steps >= args.steps:
                final = run.env_steps >= args.steps
                run.evals.append(run.evaluate(method, args.final_eval_episodes if final else args.eval_episodes))
                next_eval += args.eval_every
                curves |= {"evals": run.evals, "wall": run.wall, "updates": run.updates, "phases": run.phases}
                curves["partial"] = not final  # readable while the run goes on
                _write(out / f"curves_{method}.json", curves)
                last = [e["success"] for e in run.evals[-2:]]
                if args.stop_at is not None and len(last) == 2 and min(last) >= args.stop_at:
                    print(f"  [{method}] reached {args.stop_at:.2f} twice in a row: stopping", flush=True)
                    break
        curves |= {"evals": run.evals, "wall": run.wall, "updates": run.updates, "phases": run.phases}
        curves |= {"train_success": run.train_success, "partial": False}
        _write(out / f"curves_{method}.json", curves)
    return report(out, args)


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def load_curves(out: Path) -> tuple[dict, dict | None]:
    """Every method's curves in `out` (those on the first one's base and evaluation seeds) and the base's eval."""
    curves: dict[str, dict] = {}
    for path in sorted(out.glob("curves_*.json")):
        c = json.loads(path.read_text())
        first = next(iter(curves.values()), c)
        same = c["base"]["checkpoint"] == first["base"]["checkpoint"] and c["args"]["seed"] == first["args"]["seed"]
        if same and c.get("evals"):
            curves[c["method"]] = c
    base_file = out / "base_eval.json"
    return curves, json.loads(base_file.read_text()) if base_file.exists() else None


def report(out: Path, args) -> int:
    curves, base_eval = load_curves(out)
    if not curves:
        print(f"no curves_*.json in {out}")
        return 1
    base = base_eval or {"success": next(iter(curves.values()))["base"]["success"], "ci": [0.0, 1.0], "episodes": 0}
    print(f"\n== result ({args.task}; evaluation seeds {EVAL_SEED}.., matched across methods)")
    print(
        f"  base alone (frozen BC): {base['success']:.2f} [{base['ci'][0]:.2f}, {base['ci'][1]:.2f}] of {base['episodes']}"
    )
    summary = {"base": base, "methods": {}}
    for method, r in curves.items():
        t = targets(r, base)
        summary["methods"][method] = t
        w = r["wall"]
        print(
            f"  {method:15s} "
            + "  ".join(
                f"{e['env_steps'] // 1000}k {e['success']:.2f}" + (f" (gate {g:.2f})" if g is not None else "")
                for e, g in zip(r["evals"], t["gate_at_each_eval"])
            )
            + f"{' (partial)' if r.get('partial') else ''}\n"
            f"  {'':15s} below the base (interval's top < base): {t['evals_whose_interval_is_below_the_base'] or 'none'}"
            f"; first >= 0.90 at {t['env_steps_to_90'] or 'never'}; largest drop after it {t['largest_drop_after_90']:.2f}"
            f"; phases {r.get('phases')}; wall env {w['env']:.0f} s + updates {w['update']:.0f} s + eval "
            f"{w['eval']:.0f} s ({r['updates']} updates)"
        )
    _write(out / "summary.json", summary)
    figures = [plot(curves, base, out / f"residual_{args.task}.png")]
    if any(m in RESIDUAL for m in curves):
        figures.append(plot_diagnostics(curves, out / f"residual_{args.task}_diagnostics.png"))
    for fig in figures:
        if args.figures:
            Path(args.figures).mkdir(parents=True, exist_ok=True)
            (Path(args.figures) / fig.name).write_bytes(fig.read_bytes())
    print(f"curves: {out}/curves_*.json, summary.json; figures: {', '.join(str(f) for f in figures)}")
    return 0


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(curves: dict, base: dict, path: Path) -> Path:
    plt = _plt()
    fig, (ax, gax) = plt.subplots(2, 1, figsize=(7.5, 6.0), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.axhspan(*base["ci"], color="gray", alpha=0.2, label=f"base alone, 95 % interval ({base['episodes']} episodes)")
    ax.axhline(base["success"], ls="--", color="gray")
    for method, r in curves.items():
        x = [e["env_steps"] for e in r["evals"]]
        y = [e["success"] for e in r["evals"]]
        lo = [e["success"] - e["ci"][0] for e in r["evals"]]
        hi = [e["ci"][1] - e["success"] for e in r["evals"]]
        line = ax.errorbar(x, y, yerr=[lo, hi], fmt="o-", capsize=3, label=LABELS.get(method, method))
        gated = [(e["env_steps"], e["diag"]["gate"]) for e in r["evals"] if "diag" in e]
        if gated:  # residual methods: the executed fraction of the bound (1 throughout for ResFiT's update)
            gax.plot(*zip(*gated), "o-", color=line[0].get_color())
    gax.set_ylabel("gate at the eval")
    gax.set_ylim(-0.05, 1.05)
    gax.grid(alpha=0.3)
    gax.set_xlabel("environment steps")
    task = next(iter(curves.values()))["task"]
    a = next(iter(curves.values()))["args"]
    ax.set_ylabel(f"success ({a['eval_episodes']} seeded episodes, {a['final_eval_episodes']} at the end)")
    ax.set_title(f"{task}: weak diffusion base + RL (Wilson 95 % intervals, same seeds)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_diagnostics(curves: dict, path: Path) -> Path:
    """|residual|, the critic's advantage of the executed residual over the base with its head spread, the gate,
    and the critic's over-estimation of the executed actions, per evaluation point."""
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for method, r in curves.items():
        if not method.startswith(RESIDUAL):
            continue
        pts = [e for e in r["evals"] if "diag" in e and "batch_adv_exec" in e["diag"]]
        x = np.array([e["env_steps"] for e in pts])
        d = {k: np.array([e["diag"].get(k, np.nan) for e in pts]) for k in pts[0]["diag"]} if pts else {}
        if not pts:
            continue
        (line,) = axes[0].plot(x, d["online_residual_exec"], "o-", label=f"{method}: executed (training)")
        axes[0].plot(
            x, d["batch_residual_proposed"], "x--", color=line.get_color(), label=f"{method}: proposed (batch)"
        )
        axes[1].plot(x, d["online_adv_exec"], "o-", color=line.get_color(), label=method)
        axes[1].fill_between(
            x,
            d["online_adv_exec"] - d["online_adv_exec_head_std"],
            d["online_adv_exec"] + d["online_adv_exec_head_std"],
            color=line.get_color(),
            alpha=0.2,
        )
        axes[2].plot(x, d["online_overestimation"], "o-", color=line.get_color(), label=method)
        axes[3].plot(x, d["gate"], "o-", color=line.get_color(), label=f"{method}: gate")
        if "critic_calibration" in d:  # (runs before the calibration existed lack it)
            axes[3].plot(x, d["critic_calibration"], "x--", color=line.get_color(), label=f"{method}: corr(Q, G) demos")
        for ax in axes:
            for k, v in (r.get("phases") or {}).items():
                ax.axvline(v, color=line.get_color(), ls=":", alpha=0.5)
    axes[0].set_title("mean |residual| (normalised units)")
    axes[1].set_title("Q(s, b + r_exec) - Q(s, b), online states\n(band: std over heads)")
    axes[2].set_title("Q(s, a_taken) - MC return, online")
    axes[3].set_title("gate (fraction of the bound executed)\nand the critic's calibration on demos")
    for ax in axes:
        ax.set_xlabel("environment steps (dotted: updates / actor start)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
