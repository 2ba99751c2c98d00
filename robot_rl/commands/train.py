"""`robot-rl train`: offline behaviour cloning from an episode store (diffusion policy, or the MLP baseline).

    robot-rl train train.data=data/demos train.steps=20000                  # diffusion policy (default)
    robot-rl train policy=mlp train.data=data/demos                         # plain single-step BC
    robot-rl train train.data=/path/lerobot_ds train.data_format=lerobot    # imported into <run>/imported_store
    robot-rl train train.data=[data/target,runs/ret/selection] train.weights=[0.5,0.5]   # retrieval BC (50/50)
    robot-rl train hydra.run.dir=<old run> train.resume=true                # continue an interrupted run

What is specific to BC lives here: a seeded train/val split of the store's episodes, windows of the policy's
horizons, its normaliser fitted on the training episodes, and `policy.compute_loss`. Several datasets (stores,
`robot-rl retrieve` selections, LeRobot datasets) are mixed per batch by `train.weights` (`robot_rl.data.mixture`;
null: uniform over all their windows), each split into train/val episodes alike. Everything else (AdamW, warm-up +
cosine LR, EMA, checkpoints, bit-exact resume, tensorboard, Ctrl-C) is `robot_rl.training.loop`'s.

A run directory holds `tb/` (tensorboard: train/loss, lr, grad_norm, samples_per_s, ema_decay, val/loss,
eval/success_rate), `train_summary.json` (step, final_loss, samples/s, the last `val` and sim `eval` results) and

    checkpoints/step_<n>/manifest.json + policy.safetensors   the deployable policy (EMA weights when train.ema),
                                                               with the store's robot config and fps
    checkpoints/step_<n>/raw_policy.safetensors, optimizer.pt, trainer_state.json, config.yaml   for resuming
    checkpoints/latest                                         {"path": "step_<n>", "step": n}

`load_policy(run or checkpoint directory)` rebuilds the deployable policy.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from robot_rl.config import ConfigError, git_hash, resolve_device
from robot_rl.data.episode_store import EpisodeStore
from robot_rl.data.mixture import MixtureSampler, check_weights, store_windows
from robot_rl.data.selection import SelectionError, is_selection, read_selection
from robot_rl.interfaces import OBS_PREFIX
from robot_rl.policies.checkpoint import POLICY_TYPES, build_policy, plain_config, write_policy
from robot_rl.training.loop import Hook, LoopConfig, LoopUser, TrainingLoop, seed_everything, store_robot, to_device

log = logging.getLogger("robot_rl.commands.train")


# -------------------------------------------------------------------------------------------------- eval


def evaluate_in_sim(policy, robot_cfg: dict, episodes: int = 20, seed: int = 1000, max_steps: int = 200) -> dict:
    """Roll the policy out in simulation with `robot-rl eval`'s evaluation (episode i reset with seed+i, success at
    any step ends it); the fields the training run logs and keeps in its trainer state."""
    from robot_rl.commands.evaluate import evaluate

    r = evaluate(policy, robot_cfg, episodes=episodes, seed=seed, max_steps=max_steps)
    return {
        "success_rate": r["success_rate"],
        "successes": [e["success"] for e in r["per_episode"]],
        "mean_length": r["mean_length"],
        "wall_s": r["wall_s"],
    }


# ----------------------------------------------------------------------------------------------- trainer


def validate_train(cfg: DictConfig) -> LoopConfig:
    t = cfg.train
    loop_cfg = LoopConfig.from_section(t, "train")
    if not t.get("data"):
        raise ConfigError("train.data is empty: give the episode store (or LeRobot dataset) to train on")
    if t.data_format not in ("store", "lerobot", "auto"):
        raise ConfigError(f"train.data_format must be store, lerobot or auto, got {t.data_format!r}")
    try:
        check_weights(t.get("weights"), len(data_paths(t)), "train.weights")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not 0.0 <= float(t.val_ratio) < 1.0:
        raise ConfigError(f"train.val_ratio must be in [0, 1), got {t.val_ratio!r}")
    if cfg.policy.get("type") not in POLICY_TYPES:
        raise ConfigError(
            f"policy.type={cfg.policy.get('type')!r} cannot be trained offline; choose policy="
            f"{' or policy='.join(POLICY_TYPES)}"
        )
    return loop_cfg


def data_paths(t: DictConfig) -> list[str]:
    """train.data as a list: one path, or several (stores, selections, LeRobot datasets) to mix."""
    data = t.data
    return [str(d) for d in data] if OmegaConf.is_list(data) or isinstance(data, (list, tuple)) else [str(data)]


class Trainer(LoopUser):
    def __init__(self, cfg: DictConfig, run_dir: str | os.PathLike):
        loop_cfg = validate_train(cfg)
        self.cfg, self.t = cfg, cfg.train
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(str(self.t.device))
        seed = int(self.t.seed)
        seed_everything(seed, self.t.get("num_threads"))

        self.datasets = [self._open_dataset(p, i) for i, p in enumerate(data_paths(self.t))]  # (path, store, rows)
        self.store = self.datasets[0][1]
        feats = self.store.features
        if "action" not in feats:
            raise ConfigError(f"train.data={self.t.data}: the store has no `action` key")
        obs_features = {k[len(OBS_PREFIX) :]: f for k, f in feats.items() if k.startswith(OBS_PREFIX)}
        try:
            self.policy = build_policy(plain_config(cfg.policy), obs_features, feats["action"])
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.obs_keys = self.policy.store_obs_keys
        self._check_same_features(feats)

        # episodes: a seeded split into train / val per dataset (val only measures the loss)
        to, ha = self.policy.horizons
        train, val, self.train_episodes, self.val_episodes = [], [], [], []
        for path, store, rows in self.datasets:
            episodes = list(range(store.num_episodes)) if rows is None else np.unique(rows[0]).tolist()
            n_ep = len(episodes)
            if n_ep == 0:
                raise ConfigError(f"train.data={path} has no episodes")
            n_val = min(int(round(float(self.t.val_ratio) * n_ep)), n_ep - 1)
            order = np.random.default_rng(seed + 1).permutation(n_ep)
            val_eps = sorted(episodes[i] for i in order[:n_val])
            train_eps = sorted(episodes[i] for i in order[n_val:])
            kw = dict(obs_horizon=to, action_horizon=ha)
            train.append(store_windows(path, store, self.obs_keys, train_eps, rows, **kw))
            if n_val:
                val.append(store_windows(path, store, self.obs_keys, val_eps, rows, **kw))
            self.train_episodes.append(train_eps)
            self.val_episodes.append(val_eps)
        if len(self.datasets) == 1:  # one dataset: the episode lists as they always were
            self.train_episodes, self.val_episodes = self.train_episodes[0], self.val_episodes[0]
        weights = self.t.get("weights")
        self.sampler = MixtureSampler(train, weights)
        self.val_sampler = MixtureSampler(val, weights if len(val) == len(train) else None) if val else None
        # normalisation from the training windows (the buffers then travel with every checkpoint)
        self.policy.fit_normalizer({k: self.sampler.column(k) for k in [*self.obs_keys, "action"]})
        self.policy.to(self.device).train()

        self.robot = store_robot(self.store)
        self.provenance = {"source": "train", "data": str(self.store.path), "git": git_hash()}
        self.loop = TrainingLoop(
            self.run_dir,
            self.policy,
            lambda batch: (self.policy.compute_loss(batch), {}),
            lambda rng: self._batch(self.sampler, rng),
            loop_cfg,
            name="train",
            hooks=[
                Hook("val", int(self.t.val_every or 0), self.val_loss),
                Hook("eval", int(self.t.eval_every or 0), self.sim_eval),
            ],
            export=self._export,
            config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
            state=lambda: {
                "train_episodes": self.train_episodes,
                "val_episodes": self.val_episodes,
                "data": str(self.t.data),
            },
        )
        if self.t.resume:
            state = self.loop.resume(self.t.get("resume_from"))
            if state.get("train_episodes") != self.train_episodes:
                raise ConfigError(
                    "train.resume: the checkpoint was trained on other episodes (different data, seed "
                    "or val_ratio); start a new run instead"
                )

    def _open_dataset(self, entry: str, i: int) -> tuple[str, EpisodeStore, tuple | None]:
        """(path, store, selected (episode, step) rows or None) of one train.data entry."""
        path = Path(entry).expanduser()
        if is_selection(path):
            try:
                sel, store = read_selection(path)
            except (SelectionError, OSError) as e:
                raise ConfigError(f"train.data={str(path)!r}: {e}") from None
            return str(path), store, (sel.episode, sel.step)
        return str(path), self._open_data(path, i), None

    def _check_same_features(self, feats: dict) -> None:
        for path, store, _ in self.datasets[1:]:
            for k in [*self.obs_keys, "action"]:
                if k not in store.features or store.features[k].shape != feats[k].shape:
                    have = store.features[k].shape if k in store.features else "no such key"
                    raise ConfigError(
                        f"train.data: {path} does not match {self.datasets[0][0]}: {k} is {feats[k].shape} "
                        f"there, {have} here; datasets mixed in one run need the same observations and action"
                    )

    def _open_data(self, path: Path, i: int = 0) -> EpisodeStore:
        fmt = self.t.data_format
        if fmt == "auto":
            fmt = "lerobot" if (path / "meta" / "info.json").exists() and not (path / "meta.json").exists() else "store"
        if fmt == "store":
            try:
                return EpisodeStore.open(path)
            except Exception as e:  # StoreError says what is wrong; anything else is an unreadable path
                raise ConfigError(f"train.data={str(path)!r}: {e}") from None
        dest = Path(self.t.import_dir) if self.t.get("import_dir") else self.run_dir / "imported_store"
        dest = dest if i == 0 else dest.with_name(f"{dest.name}_{i}")
        if (dest / "meta.json").exists():
            log.info("using the store imported earlier at %s", dest)
            return EpisodeStore.open(dest)
        from robot_rl.data.interchange_import import import_lerobot  # lazy: only this path needs it

        log.info("importing LeRobot dataset %s into %s", path, dest)
        return import_lerobot(path, dest)

    def _batch(self, sampler: MixtureSampler, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        return to_device(sampler.sample(int(self.t.batch_size), rng), self.device)

    def _export(self, directory: Path, policy, loop_info: dict) -> None:
        write_policy(
            directory, policy, robot=self.robot, fps=self.store.fps, provenance={**self.provenance, **loop_info}
        )

    # ---------------------------------------------------------------------------------------------- hooks
    @torch.no_grad()
    def val_loss(self) -> dict | None:
        """Mean loss of the deployable model on fixed validation windows (the loop forks the RNG streams)."""
        if self.val_sampler is None:
            return None
        torch.manual_seed(int(self.t.val_seed))
        rng = np.random.default_rng(int(self.t.val_seed))
        model, was = self.model, self.model.training
        model.eval()
        losses = [float(model.compute_loss(self._batch(self.val_sampler, rng))) for _ in range(int(self.t.val_batches))]
        model.train(was)
        return {"loss": float(np.mean(losses))}

    def sim_eval(self) -> dict | None:
        robot_cfg = self.robot["config"]
        if not robot_cfg or robot_cfg.get("type") != "robosuite":
            log.warning("train.eval_every is set but the store was not recorded from a simulated robot; skipping")
            return None
        result = evaluate_in_sim(
            self.model, robot_cfg, int(self.t.eval_episodes), int(self.t.eval_seed), int(self.t.eval_max_steps)
        )
        log.info("step %d: sim success %.2f", self.step, result["success_rate"])
        return result


def main(cfg: DictConfig, run_dir: str | os.PathLike) -> int:
    """Entry point of `robot-rl train` (the CLI passes hydra's run directory). Returns an exit code."""
    trainer = Trainer(cfg, run_dir)
    log.info(
        "training %s on %s: %d train / %d val episodes, %d windows, device %s",
        cfg.policy.type,
        cfg.train.data,
        len(trainer.train_episodes),
        len(trainer.val_episodes),
        len(trainer.sampler),
        trainer.device,
    )
    summary = trainer.run()
    log.info(
        "done: step %d, loss %.4f, %.0f samples/s -> %s",
        summary["step"],
        summary["final_loss"] or float("nan"),
        summary["samples_per_s"],
        summary["checkpoint"],
    )
    if summary["finished"]:
        return 0
    return 130 if trainer.loop.stopped else 1  # stopped by Ctrl-C/SIGTERM: resumable from the last checkpoint
