"""Behavior retrieval: does a few-demo target plus what `robot-rl retrieve` pulls from an unlabelled prior beat the
target alone and the target plus the whole prior?

    python benchmarks/bench_retrieval.py                       # full size (hours on a 2-core CPU)
    python benchmarks/bench_retrieval.py --quick               # the reduced size that fits ~25 min here
    python benchmarks/bench_retrieval.py --only scoring        # 1M prior x 1k target scoring time + peak RSS
    python benchmarks/bench_retrieval.py --quick --prior-mix anchor --per-cell 5   # the anchor's setting (below)

Data (built once, kept in --out/data): a prior store of unlabelled episodes mixing Lift, Stack and PickPlaceCan
from the scripted experts (sim/experts.py) at every quality preset (expert, mediocre, poor) plus failed episodes
(the poor expert whose every grasp fails), `--per-cell` episodes per task and quality; and `--target-demos`
expert demos of `--target-task` from other seeds. The three tasks have different observation keys, so every
episode is stored in one shared observation space: the robot's proprioception (eef position and quaternion,
finger positions and velocities) plus two task slots, `object_pos` (the object the task moves: cube, cubeA, can)
and `goal_pos` (where it should go: 10 cm above the cube's start, cubeB, the can's bin). The labels (task,
quality, success) ride in each episode's metadata; retrieval never reads them, the benchmark scores with them.

Two priors (--prior-mix). cross_task: every task at every quality, `--per-cell` each. anchor (BR's Square setting:
mixed-quality demos of the target task from the same initial states): the target task is "paired", from each of
`--paired-seeds` seeds one expert episode, one fumble (the expert letting go of every grasp) and one failed (the
poor preset doing the same), the other tasks at every quality as distractors; "relevant" is then "target task AND
a successful episode", and a step-level label (the expert's own step, not a drop or a pause) is kept beside the store.

Measured:
1. retrieval precision / recall of the target task's transitions in the prior as δ varies (chance = the task's
   share of the prior), from one `robot-rl retrieve` run (the real command, its cache reused by the second run);
2. success of MLP BC (`robot-rl train`'s Trainer) on target only, target + whole prior (uniform over windows),
   target + whole prior at 50/50 without selection (BR's δ = 0), retrieval BC (target + selection at δ=--delta,
   50/50 per batch) and the oracle selection (target + exactly the relevant transitions, 50/50), --seeds training
   seeds each, every policy evaluated on the same --eval-episodes seeded episodes (seeds 10000..), Wilson 95 %
   intervals per method (pooled over seeds);
3. scoring time and peak RSS for a synthetic 1M-transition prior against 1k target transitions (child process,
   so its RSS is its own), plus embedding time for those 1M transitions through the default-size embedder.

Writes --out/results.json and docs/figures/retrieval_benchmark.png (P/R vs δ, success per method).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EVAL_SEED = 10_000
TASKS = {  # name -> (robosuite env, object key, episode cap in steps)
    "lift": ("Lift", "cube_pos", 150),
    "stack": ("Stack", "cubeA_pos", 250),
    "pick_place_can": ("PickPlaceCan", "Can_pos", 300),
}
QUALITIES = ("expert", "mediocre", "poor", "failed")
# --prior-mix anchor: the target task's prior is "paired" (BR's Square): from each initial state one expert episode
# and two failed attempts, the expert letting go of every grasp (fumble) and the poor preset doing the same (failed)
PAIRED = ("expert", "fumble", "failed")
PROPRIO = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "robot0_gripper_qvel")
SHARED = (*PROPRIO, "object_pos", "goal_pos")
METHODS = ("target", "uniform", "balanced", "retrieval", "retrieval_tq", "oracle")
TASK_SEED = {"lift": 0, "stack": 1, "pick_place_can": 2}


# ------------------------------------------------------------------------------------ shared observation space


class SharedObsRobot:
    """A robosuite task seen through the shared observation space (a `Robot` for Rollout): the raw observation
    stays available to the scripted expert."""

    def __init__(self, task: str):
        from robot_rl.sim.robosuite_robot import RobosuiteRobot

        self.task = task
        env_name, self.object_key, self.max_steps = TASKS[task]
        self.inner = RobosuiteRobot(env_name)
        self.goal = np.zeros(3, np.float32)
        self.raw = None

    # Robot interface (what Rollout uses)
    @property
    def observation_features(self):
        from robot_rl.interfaces import Feature

        return {k: Feature((4,) if k == "robot0_eef_quat" else (2,) if "gripper" in k else (3,)) for k in SHARED}

    @property
    def action_feature(self):
        return self.inner.action_feature

    def connect(self):
        self.inner.connect()

    def disconnect(self):
        self.inner.disconnect()

    def _goal(self, raw) -> np.ndarray:
        if self.task == "lift":
            return np.asarray(raw["cube_pos"], np.float32) + np.array([0, 0, 0.10], np.float32)
        if self.task == "stack":
            return np.asarray(raw["cubeB_pos"], np.float32)
        env = self.inner.env
        return np.asarray(env.target_bin_placements[env.object_id], np.float32)

    def shared(self, raw) -> dict:
        obs = {k: np.asarray(raw[k], np.float32) for k in PROPRIO}
        obs["object_pos"] = np.asarray(raw[self.object_key], np.float32)
        obs["goal_pos"] = self._goal(raw) if self.task == "stack" else self.goal
        return obs

    def reset(self, seed=None):
        self.raw = self.inner.reset(seed=seed)
        self.goal = self._goal(self.raw)
        return self.shared(self.raw)

    def send_action(self, action):
        return self.inner.send_action(action)

    def get_observation(self):
        self.raw = self.inner.get_observation()
        return self.shared(self.raw)

    def is_success(self) -> bool:
        return self.inner.is_success()


def expert_for(robot: SharedObsRobot, quality: str, seed: int):
    from robot_rl.sim.experts import PickPlaceCanExpert, make_expert

    kw = {
        "failed": {"quality": "poor", "failed_grasp": 1.0},
        "fumble": {"quality": "expert", "failed_grasp": 1.0},
    }.get(quality, {"quality": quality})
    if robot.task == "pick_place_can":
        return PickPlaceCanExpert.for_env(robot.inner, seed=seed, **kw)
    return make_expert(TASKS[robot.task][0], seed=seed, **kw)


def perturbed(expert, before: tuple[int, int]) -> bool:
    """Was the expert's last action a failed-grasp drop step or a hesitation pause (not its decision rule's own)?
    `before` = (drop steps left, pause steps left) before the call."""
    return before[0] > 0 or before[1] > 0 or expert._drop_left > 0 or expert._pause_left > 0 or expert.mode == "drop"


def record(store, robot: SharedObsRobot, quality: str, seeds, label: dict, steps_out: list) -> list[bool]:
    """Episodes of one task and quality into `store`: stop 5 steps after success or at the task's cap. Appends one
    flag per step to `steps_out`: the step was the expert's decision rule (not a drop step or a pause)."""
    w, out = store.writer(), []
    expert = expert_for(robot, quality, seed=int(seeds[0]))
    for seed in seeds:
        obs = robot.reset(seed=int(seed))
        expert.reset()
        w.begin({"seed": int(seed)})
        after = 0
        for _ in range(robot.max_steps):
            before = (expert._drop_left, expert._pause_left)
            action = expert.get_action(robot.raw)
            steps_out.append(not perturbed(expert, before))
            w.add({**{f"obs.{k}": v for k, v in obs.items()}, "action": np.asarray(action, np.float32)})
            robot.send_action(action)
            obs = robot.get_observation()
            after = after + 1 if robot.is_success() else 0
            if after > 5:
                break
        success = after > 0
        w.save({**label, "quality": quality, "success": success})
        out.append(success)
    return out


