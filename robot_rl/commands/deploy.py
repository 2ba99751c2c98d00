"""`robot-rl deploy`: run a trained policy on a robot (or in sim) at a fixed rate, safely, and measure it.

    robot-rl deploy deploy.checkpoint=outputs/<train run>                    # latest checkpoint of a run
    robot-rl deploy deploy.checkpoint=deploy/lift_v1 deploy.episodes=20      # an exported artefact
    robot-rl deploy deploy.checkpoint=... teleop=spacemouse                  # a human can take over
    robot-rl deploy deploy.checkpoint=... deploy.record_path=data/rollouts   # rollouts become data

Each tick of the rollout loop (robot_rl/rollout.py; PacedLoop, absolute deadlines): observation ->
`runner.observe` -> `runner.action_for(tick)` (an action chunk computed ahead by a background thread, in a child
process by default (deploy.executor), aligned on absolute ticks and blended with the previous one;
robot_rl.policies.chunking) or, if none is valid, the safe action -> optional teleop takeover (`pick_source`) ->
safety filter (bounds, NaN/inf/shape, rate limit) -> `send_action`. See docs/deploy.md.

The robot comes from the checkpoint: the robot config the training data was recorded with (or the artefact's
manifest), unless `robot=...` is given on the command line or `deploy.robot_from_checkpoint=false`.

The run directory gets `summary.json` (achieved rate, overruns, lateness p99, per-chunk inference latency p50/p99,
delay in ticks, starvations, safety events, per-episode success) and `chunks.json` (one row per chunk).
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from robot_rl.commands.record import check_compatible, policy_io  # noqa: F401  (policy_io: deploy's name too)
from robot_rl.config import ConfigError, resolve_device, write_json
from robot_rl.control.pacing import PacedLoop
from robot_rl.control.safety import build_safety
from robot_rl.control.takeover import SOURCES
from robot_rl.control.viz import make_view
from robot_rl.factory import make_robot, make_teleop
from robot_rl.policies.artifact import checkpoint_context
from robot_rl.policies.chunking import BLENDS, AsyncChunkRunner
from robot_rl.policies.inference_process import ProcessPredictor
from robot_rl.rollout import Rollout

log = logging.getLogger("robot_rl.commands.deploy")

SLOW_HINT = "lower deploy.num_inference_steps, use the distilled 1-step policy, or use CUDA"


# ------------------------------------------------------------------------------------------- configuration


def validate_deploy(cfg: DictConfig) -> None:
    d = cfg.deploy
    if not d.get("checkpoint"):
        raise ConfigError(
            "deploy.checkpoint is empty: give a training run directory, a checkpoint directory "
            "(checkpoints/step_<n>) or an artefact directory (robot-rl export-policy)"
        )

    def positive(key: str, integer: bool, allow_null: bool = False, minimum: float = 0.0, strict: bool = True):
        v = d.get(key)
        if v is None and allow_null:
            return
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > minimum if strict else v >= minimum) and (not integer or float(v).is_integer())
        if not ok:
            what = "an integer" if integer else "a number"
            bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
            raise ConfigError(f"deploy.{key} must be {what} {bound}{' or null' if allow_null else ''}, got {v!r}")

    positive("rate_hz", False)
    positive("episodes", True)
    positive("max_episode_steps", True)
    positive("prefetch_margin", True, allow_null=True, strict=False)
    positive("replan_every", True, allow_null=True)
    positive("max_action_age", True, allow_null=True)
    positive("num_inference_steps", True, allow_null=True)
    positive("torch_threads", True, allow_null=True)
    positive("crossfade_steps", True, strict=False)
    if d.blend not in BLENDS:
        raise ConfigError(f"deploy.blend must be one of {', '.join(BLENDS)}, got {d.blend!r}")
    if d.inference not in ("async", "sync"):
        raise ConfigError(f"deploy.inference must be async or sync, got {d.inference!r}")
    if d.executor not in ("thread", "process"):
        raise ConfigError(f"deploy.executor must be thread or process, got {d.executor!r}")
    if not (isinstance(d.ensemble_k, (int, float)) and math.isfinite(d.ensemble_k)):
        raise ConfigError(f"deploy.ensemble_k must be a finite number, got {d.ensemble_k!r}")
    resolve_device(str(d.device))


def load_deploy_policy(checkpoint: str, device: str, version: int | None = None) -> tuple[Any, dict]:
    """(policy in eval mode, what we know about it: kind, path, fps, robot config, sha256...) from any checkpoint
    the one loader reads: a policy/artefact dir, a train/distill/session run dir (newest or `version`)."""
    from robot_rl.policies.checkpoint import CheckpointError, load_policy

    path = Path(str(checkpoint)).expanduser()
    try:
        policy = load_policy(path, resolve_device(str(device)), version)
    except (CheckpointError, FileNotFoundError) as e:
        raise ConfigError(f"deploy.checkpoint={str(checkpoint)!r}: {e}") from None
    m, directory = policy.manifest, policy.checkpoint_dir
    if m.get("legacy"):  # a train checkpoint from before the one format: its context lies next to it
        ctx = checkpoint_context(directory)
        robot = {"config": ctx["robot_config"], "name": ctx["robot"], "task": ctx["task"]}
        m = {**m, "fps": ctx["fps"], "training": {"step": ctx["step"]}, "robot": robot, "weights": {}}
    robot, training = m.get("robot") or {}, m.get("training") or {}
    training_state = ("trainer_state.json", "algo_state.pt", "optimizer.pt", "model.safetensors")
    artifact = not any((directory / f).exists() for f in training_state)  # export-policy leaves training state behind
    return policy, {
        "source": "artifact" if artifact else "checkpoint",
        "kind": m.get("kind"),
        "path": str(directory),
        "fps": m.get("fps"),
        "robot_config": robot.get("config"),
        "robot": robot.get("name"),
        "task": robot.get("task"),
        "sha256": (m.get("weights") or {}).get("sha256"),
        "step": training.get("step"),
        "version": training.get("version"),
    }


def worker_policy(checkpoint: str, device: str, num_inference_steps: int | None = None, version: int | None = None):
    """The policy as the inference process (deploy.executor=process) loads it."""
    policy, _ = load_deploy_policy(checkpoint, device, version)
    if num_inference_steps:
        policy.cfg.num_inference_steps = int(num_inference_steps)
    return policy


def _robot_given_on_command_line() -> bool | None:
    """Whether `robot=...` / `robot.<key>=...` was among hydra's overrides (None outside hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - not running under hydra
        return None
    return any(o.split("=", 1)[0].lstrip("+~").split(".")[0].split("@")[0] == "robot" for o in overrides)


