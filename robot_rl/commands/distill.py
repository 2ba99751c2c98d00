"""`robot-rl distill`: a one-step student from a trained diffusion policy (RL-100's consistency distillation,
`action_same_noise`, reference/rl100_diffusion_ppo.md §1.9).

    robot-rl distill distill.teacher=outputs/<train run>                    # the teacher's own training store
    robot-rl distill distill.teacher=<run> distill.data=data/more_demos distill.steps=3000
    robot-rl distill hydra.run.dir=<old distill run> distill.resume=true     # continue an interrupted run

The loss (`Distiller.distill_loss`, all in the normalised action space [-1, 1]):

    c         = teacher.encode_obs(o)                    frozen teacher observation features
    x_T       ~ N(0, I)                                  one noise for both
    a_teacher = sg[ DDIM_K(x_T, c) ]                     the teacher's deterministic (eta 0) K-step chunk
    a_student = student.unet(x_T, t*, c)                 one forward pass, sample prediction
    L         = mean (a_student - a_teacher)^2           whole chunk (distill.loss_rows=executed: the rows run)

The student is a plain `DiffusionPolicy` of the teacher's shape whose config says `prediction_type: sample`,
`inference_scheduler: ddim`, `num_inference_steps: 1`. DDIM with one step and sample prediction is exactly one
forward pass, `clamp(unet(x_T, t*, c), -1, 1)` (alpha_prev = 1, eta = 0), so the stock `predict_chunk`,
`select_action` (chunking, action queue), the normaliser and `load_policy` / `robot-rl eval` run the student with
no special case. t* is the timestep DDIM's one-step schedule feeds the UNet (diffusers' "leading" spacing gives
0); for the student it is only a constant conditioning input, and taking it from the scheduler keeps training and
inference identical.

Choices (RL-100 leaves some open):
- warm start (`distill.init=teacher`, default): the student starts as a copy of the teacher's weights (UNet,
  encoder, normaliser); `random` re-initialises the UNet (encoder and normaliser still copied). Measured on Lift
  (UNet [64, 128, 256], batch 64, lr 3e-4): the warm start's first ~150 steps undo the teacher's epsilon output
  (student-teacher chunk MSE 0.023 after 300 steps vs 0.0099 from a fresh UNet), after 1000 steps both reach
  ~0.0045 and 100 % success; prefer `random` for very short runs.
- observation encoder: the student keeps its own copy of the teacher's encoder, frozen by default
  (`distill.train_encoder=false`): it then sees exactly the teacher's features (RL-100: "teacher encoder features, no
  encoder gradients") and the checkpoint stays self-contained.
- the target is the deterministic DDIM mean path (RL-100's `distill2mean`), and the loss is taken in the
  normalised space (every action dimension weighs the same), not on unnormalised actions as RL-100.

Everything but the loss is `robot_rl.training.loop`'s (AdamW, warm-up + cosine, EMA, checkpoints, bit-exact resume,
tensorboard, Ctrl-C). Checkpoints are policy directories like train's (`checkpoints/step_<n>/manifest.json +
policy.safetensors`, plus raw_policy.safetensors, optimizer.pt, trainer_state.json, config.yaml); the manifest
carries the teacher's robot config and fps, and `training.distilled` = {one_step, teacher, teacher_steps, timestep,
...}. At the end the teacher (DDIM-K) and the student are evaluated in simulation on the same seeds
(`distill.eval_episodes`, when the robot is simulated) and both success rates with Wilson 95 % intervals and
per-chunk latencies are printed and saved in `distill_summary.json`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from robot_rl.commands.evaluate import check_ints, config_section
from robot_rl.config import ConfigError, git_hash, resolve_device, write_json
from robot_rl.data.episode_store import EpisodeStore
from robot_rl.data.sequence import SequenceSampler
from robot_rl.policies.checkpoint import CheckpointError, find_policy_dir, load_policy, write_policy
from robot_rl.policies.diffusion import DiffusionPolicy
from robot_rl.policies.one_step import make_student, one_step_timestep
from robot_rl.training.loop import Hook, LoopConfig, LoopUser, TrainingLoop, seed_everything, store_robot, to_device

log = logging.getLogger("robot_rl.commands.distill")


# ------------------------------------------------------------------------------------------------- config


def validate_distill(cfg: DictConfig) -> LoopConfig:
    d = config_section(cfg, "distill", "teacher", "the trained diffusion policy's run or checkpoint directory")
    loop_cfg = LoopConfig.from_section(d, "distill")
    check_ints(
        d,
        "distill",
        positive=("teacher_steps", "probe_size"),
        non_negative=("val_every", "eval_episodes", "video_episodes", "eval_seed"),
        positive_or_null=("eval_max_steps",),
    )
    if d.init not in ("teacher", "random"):
        raise ConfigError(f"distill.init must be teacher (warm start) or random, got {d.init!r}")
    if d.loss_rows not in ("chunk", "executed"):
        raise ConfigError(f"distill.loss_rows must be chunk or executed, got {d.loss_rows!r}")
    return loop_cfg


# ------------------------------------------------------------------------------------------------ distiller


class Distiller(LoopUser):
    def __init__(self, cfg: DictConfig, run_dir: str | os.PathLike):
        loop_cfg = validate_distill(cfg)
        self.cfg, self.d = cfg, cfg.distill
        d = self.d
        self.run_dir = Path(run_dir)
        self.device = resolve_device(str(d.device))
        seed_everything(int(d.seed), d.get("num_threads"))

        # teacher: the deployable (EMA) weights, frozen
        try:
            self.teacher_ckpt = find_policy_dir(Path(str(d.teacher)).expanduser()).resolve()
        except CheckpointError as e:
            raise ConfigError(f"distill.teacher: {e}") from None
        self.teacher = load_policy(self.teacher_ckpt, device=self.device).requires_grad_(False)
        if not isinstance(self.teacher, DiffusionPolicy):
            raise ConfigError(
                f"distill.teacher={d.teacher}: a {type(self.teacher).__name__} has no denoising chain "
                f"to distil; give a diffusion policy"
            )
        from robot_rl.commands.evaluate import is_one_step

        if is_one_step(self.teacher):
            raise ConfigError(f"distill.teacher={d.teacher} is already a one-step (distilled) policy")
        if int(d.teacher_steps) > self.teacher.cfg.num_train_timesteps:
            raise ConfigError(
                f"distill.teacher_steps={d.teacher_steps} exceeds the teacher's "
                f"num_train_timesteps ({self.teacher.cfg.num_train_timesteps})"
            )

        # data: windows of the teacher's observation keys
        manifest = getattr(self.teacher, "manifest", None) or {}
        self.data_path = self._data_path(manifest)
        try:
            store = EpisodeStore.open(self.data_path)
        except Exception as e:  # StoreError says what is wrong; anything else is an unreadable path
            raise ConfigError(f"distill.data={str(self.data_path)!r}: {e}") from None
        if store.num_episodes == 0:
            raise ConfigError(f"distill.data={self.data_path} has no episodes")
        # the student drives the teacher's robot: its manifest's (else the store's) robot config and fps
        self.robot = dict(manifest.get("robot") or {})
        if not self.robot.get("config"):
            self.robot = store_robot(store)
        self.fps = manifest.get("fps") or store.fps
        tc = self.teacher.cfg
        try:
            self.sampler = SequenceSampler.from_store(
                store, self.teacher.store_obs_keys, obs_horizon=tc.obs_horizon, action_horizon=tc.action_horizon
            )
        except KeyError as e:
            raise ConfigError(f"distill.data={self.data_path} lacks what the teacher observes: {e}") from None

        # student
        self.student = make_student(self.teacher, init=str(d.init)).to(self.device).train()
        if not d.train_encoder:
            self.student.obs_encoder.requires_grad_(False)
        self.t_student = one_step_timestep(self.student)
        start = tc.obs_horizon - 1
        self.rows = slice(None) if d.loss_rows == "chunk" else slice(start, start + tc.n_action_steps)
        self._probe = None
        self.distilled = {
            "one_step": True,
            "teacher": str(self.teacher_ckpt),
            "teacher_steps": int(d.teacher_steps),
            "timestep": int(self.t_student),
            "init": str(d.init),
            "loss_rows": str(d.loss_rows),
        }
        self.provenance = {
            "source": "distill",
            "data": str(self.data_path),
            "git": git_hash(),
            "distilled": self.distilled,
        }
        conf = OmegaConf.to_container(cfg, resolve=True)
        conf["distill"]["teacher"], conf["distill"]["data"] = str(self.teacher_ckpt), str(self.data_path)
        conf["policy"] = {**self.student.cfg.to_dict(), "obs_keys": list(self.student.obs_keys)}  # what it is
        self.loop = TrainingLoop(
            self.run_dir,
            self.student,
            self.distill_loss,
            lambda rng: self._batch(int(d.batch_size), rng),
            loop_cfg,
            name="distill",
            hooks=[Hook("probe", int(d.val_every), self._probe_hook, at_start=True, at_end=True)],
            export=self._export,
            config_yaml=OmegaConf.to_yaml(OmegaConf.create(conf)),
            state=lambda: {"teacher": str(self.teacher_ckpt), "data": str(self.data_path), "distilled": self.distilled},
            summary=lambda: {"teacher": str(self.teacher_ckpt), "data": str(self.data_path)},
        )
        if d.resume:
            state = self.loop.resume(d.get("resume_from"))
            if state.get("teacher") != str(self.teacher_ckpt) or state.get("data") != str(self.data_path):
                raise ConfigError(
                    f"distill.resume: the checkpoint distilled teacher {state.get('teacher')} on "
                    f"{state.get('data')}, not {self.teacher_ckpt} on {self.data_path}; start a new run"
                )

    def _data_path(self, manifest: dict) -> Path:
        if self.d.get("data"):
            return Path(str(self.d.data)).expanduser()
        data = (manifest.get("training") or {}).get("data")
        if data:
            return Path(data)
        from robot_rl.commands.evaluate import training_store  # checkpoints from before the manifest

        path = training_store(self.teacher_ckpt)
        if path is None:
            raise ConfigError(
                f"distill.data is empty and the teacher's checkpoint ({self.teacher_ckpt}) names no "
                f"training store: set distill.data"
            )
        return path

    def _batch(self, size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        return to_device(self.sampler.sample(size, rng), self.device)

    def _export(self, directory: Path, student: DiffusionPolicy, loop_info: dict) -> None:
        write_policy(directory, student, robot=self.robot, fps=self.fps, provenance={**self.provenance, **loop_info})

    @property
    def probe_history(self) -> list[tuple[int, float]]:
        """(step, probe MSE of the deployable student)"""
        return [(step, r["mse"]) for step, r in self.loop.history["probe"]]

    # ------------------------------------------------------------------------------------------------ loss
    def distill_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        d, teacher, student = self.d, self.teacher, self.student
        b, ha, a = batch["action"].shape[0], teacher.cfg.action_horizon, teacher.action_dim
        with torch.no_grad():
            cond = teacher.encode_obs(batch)  # c: the teacher's (frozen) observation features
            x_T = torch.randn(b, ha, a, device=self.device)  # the same noise for teacher and student
            a_teacher = teacher.denoise(x_T, cond, int(d.teacher_steps))  # sg[DDIM_K(x_T, c)], in [-1, 1]
        s_cond = student.encode_obs(batch) if d.train_encoder else cond
        a_student = student.unet(x_T, self.t_student.expand(b), s_cond)  # one forward pass, sample prediction
        return F.mse_loss(a_student[:, self.rows], a_teacher[:, self.rows]), {}

    # ---------------------------------------------------------------------------------------- measuring
    @torch.no_grad()
    def probe_error(self, model: DiffusionPolicy | None = None) -> float:
        """MSE (normalised actions, the loss rows) between a student's one-step chunk and the teacher's DDIM-K
        chunk on fixed windows and noises (`distill.probe_size`, drawn once; RNG streams left untouched)."""
        if self._probe is None:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                seed = int(self.d.probe_seed)
                torch.manual_seed(seed)
                batch = self._batch(int(self.d.probe_size), np.random.default_rng(seed))
                cond = self.teacher.encode_obs(batch)
                x_T = torch.randn(
                    cond.shape[0], self.teacher.cfg.action_horizon, self.teacher.action_dim, device=self.device
                )
                self._probe = (batch, x_T, self.teacher.denoise(x_T, cond, int(self.d.teacher_steps)))
        batch, x_T, target = self._probe
        model = self.model if model is None else model
        was = model.training
        model.eval()
        try:
            pred = model.unet(x_T, self.t_student.expand(x_T.shape[0]), model.encode_obs(batch)).clamp(-1.0, 1.0)
        finally:
            model.train(was)
        return float(F.mse_loss(pred[:, self.rows], target[:, self.rows]))

    def _probe_hook(self) -> dict:
        err = self.probe_error()
        log.info("distill step %d: student vs teacher chunk MSE %.5f (normalised actions)", self.step, err)
        return {"mse": err}

    # ------------------------------------------------------------------------------------------- final eval
    def compare_in_sim(
        self, episodes: int | None = None, seed: int | None = None, video_dir: Path | None = None
    ) -> dict | None:
        """Teacher (DDIM-K) and student (one step) rolled out on the same seeds; None without a sim robot."""
        from robot_rl.commands.evaluate import evaluate, set_sampler

        d = self.d
        robot_cfg = self.robot["config"]
        if not robot_cfg or robot_cfg.get("type") != "robosuite":
            log.warning("the teacher's robot is not a simulated one: no sim evaluation")
            return None
        episodes = int(d.eval_episodes if episodes is None else episodes)
        seed = int(d.eval_seed if seed is None else seed)
        n_video = int(d.video_episodes)
        out = {"episodes": episodes, "seed": seed}
        for role, policy in (("teacher", self.teacher), ("student", self.model)):
            sampler = set_sampler(policy, "ddim", int(d.teacher_steps)) if role == "teacher" else set_sampler(policy)
            res = evaluate(
                policy,
                robot_cfg,
                episodes=episodes,
                seed=seed,
                max_steps=d.get("eval_max_steps"),
                video_dir=(video_dir / role) if video_dir is not None and n_video else None,
                video_episodes=n_video,
            )
            out[role] = {"sampler": sampler, **res}
        t_chunk = (out["teacher"]["latency"]["chunk"] or {}).get("p50_ms")
        s_chunk = (out["student"]["latency"]["chunk"] or {}).get("p50_ms")
        out["chunk_speedup_p50"] = t_chunk / s_chunk if t_chunk and s_chunk else None
        return out


def main(cfg: DictConfig, run_dir: str | os.PathLike) -> int:
    """Entry point of `robot-rl distill` (the CLI passes hydra's run directory). Returns an exit code."""
    from robot_rl.commands.evaluate import plot_training_curves, summary_line

    run_dir = Path(run_dir)
    dist = Distiller(cfg, run_dir)
    log.info(
        "distilling %s (DDIM-%d) into one step on %s: %d windows, device %s",
        dist.teacher_ckpt,
        int(cfg.distill.teacher_steps),
        dist.data_path,
        len(dist.sampler),
        dist.device,
    )
    summary = dist.run()
    if not dist.loop.is_main:  # torchrun: rank 0 reports, plots and evaluates
        return 0 if summary["finished"] else (130 if dist.loop.stopped else 1)
    log.info(
        "done: step %d, loss %.5f, probe MSE %s -> %s",
        summary["step"],
        summary["final_loss"] or float("nan"),
        (summary["probe"] or {}).get("mse"),
        summary["checkpoint"],
    )
    plot_training_curves(run_dir, run_dir / "training_curves.png")
    if not summary["finished"]:
        return 130 if dist.loop.stopped else 1
    if int(cfg.distill.eval_episodes) > 0:
        cmp = dist.compare_in_sim(video_dir=run_dir / "videos")
        if cmp is not None:
            summary["eval"] = {k: v for k, v in cmp.items()}
            write_json(run_dir / "distill_summary.json", summary)
            for role in ("teacher", "student"):
                print(f"{role} ({cmp[role]['sampler']}): {summary_line(cmp[role])}", flush=True)
            if cmp["chunk_speedup_p50"]:
                print(f"student chunk {cmp['chunk_speedup_p50']:.1f}x faster than the teacher's (p50)", flush=True)
    return 0
