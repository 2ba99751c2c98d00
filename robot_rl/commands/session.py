"""`robot-rl session`: start the learner and the control process as separate OS processes, stop them cleanly.

Ctrl-C reaches both children (same process group); each finishes its tick/update, the control process leaves
the robot on its safe action, the learner checkpoints, and the session writes one merged summary.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from robot_rl.config import ConfigError, positive, resolve_device, write_json
from robot_rl.control.telemetry import plot_learning_curve

log = logging.getLogger("robot_rl.commands.session")


def validate_session(cfg: DictConfig) -> None:
    """Everything a session needs, checked up front (robot names are checked by building the robot object)."""
    from robot_rl.factory import make_robot, make_teleop

    for field in ("rate_hz", "watchdog_s", "heartbeat_s"):
        positive(cfg, f"session.{field}")
    for field in ("episodes", "max_episode_steps", "transition_batch", "num_robots"):
        positive(cfg, f"session.{field}", integer=True)
    if cfg.session.learner not in ("local", "remote", "none"):
        raise ConfigError(f"session.learner must be local, remote or none, got {cfg.session.learner!r}")
    if cfg.session.watchdog_s <= cfg.session.heartbeat_s:
        raise ConfigError(
            f"session.watchdog_s ({cfg.session.watchdog_s}) must exceed session.heartbeat_s "
            f"({cfg.session.heartbeat_s}), or the watchdog trips between two healthy heartbeats"
        )
    if cfg.policy.get("type") == "none":
        raise ConfigError("policy=none: a session trains a policy; choose one, e.g. policy=mlp")
    robot = make_robot(cfg.robot)  # raises ConfigError on unknown type/env/robot names; does not connect
    make_teleop(cfg.teleop, robot)
    from robot_rl.algos import check_algorithm

    try:
        check_algorithm(OmegaConf.to_container(cfg.algo, resolve=True))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    resolve_device(cfg.device)


def _spawn(module: str, config: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, str(config), str(run_dir), *extra])


def _stop(proc: subprocess.Popen, name: str, timeout_s: float, already_interrupted: bool = False) -> int:
    """SIGINT, then SIGTERM, then SIGKILL: a child gets every chance to save its work. After a terminal Ctrl-C the
    child got SIGINT already, so it is first left to finish on its own (a second SIGINT during interpreter exit
    would kill it)."""
    stages = ((None, timeout_s),) if already_interrupted else ()
    stages += ((signal.SIGINT, timeout_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0))
    for sig, wait_s in stages:
        if proc.poll() is not None:
            break
        if sig is not None:
            proc.send_signal(sig)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop after %s; escalating", name, signal.Signals(sig).name if sig else "Ctrl-C")
    return proc.wait()


def _supervise(cfg, run_dir: Path, config_path: Path, names: list[str], controls: dict, procs: dict,
               restarts: dict) -> dict[str, int]:
    """Wait for the control processes; a crashed learner or control process is restarted (up to
    session.restart_crashed times each) and resumes from what is on disk: the learner from its checkpoint and
    replay, a control process from its episode log (numbering and seeds continue)."""
    limit = int(cfg.session.get("restart_crashed", 0) or 0)
    codes: dict[str, int] = {}
    while len(codes) < len(controls):
        for i, name in enumerate(names):
            if name in codes or (code := controls[name].poll()) is None:
                continue
            if code != 0 and restarts.get(name, 0) < limit:
                restarts[name] = restarts.get(name, 0) + 1
                log.warning("control process %s exited with %d: restarting it (%d/%d), resuming from its log",
                            name, code, restarts[name], limit)
                controls[name] = _spawn("robot_rl.control", config_path, run_dir / _control_dir(names, name), name,
                                        str(i), "--resume")
            else:
                codes[name] = code
        learner = procs.get("learner")
        if learner is not None and (code := learner.poll()) is not None and len(codes) < len(controls):
            if restarts.get("learner", 0) < limit:
                restarts["learner"] = restarts.get("learner", 0) + 1
                log.warning("learner exited with %d: restarting it (%d/%d) from its checkpoint and replay", code,
                            restarts["learner"], limit)
                procs["learner"] = _spawn("robot_rl.learner", config_path, run_dir / "learner")
        time.sleep(0.2)
    return codes


def _control_dir(names: list[str], name: str) -> str:
    return "control" if len(names) == 1 else f"control_{name}"


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def run_session(cfg: DictConfig, run_dir: Path) -> int:
    config_path = run_dir / "config.yaml"
    t0 = time.time()
    resume = ("--resume",) if cfg.session.get("resume", False) else ()
    learner = None
    if cfg.session.learner == "local":
        learner = _spawn("robot_rl.learner", config_path, run_dir / "learner")
    # one control process per robot; several feed one learner, each under its own sender id
    names = [cfg.session.sender_id] if cfg.session.num_robots == 1 else [
        f"{cfg.session.sender_id}_{i}" for i in range(cfg.session.num_robots)]
    controls = {name: _spawn("robot_rl.control", config_path, run_dir / _control_dir(names, name), name, str(i),
                             *resume) for i, name in enumerate(names)}
    interrupted = False
    restarts: dict[str, int] = {}
    procs = {"learner": learner}  # the supervisor may replace a crashed learner
    try:
        control_codes = _supervise(cfg, run_dir, config_path, names, controls, procs, restarts)
        learner = procs["learner"]
    except KeyboardInterrupt:
        interrupted = True
        # a second Ctrl-C must not abandon the children mid-shutdown: the SIGINT/SIGTERM/SIGKILL escalation in
        # _stop bounds how long this takes anyway
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        learner = procs["learner"]
        log.info("Ctrl-C: stopping the control process(es) and the learner")
        control_codes = {name: _stop(proc, name, cfg.session.drain_timeout_s + 5, already_interrupted=True)
                         for name, proc in controls.items()}
    learner_code = _stop(learner, "learner", 30.0, interrupted) if learner is not None else None
    control_code = max(control_codes.values())
    curve = plot_learning_curve([run_dir / _control_dir(names, n) for n in names], run_dir / "learning_curve.png")

    control_summary = _read(run_dir / _control_dir(names, names[0]) / "summary.json")
    learner_summary = _read(run_dir / "learner" / "summary.json")
    summary = {
        "verb": "session",
        "run_dir": str(run_dir),
        "robot": OmegaConf.to_container(cfg.robot, resolve=True),
        "algo": cfg.algo.name,
        "learner": cfg.session.learner,
        "interrupted": interrupted,
        "exit_codes": {"control": control_codes, "learner": learner_code},
        "episodes": control_summary and control_summary["episodes"],
        "success_rate": control_summary and control_summary["success_rate"],
        "policy_success_rate": control_summary and control_summary["policy_success_rate"],
        "final_policy_version": control_summary and control_summary["final_policy_version"],
        "learner_updates": learner_summary and learner_summary["updates"],
        "restarts": restarts,
        "learning_curve": str(curve) if curve else None,
        "wall_s": time.time() - t0,
        "control": control_summary,
        "other_robots": {n: _read(run_dir / _control_dir(names, n) / "summary.json") for n in names[1:]},
        "learner": learner_summary,
    }
    write_json(run_dir / "summary.json", summary)
    if control_summary and control_summary["episodes"]:
        policy_rate = summary["policy_success_rate"]
        policy_rate = "no policy-driven episodes" if policy_rate is None else f"policy-driven: {policy_rate:.2f}"
        print(f"session done in {summary['wall_s']:.0f} s: {summary['episodes']} episodes, success rate "
              f"{summary['success_rate']:.2f} ({policy_rate}), weights "
              f"v{summary['final_policy_version']}, {summary['learner_updates']} learner updates; "
              f"summary: {run_dir / 'summary.json'}")
    return 0 if control_code == 0 else 1
