"""One offline training loop for any model and loss: BC policies, distilled students, reward models, VAEs, critics.

    seed_everything(cfg.train.seed)                       # before the model is built (its init draws from torch)
    model = ...
    loop = TrainingLoop(run_dir, model, step_fn, batches, LoopConfig.from_section(cfg.train, "train"),
                        hooks=[Hook("val", 1000, val_fn)], export=write_deployable)
    if cfg.train.resume:
        loop.resume(cfg.train.resume_from)
    summary = loop.run()

One step: `batch = batches(rng)` (the loop's numpy Generator, checkpointed), `loss, metrics = step_fn(batch)`,
AdamW with gradient clipping, linear warm-up then cosine (or constant) LR, an optional EMA copy of the model.
The loop knows nothing of what it trains: `step_fn` computes the loss, `export(directory, module, {step, ema})`
writes the deployable form of a module (e.g. with `policies.checkpoint.write_policy`), `hooks` measure it.

`<run>/checkpoints/step_<n>/` (written under a temporary name and renamed, then `checkpoints/latest` replaced):

    <export's files>          the deployable module (the EMA copy when cfg.ema); `weights_file` must hold its
                              state_dict (without `export` the loop writes that file alone)
    raw_<weights_file>        the optimised weights (cfg.ema only)
    optimizer.pt              AdamW + LR-schedule state
    trainer_state.json        step, EMA step, torch/CUDA/numpy RNG states, per-step losses, hook results, `state()`
    config.yaml               the resolved config (when given)

`resume()` restores all of it: on CPU a resumed run repeats the uninterrupted run's batches and noise exactly.
Ctrl-C / SIGTERM finish the current step, write a checkpoint and stop. Hooks run under a forked torch RNG, so
measuring never changes what is trained. Scalars go to `<run>/tb` (tensorboard), the end to `<name>_summary.json`.

Several processes (`torchrun --nproc_per_node=N robot-rl train ...`, docs/scale.md): `seed_everything` joins the
process group torchrun describes (gloo on CPU, NCCL for CUDA tensors; each rank on GPU `LOCAL_RANK`) and the loop
wraps the model in DistributedDataParallel. `batches(rng)` still returns the global batch of `cfg.batch_size`
rows, drawn from the same data stream on every rank, and rank r trains on rows [r*B/N, (r+1)*B/N): the averaged
gradient is the one-process gradient of the same batch. Each rank's torch stream (dropout, diffusion noise) is
its own, derived from the seed (rank 0's is the one-process stream). Every step agrees on the loss (and whether
to stop) over all ranks; only rank 0 runs hooks and writes checkpoints, tensorboard, the summary and logs, and a
checkpoint keeps every rank's RNG state, so resuming with the same N repeats the uninterrupted run exactly.
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from robot_rl.config import ConfigError, write_json
from robot_rl.policies.checkpoint import latest_checkpoint, save_checkpoint
from robot_rl.policies.diffusion import EMA
from robot_rl.training.state import SCHEDULES, lr_lambda, rng_from_json, rng_to_json

log = logging.getLogger("robot_rl.training.loop")

OPTIMIZER, STATE, CONFIG = "optimizer.pt", "trainer_state.json", "config.yaml"
FINAL_LOSS_WINDOW = 50  # the summary's final_loss: mean of the last this-many step losses
_TINY = 1e-9  # guards rates against a zero wall time
# rank 0's hooks (a sim evaluation, a validation pass) run while the other ranks wait in the next step's collective:
# the process group's timeout must outlast them (torch's defaults: 10 min NCCL, 30 min gloo)
_COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


@dataclass
class LoopConfig:
    """The loop's settings, read from a config section (`train:`, `distill:`, ...) by `from_section`.
    lr_schedule: cosine | constant after warmup_steps of linear warm-up; max_grad_norm None: no clipping;
    ema_decay None: the warm-up schedule 1 - (1 + step)^-ema_power capped at ema_max_decay; keep_last None: all."""

    steps: int
    batch_size: int
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    lr_schedule: str
    warmup_steps: int
    max_grad_norm: float | None
    ema: bool
    ema_power: float
    ema_max_decay: float
    ema_decay: float | None
    log_every: int
    checkpoint_every: int
    keep_last: int | None
    seed: int
    progress: bool
    tensorboard: bool

    @classmethod
    def from_section(cls, section, name: str) -> LoopConfig:
        v = {f.name: section.get(f.name) for f in fields(cls)}
        for key in ("steps", "batch_size", "checkpoint_every", "log_every", "warmup_steps", "keep_last"):
            least = 0 if key == "warmup_steps" else 1
            if not (isinstance(v[key], int) and not isinstance(v[key], bool) and v[key] >= least) and not (
                key == "keep_last" and v[key] is None
            ):
                raise ConfigError(f"{name}.{key} must be an integer >= {least}, got {v[key]!r}")
        if not (isinstance(v["lr"], (int, float)) and not isinstance(v["lr"], bool) and v["lr"] > 0):
            raise ConfigError(f"{name}.lr must be a positive number, got {v['lr']!r}")
        if v["lr_schedule"] not in SCHEDULES:
            raise ConfigError(f"{name}.lr_schedule must be one of {', '.join(SCHEDULES)}, got {v['lr_schedule']!r}")
        if v["ema_decay"] is not None and not 0.0 <= float(v["ema_decay"]) < 1.0:
            raise ConfigError(f"{name}.ema_decay must be null (warm-up schedule) or in [0, 1), got {v['ema_decay']!r}")
        floats = ("lr", "weight_decay", "ema_power", "ema_max_decay", "ema_decay", "max_grad_norm")
        v.update(
            {k: float(v[k]) for k in floats if v[k] is not None},
            betas=tuple(float(b) for b in v["betas"]),
            max_grad_norm=float(v["max_grad_norm"]) if v["max_grad_norm"] else None,
        )
        return cls(**v)


@dataclass
class Hook:
    """`fn()` every `every` steps (0 = never) -> a dict (its numbers go to tensorboard as `<name>/<key>`) or None."""

    name: str
    every: int
    fn: Callable[[], dict | None]
    at_start: bool = False  # also before the first step of a fresh run
    at_end: bool = False  # also after the last step (cfg.steps)


# ------------------------------------------------------------------------------------------ several processes
def init_distributed() -> int:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the
    environment); a no-op for one process. CUDA tensors go over NCCL, CPU tensors over gloo; each rank takes GPU
    LOCAL_RANK as its current device (so `device=auto` / `cuda` lands there). Returns the world size."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return 1
    if dist.is_initialized():
        return dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda and local < torch.cuda.device_count():
        torch.cuda.set_device(local)
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=_COLLECTIVE_TIMEOUT)
    atexit.register(_leave_process_group)
    if dist.get_rank() != 0:  # rank 0 speaks for the run; the others only warn
        logging.getLogger("robot_rl").setLevel(logging.WARNING)
    log.info("process group: %d ranks (%s)", dist.get_world_size(), dist.get_backend())
    return dist.get_world_size()


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes files and logs."""
    return rank_and_world()[0] == 0


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The torch seed of `rank`: rank 0 at step 0 keeps `seed` (one process's stream), the others get independent
    streams derived from (seed, rank[, step]) (`step`: a resume that has no saved state for this rank)."""
    if rank == 0 and step == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(rank), int(step)]).generate_state(1, np.uint64)[0] >> 1)


def seed_everything(seed: int, num_threads: int | None = None) -> None:
    """Seed python, numpy and torch (before building models); `num_threads` caps torch's CPU threads. Under torchrun
    it first joins the process group (every rank builds the same model from the same seed; the loop then gives
    ranks > 0 their own torch stream)."""
    init_distributed()
    if num_threads:
        torch.set_num_threads(int(num_threads))  # shared CPUs: 1 thread avoids OpenMP spin contention
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """numpy -> tensors on `device`; to a GPU through pinned (page-locked) memory with an asynchronous copy, so the
    host goes on preparing the next batch while this one is copied."""
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        if device.type == "cuda":
            t = t.pin_memory()
        out[k] = t.to(device, non_blocking=True)
    return out


def shard(batch: Any, rows: int, rank: int, world: int) -> Any:
    """Rank `rank`'s contiguous share of a global batch: every tensor/array (in dicts, lists, tuples) whose first
    dimension is `rows` is cut to rows [rank*rows/world, (rank+1)*rows/world); everything else passes unchanged."""
    if world == 1:
        return batch
    k = rows // world
    if isinstance(batch, dict):
        return {key: shard(v, rows, rank, world) for key, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(shard(v, rows, rank, world) for v in batch)
    if isinstance(batch, (torch.Tensor, np.ndarray)) and batch.ndim and batch.shape[0] == rows:
        return batch[rank * k : (rank + 1) * k]
    return batch


class _Loss(nn.Module):
    """What DistributedDataParallel wraps: its forward is the caller's `step_fn`, so DDP prepares the gradient
    all-reduce for whatever methods of `model` the loss calls (`compute_loss`, several networks)."""

    def __init__(self, model: nn.Module, step_fn: Callable):
        super().__init__()
        self.model, self.step_fn = model, step_fn

    def forward(self, batch):
        return self.step_fn(batch)


def store_robot(store) -> dict:
    """{"name", "config", "task"} of the robot an episode store was recorded with (from its meta `info`)."""
    info = store.meta.get("info") or {}
    return {"name": info.get("robot"), "config": info.get("robot_config"), "task": info.get("task")}


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


class LoopUser:
    """Base of a trainer built on a TrainingLoop (`self.loop`): its state under the names verbs and tests use."""

    loop: TrainingLoop
    model = property(lambda self: self.loop.deployable, doc="the EMA copy when cfg.ema, else the trained model")
    step = property(lambda self: self.loop.step)
    losses = property(lambda self: self.loop.losses)

    def run(self, stop_after: int | None = None) -> dict:
        """Train up to cfg.steps (or stop after `stop_after` total steps, as if killed after a checkpoint)."""
        return self.loop.run(stop_after)


class TrainingLoop:
    def __init__(
        self,
        run_dir: str | os.PathLike,
        model: nn.Module,
        step_fn: Callable[[Any], tuple[torch.Tensor, dict[str, float]]],
        batches: Callable[[np.random.Generator], Any],
        cfg: LoopConfig,
        *,
        name: str = "train",
        hooks: Iterable[Hook] = (),
        export: Callable[[Path, nn.Module, dict], Any] | None = None,
        weights_file: str = "policy.safetensors",
        config_yaml: str | None = None,
        state: Callable[[], dict] | None = None,
        summary: Callable[[], dict] | None = None,
        after_step: Callable[[], None] | None = None,
    ):
        """`model`: everything trained and checkpointed (several networks, target copies: one nn.ModuleDict; only
        parameters with requires_grad are optimised). `name`: tensorboard prefix, progress label, summary file
        and the config section errors point at. `state()` / `summary()` add the caller's entries to
        trainer_state.json / the summary. `after_step()` runs after each optimiser step (e.g. a Polyak target)."""
        self.run_dir = Path(run_dir)
        if is_main_process():
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.model, self.step_fn, self.batches, self.cfg, self.name = model, step_fn, batches, cfg, name
        self.hooks, self.export, self.config_yaml = list(hooks), export, config_yaml
        self.weights_file, self.raw_file = weights_file, f"raw_{weights_file}"
        self.extra_state, self.extra_summary, self.after_step = state, summary, after_step
        self.device = next(model.parameters()).device
        self.rng = np.random.default_rng(cfg.seed)  # what `batches` draws from (the same on every rank)
        init_distributed()
        self.rank, self.world = rank_and_world()
        self.is_main = self.rank == 0
        self.ddp = self._wrap(model) if self.world > 1 else None
        if self.rank > 0:  # after DDP's broadcast of rank 0's weights: this rank's own dropout / noise stream
            torch.manual_seed(rank_seed(cfg.seed, self.rank))
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(cfg.warmup_steps, cfg.steps, cfg.lr_schedule)
        )
        self.ema = (
            EMA(model, power=cfg.ema_power, max_decay=cfg.ema_max_decay, decay=cfg.ema_decay) if cfg.ema else None
        )
        self.step = 0
        self.losses: list[float] = []  # per step, including the history a resume restores
        self.history: dict[str, list[tuple[int, dict]]] = {h.name: [] for h in self.hooks}
        self._stop = threading.Event()
        self._saved_step = -1  # the step of the newest checkpoint this run wrote or resumed from
        self._agreed_stop = False  # under DDP: every rank saw a stop request in the last step
        self.writer = None

    def _wrap(self, model: nn.Module) -> DistributedDataParallel:
        c = self.cfg
        if c.batch_size % self.world:
            raise ConfigError(
                f"{self.name}.batch_size={c.batch_size} is the global batch and must split evenly over the "
                f"{self.world} processes: use a multiple of {self.world}"
            )
        cuda = self.device.type == "cuda"
        if cuda and self.device.index != torch.cuda.current_device():
            raise ConfigError(
                f"{self.name}.device: rank {self.rank} built its model on {self.device}, not on its own GPU "
                f"cuda:{torch.cuda.current_device()} (LOCAL_RANK): use device=auto or cuda under torchrun"
            )
        # static_graph: the same parameters take part in every step (frozen or unused ones are found once)
        return DistributedDataParallel(
            _Loss(model, self.step_fn), device_ids=[self.device.index] if cuda else None, static_graph=True
        )

    @property
    def local_batch_size(self) -> int:
        """Rows each rank trains on per step (cfg.batch_size is the global batch)."""
        return self.cfg.batch_size // self.world

    def _all_ranks_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(values)
        return values

    @property
    def deployable(self) -> nn.Module:
        """What to act with and export: the EMA copy when cfg.ema, else the optimised model."""
        return self.ema.model if self.ema is not None else self.model

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def request_stop(self, *_) -> None:
        if not self._stop.is_set():
            log.info("stop requested: finishing this step, writing a checkpoint")
        self._stop.set()

    def _cuda(self) -> list[torch.device]:
        return [self.device] if self.device.type == "cuda" else []

    # ------------------------------------------------------------------------------------------------ step
    def train_step(self) -> dict[str, float]:
        batch = shard(self.batches(self.rng), self.cfg.batch_size, self.rank, self.world)
        loss, metrics = (self.ddp or self.step_fn)(batch)
        # one collective agrees on the global loss and on stopping (a signal may reach the ranks steps apart)
        flags = loss.new_tensor(float(self.stopped), dtype=torch.float32)
        total, stops = self._all_ranks_sum(torch.stack([loss.detach().float(), flags])).tolist()  # the one sync
        value = total / self.world
        if stops > 0:
            self._stop.set()
            self._agreed_stop = True
        if not np.isfinite(value):
            raise FloatingPointError(
                f"{self.name} step {self.step}: loss is {value}; lower {self.name}.lr or check the data"
            )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm or float("inf"))
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.lr_sched.step()
        if self.after_step is not None:
            self.after_step()
        out = {"loss": value, "lr": lr, "grad_norm": grad_norm, **metrics}
        if self.ema is not None:
            out["ema_decay"] = self.ema.update(self.model)
        self.step += 1
        self.losses.append(out["loss"])
        return out

    def _scalars(self, prefix: str, values: dict) -> None:
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(f"{prefix}/{k}", v, self.step)

    def _run_hook(self, hook: Hook) -> None:
        if not self.is_main:
            return  # hooks measure; rank 0 measures for the run
        done = self.history[hook.name]
        if done and done[-1][0] == self.step:
            return  # measured at this step already (before a resume)
        with torch.random.fork_rng(devices=self._cuda()):
            result = hook.fn()
        if result is not None:
            done.append((self.step, result))
            self._scalars(hook.name, result)

    # ------------------------------------------------------------------------------------------------ loop
    def run(self, stop_after: int | None = None) -> dict:
        """Train up to cfg.steps (or stop after `stop_after` total steps, as if killed after a checkpoint)."""
        from tqdm import tqdm

        c = self.cfg
        if c.tensorboard and self.writer is None and self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"))
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        end = c.steps if stop_after is None else min(c.steps, int(stop_after))
        bar = tqdm(
            total=c.steps,
            initial=self.step,
            disable=not (c.progress and self.is_main),
            dynamic_ncols=True,
            desc=self.name,
        )
        t_start, start_step = time.monotonic(), self.step
        t_window, n_window = t_start, 0
        self._agreed_stop = False
        try:
            for hook in self.hooks:
                if hook.every and hook.at_start and self.step == 0:
                    self._run_hook(hook)
            while self.step < end and not self._halted():
                m = self.train_step()
                n_window += 1
                bar.update(1)
                if self.step % c.log_every == 0 or self.step == end:
                    now = time.monotonic()
                    m = self._mean_over_ranks(m)
                    m["samples_per_s"] = n_window * c.batch_size / max(now - t_window, _TINY)
                    t_window, n_window = now, 0
                    bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}")
                    self._scalars(self.name, m)
                for hook in self.hooks:
                    if hook.every and (self.step % hook.every == 0 or (hook.at_end and self.step == c.steps)):
                        self._run_hook(hook)
                if self.step % c.checkpoint_every == 0:
                    self.save_checkpoint()
            if self.step > 0 and self._saved_step != self.step:
                self.save_checkpoint()
        finally:
            bar.close()
            for sig, h in handlers.items():
                signal.signal(sig, h)
            if self.writer is not None:
                self.writer.close()
                self.writer = None
        wall, done = time.monotonic() - t_start, self.step - start_step
        summary = {
            "step": self.step,
            "steps_this_run": done,
            "wall_s": wall,
            "s_per_step": wall / max(done, 1),
            "samples_per_s": done * c.batch_size / max(wall, _TINY),
            "final_loss": float(np.mean(self.losses[-FINAL_LOSS_WINDOW:])) if self.losses else None,
            "finished": self.step >= c.steps,
            "checkpoint": str(self.ckpt_root / f"step_{self.step}") if self.step else None,
            **{h.name: self.history[h.name][-1][1] if self.history[h.name] else None for h in self.hooks},
            **(self.extra_summary() if self.extra_summary else {}),
        }
        if self.world > 1:
            summary["processes"] = self.world
        if self.is_main:
            write_json(self.run_dir / f"{self.name}_summary.json", summary)
        if self.world > 1:
            dist.barrier()  # no rank returns before rank 0 has written the last checkpoint and the summary
        return summary

    def _halted(self) -> bool:
        """One process: a stop was requested. Several: the ranks agreed on it in the last step's collective (a
        rank that left the loop on its own flag would leave the others waiting in the next step)."""
        return self._stop.is_set() if self.world == 1 else self._agreed_stop

    def _mean_over_ranks(self, m: dict) -> dict:
        """The logged metrics as numbers; under DDP the step_fn's metrics averaged over ranks (the loss already is)."""
        m = {k: float(v) if isinstance(v, torch.Tensor) and v.numel() == 1 else v for k, v in m.items()}
        keys = [k for k, v in m.items() if k not in ("loss", "lr") and isinstance(v, (int, float))]
        keys = [k for k in keys if not isinstance(m[k], bool)]
        if self.world > 1 and keys:
            device = self.device if self.device.type == "cuda" else torch.device("cpu")
            total = self._all_ranks_sum(torch.tensor([float(m[k]) for k in keys], device=device, dtype=torch.float64))
            m.update({k: float(v) / self.world for k, v in zip(keys, total.tolist())})
        return m

    # ----------------------------------------------------------------------------------------- checkpoints
    def _rank_rng_states(self) -> tuple[list[str], list[list[str]]]:
        """Every rank's torch (CPU) and CUDA RNG states, gathered on all ranks (a collective under DDP)."""
        mine = (
            rng_to_json(torch.get_rng_state()),
            [rng_to_json(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        )
        if self.world == 1:
            return [mine[0]], [mine[1]]
        every: list = [None] * self.world
        dist.all_gather_object(every, mine)
        return [t for t, _ in every], [c for _, c in every]

    def save_checkpoint(self) -> Path:
        """Every rank calls it at the same step (the RNG states are gathered); rank 0 writes."""
        torch_states, cuda_states = self._rank_rng_states()
        self._saved_step = self.step
        path = self.ckpt_root / f"step_{self.step}"
        if not self.is_main:
            return path

        def write(d: Path) -> None:
            if self.export is not None:
                self.export(d, self.deployable, {"step": self.step, "ema": self.ema is not None})
            else:
                save_file(_tensors(self.deployable), str(d / self.weights_file))
            if self.ema is not None:
                save_file(_tensors(self.model), str(d / self.raw_file))
            torch.save({"optimizer": self.opt.state_dict(), "lr_scheduler": self.lr_sched.state_dict()}, d / OPTIMIZER)
            state = {
                "step": self.step,
                "ema": self.ema.state() if self.ema is not None else None,
                "rng": {
                    "torch": torch_states[0],
                    "cuda": cuda_states[0],
                    "numpy": self.rng.bit_generator.state,
                    "ranks": {"torch": torch_states, "cuda": cuda_states},  # under DDP: rank r's streams
                },
                "losses": self.losses,
                "hooks": self.history,
                "time": time.time(),
                **(self.extra_state() if self.extra_state else {}),
            }
            (d / STATE).write_text(json.dumps(state, default=float))
            if self.config_yaml is not None:
                (d / CONFIG).write_text(self.config_yaml)

        path = save_checkpoint(self.ckpt_root, f"step_{self.step}", write, {"step": self.step}, self.cfg.keep_last)
        log.info("checkpoint %s", path)
        return path

    @staticmethod
    def find_checkpoint(source: str | os.PathLike) -> Path | None:
        """The training checkpoint meant by a checkpoint, `checkpoints/` or run directory (its latest)."""
        source = Path(source).expanduser()
        if (source / STATE).is_file():
            return source
        for root in (source / "checkpoints", source):
            ckpt = latest_checkpoint(root)
            if ckpt is not None and (ckpt / STATE).is_file():
                return ckpt
        return None

    def resume(self, source: str | os.PathLike | None = None) -> dict:
        """Restore weights, EMA, optimiser, LR schedule, RNG states, losses and hook results from `source`
        (default: this run's latest checkpoint). Returns trainer_state.json for the caller's own checks."""
        source = source or self.run_dir
        ckpt = self.find_checkpoint(source)
        if ckpt is None:
            raise ConfigError(
                f"{self.name}.resume=true but there is nothing to resume in {source} (no checkpoint "
                f"with {STATE}). Point hydra.run.dir at the interrupted run or set "
                f"{self.name}.resume_from"
            )
        state = json.loads((ckpt / STATE).read_text())
        raw = ckpt / (self.raw_file if self.ema is not None else self.weights_file)
        if not raw.exists():
            raise ConfigError(
                f"{self.name}.resume: {ckpt} has no {raw.name} (was it trained with "
                f"{self.name}.ema={str(self.ema is None).lower()}?)"
            )
        self.model.load_state_dict(load_file(str(raw)))
        if self.ema is not None:
            self.ema.model.load_state_dict(load_file(str(ckpt / self.weights_file)))
            self.ema.load_state(state["ema"])
        opt = torch.load(ckpt / OPTIMIZER, map_location=self.device, weights_only=True)
        self.opt.load_state_dict(opt["optimizer"])
        self.lr_sched.load_state_dict(opt["lr_scheduler"])
        self.step, self.losses = int(state["step"]), list(state["losses"])
        self.history = {h.name: [tuple(x) for x in state.get("hooks", {}).get(h.name, [])] for h in self.hooks}
        self._restore_rng(state["rng"])
        self._saved_step = self.step
        log.info("resumed from %s at step %d", ckpt, self.step)
        return state

    def _restore_rng(self, rng: dict) -> None:
        """The data stream (shared by all ranks) and this rank's torch/CUDA streams; a rank the checkpoint has no
        state for (more processes than it was written with) starts a fresh stream derived from (seed, rank, step)."""
        self.rng.bit_generator.state = rng["numpy"]
        ranks = rng.get("ranks") or {"torch": [rng["torch"]], "cuda": [rng["cuda"]]}
        if self.rank < len(ranks["torch"]):
            torch.set_rng_state(rng_from_json(ranks["torch"][self.rank]))
            cuda = ranks["cuda"][self.rank]
            if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all([rng_from_json(s) for s in cuda])
        else:
            torch.manual_seed(rank_seed(self.cfg.seed, self.rank, self.step))
            log.warning(
                "rank %d: no RNG state in the checkpoint (written by fewer processes): a fresh stream", self.rank
            )
