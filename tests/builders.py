"""What the tests build again and again, built in one place: toy and robot-shaped episode stores, tiny policies
trained through the real trainer, demos recorded by the scripted expert, scripted operator keys, and the command
line of an end-to-end residual session. Plain functions; the fixtures made of them are in conftest.py."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from hydra import compose, initialize_config_module

from robot_rl.data.episode_store import EpisodeStore
from robot_rl.interfaces import OBS_PREFIX, Feature

# ------------------------------------------------------------------------------------------- tiny policies

TINY_DIFFUSION = {
    "down_dims": [16, 32],
    "diffusion_step_embed_dim": 16,
    "kernel_size": 3,
    "n_groups": 4,
    "action_horizon": 8,
    "n_action_steps": 4,
    "num_inference_steps": 3,
}
TINY_IMAGE = {"channels": [8, 8], "strides": [2, 1], "feature_dim": 8, "num_keypoints": 4, "n_groups": 4}


def hydra_overrides(prefix: str, values: dict) -> list[str]:
    """A nested dict as hydra dotted overrides: {"image": {"channels": [8, 8]}} -> ["p.image.channels=[8,8]"]."""
    out = []
    for k, v in values.items():
        if isinstance(v, dict):
            out += hydra_overrides(f"{prefix}.{k}", v)
        elif isinstance(v, (list, tuple)):
            out.append(f"{prefix}.{k}=[{','.join(map(str, v))}]")
        else:
            out.append(f"{prefix}.{k}={v}")
    return out


def tiny_diffusion(**over) -> list[str]:
    """Overrides for a diffusion policy small enough to train in seconds on a CPU (`over` replaces entries)."""
    return hydra_overrides("policy", {**TINY_DIFFUSION, **over})


def train_config(data, *overrides):
    """The `train` config on `data`: quiet, no tensorboard, no periodic checkpoint (`overrides` win)."""
    with initialize_config_module("robot_rl.configs", version_base=None):
        return compose(
            "train",
            overrides=[
                f"train.data={data}",
                "train.progress=false",
                "train.tensorboard=false",
                "train.checkpoint_every=1000",
                *overrides,
            ],
        )


def train_policy(data, run_dir: Path, *overrides) -> Path:
    """A policy trained through the real Trainer (so the checkpoint and its config are the real thing)."""
    from robot_rl.commands.train import Trainer

    Trainer(train_config(data, *overrides), run_dir).run()
    return run_dir


# ------------------------------------------------------------------------------------------------- stores

TOY_GAIN = np.array([[0.5, -0.3, 0.2, 0.1], [-0.2, 0.4, 0.1, -0.5]], np.float32)


def toy_store(
    path,
    episodes: int = 6,
    steps: int = 20,
    *,
    success_at: int | None = -1,
    success_column: bool = True,
    image: bool = False,
    info: dict | None = None,
) -> Path:
    """Toy task at 10 fps: the action is tanh(TOY_GAIN @ state), the 4-d state drifts with the action; episode e
    starts from a seeded draw. `success` (a column unless `success_column` is false) turns on at step `success_at`
    (negative: counted from the end; None: never); an episode is a success unless `success_at` is None. `image`
    adds a 16x16 camera with a dot where the state points."""
    feats = {"obs.state": Feature((4,)), "action": Feature((2,), names=("a0", "a1"), low=-np.ones(2), high=np.ones(2))}
    if success_column:
        feats["success"] = Feature((), "bool")
    if image:
        feats["obs.cam_image"] = Feature((16, 16, 3), "uint8")
    first_success = None if success_at is None else success_at % steps
    store = EpisodeStore.create(path, feats, fps=10, info=info)
    w = store.writer()
    rng = np.random.default_rng(0)
    for e in range(episodes):
        w.begin({"seed": e})
        s = rng.normal(size=4).astype(np.float32)
        for t in range(steps):
            a = np.tanh(TOY_GAIN @ s).astype(np.float32)
            frame = {"obs.state": s, "action": a}
            if success_column:
                frame["success"] = np.bool_(first_success is not None and t >= first_success)
            if image:
                img = np.zeros((16, 16, 3), np.uint8)
                img[int(8 + 6 * np.tanh(s[0])), int(8 + 6 * np.tanh(s[1]))] = 255
                frame["obs.cam_image"] = img
            w.add(frame)
            s = (0.9 * s + 0.1 * np.concatenate([a, a])).astype(np.float32)
        w.save({"success": success_at is not None})
    store.close()
    return Path(path)


def normal_draw(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.normal(size=shape).astype(np.float32)


def random_store(
    path,
    feats: dict[str, Feature],
    *,
    episodes: int,
    steps: int,
    fps: float,
    info: dict | None = None,
    draw: Callable[[np.random.Generator, tuple], np.ndarray] = normal_draw,
) -> Path:
    """Episodes of random frames (`draw(rng, shape)` per key and step, from seed 0): the right shapes, no task."""
    store = EpisodeStore.create(path, feats, fps=fps, info=info)
    w = store.writer()
    rng = np.random.default_rng(0)
    for _ in range(episodes):
        w.begin()
        for _ in range(steps):
            w.add({k: draw(rng, f.shape) for k, f in feats.items()})
        w.save()
    store.close()
    return Path(path)


def robot_store(
    path, robot_cfg: dict, *, task: str | None = None, draw=normal_draw, episodes: int = 2, steps: int = 12
) -> Path:
    """A random store at 20 fps shaped like the robot `robot_cfg` builds (its observations and action), whose info
    names that robot, its config and `task` as a recording's would."""
    from robot_rl.factory import make_robot

    robot = make_robot(robot_cfg)
    feats = {OBS_PREFIX + k: f for k, f in robot.observation_features.items()}
    feats["action"] = robot.action_feature
    info = {"robot": robot.name, "robot_config": robot_cfg, **({"task": task} if task else {})}
    return random_store(path, feats, episodes=episodes, steps=steps, fps=20, info=info, draw=draw)