# ------------------------------------------------------------------------------------------------- deployer


class Deployer:
    """`Deployer(cfg, run_dir).run() -> summary`. `policy` (tests, benchmarks) replaces loading the checkpoint;
    `robot_given` says whether the config's robot was chosen explicitly (None: detect hydra overrides)."""

    def __init__(
        self,
        cfg: DictConfig,
        run_dir: str | Path,
        *,
        policy=None,
        policy_info: dict | None = None,
        robot_given: bool | None = None,
    ):
        validate_deploy(cfg)
        self.cfg, self.d = cfg, cfg.deploy
        self.run_dir = Path(run_dir)
        self.videos = None  # mp4s of the first deploy.video_episodes episodes (made once the robot is connected)
        in_child = self.d.inference == "async" and self.d.executor == "process"
        if policy is None:  # with executor=process the child runs inference; our copy only describes the policy
            policy, policy_info = load_deploy_policy(
                self.d.checkpoint, "cpu" if in_child else self.d.device, self.d.get("version")
            )
            if in_child and not hasattr(policy, "predict_chunk"):  # a single-action policy runs here after all
                policy = policy.to(resolve_device(str(self.d.device)))
        self.policy = policy
        self.policy_info = dict(policy_info or {"source": "object", "path": str(self.d.checkpoint)})
        if self.d.num_inference_steps:
            self._set_inference_steps(int(self.d.num_inference_steps))

        # the robot: the one the policy was trained for, unless the user chose one
        if robot_given is None:
            robot_given = bool(_robot_given_on_command_line())
        ckpt_robot = self.policy_info.get("robot_config")
        if ckpt_robot and self.d.robot_from_checkpoint and not robot_given:
            robot_cfg, self.robot_from = dict(ckpt_robot), "checkpoint"
        else:
            robot_cfg = OmegaConf.to_container(cfg.robot, resolve=True)
            self.robot_from = "config"
            if not ckpt_robot and not robot_given:
                log.warning(
                    "%s records no robot config: using robot=%s from the deploy config",
                    self.policy_info.get("path"),
                    robot_cfg.get("env_name", robot_cfg.get("type")),
                )
        if self.d.max_delta is not None:
            robot_cfg.setdefault("safety", {})
            robot_cfg["safety"] = dict(robot_cfg["safety"] or {}, max_delta=self.d.max_delta)
        self.robot_cfg = robot_cfg
        self.robot = make_robot(robot_cfg)
        check_compatible(self.policy, self.robot)
        self.teleop = make_teleop(cfg.teleop, self.robot)
        self.safety = build_safety(OmegaConf.create({"robot": robot_cfg}), self.robot)
        self.loop = PacedLoop(self.d.rate_hz, field="deploy.rate_hz")
        self.rollout = Rollout(
            self.robot,
            act=self._act,
            teleop=self.teleop,
            safety=self.safety,
            pacer=self.loop,
            stop_on_success=bool(self.d.stop_on_success),
            teleop_fills_gaps=False,
        )
        self.executor = "thread"
        self.predictor = None
        if in_child and self.policy_info.get("source") not in ("checkpoint", "artifact"):
            log.info(
                "deploy.executor=process loads the policy from deploy.checkpoint in the child; a policy object "
                "was given, so inference runs on a thread of this process"
            )
        elif in_child and hasattr(self.policy, "predict_chunk"):
            self.predictor = ProcessPredictor(
                "robot_rl.commands.deploy:worker_policy",
                {
                    "checkpoint": self.policy_info["path"],
                    "device": str(self.d.device),
                    "num_inference_steps": self.d.num_inference_steps,
                },
                torch_threads=self.d.torch_threads,
            )
            self.executor = "process"
        try:
            self.runner = AsyncChunkRunner(
                self.predictor or self.policy,
                float(self.d.rate_hz),
                blend=str(self.d.blend),
                ensemble_k=float(self.d.ensemble_k),
                crossfade_steps=int(self.d.crossfade_steps),
                prefetch_margin=self.d.prefetch_margin,
                replan_every=self.d.replan_every,
                max_action_age=self.d.max_action_age,
                synchronous=self.d.inference == "sync",
                seed=int(cfg.seed),
                torch_threads=self.d.torch_threads,
            )
        except ValueError as e:  # e.g. replan_every longer than the chunk
            if self.predictor is not None:
                self.predictor.close()
            raise ConfigError(f"deploy: {e}") from None
        self._check_rates()
        self.task = self.d.task or self.policy_info.get("task") or robot_cfg.get("task") or "unspecified"
        self._stop = False
        self.episodes: list[dict] = []
        self.warnings: list[str] = []
        self.store = None

    def _set_inference_steps(self, n: int) -> None:
        c = getattr(self.policy, "cfg", None)
        if c is None or not hasattr(c, "num_inference_steps"):
            log.warning(
                "deploy.num_inference_steps=%d ignored: %s is not a diffusion policy", n, type(self.policy).__name__
            )
            return
        if not 1 <= n <= c.num_train_timesteps:
            raise ConfigError(f"deploy.num_inference_steps must be in 1..{c.num_train_timesteps}, got {n}")
        if c.inference_scheduler != "ddim":
            log.warning(
                "deploy.num_inference_steps=%d with the %s scheduler: only DDIM skips steps cleanly",
                n,
                c.inference_scheduler,
            )
        c.num_inference_steps = n

    def _check_rates(self) -> None:
        rate = float(self.d.rate_hz)
        fps = self.policy_info.get("fps")
        if fps and abs(float(fps) - rate) > 1e-6:
            log.warning(
                "the policy was trained on data recorded at %g Hz but deploy.rate_hz=%g: its actions are "
                "per-tick deltas/targets at %g Hz",
                fps,
                rate,
                fps,
            )
        freq = self.robot_cfg.get("control_freq")
        if freq and abs(float(freq) - rate) > 1e-6:
            log.warning(
                "robot control_freq=%g but deploy.rate_hz=%g: sim time runs at another speed than the loop", freq, rate
            )

    def request_stop(self, *_):
        if not self._stop:
            log.info("stop requested: finishing the tick and holding the robot")
        self._stop = True

    @property
    def chunk_budget_ms(self) -> float:
        """How long a chunk may take: async, the ticks a chunk is executed (replan_every); sync, one tick."""
        period_ms = 1e3 / float(self.d.rate_hz)
        return period_ms * (self.runner.replan_every if self.runner.chunked else 1)

    # ------------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        from robot_rl.commands.record import connect_devices, disconnect_devices, hold_safe

        main_thread = threading.current_thread() is threading.main_thread()
        old_handlers = {}
        if main_thread:
            for sig in (signal.SIGINT, signal.SIGTERM):
                old_handlers[sig] = signal.signal(sig, self.request_stop)
        connect_devices(self.robot, self.teleop)
        writer = None
        t_start = time.time()
        self.view = make_view(self.d, self.run_dir)  # deploy.viz=rerun: the live view, never on the loop's path
        try:
            self.videos = self._videos()
            has_sim_state = hasattr(self.robot, "get_sim_state")
            if self.d.record_path:
                writer = self._open_store(has_sim_state).writer()
            self.runner.start()
            log.info(
                "deploying %s (%s, %s inference%s) on %s at %g Hz, %d episodes",
                self.policy_info.get("path"),
                type(self.policy).__name__,
                self.d.inference,
                f", blend={self.d.blend}" if self.runner.chunked else "",
                self.robot.name,
                self.d.rate_hz,
                self.d.episodes,
            )
            for episode in range(int(self.d.episodes)):
                if self._stop or self.runner.failed:
                    break
                self.episodes.append(self._run_episode(episode, writer, has_sim_state))
                ep = self.episodes[-1]
                log.info(
                    "episode %d: success=%s steps=%d starvations=%d safe_steps=%d teleop_steps=%d",
                    episode,
                    ep["success"],
                    ep["steps"],
                    ep["starvations"],
                    ep["safe_steps"],
                    ep["teleop_steps"],
                )
        finally:
            self._rollout_safety_counts = dict(self.safety.counts)  # before the final hold below
            hold_safe(self.robot, self.safety)
            self.runner.stop()
            if self.predictor is not None:
                self.predictor.close()
            if self.store is not None:  # closes the writer (an unsaved episode is discarded)
                self.store.close()
            disconnect_devices(self.robot, self.teleop)
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            if self.videos is not None:
                self.videos.close()
            summary = self._summary(time.time() - t_start)
            if self.view is not None:
                summary["viz"] = self.view.close()
            write_json(self.run_dir / "summary.json", summary)
            write_json(self.run_dir / "chunks.json", {"chunks": list(self.runner.chunk_log)})
            for w in summary["warnings"]:
                log.warning("%s", w)
        return summary

    def _videos(self):
        """Like eval's: mp4s of the first deploy.video_episodes episodes, rendered from the sim state."""
        count = min(int(self.d.get("video_episodes") or 0), int(self.d.episodes))
        if count <= 0:
            return None
        from robot_rl.commands.evaluate import _EpisodeVideos

        try:
            return _EpisodeVideos(
                self.robot,
                self.run_dir / "videos",
                count,
                list(self.d.video_cameras),
                int(self.d.video_size),
                fps=float(self.d.rate_hz),
            )
        except ValueError as e:  # not a MuJoCo robot, or a camera the model does not have
            raise ConfigError(f"deploy.video_episodes: {e}") from None

    def _run_episode(self, episode: int, writer, has_sim_state: bool) -> dict:
        from robot_rl.commands.record import EpisodeRecording

        seed = int(self.cfg.seed) + episode
        obs = self.rollout.reset(seed)
        self.runner.reset(seed=seed)
        hooks = [self._replan_after_takeover()]
        if self.view is not None:
            hooks.append(lambda step: self.view.log_step(step, episode))
        if self.videos is not None:
            self.videos.start(episode)
            hooks.append(self.videos.step)
        if writer is not None:
            meta = {
                "task": self.task,
                "robot": self.robot.name,
                "seed": seed,
                "source": "deploy",
                "policy": self.policy_info.get("path"),
                "policy_sha256": self.policy_info.get("sha256"),
                "start_time": time.time(),
            }
            hooks.append(EpisodeRecording(writer, self.robot, self.loop, with_policy=True))
            hooks[-1].begin(meta, self.store if has_sim_state else None)
        r = self.runner
        starv0, chunks0, reserve0 = r.starvations, r.chunks, r.reserve_ticks
        overruns0, missed0 = self.loop.overruns, self.loop.missed_slots
        if self.d.prime:
            r.prime(obs, tick=0)
            if episode == 0:
                self._early_latency_check()
        result = self.rollout.episode(
            obs,
            int(self.d.max_episode_steps),
            hooks=hooks,
            before_step=lambda step, obs: "stopped" if self._stop or r.failed else None,
            keep_pacing_stats=episode > 0,
        )  # resets are not overruns
        ep = {
            "episode": episode,
            "seed": seed,
            "success": result["success"],
            "steps": result["steps"],
            "policy_steps": result["policy_steps"],
            "teleop_steps": result["teleop_steps"],
            "safe_steps": result["safe_steps"],
            "starvations": r.starvations - starv0,
            "reserve_ticks": r.reserve_ticks - reserve0,
            "chunks": r.chunks - chunks0,
            "overruns": self.loop.overruns - overruns0,
            "missed_slots": self.loop.missed_slots - missed0,
            "duration_s": result["duration_s"],
        }
        if self.videos is not None:
            self.videos.finish(ep)
        if writer is not None and writer.steps:
            writer.save({**ep, "stopped": self._stop, "length": writer.steps})
        elif writer is not None:
            writer.discard()
        return ep

    def _act(self, obs):
        """The action planned for this tick by the chunk runner (computed ahead), None when starved."""
        tick = self.loop.k
        self.runner.observe(obs, tick)
        return self.runner.action_for(tick)

    def _replan_after_takeover(self):
        """A step hook: when the teleop hands control back, plan from where the human left the robot."""
        previous = None

        def hook(step) -> None:
            nonlocal previous
            if previous == "teleop" and step.source != "teleop":
                self.runner.request_replan()
            previous = step.source

        return hook

    def _early_latency_check(self) -> None:
        """After the first chunk (warm-up excluded): say before the robot moves if inference cannot keep up."""
        lat = self.runner.stats()["inference_p50_ms"]
        if lat is not None and lat > self.chunk_budget_ms:
            log.warning(
                "chunk inference %.1f ms > chunk budget %.1f ms (%d ticks at %g Hz): expect reserve ticks "
                "and starvation (safe actions); %s",
                lat,
                self.chunk_budget_ms,
                self.runner.replan_every,
                self.d.rate_hz,
                SLOW_HINT,
            )

    def _open_store(self, has_sim_state: bool):
        from robot_rl.data.episode_store import EpisodeStore
        from robot_rl.commands.record import preflight, step_features

        features = step_features(self.robot, True, has_sim_state)
        path = Path(str(self.d.record_path)).expanduser()
        if (path / "meta.json").exists():
            store = EpisodeStore.open(path, "a")
            if {k: f.to_dict() for k, f in store.features.items()} != {k: f.to_dict() for k, f in features.items()}:
                store.close()
                raise ConfigError(
                    f"deploy.record_path={str(path)!r} holds episodes with other keys/shapes than this "
                    f"robot produces ({sorted(store.features)} vs {sorted(features)}); choose a new path"
                )
            if store.pending is not None:
                store.drop_pending()
        else:
            preflight(
                path,
                features,
                OmegaConf.create(
                    {
                        "max_episode_steps": int(self.d.max_episode_steps),
                        "episodes": int(self.d.episodes),
                        "min_free_gb": 1.0,
                    }
                ),
            )
            info = {
                "robot": self.robot.name,
                "robot_config": self.robot_cfg,
                "task": self.task,
                "source": "deploy",
                "policy": self.policy_info.get("path"),
            }
            store = EpisodeStore.create(path, features, float(self.d.rate_hz), info=info)
        self.store = store
        return store

    # --------------------------------------------------------------------------------------------- summary
    def _summary(self, wall_s: float) -> dict:
        eps = self.episodes
        n = len(eps)
        pacing = self.loop.stats()
        rs = self.runner.stats()
        budget = self.chunk_budget_ms
        warnings = []
        lat = rs["inference_p50_ms"]
        if lat is not None and lat > budget:
            warnings.append(f"chunk inference p50 {lat:.1f} ms > chunk budget {budget:.1f} ms: {SLOW_HINT}")
        if rs["starvations"]:
            warnings.append(
                f"{rs['starvations']} ticks had no valid action (inference fell behind or a chunk "
                f"expired): the safe action (hold) was sent"
            )
        if pacing["overruns"]:
            warnings.append(
                f"{pacing['overruns']} loop overruns ({pacing['missed_slots']} missed ticks) at "
                f"{self.d.rate_hz:g} Hz: tick work p99 {pacing['work_p99_us'] / 1e3:.1f} ms"
            )
        if rs["error"]:
            warnings.append(f"policy inference failed ({rs['error']}): the robot was held with safe actions")
        self.warnings = warnings
        return {
            "process": "deploy",
            "checkpoint": self.policy_info.get("path"),
            "policy_source": self.policy_info.get("source"),
            "policy_type": type(self.policy).__name__,
            "policy_sha256": self.policy_info.get("sha256"),
            "robot": self.robot.name,
            "robot_from": self.robot_from,
            "inference": self.d.inference if self.runner.chunked else "sync",  # single-action policies: sync
            "executor": self.executor if self.runner.chunked else None,
            "blend": self.d.blend if self.runner.chunked else None,
            "device": str(getattr(self.predictor, "device_name", None) or getattr(self.policy, "device", "cpu")),
            "num_inference_steps": getattr(getattr(self.policy, "cfg", None), "num_inference_steps", None),
            "episodes": n,
            "steps": int(sum(e["steps"] for e in eps)),
            "success_rate": (sum(e["success"] for e in eps) / n) if n else None,
            "target_rate_hz": float(self.d.rate_hz),
            "achieved_rate_hz": pacing["rate_hz"],
            "overruns": pacing["overruns"],
            "missed_slots": pacing["missed_slots"],
            "lateness_p99_us": pacing["lateness_p99_us"],
            "work_p99_us": pacing["work_p99_us"],
            "inference_p50_ms": rs["inference_p50_ms"],
            "inference_p99_ms": rs["inference_p99_ms"],
            "chunk_budget_ms": budget,
            "delay_ticks_p50": rs["delay_ticks_p50"],
            "delay_ticks_max": rs["delay_ticks_max"],
            "starvations": rs["starvations"],
            "reserve_ticks": rs["reserve_ticks"],
            "safety_events": getattr(self, "_rollout_safety_counts", dict(self.safety.counts)),
            "error": rs["error"],
            "error_traceback": self.runner.error_traceback,
            "warnings": warnings,
            "episodes_detail": eps,
            "pacing": pacing,
            "runner": rs,
            "record_path": str(self.d.record_path) if self.d.record_path else None,
            "videos": list(self.videos.paths) if self.videos is not None else [],
            "sources": list(SOURCES),
            "wall_s": wall_s,
        }


def main(cfg: DictConfig, run_dir: str | Path) -> int:
    """Entry point of `robot-rl deploy` (the CLI passes hydra's run directory). Returns an exit code."""
    summary = Deployer(cfg, run_dir).run()
    sr = summary["success_rate"]
    print(
        f"deploy: {summary['episodes']} episodes, success {'n/a' if sr is None else f'{sr:.0%}'}, "
        f"{summary['achieved_rate_hz']:.1f}/{summary['target_rate_hz']:g} Hz, {summary['overruns']} overruns, "
        f"inference p50 {summary['inference_p50_ms'] or 0:.1f} ms (budget {summary['chunk_budget_ms']:.0f} ms), "
        f"{summary['starvations']} starved ticks"
        + (f", {len(summary['videos'])} videos in {Path(run_dir) / 'videos'}" if summary["videos"] else "")
        + (f", episodes appended to {summary['record_path']}" if summary["record_path"] else "")
        + f" -> {Path(run_dir) / 'summary.json'}",
        file=sys.stderr,
    )
    if summary["error"]:
        return 1
    return 0 if summary["episodes"] else 1
