"""`robot-rl eval`: roll a trained (or distilled) policy out in simulation and report what it does.

    robot-rl eval eval.checkpoint=outputs/<train run>                      # latest checkpoint, its own robot
    robot-rl eval eval.checkpoint=<run>/checkpoints/step_2500 eval.episodes=100
    robot-rl eval eval.checkpoint=<run> eval.scheduler=ddpm                # DDPM, full chain
    robot-rl eval eval.checkpoint=<run> eval.num_inference_steps=5         # DDIM-5
    robot-rl eval eval.checkpoint=<run> robot=lift robot.horizon=100       # another robot config

The robot is the one the policy was trained for: the checkpoint's config.yaml names its training store
(`train.data`, or `distill.data` for a distilled student) and the store's `meta.info.robot_config` is the robot it
was recorded with. `robot=<name>` replaces it.

Episode i is reset with `seed + i` and the policy's sampling noise is drawn from a generator seeded with
`seed + i` as well, so two policies evaluated with one seed see the same initial states and (for diffusion
policies of one chunk shape) the same starting noise. An episode ends at its first success or after `max_steps`
(default: the robot config's `horizon`).

Written into the run directory: `eval.json` (success rate with a Wilson 95 % interval, episode lengths, per-episode
results, latency per `select_action` call and per predicted chunk), `videos/*.mp4` of the first `video_episodes`
rollouts (rendered by a separate `mujoco.Renderer` from the simulator state, so the policy's observations are
untouched) and `training_curves.png` (the loss history of the run that produced the checkpoint). The last line
printed is `success 0.96 [0.87, 0.99] over 50 episodes; ...`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from robot_rl.config import ConfigError, resolve_device

log = logging.getLogger("robot_rl.commands.evaluate")

Z95 = 1.959963984540054  # standard normal 97.5 % quantile


# ------------------------------------------------------------------------------------------------ statistics


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95 % by default); (0, 1) when n == 0.

    centre = (p + z²/2n) / (1 + z²/n),  half = z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n)
    Unlike the normal (Wald) interval it stays inside [0, 1] and is not degenerate at 0 or n successes.
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} must be in 0..n={n}")
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    lo, hi = centre - half, centre + half
    if successes == 0:
        lo = 0.0
    if successes == n:
        hi = 1.0
    return max(0.0, lo), min(1.0, hi)


def _percentiles(values: Sequence[float]) -> dict | None:
    if not len(values):
        return None
    a = np.asarray(values, dtype=np.float64) * 1e3
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
        "max_ms": float(a.max()),
        "n": int(len(a)),
    }


def _finite(obj):
    """NaN/inf -> None, recursively (strict JSON; robot configs hold NaN as "hold this dimension")."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def summary_line(result: dict) -> str:
    """`success 0.96 [0.87, 0.99] over 50 episodes; mean length 41.3; chunk p50 4.1 ms, p99 6.0 ms`."""
    lo, hi = result["success_ci95"]
    line = f"success {result['success_rate']:.2f} [{lo:.2f}, {hi:.2f}] over {result['episodes']} episodes"
    line += f"; mean length {result['mean_length']:.1f}"
    chunk = result.get("latency", {}).get("chunk")
    if chunk:
        line += f"; chunk p50 {chunk['p50_ms']:.1f} ms, p99 {chunk['p99_ms']:.1f} ms"
    return line


# ------------------------------------------------------------------------------------------------- policies


def is_one_step(policy) -> bool:
    """A distilled one-step diffusion student (robot_rl.commands.distill): sample prediction, one DDIM step."""
    from robot_rl.policies.diffusion import DiffusionPolicy

    return (
        isinstance(policy, DiffusionPolicy)
        and policy.cfg.prediction_type == "sample"
        and policy.cfg.inference_scheduler == "ddim"
        and policy.cfg.num_inference_steps == 1
    )


