"""`robot-rl distill`: a one-step student from a trained diffusion policy (RL-100's consistency distillation,
`action_same_noise`, reference/rl100_diffusion_ppo.md §1.9).

    robot-rl distill distill.teacher=outputs/<train run>                    # the teacher's own training store
    robot-rl distill distill.teacher=<run> distill.data=data/more_demos distill.steps=3000
    robot-rl distill hydra.run.dir=<old distill run> distill.resume=true     # continue an interrupted run

The loss (one step of `Distiller.distill_step`, all in the normalised action space [-1, 1]):

    c         = teacher.encode_obs(o)                    frozen teacher observation features
    x_T       ~ N(0, I)                                  one noise for both
    a_teacher = sg[ DDIM_K(x_T, c) ]                     the teacher's deterministic (eta 0) K-step chunk
    a_student = student.unet(x_T, t*, c)                 one forward pass, sample prediction
    L         = mean (a_student - a_teacher)^2           whole chunk (distill.loss_rows=executed: the rows run)

AdamW, linear warm-up then cosine, gradient clipping, an EMA copy of the student (the checkpointed model).

The student is a plain `DiffusionPolicy` of the teacher's shape whose config says `prediction_type: sample`,
`inference_scheduler: ddim`, `num_inference_steps: 1`. DDIM with one step and sample prediction is exactly one
forward pass, `clamp(unet(x_T, t*, c), -1, 1)` (alpha_prev = 1, eta = 0), so the stock `predict_chunk`,
`select_action` (chunking, action queue), the normaliser and `load_policy` / `robot-rl eval` run the student with
no special case. t* is the timestep DDIM's one-step schedule feeds the UNet (diffusers' "leading" spacing gives
0); for the student it is only a constant conditioning input, and taking it from the scheduler keeps training and
inference identical. The checkpoint metadata records `distilled` = {one_step, teacher, teacher_steps, t*}.

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

Checkpoints have train's layout (`checkpoints/step_<n>/{model,raw_model}.safetensors, optimizer.pt,
trainer_state.json, config.yaml`, `checkpoints/latest`); config.yaml carries a `policy:` section (the student's)
and `distill.data` (read by `robot-rl eval` to find the robot). Resume restores everything (on CPU the resumed run
repeats the uninterrupted one's batches and noise). At the end the teacher (DDIM-K) and the student are evaluated
in simulation on the same seeds (`distill.eval_episodes`, when the store was recorded in sim) and both success
rates with Wilson 95 % intervals and per-chunk latencies are printed and saved in `distill_summary.json`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from robot_rl.config import ConfigError, resolve_device, write_json
from robot_rl.data.episode_store import EpisodeStore, write_json_atomic
from robot_rl.data.sequence import SequenceSampler
from robot_rl.policies.diffusion import EMA, DiffusionConfig, DiffusionPolicy
from robot_rl.policies.checkpoint import load_policy, policy_features, resolve_checkpoint
from robot_rl.training.state import lr_lambda, rng_from_json, rng_to_json

log = logging.getLogger("robot_rl.commands.distill")


# ------------------------------------------------------------------------------------------ student / sampling


def make_student(teacher: DiffusionPolicy, init: str = "teacher") -> DiffusionPolicy:
    """A one-step policy of the teacher's shape (sample prediction, DDIM with 1 step), with the teacher's
    normaliser and encoder; `init=teacher` also copies the UNet (warm start), `random` leaves it freshly initialised."""
    cfg = DiffusionConfig.from_dict({**teacher.cfg.to_dict(), "obs_keys": list(teacher.obs_keys),
                                     "prediction_type": "sample", "inference_scheduler": "ddim",
                                     "num_inference_steps": 1})
    student = DiffusionPolicy(cfg, teacher.obs_features, teacher.action_feature).to(teacher.device)
    if init == "teacher":
        student.load_state_dict(teacher.state_dict())
    elif init == "random":
        student.normalizer.load_state_dict(teacher.normalizer.state_dict())
        student.obs_encoder.load_state_dict(teacher.obs_encoder.state_dict())
    else:
        raise ValueError(f"init must be teacher or random, got {init!r}")
    return student


def one_step_timestep(policy: DiffusionPolicy) -> torch.Tensor:
    """The timestep the one-step DDIM schedule feeds the UNet (what `predict_chunk` will use at inference)."""
    sched = policy.schedulers["ddim"]
    sched.set_timesteps(1, device=policy.device)
    return sched.timesteps[0].clone()


@torch.no_grad()
def ddim_chunk(policy: DiffusionPolicy, x: torch.Tensor, cond: torch.Tensor, steps: int) -> torch.Tensor:
    """DDIM_K(x_T, c) in the normalised action space: `predict_chunk`'s loop without the encode / unnormalise."""
    sched = policy.schedulers["ddim"]
    sched.set_timesteps(int(steps), device=x.device)
    for t in sched.timesteps:
        x = sched.step(policy.unet(x, t.expand(x.shape[0]), cond), t, x).prev_sample
    return x


