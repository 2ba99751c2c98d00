"""RL-100 online (PPO through the denoising chain, algo=rl100_online) from the weak Lift base of the residual
benchmark: success vs env steps, the one-step student at the end, and the robot-side cost of sampling the chain
with log-probs vs plain DDIM.

    python benchmarks/bench_rl100_online.py --steps 50000            # full size: the residual benchmark's budget
    python benchmarks/bench_rl100_online.py --quick                  # what fits ~25 min of a shared 2-core CPU

What runs: the weak chunked diffusion base from `benchmarks/residual_base.py` (cached in --bases, the one
bench_residual_learning.py starts from), then one synchronous loop in this process with the parts a session uses —
MuJoCo robot, SafetyFilter bounds, the robot-side ChainSamplerPolicy (η = 1 chain, extras on the chunk's first
step), the learner's on-disk ReplayBuffer and the RL100Online learner — minus the ZMQ hop: episodes are collected
until a rollout batch of the current version is complete, then one PPO iteration runs and its weights reach the
policy with their version at the next chunk boundary, exactly as over the wire (so nothing is ever stale here).

Every `--eval-every` env steps: `--eval-episodes` seeded episodes (seeds 10000.., as bench_residual_learning.py)
with the sampler the checkpoints deploy (algo.deploy_sampling: the η chain by default) and, unless
--no-eval-chain, the other one (deterministic DDIM); the base is the evaluation at 0 env steps. At the end the final
teacher (carrying its sampler) and the one-step student are written with `write_policy` under --out
(teacher/, student/), loaded back with `load_policy` as `robot-rl eval` would, and evaluated on the same
`--final-eval-episodes` seeds: the teacher with both samplers (its η chain; DDIM η = 0) and the student.
Success rates carry Wilson 95 % intervals. Writes curves.json and a figure
(docs/figures/rl100_online_lift.png with --figure), with the residual curve of a bench_residual_learning.py
curves.json (--residual-curves) on the same axes when given.

Two post-hoc modes (no training): `--student-ab RUN` distils two fresh one-step students from RUN's final teacher
(target: deterministic DDIM vs the deployed η chain's x_0) and evaluates both on the final seeds; `--compare
LABEL=curves.json ...  --figure F` draws several runs side by side (docs/figures/rl100_online_h19c.png).
"""

from __future__ import annotations

import argparse
import contextlib
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
from robot_rl.algos.rl100_online import RL100Online, with_sampler  # noqa: E402
from robot_rl.control.safety import SafetyFilter  # noqa: E402
from robot_rl.factory import make_robot  # noqa: E402
from robot_rl.interfaces import OBS_PREFIX  # noqa: E402
from robot_rl.learner.replay_buffer import ReplayBuffer  # noqa: E402
from robot_rl.policies.chain_sampler import ChainSamplerPolicy  # noqa: E402
from robot_rl.policies.checkpoint import load_policy, write_policy  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EVAL_SEED = 10_000  # bench_residual_learning.py's evaluation seeds


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [float(max(0.0, c - h)), float(min(1.0, c + h))]


def robot_for(task: str):
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / "robot" / f"{task}.yaml"), resolve=True)
    return make_robot(cfg)