def set_sampler(policy, scheduler: str | None = None, num_inference_steps: int | None = None) -> str:
    """Choose how a diffusion policy samples its chunks in `select_action` (None keeps the checkpoint's choice);
    returns a description (`ddim-10`, `ddim-10 eta=1`, `ddpm-100`, `one-step`, `mlp`). A distilled one-step student has no other
    sampler, and DDPM always runs the full chain of num_train_timesteps steps."""
    from robot_rl.policies.diffusion import DiffusionPolicy

    if not isinstance(policy, DiffusionPolicy) and isinstance(getattr(policy, "base", None), DiffusionPolicy):
        kind = type(policy).__name__  # residual on a diffusion base: the base samples the chunks
        return f"{kind} on {set_sampler(policy.base, scheduler, num_inference_steps)}"
    if not isinstance(policy, DiffusionPolicy):
        if scheduler or num_inference_steps:
            raise ConfigError("eval.scheduler / eval.num_inference_steps apply to diffusion policies only")
        return type(policy).__name__
    c = policy.cfg
    if is_one_step(policy):
        if (scheduler not in (None, "ddim")) or (num_inference_steps not in (None, 1)):
            raise ConfigError(
                "this checkpoint is a distilled one-step policy: it samples with one forward pass; "
                "leave eval.scheduler and eval.num_inference_steps null"
            )
        return "one-step"
    if scheduler is not None:
        if scheduler not in ("ddim", "ddpm"):
            raise ConfigError(f"eval.scheduler must be ddim, ddpm or null, got {scheduler!r}")
        c.inference_scheduler = scheduler
    if num_inference_steps is not None:
        n = int(num_inference_steps)
        if c.inference_scheduler == "ddpm":
            raise ConfigError(
                "eval.num_inference_steps: DDPM runs the full chain (num_train_timesteps steps); "
                "use eval.scheduler=ddim for fewer steps"
            )
        if not 1 <= n <= c.num_train_timesteps:
            raise ConfigError(f"eval.num_inference_steps must be in 1..{c.num_train_timesteps}, got {n}")
        c.num_inference_steps = n
    if c.inference_scheduler == "ddpm":
        return f"ddpm-{c.num_train_timesteps}"
    chain = f" eta={c.eta:g}" if getattr(c, "eta", 0.0) > 0 else ""  # the stochastic DDIM chain (RL-100's sampler)
    return f"ddim-{c.num_inference_steps or c.num_train_timesteps}{chain}"


# ---------------------------------------------------------------------------------------------------- video


