"""Build a sim robot (and its scripted expert) from a plain config dict, e.g. a hydra `robot:` group."""

from __future__ import annotations

from typing import Any

from robot_rl.interfaces import Robot, Teleop


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