def build_data(args, data: Path) -> dict:
    from robot_rl.data.episode_store import EpisodeStore

    anchor = args.prior_mix == "anchor"
    prior_path = data / ("prior_anchor" if anchor else "prior")
    target_path = data / f"target_{args.target_task}_{args.target_demos}"
    steps_path = prior_path.with_name(prior_path.name + "_steps.npy")  # per-step flags, kept beside the store
    robots = {}

    def robot(task):
        if task not in robots:
            robots[task] = SharedObsRobot(task)
            robots[task].connect()
        return robots[task]

    t0 = time.monotonic()
    stats = {}
    if not (prior_path / "commit.json").exists() or EpisodeStore.open(prior_path).num_episodes == 0:
        feats = {**{f"obs.{k}": f for k, f in robot("lift").observation_features.items()}}
        feats["action"] = robot("lift").action_feature
        store = EpisodeStore.create(
            prior_path, feats, fps=20, info={"note": f"retrieval benchmark prior ({args.prior_mix})"}
        )
        flags: list[bool] = []
        for task in TASKS:
            paired = anchor and task == args.target_task
            for qi, quality in enumerate(PAIRED if paired else QUALITIES):
                if paired:  # every quality from the same initial states
                    seeds = 1000 * (10 * TASK_SEED[task] + 9) + np.arange(args.paired_seeds)
                else:
                    seeds = 1000 * (10 * TASK_SEED[task] + qi) + np.arange(args.per_cell)
                ok = record(store, robot(task), quality, seeds, {"task": task}, flags)
                stats[f"{task}/{quality}"] = float(np.mean(ok))
                print(f"  prior {task:15s} {quality:9s}: {len(ok)} episodes, success {np.mean(ok):.2f}", flush=True)
        store.close()
        np.save(steps_path, np.asarray(flags, bool))
    if not (target_path / "commit.json").exists():
        r = robot(args.target_task)
        feats = {**{f"obs.{k}": f for k, f in r.observation_features.items()}, "action": r.action_feature}
        store = EpisodeStore.create(target_path, feats, fps=20, info={"note": "retrieval benchmark target"})
        seeds = 500_000 + np.arange(args.target_demos)
        record(store, r, "expert", seeds, {"task": args.target_task}, [])
        store.close()
    for r in robots.values():
        r.disconnect()
    return {"prior": prior_path, "target": target_path, "steps": steps_path, "build_s": time.monotonic() - t0,
            "prior_success": stats}  # fmt: skip


