"""RLIF vs HG-DAgger (vs RLPD on the sparse task reward) at equal intervention budgets, with a suboptimal operator.

    python benchmarks/bench_rlif.py                                   # full size: Lift + PickPlaceCan, poor + mediocre
    python benchmarks/bench_rlif.py --quick                           # the reduced size (Lift, poor, ~25 min on 2 cores)
    python benchmarks/bench_rlif.py --task lift --experts poor --methods rlif,hgdagger --budget 150 --max-steps 8000

What runs, per (task, acting expert, method), the same seeds for every method: one synchronous loop in this process
with the parts a session uses (MuJoCo robot, safety bounds, `pick_source` takeover switch, the simulated intervener,
the learner's on-disk ReplayBuffer, the registered algorithm classes and the robot-side policies), minus the ZMQ hop:
an episode, then the updates it owes at the configured UTD, weights to the policy every `publish_every` updates.

- Prior data: `--demos` episodes of the scripted expert at quality "poor" (recorded once, `residual_base.record_demos`),
  the same store for every method: RLIF's / RLPD's prior half of each batch, and the weak BC start. `--start shared`
  (default): one MLP is behaviour-cloned `--bc-steps` steps on them (the online-BC learner's policy) and written once
  (`<out>/<task>/bc_start`); HG-DAgger starts from its weights and RLIF's actor from it (`algo.init_policy`: the
  actor's mean action is the MLP's action), so both begin from the same policy on the same evaluation seeds.
  `--start separate`: each fits its own (RLIF: `algo.bc_init_steps`). RLIF then waits `algo.critic_warmup` rows
  before its actor moves. RLPD with the task reward starts from scratch (as released).
- Operator: `SimulatedIntervener`, rule `--strategy` (default `distance`: the released HG-DAgger sampler's rule, the
  policy's action farther than `--threshold` from the judge's starts a `--takeover-steps`-step takeover w.p.
  `--probability`), judged by a *perfect* expert (it knows when the robot goes wrong) while the *acting* expert has
  quality `--experts` (what it does when it takes over is suboptimal): RLIF's "when" vs "what". An entry may add
  knobs to its preset, `poor:hesitation=0.2` (`+` between knobs; sim/experts.py: noise_std, hesitation, failed_grasp), for an acting
  expert clearly below the policy's reach.
- Methods: `rlif` (algo=rlif: reward -1 before each takeover, nothing else), `hgdagger` (algo=online_bc with
  labels=interventions: regress on the takeover steps + the demos), `sac` (algo=sac: RLPD on the task's sparse success
  reward; takeovers go to the demo half). Each runs until it has spent `--budget` takeovers or `--max-steps` env steps.
- Every `--eval-every` env steps: `--eval-episodes` seeded episodes (seeds 10000..) of the policy alone, no
  exploration, no takeover, with the cumulative takeovers spent so far. The acting expert alone is measured on the
  same seeds. Success rates with Wilson 95 % intervals.

Writes results.json and docs/figures/rlif_<task>_<experts>.png (success vs cumulative takeovers; takeover rate vs env steps).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
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
from residual_base import record_demos  # noqa: E402

from robot_rl.algos import algo_config  # noqa: E402
from robot_rl.algos.online_bc import OnlineBC  # noqa: E402
from robot_rl.algos.rlif import RLIF  # noqa: E402
from robot_rl.algos.sac import SAC  # noqa: E402
from robot_rl.control.safety import SafetyFilter  # noqa: E402
from robot_rl.control.takeover import pick_source  # noqa: E402
from robot_rl.data.episode_store import EpisodeStore  # noqa: E402
from robot_rl.factory import make_robot  # noqa: E402
from robot_rl.interfaces import OBS_PREFIX  # noqa: E402
from robot_rl.learner.replay_buffer import ReplayBuffer  # noqa: E402
from robot_rl.policies.checkpoint import load_policy, write_policy  # noqa: E402
from robot_rl.policies.sac import SACModel, SACPolicy  # noqa: E402
from robot_rl.sim.experts import make_expert  # noqa: E402
from robot_rl.sim.intervener import SimulatedIntervener  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EVAL_SEED = 10_000
ENV = {"lift": "Lift", "pick_place_can": "PickPlaceCan"}
LABELS = {"rlif": "RLIF (takeover reward)", "hgdagger": "HG-DAgger (BC on takeovers)", "sac": "RLPD, task reward"}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def robot_for(task: str, horizon: int):
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "robot" / f"{task}.yaml"), resolve=True)
    cfg["horizon"] = horizon
    return make_robot(cfg)


def demo_rows(store_path: Path) -> dict[str, np.ndarray]:
    """The demos as replay rows for HG-DAgger: every step labelled with its own action (the BC data)."""
    s = EpisodeStore.open(store_path, "r")
    cols = {k: s.array(k) for k in s.features if k.startswith(OBS_PREFIX)}
    cols["action"] = s.array("action").astype(np.float32)
    n = len(cols["action"])
    ep, st = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for i in range(s.num_episodes):
        a, b = s.episode_bounds(i)
        ep[a:b], st[a:b] = i, np.arange(b - a)
    s.close()
    return {
        **cols,
        "expert_action": cols["action"],
        "intervention": np.ones(n, bool),
        "reward": np.zeros(n, np.float32),
        "success": np.zeros(n, bool),
        "episode": ep,
        "step": st,
    }


def expert_spec(spec: str) -> tuple[str, dict[str, float]]:
    """`poor` or `poor:hesitation=0.2+failed_grasp=0.6` -> (preset, knobs on top of it)."""
    quality, _, rest = spec.partition(":")
    knobs = {k: float(v) for k, v in (kv.split("=") for kv in rest.split("+") if kv)}
    return quality, knobs


def bc_policy(args, store: Path, out: Path):
    """The weak BC start: the online-BC learner's MLP fitted `--bc-steps` steps on the demos (HG-DAgger's start)."""
    shutil.rmtree(out, ignore_errors=True)
    replay = ReplayBuffer(out / "replay.zarr")
    demos = demo_rows(store)
    replay.append("demos", np.arange(len(demos["step"])), demos)
    cfg = algo_config("online_bc", labels="interventions", min_transitions=1, batch_size=args.batch_size)
    algo = OnlineBC(cfg, {"hidden": args.hidden, "obs_keys": None}, torch.device("cpu"), out)
    assert algo.ready(replay)
    rng = np.random.default_rng(args.seed)
    for _ in range(args.bc_steps):
        algo.update(replay, rng)
    algo.on_publish(replay)
    return algo, replay


def write_bc_start(args, store: Path, out: Path) -> Path:
    """`--start shared`: the BC start, fitted once and written as a policy checkpoint both methods load."""
    torch.manual_seed(args.seed)
    algo, _ = bc_policy(args, store, out / "bc_fit")
    write_policy(out / "bc_start", algo.robot_policy(), provenance={"source": "bench_rlif", "bc_steps": args.bc_steps})
    return out / "bc_start"


class Run:
    """One method with one acting expert: robot + intervener + robot-side policy + learner + replay."""

    def __init__(self, method: str, expert_quality: str, args, store: Path, out: Path):
        self.method, self.args, self.quality = method, args, expert_quality
        self.robot = robot_for(args.task, args.horizon)
        self.robot.connect()
        feat = self.robot.action_feature
        self.safety = SafetyFilter(feat.low, feat.high)
        quality, knobs = expert_spec(expert_quality)
        expert = make_expert(ENV[args.task], quality=quality, seed=args.seed, **knobs)
        self.intervener = SimulatedIntervener(
            expert,
            strategy=args.strategy,
            threshold=args.threshold,
            patience=args.patience,
            min_steps=args.min_steps,
            release_patience=3,
            probability=args.probability,
            takeover_steps=args.takeover_steps,
            seed=args.seed,
            judge="perfect",
        )
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        rundir = out / f"{figure_name(expert_quality)}_{method}"
        # a fresh replay: ReplayBuffer opens an existing store to append (a learner resuming), so a rerun into the
        # same --out started from the earlier run's rows (likely why HG-DAgger started at 0.50 in one run and at
        # 1.00 in another)
        shutil.rmtree(rundir, ignore_errors=True)
        self.replay = ReplayBuffer(rundir / "replay.zarr")
        common = {
            "demos": str(store),
            "critic_hidden": args.hidden,
            "actor_hidden": args.hidden,
            "batch_size": args.batch_size,
            "num_critics": args.num_critics,
        }
        if method in ("rlif", "sac"):
            cls, name = (RLIF, "rlif") if method == "rlif" else (SAC, "sac")
            extra = (
                {"learning_starts": 0}
                if method == "sac"
                else {
                    "bc_init_steps": args.bc_steps,
                    "init_policy": str(args.bc_start or ""),
                    "critic_warmup": args.critic_warmup,
                    **dict(args.rlif),
                }
            )
            self.algo = cls(algo_config(name, **common, **extra), {}, device, rundir)
            model = SACModel(self.robot.observation_features, self.algo.obs_keys, feat.shape[0], common)
            self.policy = SACPolicy(model, seed=args.seed)
            self.utd = args.utd
        else:
            cfg = algo_config("online_bc", labels="interventions", min_transitions=1, batch_size=args.batch_size)
            self.algo = OnlineBC(cfg, {"hidden": args.hidden, "obs_keys": None}, device, rundir)
            demos = demo_rows(store)
            self.replay.append("demos", np.arange(len(demos["step"])), demos)
            self.utd = args.bc_utd
        self.rng = np.random.default_rng(args.seed)
        self.updates = self.env_steps = self.episode = self.takeovers = 0
        self.episodes: list[dict] = []
        self.evals: list[dict] = []
        self.last_scalars: dict[str, float] = {}  # the learner's last update (critic loss, Q mean, penalties ...)
        self.wall = {"env": 0.0, "update": 0.0, "eval": 0.0}
        if method == "hgdagger":  # the weak BC start: the shared one, or pre-train on the demos; then go online
            t0 = time.perf_counter()
            assert self.algo.ready(self.replay)
            if args.bc_start:
                self.algo.policy.load_state_dict(load_policy(args.bc_start, device="cpu").state_dict())
            else:
                for _ in range(args.bc_steps):
                    self.algo.update(self.replay, self.rng)
            self.policy = self.algo.robot_policy()
            self.wall["update"] += time.perf_counter() - t0
        else:
            self.sync()

    def sync(self) -> None:
        if self.method == "hgdagger":
            self.algo.on_publish(self.replay)
            self.policy.load_state_dict(self.algo.policy_state())
            return
        self.policy.load_state_dict(self.algo.policy_state())
        self.policy.apply_meta(self.algo.publish_meta(self.replay))

    def rollout(self, seed: int, evaluating: bool, expert_only: bool = False) -> dict:
        obs = self.robot.reset(seed=seed)
        self.policy.reset()
        self.safety.reset()
        self.intervener.reset()
        rows: dict[str, list] = {}
        success, teleop_steps = False, 0
        exploration = getattr(self.policy, "exploration", None)
        if evaluating and exploration is not None:
            self.policy.exploration = "none"
        for step in range(self.args.horizon):
            label = self.intervener.get_action(obs) if (expert_only or not evaluating) else None
            proposal = None if expert_only else self.policy.select_action(obs)
            if evaluating:
                source, act = ("teleop", label) if expert_only else ("policy", proposal)
            else:
                source, act = pick_source(self.intervener, label, proposal)
            sent, _ = self.safety(act)
            self.robot.send_action(sent)
            nxt = self.robot.get_observation()
            success = bool(self.robot.is_success())
            teleop_steps += source == "teleop"
            if not evaluating:
                row = {OBS_PREFIX + k: np.asarray(v) for k, v in obs.items()}
                row.update(
                    action=np.asarray(sent, np.float32),
                    expert_action=np.asarray(label, np.float32),
                    policy_action=np.asarray(
                        proposal, np.float32
                    ),  # what the policy proposed (the control process's column)
                    intervention=np.bool_(source == "teleop"),
                    reward=np.float32(success),
                    success=np.bool_(success),
                    episode=np.int64(self.episode),
                    step=np.int64(step),
                )
                for k, v in row.items():
                    rows.setdefault(k, []).append(v)
            obs = nxt
            if success:
                break
        if exploration is not None:
            self.policy.exploration = exploration
        return {
            "success": success,
            "steps": step + 1,
            "teleop_steps": teleop_steps,
            "takeovers": self.intervener.n_interventions,
            "rows": rows,
        }

    def train_episode(self) -> None:
        t0 = time.perf_counter()
        r = self.rollout(self.args.seed * 1_000_003 + self.episode, evaluating=False)
        seqs = np.arange(self.env_steps, self.env_steps + r["steps"])
        self.replay.append("robot0", seqs, {k: np.stack(v) for k, v in r.pop("rows").items()})
        self.wall["env"] += time.perf_counter() - t0
        self.env_steps += r["steps"]
        self.takeovers += r["takeovers"]
        self.episodes.append(
            {**r, "episode": self.episode, "env_steps": self.env_steps, "cum_takeovers": self.takeovers}
        )
        self.episode += 1
        t0 = time.perf_counter()
        online = self.algo.trainable_transitions(self.replay)
        if self.method == "hgdagger":
            online = self.env_steps
        owed = int(self.utd * online) - self.updates
        if owed > 0 and self.algo.ready(self.replay):
            for _ in range(owed):
                self.last_scalars = self.algo.update(self.replay, self.rng)
                self.updates += 1
                if self.updates % self.args.publish_every == 0:
                    self.sync()
        self.wall["update"] += time.perf_counter() - t0

    def evaluate(self, expert_only: bool = False) -> dict:
        t0 = time.perf_counter()
        res = [self.rollout(EVAL_SEED + j, True, expert_only) for j in range(self.args.eval_episodes)]
        self.wall["eval"] += time.perf_counter() - t0
        k = sum(r["success"] for r in res)
        row = {
            "env_steps": self.env_steps,
            "takeovers": self.takeovers,
            "updates": self.updates,
            "success": k / len(res),
            "ci": wilson(k, len(res)),
            "mean_steps": float(np.mean([r["steps"] for r in res])),
            "learner": {k: float(v) for k, v in self.last_scalars.items()},
        }
        who = f"{self.quality} expert alone" if expert_only else f"{self.quality} {self.method}"
        print(
            f"  [{who}] after {self.env_steps:6d} env steps, {self.takeovers:4d} takeovers, {self.updates:6d} "
            f"updates: success {row['success']:.2f} [{row['ci'][0]:.2f}, {row['ci'][1]:.2f}] "
            f"(mean length {row['mean_steps']:.0f}); wall {sum(self.wall.values()):.0f} s",
            flush=True,
        )
        return row


def run_one(method: str, quality: str, args, store: Path, out: Path) -> dict:
    run = Run(method, quality, args, store, out)
    run.evals.append(run.evaluate())
    next_eval = args.eval_every
    while run.takeovers < args.budget and run.env_steps < args.max_steps:
        run.train_episode()
        if run.env_steps >= next_eval:
            run.evals.append(run.evaluate())
            next_eval += args.eval_every
    if run.evals[-1]["env_steps"] != run.env_steps:
        run.evals.append(run.evaluate())
    eps = run.episodes
    return {
        "evals": run.evals,
        "episodes": [
            {
                k: e[k]
                for k in ("episode", "env_steps", "steps", "success", "teleop_steps", "takeovers", "cum_takeovers")
            }
            for e in eps
        ],
        "wall": run.wall,
        "updates": run.updates,
        "env_steps": run.env_steps,
        "takeovers": run.takeovers,
    }


def run_job(method: str, quality: str, args, store: Path, out: Path) -> dict:
    """One job in its own process (one torch thread): a method's run, or the expert alone."""
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    if method == "expert":
        return expert_alone(quality, args, store, out)
    print(f"-- {quality} {method}: budget {args.budget} takeovers or {args.max_steps} env steps", flush=True)
    return run_one(method, quality, args, store, out)