class _VideoCamera:
    """Renders the sim state of a RobosuiteRobot from named cameras with its own mujoco.Renderer."""

    def __init__(self, robot, cameras: Sequence[str], size: int):
        import mujoco

        env = getattr(robot, "env", None)
        if env is None or not hasattr(env, "sim"):
            raise ValueError(f"videos need a MuJoCo (robosuite) robot, not {type(robot).__name__}")
        self.model, self.data = env.sim.model._model, env.sim.data._data
        available = [self.model.camera(i).name for i in range(self.model.ncam)]
        missing = [c for c in cameras if c not in available]
        if missing:
            raise ValueError(f"video cameras {missing} are not in the model; available: {', '.join(available)}")
        self.cameras = list(cameras)
        vis = self.model.vis.global_
        vis.offwidth, vis.offheight = max(vis.offwidth, size), max(vis.offheight, size)  # framebuffer must fit
        self.renderer = mujoco.Renderer(self.model, size, size)

    def frame(self) -> np.ndarray:
        from robot_rl.video import tile

        views = []
        for c in self.cameras:
            self.renderer.update_scene(self.data, camera=c)
            views.append(self.renderer.render().copy())
        return tile(views) if len(views) > 1 else views[0]

    def close(self) -> None:
        try:
            self.renderer.close()
        except Exception:  # noqa: BLE001 - a GL context that will not close must not hide the results
            log.debug("video renderer close failed", exc_info=True)


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate(
    policy,
    robot_cfg: dict,
    episodes: int = 50,
    seed: int = 10_000,
    max_steps: int | None = None,
    video_dir: str | os.PathLike | None = None,
    video_episodes: int = 3,
    cameras: Sequence[str] = ("agentview",),
    video_size: int = 256,
    progress: bool = False,
) -> dict:
    """Roll `policy` out for `episodes` seeded sim episodes (episode i: `reset(seed=seed + i)`, policy noise from a
    generator seeded `seed + i`) and return a JSON-able result: success rate + Wilson 95 % CI, lengths,
    per-episode results, latency per `select_action` call (`latency.step`) and per predicted chunk
    (`latency.chunk`, the calls that ran the network), video paths. `max_steps` None = robot_cfg["horizon"].
    The one evaluation of a policy in sim: `robot-rl eval`, train's and distill's sim evaluations."""
    import robot_rl.sim.robosuite_robot  # noqa: F401 - picks MUJOCO_GL before mujoco is first imported
    from robot_rl.factory import make_robot
    from robot_rl.rollout import Rollout

    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    robot_cfg = (
        OmegaConf.to_container(robot_cfg, resolve=True) if isinstance(robot_cfg, DictConfig) else dict(robot_cfg)
    )
    max_steps = int(max_steps or robot_cfg.get("horizon") or 200)
    robot = make_robot(robot_cfg)
    robot.connect()
    was_training = getattr(policy, "training", False)
    if hasattr(policy, "eval"):
        policy.eval()
    latency = _Latency(policy)
    videos = None
    t_start = time.monotonic()
    try:
        if video_dir is not None and video_episodes > 0:
            videos = _EpisodeVideos(
                robot,
                Path(video_dir),
                min(int(video_episodes), episodes),
                cameras,
                int(video_size),
                fps=float(robot_cfg.get("control_freq") or 20),
            )

        def on_start(i: int, episode_seed: int) -> None:
            latency.start_episode()
            if videos is not None:
                videos.start(i)

        def on_end(r: dict) -> None:
            if videos is not None:
                videos.finish(r)
            if progress:
                n_ok = sum(x["success"] for x in results) + r["success"]
                log.info(
                    "episode %d/%d (seed %d): %s after %d steps (%d/%d so far)",
                    r["episode"] + 1,
                    episodes,
                    r["seed"],
                    "success" if r["success"] else "failure",
                    r["steps"],
                    n_ok,
                    r["episode"] + 1,
                )
            results.append(
                {
                    "episode": r["episode"],
                    "seed": r["seed"],
                    "success": r["success"],
                    "length": r["steps"],
                    "chunks": latency.episode_chunks,
                    "wall_s": r["wall_s"],
                }
            )

        results: list[dict] = []
        hooks = [latency.step] + ([videos.step] if videos is not None else [])
        Rollout(robot, policy).run_episodes(episodes, seed, max_steps, on_start=on_start, on_end=on_end, hooks=hooks)
    finally:
        if videos is not None:
            videos.close()
        robot.disconnect()
        if hasattr(policy, "generator"):
            policy.generator = None
        if was_training:
            policy.train()
    k = sum(r["success"] for r in results)
    lengths = [r["length"] for r in results]
    ok_lengths = [r["length"] for r in results if r["success"]]
    lo, hi = wilson_interval(k, episodes)
    return {
        "episodes": episodes,
        "seed": seed,
        "max_steps": max_steps,
        "successes": k,
        "success_rate": k / episodes,
        "success_ci95": [lo, hi],
        "mean_length": float(np.mean(lengths)),
        "mean_length_success": float(np.mean(ok_lengths)) if ok_lengths else None,
        "latency": {"step": _percentiles(latency.step_times), "chunk": _percentiles(latency.chunk_times)},
        "per_episode": results,
        "videos": videos.paths if videos is not None else [],
        "wall_s": time.monotonic() - t_start,
        "robot_config": _finite(robot_cfg),
    }


class _Latency:
    """Seconds per `select_action` call, and per call that ran the network (a new chunk: `num_predictions` grew)."""

    def __init__(self, policy):
        self.policy = policy
        self.step_times: list[float] = []
        self.chunk_times: list[float] = []
        self.episode_chunks = 0
        self._predictions = None

    def start_episode(self) -> None:
        self.episode_chunks = 0
        self._predictions = getattr(self.policy, "num_predictions", None)

    def step(self, step) -> None:
        self.step_times.append(step.policy_s)
        now = getattr(self.policy, "num_predictions", None)
        if now is None or now != self._predictions:  # this call ran the network
            self.chunk_times.append(step.policy_s)
            self.episode_chunks += 1
        self._predictions = now