# ------------------------------------------------------------------------------------------------- retrieval


def retrieve_cfg(args, prior, target, out: Path, *overrides):
    with initialize_config_module("robot_rl.configs", version_base=None):
        return compose(
            "retrieve",
            overrides=[
                f"retrieve.prior={prior}",
                f"retrieve.target={target}",
                f"retrieve.output={out}",
                f"retrieve.embedder.steps={args.embedder_steps}",
                "retrieve.embedder.progress=false",
                "retrieve.num_threads=1",
                *overrides,
            ],
        )


def precision_recall(scores: np.ndarray, relevant: np.ndarray, deltas) -> list[dict]:
    out = []
    for d in deltas:
        kept = scores >= d
        tp = int((kept & relevant).sum())
        out.append(
            {
                "delta": float(d),
                "kept": int(kept.sum()),
                "precision": tp / max(int(kept.sum()), 1),
                "recall": tp / max(int(relevant.sum()), 1),
            }
        )
    return out


def pr_mask(kept: np.ndarray, relevant: np.ndarray) -> dict:
    tp = int((kept & relevant).sum())
    return {"kept": int(kept.sum()), "precision": tp / max(int(kept.sum()), 1),
            "recall": tp / max(int(relevant.sum()), 1)}  # fmt: skip


def run_retrieval(args, data, out: Path) -> dict:
    from robot_rl.commands.retrieve import retrieve
    from robot_rl.data.episode_store import EpisodeStore
    from robot_rl.data.selection import read_selection, store_fingerprint, write_selection

    prior = EpisodeStore.open(data["prior"])
    t0 = time.monotonic()
    thr = "retrieve.select.rule=threshold"
    all_rep = retrieve(
        retrieve_cfg(args, data["prior"], data["target"], out / "all", thr, "retrieve.select.threshold=0"),
        out / "ret_all",
    )
    first_s = time.monotonic() - t0
    sel, _ = read_selection(out / "all")
    lengths = np.diff(np.concatenate([[0], prior.episode_ends]))
    task = np.repeat([e["task"] for e in prior.episodes], lengths)
    quality = np.repeat([e["quality"] for e in prior.episodes], lengths)
    success = np.repeat([bool(e["success"]) for e in prior.episodes], lengths)
    scores = np.zeros(prior.num_steps, np.float32)
    scores[sel.rows(prior)] = sel.score
    deltas = np.round(np.arange(0.0, 1.0001, 0.05), 2)
    same_task = task == args.target_task
    labels = {"task": same_task}  # hidden labels: which prior transitions the target task wants
    if args.prior_mix == "anchor":  # the target task's good behaviour: successful episodes / the rule's own steps
        labels["good"] = same_task & success
        if Path(data["steps"]).exists():
            labels["good_step"] = same_task & np.load(data["steps"])
    relevant = labels["good" if args.prior_mix == "anchor" else "task"]
    rows = np.flatnonzero(relevant)  # BR's "oracle selection" baseline: exactly the relevant transitions
    ep = np.searchsorted(prior.episode_ends, rows, side="right")
    starts = np.concatenate([[0], prior.episode_ends[:-1]])
    write_selection(out / "oracle", prior, store_fingerprint(prior), ep, rows - starts[ep], np.ones(len(rows)),
                    {"rule": "oracle: the hidden label"})  # fmt: skip
    pr = precision_recall(scores, relevant, deltas)
    t0 = time.monotonic()
    rep = retrieve(
        retrieve_cfg(
            args, data["prior"], data["target"], out / "selection", thr, f"retrieve.select.threshold={args.delta}"
        ),
        out / "ret",
    )
    second_s = time.monotonic() - t0
    # rule=target_quantile (the YAML's q unless --target-quantile): the radius calibrated on the target alone
    q = [] if args.target_quantile is None else [f"retrieve.select.target_quantile={args.target_quantile}"]
    tq_rep = retrieve(
        retrieve_cfg(args, data["prior"], data["target"], out / "selection_tq", "retrieve.select.rule=target_quantile",
                     *q), out / "ret_tq")  # fmt: skip
    tq_sel, _ = read_selection(out / "selection_tq")
    tq_kept = np.zeros(prior.num_steps, bool)
    tq_kept[tq_sel.rows(prior)] = True
    cal = tq_rep["target_calibration"]
    d_lo, d_hi = all_rep["distance_range"]
    tq = {
        "q": cal["q"],
        "radius": cal["radius"],
        "score_equivalent": (d_hi - cal["radius"]) / (d_hi - d_lo),  # the δ this radius amounts to on this prior
        "kept": int(tq_kept.sum()),
        "calibration": cal,
        "by_label": {k: pr_mask(tq_kept, v) for k, v in labels.items()},
        # reported only (a user has no labels): what other q would have kept, from the same distances
        "by_q": {
            qq: {k: pr_mask(d_hi - scores * (d_hi - d_lo) <= rq + 1e-6, v) for k, v in labels.items()}
            for qq, rq in cal["radius_at_q"].items()
        },
        "selection": str(out / "selection_tq"),
    }
    kept = scores >= args.delta
    by_cell, by_cell_tq = {}, {}
    for t in TASKS:
        for qual in PAIRED if args.prior_mix == "anchor" and t == args.target_task else QUALITIES:
            m = (task == t) & (quality == qual)
            by_cell[f"{t}/{qual}"] = {"steps": int(m.sum()), "kept": int((kept & m).sum())}
            by_cell_tq[f"{t}/{qual}"] = {"steps": int(m.sum()), "kept": int((tq_kept & m).sum())}
            if "good_step" in labels and t == args.target_task:  # the expert's own steps vs drop / pause steps
                own = np.load(data["steps"])
                for kind, mk in (("own", m & own), ("drop_or_pause", m & ~own)):
                    by_cell[f"{t}/{qual}"][kind] = {"steps": int(mk.sum()), "kept": int((kept & mk).sum()),
                                                    "median_score": float(np.median(scores[mk])) if mk.any() else None}  # fmt: skip
                    by_cell_tq[f"{t}/{qual}"][kind] = {"steps": int(mk.sum()), "kept": int((tq_kept & mk).sum())}
    tq["kept_by_task_quality"] = by_cell_tq
    return {
        "relevant": "good" if args.prior_mix == "anchor" else "task",
        "chance_precision": float(relevant.mean()),
        "pr_curve": pr,
        "pr_by_label": {
            k: {"chance": float(v.mean()), "curve": precision_recall(scores, v, deltas)} for k, v in labels.items()
        },  # fmt: skip
        "at_delta": precision_recall(scores, relevant, [args.delta])[0],
        "at_delta_by_label": {k: precision_recall(scores, v, [args.delta])[0] for k, v in labels.items()},
        "kept_by_task_quality": by_cell,
        "target_quantile": tq,
        "first_run_s": first_s,
        "second_run_s": second_s,
        "second_run_reused_cache": rep["embedder"]["reused"],
        "embedder": all_rep["embedder"],
        "score_s": rep["timing_s"]["score"],
        "fingerprint_s": rep["timing_s"]["fingerprint"],
        "selection": str(out / "selection"),
        "all": str(out / "all"),
        "oracle": str(out / "oracle"),
        "scores_hist": np.histogram(scores, bins=20, range=(0, 1))[0].tolist(),
    }


