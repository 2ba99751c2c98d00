"""Build a sim robot (and its scripted expert) from a plain config dict, e.g. a hydra `robot:` group."""

from __future__ import annotations

from typing import Any

from robot_rl.interfaces import Robot, Teleop


def is_concatenation(key: str) -> bool:
    """robosuite's modality observations (`object-state`, `robot0_proprio-state`, any `<...>-state`) concatenate
    other observation keys: default inputs and LeRobot's observation.state leave them out (no duplicated values);
    a policy can still name them in its obs_keys. `key` with or without the store's `obs.` prefix."""
    return key.endswith("-state")


def make_sim_robot(**cfg: Any) -> Robot:
    """`RobosuiteRobot(**cfg)`; a `type`/`kind` key (if present) must be "robosuite"."""
    kind = cfg.pop("type", cfg.pop("kind", "robosuite"))
    if kind != "robosuite":
        raise ValueError(f"robot.type={kind!r} is not a sim robot; choose one of: robosuite")
    from .robosuite_robot import RobosuiteRobot

    return RobosuiteRobot(**cfg)


def make_sim_expert(env_name: str, **kw: Any) -> Teleop:
    """The scripted expert for a sim task (see `robot_rl.sim.experts.make_expert`)."""
    from .experts import make_expert

    return make_expert(env_name, **kw)
