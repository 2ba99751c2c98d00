"""`robot-rl train`: offline behaviour cloning from an episode store (diffusion policy, or the MLP baseline).

    robot-rl train train.data=data/demos train.steps=20000                  # diffusion policy (default)
    robot-rl train policy=mlp train.data=data/demos                         # plain single-step BC
    robot-rl train train.data=/path/lerobot_ds train.data_format=lerobot    # imported into <run>/imported_store
    robot-rl train hydra.run.dir=<old run> train.resume=true                # continue an interrupted run

A run directory holds `tb/` (tensorboard: loss, lr, grad norm, samples/s, EMA decay, val loss, sim success) and

    checkpoints/step_<n>/model.safetensors     the policy to deploy (EMA weights when train.ema) with its
                                               normalisation buffers; metadata: policy type/config, features
    checkpoints/step_<n>/raw_model.safetensors the optimised (non-EMA) weights, for resuming (train.ema only)
    checkpoints/step_<n>/optimizer.pt          AdamW + LR-schedule state
    checkpoints/step_<n>/trainer_state.json    step, EMA step, torch/CUDA/numpy RNG states, loss history
    checkpoints/step_<n>/config.yaml           the resolved config
    checkpoints/latest                         JSON pointer {"step": n, "path": "step_<n>"}

A checkpoint directory is written under a temporary name and renamed, then `latest` is replaced atomically, so
a crash never leaves `latest` pointing at a half-written checkpoint. Resuming restores weights, EMA, optimiser,
LR schedule and RNG states: on CPU a resumed run repeats the uninterrupted run's batches and noise exactly.
Ctrl-C / SIGTERM finish the current step, write a checkpoint and stop.

`load_policy(checkpoint)` rebuilds the deployable policy from a checkpoint (or run) directory alone.
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
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from robot_rl.config import ConfigError, resolve_device
from robot_rl.data.episode_store import EpisodeStore, write_json_atomic
from robot_rl.data.sequence import SequenceSampler
from robot_rl.interfaces import OBS_PREFIX, Feature
from robot_rl.policies.diffusion import EMA, DiffusionPolicy
from robot_rl.policies.checkpoint import (POLICY_TYPES, build_policy, load_policy, plain_config, policy_features,
                                          resolve_checkpoint)
from robot_rl.policies.mlp import MLPPolicy
from robot_rl.training.state import lr_lambda, rng_from_json, rng_to_json

log = logging.getLogger("robot_rl.commands.train")


# ------------------------------------------------------------------------------------------- policy building


def fit_mlp_stats(policy: MLPPolicy, data: dict[str, np.ndarray]) -> None:
    """Observation mean/std and the action range of the data (+5 % room), as the online BC learner does."""
    flat = policy.flatten({k: data[OBS_PREFIX + k] for k in policy.obs_keys})
    policy.set_obs_stats(flat.mean(0).numpy(), flat.std(0).numpy())
    act = data["action"]
    lo, hi = act.min(0), act.max(0)
    pad = np.maximum(0.05 * (hi - lo), 1e-2)
    policy.action_low.copy_(torch.as_tensor(lo - pad))
    policy.action_high.copy_(torch.as_tensor(hi + pad))


def policy_loss(policy, batch: dict[str, np.ndarray], device: torch.device) -> torch.Tensor:
    if isinstance(policy, DiffusionPolicy):
        return policy.compute_loss(batch)
    obs = policy.flatten({k: batch[OBS_PREFIX + k][:, -1] for k in policy.obs_keys}).to(device)
    target = torch.as_tensor(batch["action"][:, 0], device=device)
    return ((policy(obs) - target) ** 2).mean()


def horizons(policy) -> tuple[int, int]:
    """(obs_horizon, action_horizon) of the training windows."""
    if isinstance(policy, DiffusionPolicy):
        return policy.cfg.obs_horizon, policy.cfg.action_horizon
    return 1, 1


# --------------------------------------------------------------------------------------------- checkpoints


# -------------------------------------------------------------------------------------------------- eval


def evaluate_in_sim(policy, robot_cfg: dict, episodes: int = 20, seed: int = 1000, max_steps: int = 200) -> dict:
    """Roll the policy out in simulation: episode i reset with seed+i, success at any step ends it."""
    from robot_rl.factory import make_robot

    robot = make_robot(robot_cfg)
    robot.connect()
    successes, lengths = [], []
    was_training = getattr(policy, "training", False)
    if hasattr(policy, "eval"):
        policy.eval()
    t0 = time.monotonic()
    try:
        for i in range(episodes):
            obs = robot.reset(seed=seed + i)
            policy.reset()
            if isinstance(policy, DiffusionPolicy):
                policy.generator = torch.Generator(device=policy.device).manual_seed(seed + i)
            ok, t = False, 0
            for t in range(1, max_steps + 1):
                robot.send_action(policy.select_action(obs))
                obs = robot.get_observation()
                if robot.is_success():
                    ok = True
                    break
            successes.append(ok)
            lengths.append(t)
    finally:
        robot.disconnect()
        if isinstance(policy, DiffusionPolicy):
            policy.generator = None
        if was_training:
            policy.train()
    return {"success_rate": float(np.mean(successes)), "successes": [bool(s) for s in successes],
            "mean_length": float(np.mean(lengths)), "wall_s": time.monotonic() - t0}


# ----------------------------------------------------------------------------------------------- trainer


def validate_train(cfg: DictConfig) -> None:
    t = cfg.train
    for key in ("steps", "batch_size", "checkpoint_every", "log_every"):
        v = t.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"train.{key} must be a positive integer, got {v!r}")
    if not t.get("data"):
        raise ConfigError("train.data is empty: give the episode store (or LeRobot dataset) to train on")
    if t.data_format not in ("store", "lerobot"):
        raise ConfigError(f"train.data_format must be store or lerobot, got {t.data_format!r}")
    if not (isinstance(t.lr, (int, float)) and t.lr > 0):
        raise ConfigError(f"train.lr must be a positive number, got {t.lr!r}")
    if t.lr_schedule not in ("cosine", "constant"):
        raise ConfigError(f"train.lr_schedule must be cosine or constant, got {t.lr_schedule!r}")
    if not 0.0 <= float(t.val_ratio) < 1.0:
        raise ConfigError(f"train.val_ratio must be in [0, 1), got {t.val_ratio!r}")
    if t.ema_decay is not None and not 0.0 <= float(t.ema_decay) < 1.0:
        raise ConfigError(f"train.ema_decay must be null (warm-up schedule) or in [0, 1), got {t.ema_decay!r}")
    if cfg.policy.get("type") not in POLICY_TYPES:
        raise ConfigError(f"policy.type={cfg.policy.get('type')!r} cannot be trained offline; choose policy="
                          f"{' or policy='.join(POLICY_TYPES)}")


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: str | os.PathLike):
        validate_train(cfg)
        self.cfg, self.t = cfg, cfg.train
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.device = resolve_device(str(self.t.device))
        self.policy_cfg = plain_config(cfg.policy)

        if self.t.get("num_threads"):
            torch.set_num_threads(int(self.t.num_threads))  # shared CPUs: 1 thread avoids OpenMP spin contention
        seed = int(self.t.seed)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.rng = np.random.default_rng(seed)  # batch sampling

        self.store = self._open_data()
        feats = self.store.features
        if "action" not in feats:
            raise ConfigError(f"train.data={self.t.data}: the store has no `action` key")
        obs_features = {k[len(OBS_PREFIX):]: f for k, f in feats.items() if k.startswith(OBS_PREFIX)}
        try:
            self.policy = build_policy(self.policy_cfg, obs_features, feats["action"])
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.obs_keys = (self.policy.store_obs_keys if isinstance(self.policy, DiffusionPolicy)
                         else [OBS_PREFIX + k for k in self.policy.obs_keys])

        # episodes: a seeded split into train / val (val only measures the denoising loss)
        n_ep = self.store.num_episodes
        if n_ep == 0:
            raise ConfigError(f"train.data={self.t.data} has no episodes")
        n_val = int(round(float(self.t.val_ratio) * n_ep))
        n_val = min(n_val, n_ep - 1)
        order = np.random.default_rng(seed + 1).permutation(n_ep)
        self.val_episodes = sorted(order[:n_val].tolist())
        self.train_episodes = sorted(order[n_val:].tolist())
        to, ha = horizons(self.policy)
        self.sampler = SequenceSampler.from_store(self.store, self.obs_keys, episodes=self.train_episodes,
                                                  obs_horizon=to, action_horizon=ha)
        self.val_sampler = (SequenceSampler.from_store(self.store, self.obs_keys, episodes=self.val_episodes,
                                                       obs_horizon=to, action_horizon=ha) if n_val else None)
        self._fit_stats()
        self.policy.to(self.device).train()

        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=float(self.t.lr), betas=tuple(self.t.betas),
                                     weight_decay=float(self.t.weight_decay))
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(int(self.t.warmup_steps), int(self.t.steps), str(self.t.lr_schedule)))
        self.ema = (EMA(self.policy, power=float(self.t.ema_power), max_decay=float(self.t.ema_max_decay),
                        decay=None if self.t.ema_decay is None else float(self.t.ema_decay))
                    if self.t.ema else None)
        self.step = 0
        self.losses: list[float] = []  # per step, this process's and (after resume) the restored history
        self.last_decay = 0.0
        self._stop = threading.Event()
        self.writer = None
        if self.t.resume:
            self._resume()

    # -------------------------------------------------------------------------------------------- data
    def _open_data(self) -> EpisodeStore:
        path = Path(str(self.t.data)).expanduser()
        if self.t.data_format == "store":
            try:
                return EpisodeStore.open(path)
            except Exception as e:  # StoreError says what is wrong; anything else is an unreadable path
                raise ConfigError(f"train.data={str(path)!r}: {e}") from None
        dest = Path(self.t.import_dir) if self.t.get("import_dir") else self.run_dir / "imported_store"
        if (dest / "meta.json").exists():
            log.info("using the store imported earlier at %s", dest)
            return EpisodeStore.open(dest)
        from robot_rl.data.interchange_import import import_lerobot  # lazy: only this path needs it

        log.info("importing LeRobot dataset %s into %s", path, dest)
        return import_lerobot(path, dest)

    def _fit_stats(self) -> None:
        """Normalisation from the training episodes (the buffers then travel with every checkpoint)."""
        keys = [*self.obs_keys, "action"]
        data = {k: self.sampler.data[k] for k in keys}
        if isinstance(self.policy, DiffusionPolicy):
            self.policy.fit_normalizer(data)
        else:
            fit_mlp_stats(self.policy, data)

    @property
    def model(self):
        """The policy to act with / deploy: the EMA copy when train.ema, else the optimised one."""
        return self.ema.model if self.ema is not None else self.policy

    # ---------------------------------------------------------------------------------------- training
    def _batch(self, sampler: SequenceSampler, size: int, rng: np.random.Generator) -> dict[str, Any]:
        batch = sampler.sample(size, rng)
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device, non_blocking=True)
                for k, v in batch.items()} if isinstance(self.policy, DiffusionPolicy) else batch

    def train_step(self) -> dict[str, float]:
        batch = self._batch(self.sampler, int(self.t.batch_size), self.rng)
        loss = policy_loss(self.policy, batch, self.device)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train step {self.step}: loss is {loss.item()}; lower train.lr or check the data")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = float(self.t.max_grad_norm) if self.t.max_grad_norm else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.lr_sched.step()
        if self.ema is not None:
            self.last_decay = self.ema.update(self.policy)
        self.step += 1
        value = float(loss.item())
        self.losses.append(value)
        return {"loss": value, "lr": lr, "grad_norm": float(grad_norm)}

    @torch.no_grad()
    def val_loss(self, batches: int = 4) -> float | None:
        """Mean loss of the deployable model on fixed validation windows (RNG streams left untouched)."""
        if self.val_sampler is None:
            return None
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(12345)
            rng = np.random.default_rng(12345)
            model = self.model
            was = model.training
            model.eval()
            losses = [float(policy_loss(model, self._batch(self.val_sampler, int(self.t.batch_size), rng),
                                        self.device)) for _ in range(batches)]
            model.train(was)
        return float(np.mean(losses))

    def sim_eval(self) -> dict | None:
        robot_cfg = self.store.meta.get("info", {}).get("robot_config")
        if not robot_cfg or robot_cfg.get("type") != "robosuite":
            log.warning("train.eval_every is set but the store was not recorded from a simulated robot; skipping")
            return None
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return evaluate_in_sim(self.model, robot_cfg, int(self.t.eval_episodes), int(self.t.eval_seed),
                                   int(self.t.eval_max_steps))

    def request_stop(self, *_):
        if not self._stop.is_set():
            log.info("stop requested: finishing this step, writing a checkpoint")
        self._stop.set()

    def run(self, stop_after: int | None = None) -> dict:
        """Train up to train.steps (or stop early after `stop_after` total steps, as if killed after a checkpoint)."""
        from tqdm import tqdm

        if self.t.tensorboard and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"))
        old_handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old_handlers[sig] = signal.signal(sig, self.request_stop)
        total = int(self.t.steps)
        end = total if stop_after is None else min(total, int(stop_after))
        every = int(self.t.log_every)
        bar = tqdm(total=total, initial=self.step, disable=not self.t.progress, dynamic_ncols=True, desc="train")
        t_window, n_window = time.monotonic(), 0
        t_start, start_step = time.monotonic(), self.step
        val = sim = None
        try:
            while self.step < end and not self._stop.is_set():
                m = self.train_step()
                n_window += 1
                bar.update(1)
                if self.step % every == 0 or self.step == end:
                    now = time.monotonic()
                    m["samples_per_s"] = n_window * int(self.t.batch_size) / max(now - t_window, 1e-9)
                    t_window, n_window = now, 0
                    bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}")
                    if self.writer is not None:
                        for k, v in m.items():
                            self.writer.add_scalar(f"train/{k}", v, self.step)
                        if self.ema is not None:
                            self.writer.add_scalar("train/ema_decay", self.last_decay, self.step)
                if self.t.val_every and self.step % int(self.t.val_every) == 0:
                    val = self.val_loss()
                    if val is not None and self.writer is not None:
                        self.writer.add_scalar("val/loss", val, self.step)
                if self.t.eval_every and self.step % int(self.t.eval_every) == 0:
                    sim = self.sim_eval()
                    if sim is not None:
                        log.info("step %d: sim success %.2f", self.step, sim["success_rate"])
                        if self.writer is not None:
                            self.writer.add_scalar("eval/success_rate", sim["success_rate"], self.step)
                if self.step % int(self.t.checkpoint_every) == 0:
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
                   "samples_per_s": done * int(self.t.batch_size) / max(wall, 1e-9),
                   "final_loss": float(np.mean(self.losses[-50:])) if self.losses else None,
                   "val_loss": val, "sim_eval": sim, "finished": self.step >= total,
                   "checkpoint": str(self.ckpt_root / f"step_{self.step}") if self.step else None}
        (self.run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    # ------------------------------------------------------------------------------------- checkpoints
    def _latest_is(self, step: int) -> bool:
        pointer = self.ckpt_root / "latest"
        return pointer.exists() and json.loads(pointer.read_text()).get("step") == step

    def save_checkpoint(self) -> Path:
        name = f"step_{self.step}"
        final, tmp = self.ckpt_root / name, self.ckpt_root / f".{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        meta = {"format": "robot_rl.checkpoint", "policy_type": self.policy_cfg["type"], "step": str(self.step),
                "policy_config": json.dumps(self._policy_config_for_checkpoint()),
                "features": json.dumps(policy_features(self.policy))}

        def tensors(module) -> dict[str, torch.Tensor]:
            return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}

        save_file(tensors(self.model), str(tmp / "model.safetensors"), metadata=meta)
        if self.ema is not None:
            save_file(tensors(self.policy), str(tmp / "raw_model.safetensors"), metadata=meta)
        torch.save({"optimizer": self.opt.state_dict(), "lr_scheduler": self.lr_sched.state_dict()},
                   tmp / "optimizer.pt")
        state = {
            "step": self.step,
            "ema": self.ema.state() if self.ema is not None else None,
            "rng": {"torch": rng_to_json(torch.get_rng_state()),
                    "cuda": [rng_to_json(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available()
                    else [],
                    "numpy": self.rng.bit_generator.state},
            "losses": self.losses,
            "train_episodes": self.train_episodes, "val_episodes": self.val_episodes,
            "data": str(self.t.data), "time": time.time(),
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_json_atomic(self.ckpt_root / "latest", {"step": self.step, "path": name})
        keep = self.t.get("keep_last")
        if keep:
            steps = sorted(int(p.name[5:]) for p in self.ckpt_root.glob("step_*") if p.name[5:].isdigit())
            for s in steps[:-int(keep)]:
                shutil.rmtree(self.ckpt_root / f"step_{s}", ignore_errors=True)
        log.info("checkpoint %s", final)
        return final

    def _policy_config_for_checkpoint(self) -> dict:
        if isinstance(self.policy, DiffusionPolicy):
            return {**self.policy.cfg.to_dict(), "obs_keys": list(self.policy.obs_keys)}
        return {**self.policy_cfg, "obs_keys": list(self.policy.obs_keys)}

    def _resume(self) -> None:
        src = self.t.get("resume_from") or self.run_dir
        try:
            ckpt = resolve_checkpoint(src)
        except FileNotFoundError as e:
            raise ConfigError(f"train.resume=true but there is nothing to resume: {e}. Point hydra.run.dir at the "
                              f"interrupted run or set train.resume_from") from None
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if state["train_episodes"] != self.train_episodes:
            raise ConfigError(f"train.resume: {ckpt} was trained on other episodes (different data, seed or "
                              f"val_ratio); start a new run instead")
        raw = ckpt / ("raw_model.safetensors" if self.ema is not None else "model.safetensors")
        if self.ema is not None and not raw.exists():
            raise ConfigError(f"train.resume: {ckpt} has no raw_model.safetensors (it was trained without EMA)")
        self.policy.load_state_dict(load_file(str(raw)))
        if self.ema is not None:
            self.ema.model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
            self.ema.load_state(state["ema"])
        opt = torch.load(ckpt / "optimizer.pt", map_location=self.device, weights_only=True)
        self.opt.load_state_dict(opt["optimizer"])
        self.lr_sched.load_state_dict(opt["lr_scheduler"])
        self.step = int(state["step"])
        self.losses = list(state.get("losses", []))
        rng = state["rng"]
        torch.set_rng_state(rng_from_json(rng["torch"]))
        if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([rng_from_json(s) for s in rng["cuda"]])
        self.rng.bit_generator.state = rng["numpy"]
        log.info("resumed from %s at step %d", ckpt, self.step)


def main(cfg: DictConfig, run_dir: str | os.PathLike) -> int:
    """Entry point of `robot-rl train` (the CLI passes hydra's run directory). Returns an exit code."""
    trainer = Trainer(cfg, run_dir)
    log.info("training %s on %s: %d train / %d val episodes, %d windows, device %s", cfg.policy.type, cfg.train.data,
             len(trainer.train_episodes), len(trainer.val_episodes), len(trainer.sampler), trainer.device)
    summary = trainer.run()
    log.info("done: step %d, loss %.4f, %.0f samples/s -> %s", summary["step"], summary["final_loss"] or float("nan"),
             summary["samples_per_s"], summary["checkpoint"])
    if summary["finished"]:
        return 0
    return 130 if trainer._stop.is_set() else 1  # stopped by Ctrl-C/SIGTERM: resumable from the last checkpoint