class _EpisodeVideos:
    """mp4s of the first `count` episodes, named by seed and outcome once the episode is over."""

    def __init__(self, robot, video_dir: Path, count: int, cameras: Sequence[str], size: int, fps: float):
        self.camera = _VideoCamera(robot, cameras, size)
        self.video_dir, self.count, self.fps = video_dir, count, fps
        self.writer = None
        self.paths: list[str] = []

    def start(self, episode: int) -> None:
        from robot_rl.video import Mp4Writer

        if episode < self.count:
            self.writer = Mp4Writer(self.video_dir / f".episode_{episode:03d}.mp4", fps=self.fps)
            self.writer.write(self.camera.frame())

    def step(self, step) -> None:
        if self.writer is not None:
            self.writer.write(self.camera.frame())

    def finish(self, r: dict) -> None:
        if self.writer is not None:
            self.writer.close()
            final = self.video_dir / (
                f"episode_{r['episode']:03d}_seed{r['seed']}_{'success' if r['success'] else 'failure'}.mp4"
            )
            os.replace(self.writer.path, final)
            self.writer = None
            self.paths.append(str(final))

    def close(self) -> None:
        if self.writer is not None:  # an episode that raised: keep what was rendered (under its temporary name)
            self.writer.close()
        self.camera.close()


# ------------------------------------------------------------------------------------------ training curves


def _run_dir_of(path: Path) -> Path:
    """The run directory of a run, `checkpoints/` or `checkpoints/step_<n>` path."""
    path = Path(path)
    if path.parent.name == "checkpoints" and (
        (path / "model.safetensors").exists() or (path / "manifest.json").exists()
    ):
        return path.parent.parent
    if path.name == "checkpoints":
        return path.parent
    return path