def expert_alone(quality: str, args, store: Path, out: Path) -> dict:
    """The acting expert driving every step on the evaluation seeds (its own success rate)."""
    run = Run("hgdagger", quality, args, store, out / "expert_eval")
    return run.evaluate(expert_only=True)


def label(method: str) -> str:
    """A method's legend label: the base method's description + its `--tag` (e.g. `rlif bc_weight=1`)."""
    base = method.split(" ")[0]
    return LABELS.get(base, base) + method[len(base) :]


def figure_name(experts: str) -> str:
    """`poor,poor:hesitation=0.2` style expert lists -> a file-name part (poor_poor-hesitation0.2)."""
    return "_".join(e.replace(":", "-").replace("=", "").replace("+", "-") for e in experts.split(","))


def intervention_rate(episodes: list[dict], window: int) -> tuple[list[int], list[float]]:
    steps = np.array([e["env_steps"] for e in episodes])
    rate = np.array([e["teleop_steps"] / e["steps"] for e in episodes])
    k = min(window, len(rate))
    if k == 0:
        return [], []
    avg = np.convolve(rate, np.ones(k) / k, mode="valid")
    return steps[k - 1 :].tolist(), avg.tolist()


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qualities = list(results["experts"])
    fig, axes = plt.subplots(2, len(qualities), figsize=(6 * len(qualities), 7), squeeze=False)
    for j, q in enumerate(qualities):
        ax, ax2 = axes[0][j], axes[1][j]
        r = results["experts"][q]
        for method, m in r["methods"].items():
            x = [e["takeovers"] for e in m["evals"]]
            y = [e["success"] for e in m["evals"]]
            lo = [e["ci"][0] for e in m["evals"]]
            hi = [e["ci"][1] for e in m["evals"]]
            (line,) = ax.plot(x, y, "o-", label=label(method))
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.12)
            xs, ys = intervention_rate(m["episodes"], results["args"]["rate_window"])
            ax2.plot(xs, ys, label=label(method), color=line.get_color())
        ax.axhline(r["expert_alone"]["success"], ls="--", color="gray", label=f"acting expert alone ({q})")
        ax.set_xlabel("cumulative takeovers (interventions spent)")
        ax.set_ylabel(f"success ({results['args']['eval_episodes']} seeded episodes, policy alone)")
        ax.set_title(f"{results['task']}: acting expert {q}")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax2.set_xlabel("environment steps")
        ax2.set_ylabel(f"takeover steps / episode steps (avg of {results['args']['rate_window']})")
        ax2.set_ylim(-0.02, 1.02)
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="lift,pick_place_can", help="comma list: lift, pick_place_can")
    p.add_argument("--experts", default="poor,mediocre", help="acting expert qualities (sim/experts.py presets)")
    p.add_argument("--methods", default="rlif,hgdagger,sac")
    p.add_argument("--budget", type=int, default=1000, help="takeovers each method may spend")
    p.add_argument("--max-steps", type=int, default=100_000, help="env-step cap per method")
    p.add_argument("--demos", type=int, default=20, help="poor-expert demos: prior data and the weak BC's data")
    p.add_argument("--bc-steps", type=int, default=1000, help="BC pre-training on the demos (HG-DAgger; RLIF's actor)")
    p.add_argument("--start", default="shared", help="shared: one BC MLP both start from | separate: each its own BC")
    p.add_argument("--critic-warmup", type=int, default=1000, help="RLIF: replay rows before the actor moves")
    p.add_argument(
        "--rlif",
        nargs="*",
        default=[],
        type=lambda kv: (kv.split("=")[0], json.loads(kv.split("=", 1)[1])),
        help="more algo=rlif settings, key=json-value (e.g. actor_lr=1e-4 interventions_to_demos=true)",
    )
    p.add_argument("--horizon", type=int, default=200)
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    p.add_argument("--num-critics", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--utd", type=float, default=2.0, help="RLIF/RLPD updates per env step")
    p.add_argument("--bc-utd", type=float, default=1.0, help="HG-DAgger updates per env step")
    p.add_argument("--publish-every", type=int, default=100)
    p.add_argument("--strategy", default="distance", help="intervener rule: distance (k-step takeovers) | deviation")
    p.add_argument("--threshold", type=float, default=0.5, help="intervener: deviation that counts as wrong")
    p.add_argument("--probability", type=float, default=0.95, help="intervener: take over w.p. this when it fires")
    p.add_argument("--takeover-steps", type=int, default=4, help="distance: k, the takeover length (released: 4)")
    p.add_argument("--patience", type=int, default=3, help="deviation: deviating steps before a takeover")
    p.add_argument("--min-steps", type=int, default=10, help="deviation: shortest takeover")
    p.add_argument("--jobs", type=int, default=1, help="methods run in parallel processes")
    p.add_argument("--eval-every", type=int, default=5000)
    p.add_argument("--eval-episodes", type=int, default=50)
    p.add_argument("--rate-window", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/robot_rl_bench/rlif")
    p.add_argument("--figures", default=str(REPO / "docs" / "figures"))
    p.add_argument("--tag", default="", help="appended to the method names in results.json (variants to --merge)")
    p.add_argument("--quick", action="store_true", help="the reduced size (see the module doc)")
    p.add_argument("--merge", nargs="+", default=None, help="results.json files of one task: plot them as one figure")
    args = p.parse_args(argv)
    if args.merge:
        merged: dict = {}
        for path in args.merge:  # later files win for the same (expert, method)
            r = json.loads(Path(path).read_text())
            merged = merged or {**r, "experts": {}}
            for q, e in r["experts"].items():
                m = merged["experts"].setdefault(q, {"methods": {}})
                m["expert_alone"] = e.get("expert_alone", m.get("expert_alone"))
                m["methods"].update(e["methods"])
        fig = Path(args.figures) / f"rlif_{merged['task']}_{figure_name(','.join(merged['experts']))}.png"
        plot(merged, fig)
        print(f"figure {fig}")
        return 0
    if args.quick:  # the task, experts and methods given explicitly are kept
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        args.task = args.task if "--task" in given else "lift"
        args.experts = args.experts if "--experts" in given else "poor"
        args.methods = args.methods if "--methods" in given else "rlif,hgdagger"
        args.budget, args.max_steps, args.eval_every, args.eval_episodes = 600, 6000, 1500, 20
        args.horizon, args.bc_steps = 100, 1000
        args.num_critics, args.utd, args.batch_size, args.jobs = 5, 1.0, 128, 3
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    for task in args.task.split(","):
        out = Path(args.out) / task
        out.mkdir(parents=True, exist_ok=True)
        store = out / "demos"
        record_demos(task, store, args.demos, "poor", args.seed)
        targs = argparse.Namespace(**{**vars(args), "task": task, "bc_start": None})
        if args.start == "shared":
            targs.bc_start = str(write_bc_start(targs, store, out))
        results = {"task": task, "args": vars(targs), "experts": {}}
        jobs = [(q, m) for q in args.experts.split(",") for m in ["expert", *args.methods.split(",")]]
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            futures = {pool.submit(run_job, m, q, targs, store, out): (q, m) for q, m in jobs}
            for fut in concurrent.futures.as_completed(futures):
                q, m = futures[fut]
                r = results["experts"].setdefault(q, {"methods": {}})
                if m == "expert":
                    r["expert_alone"] = fut.result()
                else:
                    r["methods"][m + args.tag] = fut.result()
                (out / "results.json").write_text(json.dumps(results, indent=1))
        for q in results["experts"]:  # methods in the order asked for
            r = results["experts"][q]
            r["methods"] = {m + args.tag: r["methods"][m + args.tag] for m in args.methods.split(",")}
        fig = Path(args.figures) / f"rlif_{task}_{figure_name(args.experts)}.png"
        plot(results, fig)
        print(f"\n== {task}: results {out / 'results.json'}, figure {fig}")
        for q, r in results["experts"].items():
            print(f"  acting expert {q} alone: success {r['expert_alone']['success']:.2f}")
            for method, m in r["methods"].items():
                last, best = m["evals"][-1], max(m["evals"], key=lambda e: e["success"])
                print(
                    f"  {q:8s} {method:9s}: final {last['success']:.2f} [{last['ci'][0]:.2f}, {last['ci'][1]:.2f}] "
                    f"after {last['takeovers']} takeovers / {last['env_steps']} env steps (best {best['success']:.2f} "
                    f"at {best['takeovers']} takeovers); wall env {m['wall']['env']:.0f} s, updates "
                    f"{m['wall']['update']:.0f} s, eval {m['wall']['eval']:.0f} s"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