# ------------------------------------------------------------------------------------------------------ BC


def train_bc(args, data_list, weights, run_dir: Path, seed: int):
    from robot_rl.commands.train import Trainer

    over = [
        f"train.data=[{','.join(str(d) for d in data_list)}]",
        "policy=mlp",
        f"policy.hidden=[{','.join(map(str, args.hidden))}]",
        f"train.steps={args.bc_steps}",
        f"train.batch_size={args.batch_size}",
        f"train.lr={args.lr}",
        "train.warmup_steps=100",
        "train.weight_decay=0.0",
        f"train.seed={seed}",
        "train.num_threads=1",
        "train.progress=false",
        "train.tensorboard=false",
        f"train.checkpoint_every={args.bc_steps}",
        "train.val_ratio=0.0",
    ]
    if weights is not None:
        over.append(f"train.weights=[{','.join(map(str, weights))}]")
    with initialize_config_module("robot_rl.configs", version_base=None):
        cfg = compose("train", overrides=over)
    tr = Trainer(cfg, run_dir)
    tr.run()
    return tr.model


def evaluate_policy(policy, task: str, episodes: int, seed: int = EVAL_SEED) -> list[bool]:
    from robot_rl.rollout import Rollout

    robot = SharedObsRobot(task)
    robot.connect()
    policy.eval()
    try:
        res = Rollout(robot, policy).run_episodes(episodes, seed, robot.max_steps)
    finally:
        robot.disconnect()
    return [bool(r["success"]) for r in res]