# ------------------------------------------------------------------------------------------------- config


def _pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def validate_distill(cfg: DictConfig) -> None:
    d = cfg.get("distill")
    if d is None:
        raise ConfigError("the config has no `distill:` section")
    if not d.get("teacher"):
        raise ConfigError("distill.teacher is empty: give the trained diffusion policy's run or checkpoint "
                          "directory, e.g. distill.teacher=outputs/<date>/<time>_train")
    for key in ("steps", "batch_size", "checkpoint_every", "log_every", "teacher_steps", "probe_size"):
        if not _pos_int(d.get(key)):
            raise ConfigError(f"distill.{key} must be a positive integer, got {d.get(key)!r}")
    for key in ("val_every", "eval_episodes", "video_episodes", "eval_seed"):
        v = d.get(key)
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            raise ConfigError(f"distill.{key} must be a non-negative integer, got {v!r}")
    if not (isinstance(d.lr, (int, float)) and not isinstance(d.lr, bool) and d.lr > 0):
        raise ConfigError(f"distill.lr must be a positive number, got {d.lr!r}")
    if d.lr_schedule not in ("cosine", "constant"):
        raise ConfigError(f"distill.lr_schedule must be cosine or constant, got {d.lr_schedule!r}")
    if d.ema_decay is not None and not 0.0 <= float(d.ema_decay) < 1.0:
        raise ConfigError(f"distill.ema_decay must be null (warm-up schedule) or in [0, 1), got {d.ema_decay!r}")
    if d.init not in ("teacher", "random"):
        raise ConfigError(f"distill.init must be teacher (warm start) or random, got {d.init!r}")
    if d.loss_rows not in ("chunk", "executed"):
        raise ConfigError(f"distill.loss_rows must be chunk or executed, got {d.loss_rows!r}")
    ms = d.get("eval_max_steps")
    if ms is not None and not _pos_int(ms):
        raise ConfigError(f"distill.eval_max_steps must be a positive integer or null, got {ms!r}")


# ------------------------------------------------------------------------------------------------ distiller