# ------------------------------------------------------------------------------------------------ recording


def record_config(path, *overrides):
    """The `record` config writing to `path`, reporting rarely (`overrides` win)."""
    with initialize_config_module("robot_rl.configs", version_base=None):
        return compose("record", overrides=[f"record.path={path}", "record.report_every_s=100", *overrides])


def camera(height: int, width: int | None = None) -> list[str]:
    """Overrides for the robot's agentview camera at height x width (square by default)."""
    return ["robot.cameras=[agentview]", f"robot.camera_height={height}", f"robot.camera_width={width or height}"]


def record_demos(path, run_dir: Path, *overrides, paced: bool = True) -> dict:
    """The scripted expert's demos recorded into a real store by the real Recorder; its summary. `paced=False`
    runs the loop as fast as it goes."""
    from robot_rl.commands.record import Recorder
    from robot_rl.control.pacing import PacedLoop

    rec = Recorder(record_config(path, *overrides), run_dir)
    if not paced:
        rec.loop = PacedLoop(1e6)
    return rec.run()


class ScriptedControls:
    """Episode-control events as an operator's keys would deliver them, one poll per tick (ticks count across
    episodes): `script` maps a tick number (from 1) to its event."""

    def __init__(self, script: dict[int, str]):
        self.script, self.tick = script, 0

    def poll(self):
        self.tick += 1
        return self.script.get(self.tick)


# ------------------------------------------------------------------------------------------ residual session

TINY_BASE = tiny_diffusion(down_dims=[32, 64])


def session_args(base: Path, run_dir: Path, ports, *extra) -> list[str]:
    """`robot-rl session algo=residual` on Lift with a tiny residual and critic, on the base at `base/base` and the
    demos at `base/demos` (as the lift_base fixture lays them out)."""
    return [
        "session",
        "algo=residual",
        f"algo.base_checkpoint={base / 'base'}",
        f"algo.demos={base / 'demos'}",
        "algo.actor_hidden=[32]",
        "algo.critic_hidden=[32,32]",
        "algo.num_critics=4",
        "algo.batch_size=32",
        "algo.learning_starts=40",
        "algo.critic_warmup=20",
        "algo.publish_every_updates=10",
        "algo.log_every_updates=10",
        "algo.updates_per_transition=1",
        "session.max_episode_steps=30",
        "session.rate_hz=60",
        "session.stop_on_success=true",
        "session.eval_every_episodes=2",
        "session.eval_episodes=1",
        "session.watchdog_s=1.0",
        "session.heartbeat_s=0.02",
        "device=cpu",
        "tensorboard=false",
        f"session.transitions_port={ports[0]}",
        f"session.weights_port={ports[1]}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def run_cli(args, timeout: float = 240):
    """The CLI as a separate process on one OpenMP thread (a session's processes share the few cores)."""
    from conftest import robot_rl_cli

    return robot_rl_cli(*args, timeout=timeout, threads=1)


def base_from_demos(tmp: Path, *train_overrides, demos: int = 3, record_overrides=()) -> Path:
    """`tmp/demos`: scripted Lift demos (unpaced); `tmp/base`: a tiny diffusion base trained on them."""
    summary = record_demos(
        tmp / "demos",
        tmp / "record_run",
        "robot=lift",
        f"record.episodes={demos}",
        "record.report_every_s=1e9",
        "teleop.quality=expert",
        "teleop.seed=0",
        *record_overrides,
        paced=False,
    )
    assert summary["saved"] == demos
    train_policy(tmp / "demos", tmp / "base", "train.batch_size=16", *TINY_BASE, *train_overrides)
    return tmp


# ------------------------------------------------------------------------------------------ training loop
def loop_config(**over):
    """A small, fast TrainingLoop config for tests of the loop itself (`over` wins)."""
    from robot_rl.training.loop import LoopConfig

    base = dict(
        steps=40,
        batch_size=32,
        lr=3e-2,
        betas=(0.9, 0.999),
        weight_decay=1e-4,
        lr_schedule="cosine",
        warmup_steps=5,
        max_grad_norm=1.0,
        ema=True,
        ema_power=0.75,
        ema_max_decay=0.999,
        ema_decay=None,
        log_every=5,
        checkpoint_every=20,
        keep_last=None,
        seed=0,
        progress=False,
        tensorboard=False,
    )
    return LoopConfig(**{**base, **over})