class Run:
    """Robot-side chain sampler + RL100Online learner + replay, collecting and updating alternately."""

    def __init__(self, args, base: dict, out: Path):
        self.args = args
        self.robot = robot_for(args.task)
        self.robot.connect()
        feat = self.robot.action_feature
        self.safety = SafetyFilter(feat.low, feat.high)
        settings = {
            "base_checkpoint": base["checkpoint"],
            "batch_chunks": args.batch_chunks,
            "minibatch": args.minibatch,
            "epochs": args.epochs,
            "actor_lr": args.actor_lr,
            "clip": args.clip,
            "std_min": args.std_min,
            "lr_decay_iterations": args.lr_decay_iterations,
            "distill_steps": args.distill_steps,
            "denoise_gamma": args.denoise_gamma,
            "target_kl": args.target_kl,
        }
        if args.distill_target:
            settings["distill_target"] = args.distill_target
        if args.deploy_sampling:
            settings["deploy_sampling"] = args.deploy_sampling
        cfg = algo_config("rl100_online", **settings)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        run_dir = out / "learner"
        run_dir.mkdir(parents=True, exist_ok=True)
        self.algo = RL100Online(cfg, {}, device, run_dir)
        self.policy = RL100Online.build_robot_policy(cfg, {}, self.robot, args.seed)
        self.replay = ReplayBuffer(out / "replay.zarr")
        self.rng = np.random.default_rng(args.seed)
        self.env_steps = self.episode = 0
        self.train_success: list[tuple[int, bool]] = []
        self.evals: list[dict] = []
        self.history: list[dict] = []
        self.wall = {"env": 0.0, "update": 0.0, "eval": 0.0}

    def sync(self) -> None:
        self.policy.load_state_dict(self.algo.policy_state())
        self.policy.apply_meta(self.algo.publish_meta(self.replay))

    def rollout(self, policy, seed: int, record: bool) -> tuple[bool, int, dict]:
        obs = self.robot.reset(seed=seed)
        policy.seed_episode(seed)
        policy.reset()
        self.safety.reset()
        rows: dict[str, list] = {}
        success = False
        for step in range(self.args.horizon):
            proposal = policy.select_action(obs)
            sent, _ = self.safety(proposal)
            self.robot.send_action(sent)
            row = {OBS_PREFIX + k: np.asarray(v) for k, v in obs.items()}
            obs = self.robot.get_observation()
            success = bool(self.robot.is_success())
            if record:
                row.update(
                    {
                        "action": sent.astype(np.float32),
                        "reward": np.float32(success),
                        "success": np.bool_(success),
                        "done": np.bool_(success or step == self.args.horizon - 1),
                        "episode": np.int64(self.episode),
                        "step": np.int64(step),
                    }
                )
                row.update(policy.transition_extras(acted=True))
                for k, v in row.items():
                    rows.setdefault(k, []).append(v)
            if success:
                break
        return success, step + 1, rows

    def train_episode(self) -> None:
        t0 = time.perf_counter()
        success, steps, rows = self.rollout(self.policy, self.args.seed * 1_000_003 + self.episode, record=True)
        seqs = np.arange(self.env_steps, self.env_steps + steps)
        self.replay.append("robot0", seqs, {k: np.stack(v) for k, v in rows.items()})
        self.wall["env"] += time.perf_counter() - t0
        self.env_steps += steps
        self.episode += 1
        self.train_success.append((self.env_steps, success))
        if self.algo.ready(self.replay):
            t0 = time.perf_counter()
            m = self.algo.update(self.replay, self.rng)
            self.wall["update"] += time.perf_counter() - t0
            self.sync()
            self.history.append({"env_steps": self.env_steps, **m})
            print(
                f"  iteration {int(m['ppo/iteration'])}: batch success {m['batch/success']:.2f} "
                f"({int(m['batch/episodes'])} episodes), kl {m['ppo/kl']:.4f}, clip {m['ppo/clip_frac']:.2f}, "
                f"value loss {m['value/loss']:.4f}, distill {m.get('distill/loss', float('nan')):.4f}, "
                f"{m['ppo/iteration_s']:.1f} s",
                flush=True,
            )

    def evaluate(self, policy, label: str, mode: str = "policy", episodes: int | None = None) -> dict:
        """Seeded episodes in evaluation mode `mode`: "ddim" deterministic DDIM, "chain" the η chain PPO trains."""
        t0 = time.perf_counter()
        with policy.evaluating(mode):
            n_eps = episodes or self.args.eval_episodes
            results = [self.rollout(policy, EVAL_SEED + j, record=False) for j in range(n_eps)]
        self.wall["eval"] += time.perf_counter() - t0
        k = int(sum(r[0] for r in results))
        n = len(results)
        row = {
            "mode": label,
            "env_steps": self.env_steps,
            "iterations": self.algo.iteration,
            "success": k / n,
            "ci95": wilson(k, n),
            "mean_steps": float(np.mean([r[1] for r in results])),
            "per_seed": [bool(r[0]) for r in results],
            "wall_s": sum(self.wall.values()),
        }
        print(
            f"  [{label}] eval after {self.env_steps:6d} env steps, {self.algo.iteration:3d} iterations: success "
            f"{row['success']:.2f} [{row['ci95'][0]:.2f}, {row['ci95'][1]:.2f}]; wall {row['wall_s']:.0f} s",
            flush=True,
        )
        return row