def pool(a: dict, b: dict, episodes: int) -> dict:
    """BC results of two runs merged per method: the training seeds of both (same evaluation episodes), one Wilson
    interval over all of them (a seed run twice counts once, the later run's)."""
    from robot_rl.commands.evaluate import wilson_interval

    out = dict(a)
    for name, res in b.items():
        seeds = {s["seed"]: s for s in a.get(name, {}).get("per_seed", [])}
        seeds.update({s["seed"]: s for s in res["per_seed"]})
        per_seed = [seeds[k] for k in sorted(seeds)]
        k, n = sum(s["successes"] for s in per_seed), len(per_seed) * episodes
        out[name] = {"success_rate": k / n, "ci95": list(wilson_interval(k, n)), "n": n, "per_seed": per_seed}
    return out


def run_bc(args, data, retrieval, out: Path, partial=None) -> dict:
    """Train and evaluate each method on --seeds seeds; `partial(results)` after each method (kept on disk)."""
    from robot_rl.commands.evaluate import wilson_interval

    methods = {  # id (for --methods) -> (label, datasets, mixing weights)
        "target": ("target only", [data["target"]], None),
        "uniform": ("target + whole prior (uniform)", [data["target"], data["prior"]], None),
        "balanced": ("target + whole prior (50/50, no selection)", [data["target"], retrieval["all"]], [0.5, 0.5]),
        "retrieval": (f"retrieval BC (δ={args.delta}, 50/50)", [data["target"], retrieval["selection"]], [0.5, 0.5]),
        "oracle": ("oracle selection (hidden label), 50/50", [data["target"], retrieval["oracle"]], [0.5, 0.5]),
        "retrieval_tq": (
            f"retrieval BC (target_quantile q={retrieval['target_quantile']['q']:g}, 50/50)",
            [data["target"], retrieval["target_quantile"]["selection"]],
            [0.5, 0.5],
        ),
    }
    results = {}
    for method in args.methods:
        name, datasets, weights = methods[method]
        per_seed = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            t0 = time.monotonic()
            policy = train_bc(args, datasets, weights, out / "bc" / f"{method}_{seed}", seed)
            t1 = time.monotonic()
            ok = evaluate_policy(policy, args.target_task, args.eval_episodes, args.eval_seed)
            per_seed.append(
                {"seed": seed, "successes": int(sum(ok)), "train_s": t1 - t0, "eval_s": time.monotonic() - t1}
            )
            s = per_seed[-1]
            print(f"  {name:40s} seed {seed}: {sum(ok)}/{len(ok)} (train {s['train_s']:.0f} s, eval {s['eval_s']:.0f} s)",
                  flush=True)  # fmt: skip
        k = sum(s["successes"] for s in per_seed)
        n = args.seeds * args.eval_episodes
        results[name] = {"success_rate": k / n, "ci95": list(wilson_interval(k, n)), "n": n, "per_seed": per_seed}
        if partial is not None:
            partial(results)
    return results