class Distiller:
    def __init__(self, cfg: DictConfig, run_dir: str | os.PathLike):
        validate_distill(cfg)
        self.cfg, self.d = cfg, cfg.distill
        d = self.d
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.device = resolve_device(str(d.device))
        if d.get("num_threads"):
            torch.set_num_threads(int(d.num_threads))
        seed = int(d.seed)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.rng = np.random.default_rng(seed)  # batch sampling

        # teacher: the deployable (EMA) weights, frozen
        try:
            self.teacher_ckpt = resolve_checkpoint(Path(str(d.teacher)).expanduser()).resolve()
        except FileNotFoundError as e:
            raise ConfigError(f"distill.teacher: {e}") from None
        self.teacher = load_policy(self.teacher_ckpt, device=self.device).requires_grad_(False)
        if not isinstance(self.teacher, DiffusionPolicy):
            raise ConfigError(f"distill.teacher={d.teacher}: a {type(self.teacher).__name__} has no denoising chain "
                              f"to distil; give a diffusion policy")
        from robot_rl.commands.evaluate import is_one_step

        if is_one_step(self.teacher):
            raise ConfigError(f"distill.teacher={d.teacher} is already a one-step (distilled) policy")
        if int(d.teacher_steps) > self.teacher.cfg.num_train_timesteps:
            raise ConfigError(f"distill.teacher_steps={d.teacher_steps} exceeds the teacher's "
                              f"num_train_timesteps ({self.teacher.cfg.num_train_timesteps})")

        # data: windows of the teacher's observation keys
        self.data_path = self._data_path()
        try:
            store = EpisodeStore.open(self.data_path)
        except Exception as e:  # StoreError says what is wrong; anything else is an unreadable path
            raise ConfigError(f"distill.data={str(self.data_path)!r}: {e}") from None
        if store.num_episodes == 0:
            raise ConfigError(f"distill.data={self.data_path} has no episodes")
        self.robot_config = store.meta.get("info", {}).get("robot_config")
        tc = self.teacher.cfg
        try:
            self.sampler = SequenceSampler.from_store(store, self.teacher.store_obs_keys,
                                                      obs_horizon=tc.obs_horizon, action_horizon=tc.action_horizon)
        except KeyError as e:
            raise ConfigError(f"distill.data={self.data_path} lacks what the teacher observes: {e}") from None

        # student
        self.student = make_student(self.teacher, init=str(d.init)).to(self.device).train()
        if not d.train_encoder:
            self.student.obs_encoder.requires_grad_(False)
        self.t_student = one_step_timestep(self.student)
        start = tc.obs_horizon - 1
        self.rows = (slice(None) if d.loss_rows == "chunk" else slice(start, start + tc.n_action_steps))
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=float(d.lr), betas=tuple(d.betas),
                                     weight_decay=float(d.weight_decay))
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(int(d.warmup_steps), int(d.steps), str(d.lr_schedule)))
        self.ema = (EMA(self.student, decay=None if d.ema_decay is None else float(d.ema_decay))
                    if d.ema else None)
        self.step = 0
        self.losses: list[float] = []
        self.probe_history: list[tuple[int, float]] = []  # (step, probe MSE of the deployable student)
        self._probe = None
        self._stop = threading.Event()
        self.writer = None
        if d.resume:
            self._resume()

    def _data_path(self) -> Path:
        if self.d.get("data"):
            return Path(str(self.d.data)).expanduser()
        from robot_rl.commands.evaluate import training_store

        path = training_store(self.teacher_ckpt)
        if path is None:
            raise ConfigError(f"distill.data is empty and the teacher's checkpoint ({self.teacher_ckpt}) names no "
                              f"training store: set distill.data")
        return path

    @property
    def model(self) -> DiffusionPolicy:
        """The student to deploy: the EMA copy when distill.ema, else the optimised one."""
        return self.ema.model if self.ema is not None else self.student

    def _batch(self, size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device, non_blocking=True)
                for k, v in self.sampler.sample(size, rng).items()}

    # ------------------------------------------------------------------------------------------ one step
    def distill_step(self) -> dict[str, float]:
        d, teacher, student = self.d, self.teacher, self.student
        batch = self._batch(int(d.batch_size), self.rng)
        b, ha, a = batch["action"].shape[0], teacher.cfg.action_horizon, teacher.action_dim
        with torch.no_grad():
            cond = teacher.encode_obs(batch)  # c: the teacher's (frozen) observation features
            x_T = torch.randn(b, ha, a, device=self.device)  # the same noise for teacher and student
            a_teacher = ddim_chunk(teacher, x_T, cond, int(d.teacher_steps))  # sg[DDIM_K(x_T, c)], in [-1, 1]
        s_cond = student.encode_obs(batch) if d.train_encoder else cond
        a_student = student.unet(x_T, self.t_student.expand(b), s_cond)  # one forward pass, sample prediction
        loss = F.mse_loss(a_student[:, self.rows], a_teacher[:, self.rows])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"distill step {self.step}: loss is {loss.item()}; lower distill.lr")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = float(d.max_grad_norm) if d.max_grad_norm else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.lr_sched.step()
        decay = self.ema.update(student) if self.ema is not None else 0.0
        self.step += 1
        value = float(loss.item())
        self.losses.append(value)
        return {"loss": value, "lr": lr, "grad_norm": float(grad_norm), "ema_decay": decay}

    # ---------------------------------------------------------------------------------------- measuring
    @torch.no_grad()
    def probe_error(self, model: DiffusionPolicy | None = None) -> float:
        """MSE (normalised actions, the loss rows) between a student's one-step chunk and the teacher's DDIM-K
        chunk on fixed windows and noises (`distill.probe_size`, drawn once; RNG streams left untouched)."""
        if self._probe is None:
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(12345)
                batch = self._batch(int(self.d.probe_size), np.random.default_rng(12345))
                cond = self.teacher.encode_obs(batch)
                x_T = torch.randn(cond.shape[0], self.teacher.cfg.action_horizon, self.teacher.action_dim,
                                  device=self.device)
                self._probe = (batch, x_T, ddim_chunk(self.teacher, x_T, cond, int(self.d.teacher_steps)))
        batch, x_T, target = self._probe
        model = self.model if model is None else model
        was = model.training
        model.eval()
        try:
            pred = model.unet(x_T, self.t_student.expand(x_T.shape[0]), model.encode_obs(batch)).clamp(-1.0, 1.0)
        finally:
            model.train(was)
        return float(F.mse_loss(pred[:, self.rows], target[:, self.rows]))

    # ------------------------------------------------------------------------------------------------ loop
    def request_stop(self, *_):
        if not self._stop.is_set():
            log.info("stop requested: finishing this step, writing a checkpoint")
        self._stop.set()

    def run(self, stop_after: int | None = None) -> dict:
        """Distil up to distill.steps (or stop after `stop_after` total steps, as if killed after a checkpoint)."""
        from tqdm import tqdm

        d = self.d
        if d.tensorboard and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"))
        old_handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old_handlers[sig] = signal.signal(sig, self.request_stop)
        total = int(d.steps)
        end = total if stop_after is None else min(total, int(stop_after))
        every = int(d.log_every)
        bar = tqdm(total=total, initial=self.step, disable=not d.progress, dynamic_ncols=True, desc="distill")
        t_start, start_step = time.monotonic(), self.step
        if self.step == 0 and d.val_every:
            self._log_probe()
        try:
            while self.step < end and not self._stop.is_set():
                m = self.distill_step()
                bar.update(1)
                if self.step % every == 0 or self.step == end:
                    bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}")
                    if self.writer is not None:
                        for k, v in m.items():
                            self.writer.add_scalar(f"distill/{k}", v, self.step)
                if d.val_every and (self.step % int(d.val_every) == 0 or self.step == end):
                    self._log_probe()
                if self.step % int(d.checkpoint_every) == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
        if self.step > 0 and not self._latest_is(self.step):
            self.save_checkpoint()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        wall = time.monotonic() - t_start
        done = self.step - start_step
        summary = {"step": self.step, "steps_this_run": done, "wall_s": wall,
                   "s_per_step": wall / max(done, 1),
                   "final_loss": float(np.mean(self.losses[-50:])) if self.losses else None,
                   "probe_mse": self.probe_history[-1][1] if self.probe_history else None,
                   "finished": self.step >= total, "teacher": str(self.teacher_ckpt), "data": str(self.data_path),
                   "checkpoint": str(self.ckpt_root / f"step_{self.step}") if self.step else None}
        write_json(self.run_dir / "distill_summary.json", summary)
        return summary

    def _log_probe(self) -> None:
        err = self.probe_error()
        if self.probe_history and self.probe_history[-1][0] == self.step:
            return
        self.probe_history.append((self.step, err))
        log.info("distill step %d: student vs teacher chunk MSE %.5f (normalised actions)", self.step, err)
        if self.writer is not None:
            self.writer.add_scalar("distill/probe_mse", err, self.step)

    # ------------------------------------------------------------------------------------- checkpoints
    def _latest_is(self, step: int) -> bool:
        pointer = self.ckpt_root / "latest"
        return pointer.exists() and json.loads(pointer.read_text()).get("step") == step

    def student_config(self) -> dict:
        return {**self.student.cfg.to_dict(), "obs_keys": list(self.student.obs_keys)}

    def save_checkpoint(self) -> Path:
        name = f"step_{self.step}"
        final, tmp = self.ckpt_root / name, self.ckpt_root / f".{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        distilled = {"one_step": True, "teacher": str(self.teacher_ckpt), "teacher_steps": int(self.d.teacher_steps),
                     "timestep": int(self.t_student), "init": str(self.d.init), "loss_rows": str(self.d.loss_rows)}
        meta = {"format": "robot_rl.checkpoint", "policy_type": "diffusion", "step": str(self.step),
                "policy_config": json.dumps(self.student_config()),
                "features": json.dumps(policy_features(self.student)), "distilled": json.dumps(distilled)}

        def tensors(module) -> dict[str, torch.Tensor]:
            return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}

        save_file(tensors(self.model), str(tmp / "model.safetensors"), metadata=meta)
        if self.ema is not None:
            save_file(tensors(self.student), str(tmp / "raw_model.safetensors"), metadata=meta)
        torch.save({"optimizer": self.opt.state_dict(), "lr_scheduler": self.lr_sched.state_dict()},
                   tmp / "optimizer.pt")
        state = {
            "step": self.step,
            "ema": self.ema.state() if self.ema is not None else None,
            "rng": {"torch": rng_to_json(torch.get_rng_state()),
                    "cuda": [rng_to_json(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available()
                    else [],
                    "numpy": self.rng.bit_generator.state},
            "losses": self.losses, "probe_history": self.probe_history,
            "teacher": str(self.teacher_ckpt), "data": str(self.data_path), "distilled": distilled,
            "time": time.time(),
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        conf = OmegaConf.to_container(self.cfg, resolve=True)
        conf["distill"]["teacher"], conf["distill"]["data"] = str(self.teacher_ckpt), str(self.data_path)
        conf["policy"] = self.student_config()  # load_policy's fallback, and what the student is
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(conf)))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_json_atomic(self.ckpt_root / "latest", {"step": self.step, "path": name})
        keep = self.d.get("keep_last")
        if keep:
            steps = sorted(int(p.name[5:]) for p in self.ckpt_root.glob("step_*") if p.name[5:].isdigit())
            for s in steps[:-int(keep)]:
                shutil.rmtree(self.ckpt_root / f"step_{s}", ignore_errors=True)
        log.info("checkpoint %s", final)
        return final

    def _resume(self) -> None:
        src = self.d.get("resume_from") or self.run_dir
        try:
            ckpt = resolve_checkpoint(src)
        except FileNotFoundError as e:
            raise ConfigError(f"distill.resume=true but there is nothing to resume: {e}. Point hydra.run.dir at the "
                              f"interrupted run or set distill.resume_from") from None
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if state.get("teacher") != str(self.teacher_ckpt) or state.get("data") != str(self.data_path):
            raise ConfigError(f"distill.resume: {ckpt} distilled teacher {state.get('teacher')} on "
                              f"{state.get('data')}, not {self.teacher_ckpt} on {self.data_path}; start a new run")
        raw = ckpt / ("raw_model.safetensors" if self.ema is not None else "model.safetensors")
        if not raw.exists():
            raise ConfigError(f"distill.resume: {ckpt} has no {raw.name} (was it distilled with distill.ema=false?)")
        self.student.load_state_dict(load_file(str(raw)))
        if self.ema is not None:
            self.ema.model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
            self.ema.load_state(state["ema"])
        opt = torch.load(ckpt / "optimizer.pt", map_location=self.device, weights_only=True)
        self.opt.load_state_dict(opt["optimizer"])
        self.lr_sched.load_state_dict(opt["lr_scheduler"])
        self.step = int(state["step"])
        self.losses = list(state.get("losses", []))
        self.probe_history = [tuple(x) for x in state.get("probe_history", [])]
        rng = state["rng"]
        torch.set_rng_state(rng_from_json(rng["torch"]))
        if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([rng_from_json(s) for s in rng["cuda"]])
        self.rng.bit_generator.state = rng["numpy"]
        log.info("resumed from %s at step %d", ckpt, self.step)

    # ------------------------------------------------------------------------------------------- final eval
    def compare_in_sim(self, episodes: int | None = None, seed: int | None = None,
                       video_dir: Path | None = None) -> dict | None:
        """Teacher (DDIM-K) and student (one step) rolled out on the same seeds; None without a sim robot."""
        from robot_rl.commands.evaluate import evaluate, set_sampler

        d = self.d
        robot_cfg = self.robot_config
        if not robot_cfg or robot_cfg.get("type") != "robosuite":
            log.warning("the distillation store was not recorded from a simulated robot: no sim evaluation")
            return None
        episodes = int(d.eval_episodes if episodes is None else episodes)
        seed = int(d.eval_seed if seed is None else seed)
        n_video = int(d.video_episodes)
        out = {"episodes": episodes, "seed": seed}
        for role, policy in (("teacher", self.teacher), ("student", self.model)):
            sampler = set_sampler(policy, "ddim", int(d.teacher_steps)) if role == "teacher" else set_sampler(policy)
            res = evaluate(policy, robot_cfg, episodes=episodes, seed=seed, max_steps=d.get("eval_max_steps"),
                           video_dir=(video_dir / role) if video_dir is not None and n_video else None,
                           video_episodes=n_video)
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
    log.info("distilling %s (DDIM-%d) into one step on %s: %d windows, device %s", dist.teacher_ckpt,
             int(cfg.distill.teacher_steps), dist.data_path, len(dist.sampler), dist.device)
    summary = dist.run()
    log.info("done: step %d, loss %.5f, probe MSE %s -> %s", summary["step"], summary["final_loss"] or float("nan"),
             summary["probe_mse"], summary["checkpoint"])
    plot_training_curves(run_dir, run_dir / "training_curves.png")
    if not summary["finished"]:
        return 130 if dist._stop.is_set() else 1
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