class Plain:
    """A plain diffusion policy in the eval loop's shape (`evaluating`, `seed_episode`): the student."""

    def __init__(self, policy):
        self.policy = policy

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def seed_episode(self, seed: int) -> None:
        self.policy.generator = torch.Generator().manual_seed(int(seed))

    def evaluating(self, mode):
        return contextlib.nullcontext()


def latency(policy: ChainSamplerPolicy, replay: ReplayBuffer, n: int = 50) -> dict:
    """Robot-side time of one chunk, median over the same observation windows, side by side in one loop:
    the chain with log-probs (what a training episode runs) vs plain DDIM `predict_chunk` (deployment)."""
    pol = policy.policy
    to = pol.cfg.obs_horizon
    rows = np.linspace(to, replay.size - 1, n).astype(int)
    chain, plain = [], []
    for i, r in enumerate(rows):
        window = {k: torch.as_tensor(replay.column(OBS_PREFIX + k)[r - to + 1 : r + 1])[None] for k in pol.obs_keys}
        for order in (0, 1) if i % 2 else (1, 0):  # alternate which goes first
            t0 = time.perf_counter()
            if order == 0:
                policy.sample(window)
                chain.append(time.perf_counter() - t0)
            else:
                pol.predict_chunk(window, generator=torch.Generator().manual_seed(int(r)))
                plain.append(time.perf_counter() - t0)
    return {
        "chain_logp_ms_p50": float(np.median(chain) * 1e3),
        "ddim_ms_p50": float(np.median(plain) * 1e3),
        "ratio": float(np.median(chain) / np.median(plain)),
        "n": n,
        "threads": torch.get_num_threads(),
    }


def final_evaluation(run: Run, out: Path, episodes: int) -> dict:
    """Write the final teacher (with the sampler its checkpoints deploy) and the student with `write_policy`, load
    them back with `load_policy` (as `robot-rl eval`/`deploy` do) and evaluate each on the same seeded episodes:
    the teacher's η chain, the same weights with deterministic DDIM (η = 0), the one-step student, and the base
    checkpoint with both samplers (the baseline on the same seeds)."""
    prov = {"source": "bench_rl100_online", "teacher_version": run.algo.iteration}
    write_policy(out / "teacher", run.algo.robot_policy(), provenance=prov)
    cfg, steps = run.algo.cfg, run.algo.steps
    teacher_chain = with_sampler(load_policy(out / "teacher", device="cpu"), cfg, steps, "chain")
    teacher_ddim = with_sampler(load_policy(out / "teacher", device="cpu"), cfg, steps, "ddim")
    deployed = load_policy(out / "teacher", device="cpu").cfg
    assert deployed == (teacher_chain if cfg.deploy_sampling == "chain" else teacher_ddim).cfg, "sampler not saved"
    results = {
        f"teacher, eta={teacher_chain.cfg.eta:g} chain ({teacher_chain.cfg.num_inference_steps} steps)": teacher_chain,
        f"teacher, DDIM eta=0 ({teacher_ddim.cfg.num_inference_steps} steps)": teacher_ddim,
    }
    if run.algo.student is not None:
        write_policy(out / "student", run.algo.student.cpu().eval(), provenance={**prov, "distilled": True})
        results["student"] = load_policy(out / "student", device="cpu")
    rows = {name: run.evaluate(Plain(pol.eval()), name, episodes=episodes) for name, pol in results.items()}
    return {**rows, **(evaluate_base(run, episodes) if run.args.final_base else {})}