# -------------------------------------------------------------------------------------------------- scoring


def scoring_child(n_prior: int, n_target: int, chunk: int) -> None:
    """In a child process: embed a synthetic prior with the default-size embedder, score it; print JSON."""
    from robot_rl.algos.retrieval import RetrievalConfig, StateActionVAE, embed_blocks, nearest_distance
    from robot_rl.interfaces import Feature

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    with initialize_config_module("robot_rl.configs", version_base=None):
        cfg = compose("retrieve")
    algo = RetrievalConfig.from_sections(cfg.retrieve.embedder, cfg.retrieve.select)
    rng = np.random.default_rng(0)
    dims = {"obs.robot0_eef_pos": 3, "obs.robot0_eef_quat": 4, "obs.robot0_gripper_qpos": 2,
            "obs.robot0_gripper_qvel": 2, "obs.object_pos": 3, "obs.goal_pos": 3}  # fmt: skip
    vae = StateActionVAE({k: Feature((d,)) for k, d in dims.items()}, Feature((7,)), algo).eval()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    prior = {k: rng.normal(size=(n_prior, d)).astype(np.float32) for k, d in dims.items()}
    prior["action"] = rng.uniform(-1, 1, size=(n_prior, 7)).astype(np.float32)
    target = {k: v[:n_target] + 0.01 for k, v in prior.items()}
    t0 = time.monotonic()
    pe = embed_blocks(vae, [prior], torch.device("cpu"), 4096)
    embed_s = time.monotonic() - t0
    te = embed_blocks(vae, [target], torch.device("cpu"), 4096)
    del prior
    t0 = time.monotonic()
    d = nearest_distance(pe, te, chunk, torch.device("cpu"))
    score_s = time.monotonic() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"prior": n_prior, "target": n_target, "dim": int(pe.shape[1]), "chunk": chunk,
                      "embed_s": embed_s, "score_s": score_s, "embed_plus_score_s": embed_s + score_s,
                      "peak_rss_gb": rss, "rss_after_imports_gb": rss0, "mean_d": float(d.mean()),
                      "threads": torch.get_num_threads()}))  # fmt: skip


