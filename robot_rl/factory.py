"""Build robots, teleops and policies from their hydra config groups (`robot=`, `teleop=`, `policy=`)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from robot_rl.config import ConfigError
from robot_rl.interfaces import Robot, Teleop


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def make_robot(cfg) -> Robot:
    """robot.type: robosuite (MuJoCo sim) | gym_hil (gym-hil's MuJoCo Panda tasks) | lerobot (any lerobot Robot, real
    or our sim plugin)."""
    cfg = _plain(cfg)
    kind = cfg.pop("type", None)
    cfg.pop("safety", None)
    cfg.pop("task", None)
    try:
        if kind == "robosuite":
            from robot_rl.sim.robosuite_robot import RobosuiteRobot

            return RobosuiteRobot(**cfg)
        if kind == "gym_hil":
            from robot_rl.sim.gym_hil_robot import GymHilRobot

            return GymHilRobot(**cfg)
        if kind == "lerobot":
            from robot_rl.hardware.lerobot_adapter import LeRobotRobot, make_lerobot_robot

            ours = {k: cfg.pop(k) for k in ("action_low", "action_high", "calibrate") if k in cfg}
            return LeRobotRobot(make_lerobot_robot(cfg.pop("lerobot_type"), **cfg), **ours)
    except (ValueError, TypeError, KeyError, ImportError) as e:
        raise ConfigError(f"robot: {e}") from None
    raise ConfigError(f"robot.type={kind!r} is not a known robot type; choose one of: robosuite, gym_hil, lerobot")


def make_teleop(cfg, robot: Robot) -> Teleop | None:
    """teleop.type: none | scripted (sim expert for the robot's task; `intervener:` wraps it in a simulated
    intervener) | device (keyboard, gamepad, spacemouse) | lerobot (any lerobot Teleoperator)."""
    cfg = _plain(cfg)
    kind = cfg.pop("type", "none")
    try:
        if kind == "none":
            return None
        if kind == "scripted":
            from robot_rl.sim.experts import make_expert

            env_name = getattr(robot, "env_name", None)
            if env_name is None:
                raise ConfigError("teleop.type=scripted needs a simulated robot (robot.type=robosuite)")
            intervener = cfg.pop("intervener", None)
            expert = make_expert(env_name, **cfg)
            if intervener:
                from robot_rl.sim.intervener import SimulatedIntervener

                return SimulatedIntervener(expert, **intervener)
            return expert
        if kind == "device":
            from robot_rl.hardware.teleop import make_device_teleop

            return make_device_teleop(cfg.pop("device"), **cfg)
        if kind == "lerobot":
            from robot_rl.hardware.lerobot_adapter import LeRobotTeleop, make_lerobot_teleop

            ours = {k: cfg.pop(k) for k in ("intervening", "calibrate", "action_low", "action_high") if k in cfg}
            return LeRobotTeleop(make_lerobot_teleop(cfg.pop("lerobot_type"), **cfg), **ours)
    except (ValueError, TypeError, KeyError, ImportError) as e:
        raise ConfigError(f"teleop: {e}") from None
    raise ConfigError(
        f"teleop.type={kind!r} is not a known teleop type; choose one of: none, scripted, device, lerobot"
    )


def make_policy(cfg, robot: Robot):
    """policy.type: none | mlp | diffusion, untrained, for the robot's features (robot_rl/policies/checkpoint.py
    builds it, so the algorithms can too)."""
    from robot_rl.policies.checkpoint import POLICY_TYPES, build_policy

    cfg = _plain(cfg)
    kind = cfg.get("type")
    if kind == "none":
        return None
    if kind not in POLICY_TYPES:
        raise ConfigError(
            f"policy.type={kind!r} is not a known policy type; choose one of: none, {', '.join(POLICY_TYPES)}"
        )
    try:
        return build_policy(cfg, robot.observation_features, robot.action_feature)
    except ValueError as e:
        raise ConfigError(f"policy: {e}") from None