def student_ab(args) -> int:
    """The student's target compared on one teacher: a finished run's final teacher (written with its deployed
    sampler), two fresh one-step students (distill_init random) trained with RL100Online's own distillation step on
    observation windows of the run's replay, one towards the teacher's deterministic DDIM chunk, one towards the
    deployed η chain's x_0 from the same x_T; both and the teacher's chain evaluated on the same seeds."""
    import dataclasses

    from robot_rl.algos.ensemble import make_adam
    from robot_rl.policies.one_step import make_student, one_step_timestep

    run_dir = Path(args.student_ab) / args.task
    curves = json.loads((run_dir / "curves.json").read_text())
    cfg = algo_config("rl100_online", **{"base_checkpoint": str(run_dir / "teacher"), "std_min": args.std_min})
    algo = RL100Online(cfg, {}, torch.device("cpu"), None)  # the final teacher as its policy
    replay = ReplayBuffer(run_dir / "replay.zarr")
    to, rng = algo.policy.cfg.obs_horizon, np.random.default_rng(args.seed)
    rows = np.flatnonzero(replay.column("step") >= to - 1)
    columns = {k: np.asarray(replay.column(OBS_PREFIX + k)) for k in algo.policy.obs_keys}
    eval_run = Run.__new__(Run)  # the evaluation loop only: robot, safety filter, wall clock
    eval_run.args, eval_run.robot = args, robot_for(args.task)
    eval_run.robot.connect()
    feat = eval_run.robot.action_feature
    eval_run.safety, eval_run.env_steps, eval_run.algo = SafetyFilter(feat.low, feat.high), 0, algo
    eval_run.wall = {"env": 0.0, "update": 0.0, "eval": 0.0}
    results = {}
    for target in ("ddim", "chain"):
        torch.manual_seed(args.seed)
        algo.cfg = dataclasses.replace(cfg, distill_target=target)
        algo.student = make_student(algo.policy, "random").eval().requires_grad_(False)
        algo.student.unet.requires_grad_(True)
        algo.student_opt = make_adam(algo.student.unet.parameters(), lr=cfg.distill_lr)
        algo.t_student = one_step_timestep(algo.student)
        t0, losses = time.perf_counter(), []
        for _ in range(args.ab_steps):
            idx = rng.choice(rows, cfg.distill_batch)[:, None] + np.arange(-to + 1, 1)
            with torch.no_grad():
                cond = algo.policy.encode_obs({k: torch.as_tensor(v[idx]) for k, v in columns.items()})
            losses.append(algo._update_student(cond))
        print(
            f"  student towards {target}: {args.ab_steps} steps, last-50 loss {np.mean(losses[-50:]):.4f}, "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        write_policy(run_dir / f"student_{target}", algo.student.cpu().eval(), provenance={"distill_target": target})
        student = load_policy(run_dir / f"student_{target}", device="cpu")
        row = eval_run.evaluate(Plain(student.eval()), f"student ({target} target)", episodes=args.final_eval_episodes)
        results[target] = {**row, "loss_last50": float(np.mean(losses[-50:])), "steps": args.ab_steps}
    teacher = next((r for n, r in curves["final"].items() if n.startswith("teacher, eta")), None)
    out = {"teacher_chain": teacher, "students": results, "run": str(run_dir)}
    (run_dir / "student_ab.json").write_text(json.dumps(out, indent=1))
    n = args.final_eval_episodes
    if teacher:
        print(f"  teacher (deployed chain): {teacher['success']:.2f} {teacher['ci95']} (n={n}, from the run)")
    for target, row in results.items():
        print(f"  student, {target} target: {row['success']:.2f} [{row['ci95'][0]:.2f}, {row['ci95'][1]:.2f}] (n={n})")
    return 0


def evaluate_checkpoint(args) -> int:
    """One policy on `--final-eval-episodes` seeds from `--eval-seed`: is the benchmark's seed set representative?"""
    import dataclasses

    policy = load_policy(args.eval_checkpoint, device="cpu").eval()
    if args.as_chain:  # the robot's chain: eta 1, sigma >= std_min, the policy's K steps
        policy.cfg = dataclasses.replace(policy.cfg, eta=1.0, std_min=args.std_min, std_max=None)
    robot = robot_for(args.task)
    robot.connect()
    feat = robot.action_feature
    safety = SafetyFilter(feat.low, feat.high)
    wins = 0
    for j in range(args.final_eval_episodes):
        seed = args.eval_seed + j
        obs = robot.reset(seed=seed)
        policy.generator = torch.Generator().manual_seed(seed)
        policy.reset()
        safety.reset()
        for _ in range(args.horizon):
            robot.send_action(safety(policy.select_action(obs))[0])
            obs = robot.get_observation()
            if robot.is_success():
                wins += 1
                break
    n = args.final_eval_episodes
    print(
        f"{args.eval_checkpoint} (eta {policy.cfg.eta:g}), seeds {args.eval_seed}..{args.eval_seed + n - 1}: "
        f"{wins}/{n} = {wins / n:.2f} {[round(x, 2) for x in wilson(wins, n)]}"
    )
    return 0


def evaluate_base(run: Run, episodes: int) -> dict:
    """The base checkpoint (what PPO started from) with the η chain and with deterministic DDIM."""
    cfg, steps = run.algo.cfg, run.algo.steps
    out = {}
    for sampling, name in (("chain", f"base, eta={cfg.eta:g} chain"), ("ddim", "base, DDIM eta=0")):
        pol = with_sampler(load_policy(cfg.base_checkpoint, device="cpu"), cfg, steps, sampling)
        out[name] = run.evaluate(Plain(pol.eval()), name, episodes=episodes)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="lift", choices=["lift", "pick_place_can"])
    p.add_argument("--steps", type=int, default=50_000, help="env-step budget (bench_residual_learning's default)")
    p.add_argument("--quick", action="store_true", help="15k env steps, batches of 100 chunks")
    p.add_argument("--bases", default="/tmp/robot_rl_bench/weak_bases", help="cache of the weak bases")
    p.add_argument("--base-dir", default=None, help="use this make_weak_base output dir as is (no re-make)")
    p.add_argument("--out", default="/tmp/robot_rl_bench/rl100_online")
    p.add_argument("--horizon", type=int, default=200)
    p.add_argument("--batch-chunks", type=int, default=200)
    p.add_argument("--minibatch", type=int, default=50)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--actor-lr", type=float, default=1e-5)
    p.add_argument("--clip", type=float, default=0.2)
    p.add_argument("--std-min", type=float, default=None, help="default: the algo YAML's")
    p.add_argument("--lr-decay-iterations", type=int, default=100)
    p.add_argument("--distill-steps", type=int, default=20)
    p.add_argument("--distill-target", choices=["ddim", "chain"], default=None, help="default: the algo YAML's")
    p.add_argument("--denoise-gamma", type=float, default=1.0, help="DPPO's denoising discount (1 = off)")
    p.add_argument("--target-kl", type=float, default=0.05, help="KL early stop of an iteration's epochs")
    p.add_argument("--eval-every", type=int, default=5000)
    p.add_argument("--eval-episodes", type=int, default=20)
    p.add_argument("--no-eval-chain", dest="eval_chain", action="store_false", help="skip the other sampler's evals")
    p.add_argument("--deploy-sampling", choices=["chain", "ddim"], default=None, help="default: the algo YAML's")
    p.add_argument("--final-eval-episodes", type=int, default=50, help="final teacher (both samplers) + student")
    p.add_argument(
        "--no-final-base",
        dest="final_base",
        action="store_false",
        help="skip the base's final rows (deterministic: the same numbers as any earlier run on the same seeds)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--residual-curves", default=None, help="bench_residual_learning.py curves.json to overlay")
    p.add_argument("--figure", default=None, help="also write the figure here (e.g. docs/figures/...png)")
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="LABEL=CURVES",
        default=None,
        help="only plot: several runs' curves.json side by side into --figure (no training)",
    )
    p.add_argument(
        "--student-ab",
        default=None,
        metavar="RUN",
        help="only distil: two fresh one-step students from a finished run's final teacher (RUN/<task>/teacher) on its "
        "replay's observations, target ddim vs chain, --ab-steps steps each, evaluated on --final-eval-episodes seeds",
    )
    p.add_argument("--ab-steps", type=int, default=500)
    p.add_argument(
        "--eval-checkpoint",
        default=None,
        metavar="POLICY",
        help="only evaluate: a policy dir (its own sampler; with --std-min > 0 and a base, the eta chain) on "
        "--final-eval-episodes seeds from --eval-seed (other seed sets than the benchmark's 10000..)",
    )
    p.add_argument("--eval-seed", type=int, default=EVAL_SEED)
    p.add_argument("--as-chain", action="store_true", help="--eval-checkpoint: sample the eta=1 chain (a base)")
    args = p.parse_args(argv)
    if args.std_min is None:
        args.std_min = algo_config("rl100_online").std_min
    if args.eval_checkpoint:
        torch.set_num_threads(1)
        return evaluate_checkpoint(args)
    if args.student_ab:
        torch.set_num_threads(1)
        return student_ab(args)
    if args.compare:
        runs = {label: json.loads(Path(path).read_text()) for label, path in (c.split("=", 1) for c in args.compare)}
        for label, path in (c.split("=", 1) for c in args.compare):  # a --student-ab result beside it, if any
            ab = Path(path).with_name("student_ab.json")
            if ab.exists():
                runs[label]["student_ab"] = json.loads(ab.read_text())["students"]
        plot_compare(runs, Path(args.figure or "rl100_online_compare.png"))
        return 0
    if args.quick:
        args.steps, args.batch_chunks = min(args.steps, 15_000), 100
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out) / args.task
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    if args.base_dir:
        base = json.loads((Path(args.base_dir) / "result.json").read_text())
    else:
        base = make_weak_base(args.task, Path(args.bases) / args.task)
    print(f"weak base ({args.task}): success {base['success']:.2f} {base.get('ci')} on its own eval", flush=True)
    run = Run(args, base, out)
    curves = {"task": args.task, "args": vars(args), "base": {k: base[k] for k in ("success", "ci", "checkpoint")}}
    chain_evals: list[dict] = []  # the other sampler's evaluations (ddim when the chain is deployed)
    deployed = run.algo.cfg.deploy_sampling
    other = {"chain": "ddim", "ddim": "chain"}[deployed]
    curves["deploy_sampling"] = deployed

    def evaluate() -> None:
        run.evals.append(run.evaluate(run.policy, f"deployed: {deployed}", mode=deployed))
        if args.eval_chain:
            chain_evals.append(run.evaluate(run.policy, f"other: {other}", mode=other))

    evaluate()
    t_start = time.perf_counter()
    next_eval = args.eval_every
    while run.env_steps < args.steps:
        run.train_episode()
        if run.env_steps >= next_eval or run.env_steps >= args.steps:
            evaluate()
            next_eval += args.eval_every
            curves.update(evals=run.evals, chain_evals=chain_evals, history=run.history, partial=True)
            (out / "curves.json").write_text(json.dumps(curves, indent=1))
    curves["final"] = final_evaluation(run, out, args.final_eval_episodes)
    if "student" in curves["final"]:
        curves["student"] = curves["final"]["student"]
    curves["latency"] = latency(run.policy, run.replay)
    hit = next((e["env_steps"] for e in run.evals if e["success"] >= 0.9), None)
    total = time.perf_counter() - t_start
    curves.update(
        evals=run.evals,
        chain_evals=chain_evals,
        history=run.history,
        train_success=run.train_success,
        wall=run.wall,
        env_steps_to_90=hit,
        partial=False,
        iterations_per_s=run.algo.iteration / run.wall["update"] if run.wall["update"] else None,
        total_s=total,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    (out / "curves.json").write_text(json.dumps(curves, indent=1))
    final, best = run.evals[-1], max(run.evals, key=lambda e: e["success"])
    lat = curves["latency"]
    print(f"\n== result ({args.task}, eval seeds {EVAL_SEED}..{EVAL_SEED + args.eval_episodes - 1})")
    print(f"  base ({deployed})  : {run.evals[0]['success']:.2f} {run.evals[0]['ci95']}")
    print(
        f"  rl100_online ({deployed}) final {final['success']:.2f} {final['ci95']} after {final['env_steps']} env steps, "
        f"{run.algo.iteration} iterations (best {best['success']:.2f} at {best['env_steps']}); first >= 0.90 at "
        f"{hit or 'never'}"
    )
    if chain_evals:
        c0, c1 = chain_evals[0], chain_evals[-1]
        print(f"  other sampler ({other}): {c0['success']:.2f} {c0['ci95']} -> {c1['success']:.2f} {c1['ci95']}")
    n_final = args.final_eval_episodes
    print(f"  final checkpoints via load_policy, seeds {EVAL_SEED}..{EVAL_SEED + n_final - 1}:")
    for name, row in curves["final"].items():
        print(f"    {name:28s}: {row['success']:.2f} [{row['ci95'][0]:.2f}, {row['ci95'][1]:.2f}] (n={n_final})")
    print(
        f"  wall env {run.wall['env']:.0f} s + updates {run.wall['update']:.0f} s + eval {run.wall['eval']:.0f} s; "
        f"{curves['iterations_per_s'] or 0:.3f} PPO iterations/s ({curves['device']})"
    )
    print(
        f"  robot-side chunk latency (median, same windows, one loop): chain + log-probs "
        f"{lat['chain_logp_ms_p50']:.1f} ms vs DDIM predict_chunk {lat['ddim_ms_p50']:.1f} ms (x{lat['ratio']:.2f})"
    )
    plot(curves, out / "learning_curve.png", args.residual_curves)
    if args.figure:
        plot(curves, Path(args.figure), args.residual_curves)
    print(f"curves: {out / 'curves.json'}, plot: {out / 'learning_curve.png'}")
    return 0


def plot_compare(runs: dict[str, dict], path: Path) -> None:
    """Several runs on one figure: the deployed sampler's in-loop evaluations (left) and the final checkpoints on
    the 50 shared seeds with Wilson intervals (right: teacher chain, teacher DDIM, student per run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [1, 1.2]})
    for i, (label, c) in enumerate(runs.items()):
        xs = [e["env_steps"] for e in c["evals"]]
        ax.plot(xs, [e["success"] for e in c["evals"]], "o-", color=f"C{i}", label=label)
        ts = c.get("train_success") or []
        if ts:  # training episodes (the eta chain), mean over a 5k-step window
            steps, ok = np.array([t[0] for t in ts]), np.array([t[1] for t in ts], float)
            grid = np.arange(5000, steps[-1] + 1, 2500)
            ax.plot(grid, [ok[(steps > g - 5000) & (steps <= g)].mean() for g in grid], ":", color=f"C{i}", alpha=0.7)
        rows = dict(c.get("final") or {})
        rows.update({f"ab {t}": r for t, r in (c.get("student_ab") or {}).items()})
        keys = ("teacher, eta", "teacher, DDIM", "student", "ab chain", "ab ddim", "base, eta", "base, DDIM")
        for j, key in enumerate(keys):
            row = next((r for n, r in rows.items() if n.startswith(key)), None)
            if row is None:
                continue
            x = j + (i - (len(runs) - 1) / 2) * 0.8 / len(runs)
            err = [[row["success"] - row["ci95"][0]], [row["ci95"][1] - row["success"]]]
            bx.errorbar([x], [row["success"]], yerr=err, fmt="o", color=f"C{i}", capsize=3)
    ax.axhline(0.9, ls="--", color="gray", lw=0.8)
    bx.axhline(0.9, ls="--", color="gray", lw=0.8)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("success (deployed chain, 20 seeds)")
    ax.set_title("evaluations; dotted: training episodes (5k window)", fontsize=9)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    names = [
        "teacher\nchain\n(deployed)",
        "teacher\nDDIM",
        "student\n(online)",
        "student\nfinal,\nchain",
        "student\nfinal,\nDDIM",
    ]
    bx.set_xticks(range(7), names + ["base\nchain", "base\nDDIM"])
    bx.set_ylabel("final success, 50 seeds, Wilson 95 %")
    bx.set_ylim(-0.02, 1.02)
    bx.grid(alpha=0.3, axis="y")
    fig.suptitle("Lift, RL-100 online from the weak base, 30k env steps, one training seed per run")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def plot(curves: dict, path: Path, residual_curves: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [e["env_steps"] for e in curves["evals"]]
    ys = [e["success"] for e in curves["evals"]]
    lo = [e["ci95"][0] for e in curves["evals"]]
    hi = [e["ci95"][1] for e in curves["evals"]]
    deployed = curves.get("deploy_sampling", "ddim")
    names = {"chain": "eta chain (what PPO trains)", "ddim": "deterministic DDIM"}
    ax.plot(xs, ys, "o-", label=f"RL-100 online, deployed sampler: {names[deployed]}")
    ax.fill_between(xs, lo, hi, alpha=0.2)
    if curves.get("chain_evals"):
        ce = curves["chain_evals"]
        ax.plot(
            [e["env_steps"] for e in ce],
            [e["success"] for e in ce],
            "o:",
            color="C1",
            label=f"same weights, {names['ddim' if deployed == 'chain' else 'chain']}",
        )
    finals = [(n, s) for n, s in (curves.get("final") or {}).items() if not n.startswith("base")]
    finals += [(n, s) for n, s in (curves.get("final") or {}).items() if n.startswith("base")]
    end = curves["evals"][-1]["env_steps"]
    for i, (name, s) in enumerate(finals):
        ax.errorbar(
            [end * (1.01 + 0.015 * i) if not name.startswith("base") else end * (0.01 + 0.015 * (i - 3))],
            [s["success"]],
            yerr=[[s["success"] - s["ci95"][0]], [s["ci95"][1] - s["success"]]],
            fmt="sDv"[i % 3],
            color=f"C{3 + i}",
            capsize=3,
            label=f"{'' if name.startswith('base') else 'final '}{name} (n={curves['args']['final_eval_episodes']})",
        )
    if residual_curves and Path(residual_curves).exists():
        r = json.loads(Path(residual_curves).read_text())
        res = r.get("methods", {}).get("residual")
        if res:
            ax.plot(
                [e["env_steps"] for e in res["evals"]],
                [e["success"] for e in res["evals"]],
                "^-",
                color="C2",
                label="base + residual (ResFiT)",
            )
    ax.axhline(curves["evals"][0]["success"], ls="--", color="gray", label=f"base ({names[deployed]})")
    ax.set_xlabel("environment steps")
    ax.set_ylabel(f"success ({curves['args']['eval_episodes']} seeded eval episodes)")
    ax.set_title(f"{curves['task']}: RL-100 online from the weak base")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