def run_scoring(args) -> dict:
    env = dict(os.environ, BENCH_THREADS=str(args.scoring_threads))
    cmd = [sys.executable, __file__, "--scoring-child", str(args.scoring_prior), str(args.scoring_target)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["met_60s"] = out["score_s"] <= 60
    out["met_60s_with_embedding"] = out["embed_plus_score_s"] <= 60
    out["met_4gb"] = out["peak_rss_gb"] <= 4
    return out


# ---------------------------------------------------------------------------------------------------- figure


def plot(results: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    r = results.get("retrieval")
    if r:
        ax = axes[0]
        names = {"task": f"same task ({args.target_task})", "good": "same task, successful episode",
                 "good_step": "same task, expert's own step"}  # fmt: skip
        curves = r.get("pr_by_label") or {"task": {"chance": r["chance_precision"], "curve": r["pr_curve"]}}
        if args.prior_mix == "anchor":
            curves = {k: v for k, v in curves.items() if k != "task"}
        for (label, c), color in zip(curves.items(), ("tab:blue", "tab:green", "tab:purple")):
            pr, tag = c["curve"], names[label]
            ax.plot(
                [p["delta"] for p in pr], [p["precision"] for p in pr], "o-", color=color, label=f"precision: {tag}"
            )
            ax.plot([p["delta"] for p in pr], [p["recall"] for p in pr], "s--", color=color, label=f"recall: {tag}")
            ax.axhline(c["chance"], color=color, ls=":", lw=1, label=f"chance precision {c['chance']:.2f}")
        used = sorted({float(m.group(1)) for n in results.get("bc", {}) if (m := re.search(r"δ=([0-9.]+)", n))})
        for d in used:  # only the δ that retrieval BC was run at
            ax.axvline(d, color="k", ls="--", lw=1)
        if r.get("target_quantile"):  # where the calibrated radius lands on this prior's δ axis
            tq = r["target_quantile"]
            ax.axvline(tq["score_equivalent"], color="tab:purple", ls="-.", lw=1.2,
                       label=f"target_quantile q={tq['q']:g}: radius {tq['radius']:.2f} (≡ δ {tq['score_equivalent']:.3f})")  # fmt: skip
        if used:
            ax.plot([], [], "k--", lw=1, label=f"δ of retrieval BC ({', '.join(f'{d:g}' for d in used)})")
        ax.set(xlabel="δ (score threshold)", ylabel="fraction", ylim=(0, 1.05))
        ax.set_title(f"retrieving {args.target_task} from the {args.prior_mix} prior", fontsize=10)
        ax.legend(fontsize=7)
    b = results.get("bc")
    if b:  # retrieval BC's success against δ; the two baselines as bands (all Wilson 95 %, same episodes)
        ax = axes[1]
        pts = sorted((float(m.group(1)), v) for n, v in b.items() if (m := re.search(r"δ=([0-9.]+)", n)))
        if pts:
            x = [d for d, _ in pts]
            y = [v["success_rate"] for _, v in pts]
            err = [
                [v["success_rate"] - v["ci95"][0] for _, v in pts],
                [v["ci95"][1] - v["success_rate"] for _, v in pts],
            ]
            ax.errorbar(x, y, yerr=err, fmt="o-", color="tab:blue", capsize=5, label="retrieval BC (50/50)")
            fixed_rule = any(n.startswith("retrieval BC (target_quantile") for n in b)
            for d, v in pts:  # the δ fixed before the run (--delta) vs the points of a later sweep
                tag = "min-max δ" if fixed_rule else "chosen in advance" if abs(d - args.delta) < 1e-9 else "sweep"
                ax.annotate(f"{tag}, n={v['n']}", (d, v["ci95"][1]), textcoords="offset points", xytext=(0, 4),
                            ha="center", fontsize=7)  # fmt: skip
        bands = (("target only", "0.4"), ("target + whole prior (uniform)", "tab:orange"),
                 ("target + whole prior (50/50, no selection)", "tab:red"),
                 ("oracle selection (hidden label), 50/50", "tab:green"))  # fmt: skip
        tq = (r or {}).get("target_quantile")
        for n in [n for n in b if n.startswith("retrieval BC (target_quantile")]:  # at the δ its radius amounts to
            v = b[n]
            x = tq["score_equivalent"] if tq else 1.0
            ax.errorbar([x], [v["success_rate"]], yerr=[[v["success_rate"] - v["ci95"][0]], [v["ci95"][1] - v["success_rate"]]],
                        fmt="D", color="tab:purple", capsize=5, label=f"{n} {v['success_rate']:.2f} (fixed in advance)")  # fmt: skip
        for n, color in bands:
            if n in b:
                lo, hi = b[n]["ci95"]
                ax.axhline(b[n]["success_rate"], color=color, lw=1.5, label=f"{n} {b[n]['success_rate']:.2f}")
                ax.axhspan(lo, hi, color=color, alpha=0.15)
        ax.set(xlabel="δ of the retrieval (min-max score)", ylabel="success (Wilson 95 %)", ylim=(0, 1.05))
        n, seeds = next(iter(b.values()))["n"], len(next(iter(b.values()))["per_seed"])
        ax.set_title(
            f"MLP BC on {args.target_task} ({args.prior_mix} prior): {seeds} seeds x {args.eval_episodes} "
            f"episodes (n={n})",
            fontsize=10,
        )
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--scoring-child":
        scoring_child(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 32768)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the reduced size that fits ~25 min on a shared 2-core CPU")
    p.add_argument("--only", choices=["retrieval", "bc", "scoring"], action="append")
    p.add_argument("--target-task", default="stack", choices=list(TASKS))
    p.add_argument("--target-demos", type=int, default=10)
    p.add_argument("--prior-mix", choices=["cross_task", "anchor"], default="cross_task",
                   help="cross_task: every task at every quality; anchor: the target task paired (expert, fumble, "
                   "failed from the same seeds), the other tasks as distractors (docs/behavior_retrieval.md)")  # fmt: skip
    p.add_argument("--per-cell", type=int, default=25, help="prior episodes per task x quality (12 cells)")
    p.add_argument("--paired-seeds", type=int, default=20, help="--prior-mix anchor: initial states of the target task")
    p.add_argument("--delta", type=float, default=0.8)
    p.add_argument("--target-quantile", type=float, default=None,
                   help="q of rule=target_quantile (method retrieval_tq); default: configs/retrieve.yaml")  # fmt: skip
    p.add_argument("--embedder-steps", type=int, default=20000)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--eval-episodes", type=int, default=50)
    p.add_argument("--first-seed", type=int, default=0, help="training seeds first_seed .. first_seed + seeds - 1")
    p.add_argument("--eval-seed", type=int, default=EVAL_SEED, help="evaluation episode i resets with eval_seed + i")
    p.add_argument("--bc-steps", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="BC methods to run; results already in --out/results.json are kept (other seeds pooled)")  # fmt: skip
    p.add_argument("--scoring-prior", type=int, default=1_000_000)
    p.add_argument("--scoring-target", type=int, default=1000)
    p.add_argument("--scoring-threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="default outputs/bench_retrieval[_anchor]")
    p.add_argument("--data", type=Path, default=None, help="where the prior/target stores are built (default out/data)")
    p.add_argument(
        "--figure",
        type=Path,
        default=None,
        help="default docs/figures/retrieval_benchmark.png (cross_task) / retrieval_anchor.png (anchor)",
    )
    p.add_argument(
        "--merge",
        type=Path,
        nargs="*",
        default=[],
        help="results.json files of parallel runs (other --out, same --data): their BC results are merged",
    )
    args = p.parse_args()
    anchor = args.prior_mix == "anchor"
    args.out = args.out or REPO / "outputs" / ("bench_retrieval_anchor" if anchor else "bench_retrieval")
    args.figure = args.figure or REPO / "docs" / "figures" / (
        "retrieval_anchor.png" if anchor else "retrieval_benchmark.png"
    )
    if args.quick:
        for k, v in {"target_demos": 5, "per_cell": 10, "embedder_steps": 3000, "seeds": 3, "eval_episodes": 20,
                     "bc_steps": 3000}.items():  # fmt: skip
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    only = set(args.only or ["retrieval", "bc", "scoring"])
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    results: dict = {"args": json.loads(json.dumps(vars(args), default=str))}
    earlier = json.loads((args.out / "results.json").read_text()) if (args.out / "results.json").exists() else {}
    for other in args.merge:
        earlier["bc"] = pool(earlier.get("bc", {}), json.loads(other.read_text()).get("bc", {}), args.eval_episodes)
    t_start = time.monotonic()
    if only & {"retrieval", "bc"}:
        print("building data ...", flush=True)
        data = build_data(args, args.data or args.out / "data")
        results["data"] = {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}
        print("retrieval ...", flush=True)
        results["retrieval"] = run_retrieval(args, data, args.out)
        r = results["retrieval"]
        print(
            f"  chance precision {r['chance_precision']:.2f}; at δ={args.delta}: precision "
            f"{r['at_delta']['precision']:.2f}, recall {r['at_delta']['recall']:.2f}, kept {r['at_delta']['kept']}",
            flush=True,
        )
        for label, at in r["at_delta_by_label"].items():
            print(f"  label {label:9s}: chance {r['pr_by_label'][label]['chance']:.3f}, at δ={args.delta} precision "
                  f"{at['precision']:.2f}, recall {at['recall']:.2f}", flush=True)  # fmt: skip
        tq = r["target_quantile"]
        print(f"  target_quantile q={tq['q']:g}: radius {tq['radius']:.4f} (≡ δ {tq['score_equivalent']:.3f}), kept "
              f"{tq['kept']}; " + "; ".join(f"{k} P {v['precision']:.2f} R {v['recall']:.2f}"
                                           for k, v in tq["by_label"].items()), flush=True)  # fmt: skip
        if "bc" not in only and earlier.get("bc"):
            results["bc"] = earlier["bc"]
        if "bc" in only:
            print("BC ...", flush=True)

            def partial(bc):  # methods run in an earlier invocation are kept
                merged = {**results, "bc": pool(earlier.get("bc", {}), bc, args.eval_episodes)}
                (args.out / "results.json").write_text(json.dumps(merged, indent=1, default=float))

            results["bc"] = pool(earlier.get("bc", {}), run_bc(args, data, r, args.out, partial), args.eval_episodes)
    if "scoring" in only:
        print(f"scoring {args.scoring_prior} x {args.scoring_target} ...", flush=True)
        results["scoring"] = run_scoring(args)
        print("  " + json.dumps(results["scoring"]), flush=True)
    results["wall_s"] = time.monotonic() - t_start
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    if "retrieval" in results or "bc" in results:
        plot(results, args.figure, args)
    for name, b in results.get("bc", {}).items():
        print(f"{name:40s} {b['success_rate']:.2f} [{b['ci95'][0]:.2f}, {b['ci95'][1]:.2f}] (n={b['n']})")
    print(f"wall {results['wall_s']:.0f} s -> {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
