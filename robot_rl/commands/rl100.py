"""`robot-rl rl100`: RL-100's iterative offline RL on a diffusion policy, gated by OPE; then distil and deploy.

    robot-rl rl100 rl100.policy=<train run> rl100.data=<store> rl100.rounds=3
    robot-rl rl100 hydra.run.dir=<that run>                              # after a crash: continues
    robot-rl rl100 hydra.run.dir=<run> rl100.stage=fit rl100.round=1     # one stage alone

Each round r = 1..N runs three stages, each recorded in `rl100_state.json` when it finishes (atomic replace):

    collect  K episodes of the accepted policy, stochastic chain, into rounds/r<r>/rollouts (an episode store;
             episode meta: round, policy version, policy path). Sim only; on hardware record with `robot-rl
             deploy` and pass the stores in rl100.data with rl100.collect.episodes=0.
    fit      chunk transitions of rl100.data + every round's rollouts over the frozen encoder's features; IQL
             critics and the latent dynamics ensemble -> rounds/r<r>/critics.pt (tmp + rename)
    ppo      PPO over the chain from the accepted policy -> rounds/r<r>/candidate (a policy directory); the gate
             compares AM-Q(candidate) with AM-Q(best) under this round's critics; accepted -> policies/v<n>

then `report` (every candidate: OPE estimate + bootstrap CI under the last round's critics, SharpeRatio@k, in sim
true success beside it and the rank correlation; report/report.json + report.png) and `distill` (the final
accepted policy through `robot-rl distill`'s Distiller into distill/; deploy that with `robot-rl deploy`).
A stage interrupted half way (a crash mid-PPO) is simply run again from its start: its outputs only count once
the state file names it. Algorithm: robot_rl/algos/rl100.py; settings: configs/rl100.yaml; docs/rl100.md.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from robot_rl.algos.iql import IQL
from robot_rl.algos.latent_dynamics import EnsembleDynamics
from robot_rl.algos.ope import sharpe_ratio_at_k, spearman
from robot_rl.algos.rl100 import (
    ChunkPolicy,
    RL100Config,
    best_of_n_sampler,
    check_teacher,
    chunk_shift,
    chunk_transitions,
    fit_critics,
    fit_dynamics,
    gate,
    ope_estimate,
    ppo_over_chain,
    start_states,
    stochastic_sampler,
)
from robot_rl.config import ConfigError, git_hash, resolve_device, write_json
from robot_rl.data.episode_store import EpisodeStore, StoreError
from robot_rl.policies.checkpoint import CheckpointError, copy_policy, find_policy_dir, load_policy, write_policy
from robot_rl.training.loop import seed_everything, store_robot

log = logging.getLogger("robot_rl.commands.rl100")

ROUND_STAGES = ("collect", "fit", "ppo")
STAGES = ("all", *ROUND_STAGES, "report", "distill")
STATE = "rl100_state.json"


class RL100Run:
    """One run directory: its state file, the policies, the rounds' outputs. Every stage is a method."""

    def __init__(self, cfg: DictConfig, run_dir: str | os.PathLike):
        self.cfg, self.c = cfg, cfg.rl100
        self.run_dir = Path(run_dir)
        c = self.c
        if c.stage not in STAGES:
            raise ConfigError(f"rl100.stage must be one of {', '.join(STAGES)}, got {c.stage!r}")
        if not isinstance(c.rounds, int) or c.rounds < 1:
            raise ConfigError(f"rl100.rounds must be an integer >= 1, got {c.rounds!r}")
        try:
            self.algo = RL100Config.from_dict(
                OmegaConf.to_container(c.algo, resolve=True), OmegaConf.to_container(c.iql, resolve=True)
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.device = resolve_device(str(c.device))
        seed_everything(self.algo.seed, c.get("num_threads"))
        self.state = self._load_state()
        self.init_dir = self._init_policy()
        self.stores = self._open_data()
        info = store_robot(self.stores[0])
        manifest = load_policy(self.init_dir, "cpu").manifest
        self.robot = dict(manifest.get("robot") or {}) if (manifest.get("robot") or {}).get("config") else info
        self.fps = manifest.get("fps") or self.stores[0].fps

    # ------------------------------------------------------------------------------------------- state
    def _load_state(self) -> dict:
        import json

        path = self.run_dir / STATE
        if path.exists():
            state = json.loads(path.read_text())
            for key in ("policy", "data"):
                given = self._given(key)
                if given is not None and given != state[key]:
                    raise ConfigError(
                        f"rl100.{key}={given} but this run ({self.run_dir}) was started with {state[key]}: "
                        f"continue it without changing rl100.{key}, or start a new run directory"
                    )
            log.info("continuing %s: finished %s", self.run_dir, ", ".join(state["finished"]) or "nothing yet")
            return state
        for key, what in (("policy", "the BC diffusion policy (train run or checkpoint dir)"), ("data", "a store")):
            if self._given(key) is None:
                raise ConfigError(f"rl100.{key} is not set: give {what}")
        return {
            "policy": self._given("policy"),
            "data": self._given("data"),
            "finished": {},
            "accepted": {"version": 0, "path": "policies/v0"},
            "decisions": [],
            "candidates": [{"name": "bc", "round": 0, "path": "policies/v0", "accepted": True}],
            "git": git_hash(),
        }

    def _given(self, key: str):
        value = self.c.get(key)
        if value is None:
            return None
        if key == "data":
            items = [value] if isinstance(value, str) else list(value)
            return [str(Path(str(v)).expanduser().resolve()) for v in items]
        return str(Path(str(value)).expanduser().resolve())

    def save_state(self) -> None:
        write_json(self.run_dir / STATE, self.state)

    def finish(self, name: str, info: dict) -> None:
        self.state["finished"][name] = {**info, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.save_state()

    def done(self, name: str) -> bool:
        return name in self.state["finished"]

    # ------------------------------------------------------------------------------------------- inputs
    def _init_policy(self) -> Path:
        """policies/v0: a copy of the BC init (checked to be a multi-step diffusion policy)."""
        v0 = self.run_dir / "policies" / "v0"
        if (v0 / "manifest.json").exists():
            return v0
        try:
            src = find_policy_dir(self.state["policy"])
            policy = load_policy(src, "cpu")
        except (CheckpointError, FileNotFoundError) as e:
            raise ConfigError(f"rl100.policy={self.state['policy']}: {e}") from None
        try:
            check_teacher(policy)
        except ValueError as e:
            raise ConfigError(f"rl100.policy={self.state['policy']}: {e}") from None
        tmp = v0.with_name(".v0.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        copy_policy(src, tmp)
        os.replace(tmp, v0)
        self.save_state()
        return v0

    def _open_data(self) -> list[EpisodeStore]:
        stores = []
        for path in self.state["data"]:
            try:
                store = EpisodeStore.open(path)
            except (StoreError, OSError) as e:
                raise ConfigError(f"rl100.data: {e}") from None
            if store.num_episodes == 0:
                raise ConfigError(f"rl100.data: {path} has no episodes")
            stores.append(store)
        return stores

    def rollouts(self, r: int) -> Path:
        return self.run_dir / "rounds" / f"r{r}" / "rollouts"

    def data_for(self, r: int) -> list[EpisodeStore]:
        """rl100.data and the rollouts of rounds 1..r that were collected."""
        extra = [self.rollouts(i) for i in range(1, r + 1) if self.done(f"r{i}/collect") and self.rollouts(i).exists()]
        return self.stores + [EpisodeStore.open(p) for p in extra]

    def load(self, rel: str):
        return load_policy(self.run_dir / rel, self.device)

    # ------------------------------------------------------------------------------------------- stages
    def collect(self, r: int) -> dict:
        """K episodes of the accepted policy (stochastic chain) into rounds/r<r>/rollouts; resumes a partial one."""
        from robot_rl.commands.record import EpisodeRecording, step_features
        from robot_rl.control.pacing import PacedLoop
        from robot_rl.factory import make_robot
        from robot_rl.rollout import Rollout

        k = int(self.c.collect.episodes)
        robot_cfg = self.robot.get("config")
        if k == 0:
            return {"episodes": 0}
        if not robot_cfg or robot_cfg.get("type") != "robosuite":
            raise ConfigError(
                "rl100.collect needs a simulated robot (the store/policy names none): on hardware record the "
                "accepted policy's rollouts with robot-rl deploy, add the store to rl100.data and set "
                "rl100.collect.episodes=0"
            )
        import robot_rl.sim.robosuite_robot  # noqa: F401 - picks MUJOCO_GL before mujoco is first imported

        accepted = self.state["accepted"]
        policy = self.load(accepted["path"])
        actor = ChunkPolicy(policy, stochastic_sampler(policy, self.algo.chain))
        robot = make_robot(robot_cfg)
        robot.connect()
        path = self.rollouts(r)
        try:
            has_sim = hasattr(robot, "get_sim_state")
            if (path / "meta.json").exists():
                store = EpisodeStore.open(path, "a")
                store.drop_pending()  # a crash mid-episode: that episode is collected again
            else:
                shutil.rmtree(path, ignore_errors=True)
                store = EpisodeStore.create(
                    path, step_features(robot, False, has_sim), self.fps, info={**self.stores[0].meta.get("info", {})}
                )
            rec = EpisodeRecording(store.writer(), robot, PacedLoop(1e6), with_policy=False)
            rollout = Rollout(robot, actor)
            max_steps = int(self.c.collect.max_steps or robot_cfg.get("horizon") or 200)
            seed0 = int(self.c.collect.seed) + 1000 * r
            while store.num_episodes < k:
                i = store.num_episodes
                obs = rollout.reset(seed0 + i)
                meta = {"seed": seed0 + i, "round": r, "policy_version": accepted["version"],
                        "policy": accepted["path"], "sampler": "chain", "source": "rl100"}  # fmt: skip
                rec.begin(meta, store if has_sim else None)
                res = rollout.episode(obs, max_steps, with_teleop=False, hooks=[rec])
                rec.writer.save({"success": bool(res["success"])})
            summary = store.summary()
            store.close()
        finally:
            robot.disconnect()
        return {"episodes": summary["episodes"], "success_rate": summary["success_rate"], "store": str(path)}

    def transitions(self, r: int):
        policy = self.load("policies/v0")  # the frozen encoder is the BC init's (PPO never changes it)
        try:
            return chunk_transitions(self.data_for(r), policy, self.algo)
        except ValueError as e:
            raise ConfigError(f"rl100.data: {e}") from None

    def fit(self, r: int) -> dict:
        data = self.transitions(r)
        t0 = time.monotonic()
        critics = fit_critics(data, self.algo, self.device, lambda s, m: log.info("round %d IQL %d: %s", r, s, m))
        t_critics = time.monotonic() - t0
        dynamics, dyn_info = fit_dynamics(data, self.algo, self.device)
        out = self.run_dir / "rounds" / f"r{r}"
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "critics.pt.tmp"
        torch.save(
            {"iql": critics.state_dict(), "dynamics": dynamics.state_dict(), "obs_dim": data["obs"].shape[1],
             "action_dim": data["action"].shape[1]}, tmp)  # fmt: skip
        os.replace(tmp, out / "critics.pt")
        return {"transitions": len(data["obs"]), "critics_s": t_critics, "dynamics": dyn_info,
                "success_transitions": int((data["reward"] > 0).sum())}  # fmt: skip

    def load_models(self, r: int) -> tuple[IQL, EnsembleDynamics]:
        saved = torch.load(self.run_dir / "rounds" / f"r{r}" / "critics.pt", map_location=self.device)
        critics = IQL.build(self.algo.iql, saved["obs_dim"], saved["action_dim"], self.device)
        critics.load_state_dict(saved["iql"])
        d = self.algo.dynamics
        dynamics = EnsembleDynamics(saved["obs_dim"], saved["action_dim"], d.members, d.elites, list(d.hidden))
        dynamics.load_state_dict(saved["dynamics"])
        return critics, dynamics.to(self.device).eval()

    def ppo(self, r: int) -> dict:
        if not self.done(f"r{r}/fit"):
            raise ConfigError(f"rl100.stage=ppo for round {r}: its critics are not fitted; run rl100.stage=fit first")
        data = self.transitions(r)
        critics, dynamics = self.load_models(r)
        z0 = start_states(data, self.algo, self.device)
        states = torch.as_tensor(data["obs"], device=self.device)
        best = self.state["accepted"]
        policy = self.load(best["path"])
        est_best = ope_estimate(policy, critics, dynamics, z0, self.algo)
        jsonl = self.run_dir / "rounds" / f"r{r}" / "ppo_log.jsonl"
        jsonl.unlink(missing_ok=True)

        def log_it(it: int, m: dict) -> None:
            import json

            with open(jsonl, "a") as f:
                f.write(json.dumps(m) + "\n")
            if it % 10 == 0 or it == self.algo.ppo.iterations:
                log.info("round %d PPO %d: loss %.4f KL %.3f |r-1| %.4f clip %.3f Q %.4f", r, it, m["loss"], m["kl"],
                         m["ratio_dev"], m["clip_frac"], m["q_mean"])  # fmt: skip

        t0 = time.monotonic()
        bc = self.load("policies/v0")  # the KL anchor is the BC init, whichever policy the round starts from
        history = ppo_over_chain(policy, critics, states, self.algo, log_it, reference=bc)
        ppo_s = time.monotonic() - t0
        est_new = ope_estimate(policy, critics, dynamics, z0, self.algo)
        decision = gate(est_new, est_best, self.algo.gate_delta, self.algo.gate)
        decision["shift_from_bc"] = chunk_shift(policy, bc, z0, self.algo)  # logged, not a criterion
        cand = f"rounds/r{r}/candidate"
        self._write(policy, cand, {"round": r, "from_version": best["version"], "decision": decision})
        version = best["version"]
        if decision["accepted"]:
            version = max(c.get("version") or 0 for c in [best, *self.state["candidates"]]) + 1
            self._write(policy, f"policies/v{version}", {"round": r, "version": version, "decision": decision})
            self.state["accepted"] = {"version": version, "path": f"policies/v{version}"}
        log.info(
            "round %d gate: %s (AM-Q candidate %.4f [%.4f, %.4f] vs best v%d %.4f [%.4f, %.4f], threshold %.4f; "
            "chunks moved %.3f from BC)",
            r, "ACCEPT" if decision["accepted"] else "REJECT, keep the best", est_new["estimate"], *est_new["ci95"],
            best["version"], est_best["estimate"], *est_best["ci95"], decision["threshold"], decision["shift_from_bc"],
        )  # fmt: skip
        self.state["decisions"].append({"round": r, "best_version": best["version"], **decision})
        self.state["candidates"] = [c for c in self.state["candidates"] if c["round"] != r]
        self.state["candidates"].append({"name": f"round{r}", "round": r, "path": cand, "accepted": decision["accepted"],
                                         "version": version if decision["accepted"] else None})  # fmt: skip
        return {"ppo_s": ppo_s, "accepted": decision["accepted"], "final": history[-1] if history else None}

    def _write(self, policy, rel: str, provenance: dict) -> None:
        """A policy directory written under a temporary name and renamed."""
        final = self.run_dir / rel
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write_policy(tmp, policy, robot=self.robot, fps=self.fps,
                     provenance={"source": "rl100", "init": self.state["policy"], "data": self.state["data"],
                                 "git": git_hash(), **provenance})  # fmt: skip
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

    # ------------------------------------------------------------------------------------------- report
    def last_fitted_round(self) -> int | None:
        done = [r for r in range(1, self.c.rounds + 1) if self.done(f"r{r}/fit")]
        return done[-1] if done else None

    def report(self) -> dict:
        """Every candidate: AM-Q with a bootstrap CI under the last round's critics; in sim, true success (same
        seeds) and the rank correlation; SharpeRatio@k over the top-k candidates by estimate."""
        from robot_rl.commands.evaluate import evaluate

        r = self.last_fitted_round()
        if r is None:
            raise ConfigError("rl100.stage=report: no round has fitted critics yet; run the rounds first")
        data = self.transitions(r)
        critics, dynamics = self.load_models(r)
        z0 = start_states(data, self.algo, self.device)
        rep = self.c.report
        robot_cfg = self.robot.get("config") or {}
        sim = robot_cfg.get("type") == "robosuite" and int(rep.eval_episodes) > 0
        rows = []
        for cand in self.state["candidates"]:
            policy = self.load(cand["path"])
            row = {**cand, "ope": ope_estimate(policy, critics, dynamics, z0, self.algo)}
            if sim:
                res = evaluate(policy, robot_cfg, int(rep.eval_episodes), int(rep.eval_seed), rep.eval_max_steps,
                               video_dir=None, video_episodes=0)  # fmt: skip
                row["sim"] = {k: res[k] for k in ("success_rate", "success_ci95", "successes", "episodes")}
                if rep.chain_eval:  # the sampler PPO optimised and collection uses, on the same seeds
                    actor = ChunkPolicy(policy, stochastic_sampler(policy, self.algo.chain))
                    res = evaluate(actor, robot_cfg, int(rep.eval_episodes), int(rep.eval_seed), rep.eval_max_steps,
                                   video_dir=None, video_episodes=0)  # fmt: skip
                    row["sim_chain"] = {k: res[k] for k in ("success_rate", "success_ci95", "successes", "episodes")}
            rows.append(row)
            log.info("report %s: AM-Q %.4f%s%s", cand["name"], row["ope"]["estimate"],
                     f", success {row['sim']['success_rate']:.2f} (DDIM)" if sim else "",
                     f", {row['sim_chain']['success_rate']:.2f} (chain)" if "sim_chain" in row else "")  # fmt: skip
        final = self.state["accepted"]
        if sim and int(rep.best_of_n) > 0:
            policy = self.load(final["path"])
            actor = ChunkPolicy(policy, best_of_n_sampler(policy, critics, int(rep.best_of_n), self.algo.chain.steps))
            res = evaluate(actor, robot_cfg, int(rep.eval_episodes), int(rep.eval_seed), rep.eval_max_steps,
                           video_dir=None, video_episodes=0)  # fmt: skip
            best_of_n = {"n": int(rep.best_of_n), "policy": final["path"],
                         **{k: res[k] for k in ("success_rate", "success_ci95", "successes", "episodes")}}  # fmt: skip
        else:
            best_of_n = None
        est = [row["ope"]["estimate"] for row in rows]
        truth = [row["sim"]["success_rate"] for row in rows] if sim else est
        baseline = truth[0]  # the BC init
        report = {
            "critics_round": r,
            "final": final,
            "candidates": rows,
            "sharpe_ratio_at_k": {k: sharpe_ratio_at_k(est, truth, baseline, k) for k in range(1, len(rows) + 1)},
            "sharpe_from": "sim success" if sim else "OPE estimates (no ground truth outside sim)",
            "rank_correlation": spearman(est, truth) if sim else None,
            "best_of_n": best_of_n,
        }
        out = self.run_dir / "report"
        write_json(out / "report.json", report)
        plot_report(report, out / "report.png")
        return report

    # ------------------------------------------------------------------------------------------- distill
    def distill(self) -> dict:
        """The final accepted policy -> one-step student in distill/ (robot-rl distill's Distiller)."""
        from hydra import compose, initialize_config_module

        from robot_rl.commands.distill import Distiller

        d = self.c.distill
        teacher = self.run_dir / self.state["accepted"]["path"]
        with initialize_config_module("robot_rl.configs", version_base=None):
            cfg = compose("distill", overrides=[
                f"distill.teacher={teacher}", f"distill.data={self.state['data'][0]}", f"distill.steps={int(d.steps)}",
                f"distill.device={self.c.device}", "distill.progress=false", "distill.tensorboard=false",
                f"distill.checkpoint_every={int(d.steps)}", f"distill.eval_episodes={int(d.eval_episodes)}"])  # fmt: skip
        out = self.run_dir / "distill"
        shutil.rmtree(out, ignore_errors=True)  # an interrupted distillation starts over
        dist = Distiller(cfg, out)
        summary = dist.run()
        if int(d.eval_episodes) > 0:
            summary["eval"] = dist.compare_in_sim()
        write_json(out / "distill_summary.json", summary)
        return {"teacher": str(teacher), "checkpoint": summary["checkpoint"], "eval": summary.get("eval")}


def plot_report(report: dict, path: Path) -> None:
    """OPE estimate (95 % bootstrap CI) and, in sim, true success (Wilson 95 %) per candidate; SharpeRatio@k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["candidates"]
    names = [row["name"] + ("" if row["accepted"] else " (rejected)") for row in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    est = np.array([row["ope"]["estimate"] for row in rows])
    ci = np.array([row["ope"]["ci95"] for row in rows])
    ax = axes[0]
    ax.errorbar(x - 0.1, est, yerr=[est - ci[:, 0], ci[:, 1] - est], fmt="o", capsize=4, label="AM-Q (OPE)")
    ax.set_ylabel("AM-Q estimate")
    if rows and "sim" in rows[0]:
        sr = np.array([row["sim"]["success_rate"] for row in rows])
        sci = np.array([row["sim"]["success_ci95"] for row in rows])
        ax2 = ax.twinx()
        ax2.errorbar(x + 0.1, sr, yerr=[sr - sci[:, 0], sci[:, 1] - sr], fmt="s", color="C1", capsize=4,
                     label="sim success")  # fmt: skip
        ax2.set_ylabel("sim success rate", color="C1")
        ax2.set_ylim(0, 1)
        rc = report.get("rank_correlation")
        ax.set_title(f"candidates (Spearman {rc:.2f})" if rc is not None else "candidates")
    ax.set_xticks(x, names, rotation=20)
    ks = sorted(int(k) for k in report["sharpe_ratio_at_k"])
    vals = [report["sharpe_ratio_at_k"][k] for k in ks]
    axes[1].plot(ks, [np.nan if v is None else v for v in vals], "o-")
    axes[1].set_xlabel("k (top-k candidates by OPE estimate)")
    axes[1].set_ylabel("SharpeRatio@k")
    axes[1].set_title(f"risk-return ({report['sharpe_from']})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pending_round(run: RL100Run, stage: str) -> int:
    """rl100.round, or the first round that has not finished `stage`."""
    if run.c.round is not None:
        return int(run.c.round)
    for r in range(1, run.c.rounds + 1):
        if not run.done(f"r{r}/{stage}"):
            return r
    return run.c.rounds


def main(cfg: DictConfig, run_dir: str | os.PathLike) -> int:
    """Entry point of `robot-rl rl100` (the CLI passes hydra's run directory). Returns an exit code."""
    run = RL100Run(cfg, run_dir)
    stage = run.c.stage
    jobs = (
        [(f"r{r}/{s}", getattr(run, s), r) for r in range(1, run.c.rounds + 1) for s in ROUND_STAGES]
        + [("report", run.report, None), ("distill", run.distill, None)]
        if stage == "all"
        else [(f"r{pending_round(run, stage)}/{stage}" if stage in ROUND_STAGES else stage, getattr(run, stage),
               pending_round(run, stage) if stage in ROUND_STAGES else None)]
    )  # fmt: skip
    for name, fn, r in jobs:
        if name == "distill" and not run.c.distill.enabled:
            continue
        if run.done(name) and stage == "all":
            continue
        t0 = time.monotonic()
        log.info("stage %s", name)
        info = fn(r) if r is not None else fn()
        run.finish(name, {"wall_s": time.monotonic() - t0, **(info if isinstance(info, dict) else {})})
    acc = run.state["accepted"]
    print(
        f"rl100: accepted policy v{acc['version']} ({run.run_dir / acc['path']}); decisions: "
        + ", ".join(f"r{d['round']} {'accept' if d['accepted'] else 'reject'}" for d in run.state["decisions"])
        + (f"; deploy: robot-rl deploy deploy.checkpoint={run.run_dir / 'distill'}" if run.done("distill") else ""),
        flush=True,
    )
    return 0