def read_scalars(tb_dir: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar tag of the tensorboard event files in `tb_dir`: tag -> (steps, values), sorted by step (a
    resumed run's repeated steps keep the last value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dir = Path(tb_dir)
    if not tb_dir.is_dir() or not any(tb_dir.glob("events.out.tfevents.*")):
        return {}
    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # "No path found after ..." at every end of file
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        by_step = {e.step: e.value for e in acc.Scalars(tag)}
        steps = np.array(sorted(by_step), dtype=np.int64)
        out[tag] = (steps, np.array([by_step[s] for s in steps], dtype=np.float64))
    return out


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    c = np.cumsum(np.insert(values, 0, 0.0))
    head = c[1:window] / np.arange(1, window)  # growing window at the start
    return np.concatenate([head, (c[window:] - c[:-window]) / window])


def plot_training_curves(run_dir: str | os.PathLike, out_png: str | os.PathLike) -> Path | None:
    """A PNG of a training (or distillation) run's curves: the per-step loss history of its latest checkpoint's
    trainer_state.json (raw and smoothed, log scale) with the tensorboard loss/validation curves, plus one panel per
    other scalar (lr, grad norm, EMA decay, sim success, ...) from `<run>/tb`. `run_dir` may also be a checkpoint
    directory. Returns the PNG path, or None when the run has no history to plot."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from robot_rl.policies.checkpoint import CheckpointError, find_policy_dir

    run = _run_dir_of(Path(run_dir))
    losses: list[float] = []
    try:
        state_path = find_policy_dir(run_dir) / "trainer_state.json"
        if state_path.exists():
            losses = [float(x) for x in json.loads(state_path.read_text()).get("losses", [])]
    except CheckpointError:
        pass
    scalars = read_scalars(run / "tb")
    loss_tags = sorted(t for t in scalars if t.endswith("/loss") or t.endswith("_mse") or t.endswith("/mse"))
    other = [t for t in sorted(scalars) if t not in loss_tags and not t.endswith("samples_per_s")]
    if not losses and not scalars:
        return None
    panels = 1 + len(other)
    cols = min(3, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    ax = axes[0][0]
    if losses:
        y = np.asarray(losses)
        x = np.arange(1, len(y) + 1)
        ax.plot(x, y, color="tab:blue", alpha=0.25, lw=0.6, label="loss (per step)")
        ax.plot(x, _smooth(y, max(1, len(y) // 50)), color="tab:blue", lw=1.5, label="loss (smoothed)")
    for i, tag in enumerate(loss_tags):
        if losses and tag.startswith(("train/", "distill/")) and tag.endswith("/loss"):
            continue  # the same curve as the per-step history, only subsampled
        s, v = scalars[tag]
        ax.plot(s, v, marker="o" if len(s) < 30 else None, ms=3, lw=1.2, color=f"C{(i + 1) % 10}", label=tag)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    for j, tag in enumerate(other, start=1):
        ax = axes[j // cols][j % cols]
        s, v = scalars[tag]
        ax.plot(s, v, marker="o" if len(s) < 30 else None, ms=3, lw=1.2, color=f"C{j % 10}")
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for j in range(panels, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle(str(run), fontsize=8)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------------------ CLI


def training_config(checkpoint: str | os.PathLike) -> DictConfig | None:
    """The config.yaml saved with a checkpoint (None if there is none)."""
    from robot_rl.policies.checkpoint import find_policy_dir

    path = find_policy_dir(checkpoint) / "config.yaml"
    return OmegaConf.load(path) if path.exists() else None


def training_store(checkpoint: str | os.PathLike) -> Path | None:
    """The episode store a checkpoint was trained (`train.data`) or distilled (`distill.data`) on; for a LeRobot
    import, the store it was imported into."""
    cfg = training_config(checkpoint)
    if cfg is None:
        return None
    data = OmegaConf.select(cfg, "train.data") or OmegaConf.select(cfg, "distill.data")
    if OmegaConf.is_list(data) or isinstance(data, (list, tuple)):  # several datasets: the first is the task's own
        data = data[0] if len(data) else None
    if OmegaConf.select(cfg, "train.data_format") == "lerobot":
        from robot_rl.policies.checkpoint import find_policy_dir

        ckpt = find_policy_dir(checkpoint)
        data = OmegaConf.select(cfg, "train.import_dir") or (_run_dir_of(ckpt) / "imported_store")
    return Path(str(data)).expanduser() if data else None


def robot_config_from_checkpoint(checkpoint: str | os.PathLike, version: int | None = None) -> tuple[dict, str]:
    """The robot config in the checkpoint's manifest (what it was trained or run with), else the one its training
    data was recorded with (store meta `info.robot_config`)."""
    from robot_rl.policies.checkpoint import MANIFEST, find_policy_dir, read_manifest

    directory = find_policy_dir(checkpoint, version)
    if (directory / MANIFEST).is_file():
        robot_cfg = (read_manifest(directory).get("robot") or {}).get("config")
        if robot_cfg:
            return dict(robot_cfg), "the checkpoint's manifest"
    store = training_store(directory)
    hint = "pass the robot yourself, e.g. robot=lift"
    if store is None:
        raise ConfigError(
            f"{checkpoint}: the checkpoint's config.yaml names no training data, so the robot is unknown; {hint}"
        )
    meta_path = store / "meta.json"
    if not meta_path.exists():
        raise ConfigError(
            f"{checkpoint} was trained on {store}, which is gone (no meta.json) so its robot config "
            f"cannot be read; {hint}"
        )
    robot_cfg = json.loads(meta_path.read_text()).get("info", {}).get("robot_config")
    if not robot_cfg:
        raise ConfigError(f"{store} does not record the robot it came from (meta.info.robot_config); {hint}")
    return dict(robot_cfg), "the training store"


def config_section(cfg: DictConfig, name: str, path_key: str, what: str) -> DictConfig:
    """`cfg.<name>`, which must name `path_key` (`what`: a run or checkpoint directory); ConfigError otherwise."""
    section = cfg.get(name)
    if section is None:
        raise ConfigError(f"the config has no `{name}:` section")
    if not section.get(path_key):
        raise ConfigError(
            f"{name}.{path_key} is empty: give {what}, e.g. {name}.{path_key}=outputs/<date>/<time>_train"
        )
    return section


def check_ints(
    section: DictConfig,
    name: str,
    positive: Sequence[str] = (),
    non_negative: Sequence[str] = (),
    positive_or_null: Sequence[str] = (),
) -> None:
    """ConfigError unless each of those keys of `section` (`name.key` in messages) holds an integer (not a bool)
    of its kind."""
    kinds = [
        (positive, 1, False, "a positive integer"),
        (non_negative, 0, False, "a non-negative integer"),
        (positive_or_null, 1, True, "a positive integer or null"),
    ]
    for keys, minimum, nullable, kind in kinds:
        for key in keys:
            v = section.get(key)
            if v is None and nullable:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                raise ConfigError(f"{name}.{key} must be {kind}, got {v!r}")


def validate_eval(cfg: DictConfig) -> None:
    e = config_section(cfg, "eval", "checkpoint", "a training run directory or a checkpoint directory")
    check_ints(
        e,
        "eval",
        positive=("episodes", "video_size"),
        non_negative=("seed", "video_episodes"),
        positive_or_null=("max_steps", "num_inference_steps"),
    )
    if e.get("scheduler") not in (None, "ddim", "ddpm"):
        raise ConfigError(f"eval.scheduler must be ddim, ddpm or null (the checkpoint's), got {e.scheduler!r}")
    if e.get("weights", "model") not in ("model", "raw_model"):
        raise ConfigError(f"eval.weights must be model (EMA) or raw_model, got {e.weights!r}")
    cams = e.get("video_cameras")
    if e.video_episodes and (not cams or isinstance(cams, str)):
        raise ConfigError(f"eval.video_cameras must be a list of camera names, got {cams!r}")


def main(cfg: DictConfig, run_dir: str | os.PathLike) -> int:
    """Entry point of `robot-rl eval` (the CLI passes hydra's run directory). Returns an exit code."""
    from robot_rl.factory import make_robot
    from robot_rl.policies.checkpoint import CheckpointError, find_policy_dir, load_policy

    validate_eval(cfg)
    e = cfg.eval
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if e.get("num_threads"):
        torch.set_num_threads(int(e.num_threads))
    version = e.get("version")
    try:
        ckpt = find_policy_dir(Path(str(e.checkpoint)).expanduser(), version)
    except CheckpointError as err:
        raise ConfigError(f"eval.checkpoint: {err}") from None
    device = resolve_device(str(cfg.get("device", "auto")))
    if cfg.get("robot") is not None:
        robot_cfg = OmegaConf.to_container(cfg.robot, resolve=True)
        source = "robot= override"
    else:
        robot_cfg, source = robot_config_from_checkpoint(ckpt)
    make_robot(robot_cfg)  # a bad robot config fails here as a ConfigError, before the policy is loaded
    policy = load_policy(ckpt, device=device, weights="raw" if e.get("weights") == "raw_model" else "policy")
    sampler = set_sampler(policy, e.get("scheduler"), e.get("num_inference_steps"))
    log.info(
        "evaluating %s (%s, %s) on %s (robot config from %s): %d episodes from seed %d",
        ckpt,
        sampler,
        device,
        robot_cfg.get("env_name", robot_cfg.get("type")),
        source,
        e.episodes,
        e.seed,
    )
    result = evaluate(
        policy,
        robot_cfg,
        episodes=int(e.episodes),
        seed=int(e.seed),
        max_steps=e.get("max_steps"),
        video_dir=run_dir / "videos",
        video_episodes=int(e.video_episodes),
        cameras=list(e.get("video_cameras") or ["agentview"]),
        video_size=int(e.video_size),
        progress=bool(e.get("progress", True)),
    )
    result = {
        "checkpoint": str(ckpt),
        "weights": str(e.get("weights", "model")),
        "sampler": sampler,
        "device": str(device),
        "robot_config_source": source,
        **result,
    }
    from robot_rl.config import write_json

    write_json(run_dir / "eval.json", result)
    if e.get("plot", True):
        png = plot_training_curves(ckpt, run_dir / "training_curves.png")
        if png is None:
            log.info("no training history next to %s: no training_curves.png", ckpt)
    print(summary_line(result), flush=True)
    return 0
