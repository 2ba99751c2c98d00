"""`robot-rl session`: start the learner and the control process(es) as separate OS processes, supervise them, stop
them cleanly, and say truthfully what happened.

Stopping: SIGINT (Ctrl-C, to the process group or to this process alone) and SIGTERM are caught explicitly, also
when the session was started with SIGINT ignored (a background job of a script). The control processes get
SIGTERM at once: the robot is on its safe action from their next tick; they wait (session.drain_timeout_s at
most) until the learner acknowledged every transition, then the learner is stopped and checkpoints. Children
started by a session also stop on their own if the session dies.

Faults: a crashed learner or control process is restarted (session.restart_crashed times each) and resumes from
what is on disk. A learner that exits for a full disk (or another storage error) is not restarted: the session
stops early with one clear message, the robots hold their safe action, nothing stored is touched, and the summary
is still written (a small space reserve is released for it). A control process is never restarted into a learner
that is gone.

The truth at the top: the final line and the top level of summary.json give transitions sent / stored /
quarantined / unacknowledged, each drain's result, restarts, storage errors, watchdog outages, the episodes of
the control logs and of the learner's replay, and whether the robot ever ran learner weights; the exit code is
0 only when nothing was lost, every transition was acknowledged and every process ended cleanly (28 when the
session stopped for a full disk, 1 for anything else).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from robot_rl.config import ConfigError, positive, resolve_device
from robot_rl.control.learning_curve import learning_curve
from robot_rl.control.session_summary import final_line, replay_episodes, robots_summary
from robot_rl.control.telemetry import read_json, read_jsonl, write_json_safely

log = logging.getLogger("robot_rl.commands.session")

EXIT_OK, EXIT_FAILED, EXIT_DISK_FULL = 0, 1, 28
LEARNER_DISK_FULL, LEARNER_STORAGE_ERROR = 28, 74  # robot_rl/learner/process.py's exit codes
CONTROL_UNACKED, CONTROL_STREAM_FAILED = 3, 4  # robot_rl/control/process.py's exit codes
PARENT_PID_ENV = "ROBOT_RL_PARENT_PID"
RESERVE_FILE = ".session_space_reserve"
DISK_FULL_ADVICE = (
    "stopping the session early; the robots hold their safe action, everything acknowledged is "
    "stored and kept, the rest stays in the control outboxes. Free space, then resume with "
    "session.resume=true"
)


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


# ------------------------------------------------------------------------------------------------ preflight
def preflight_warnings(cfg: DictConfig) -> list[str]:
    """What will keep this session from learning anything, said before it starts: a budget (episodes x
    max_episode_steps x robots) below what the algorithm needs before its first update or its first published
    weights, or nobody at all to drive (no teleop, and weights that cannot come)."""
    from robot_rl.algos import REGISTRY, with_defaults

    s = cfg.session
    algo = with_defaults(OmegaConf.to_container(cfg.algo, resolve=True))
    entry = REGISTRY.get(algo.get("name"))
    budget = int(s.episodes) * int(s.max_episode_steps) * int(s.num_robots)
    first = int(algo.get("min_transitions") or algo.get("learning_starts") or 0)
    utd = float(algo.get("updates_per_transition") or 1.0)
    first_weights = first + int(float(algo.get("publish_every_updates") or 0) / max(utd, 1e-9))
    no_teleop = (cfg.teleop.get("type") or "none") == "none"
    # online BC learns from the teleop's labels: without a teleop it never gets any
    needs_labels = bool(getattr(entry.algorithm, "needs_teleop_labels", "min_transitions" in algo)) if entry else False
    warnings = []
    if s.learner == "none":
        pass
    elif no_teleop and needs_labels:
        warnings.append(
            f"algo={algo['name']} learns from the teleop's labels and teleop=none gives none: the "
            "learner will never update, the robot will never get weights"
        )
    elif budget < first:
        warnings.append(
            f"budget cannot reach the first update: at most {budget} transitions (episodes "
            f"{s.episodes} x max_episode_steps {s.max_episode_steps} x robots {s.num_robots}) < the "
            f"{first} algo={algo['name']} needs before its first update"
        )
    elif budget < first_weights:
        warnings.append(
            f"budget cannot reach the first published weights: at most {budget} transitions < about "
            f"{first_weights} ({first} before the first update + publish_every_updates "
            f"{algo.get('publish_every_updates')} at {utd:g} updates per transition)"
        )
    acts_without = entry is not None and entry.algorithm.robot_acts_without_weights
    if no_teleop and not acts_without and (s.learner == "none" or warnings):
        warnings.append(
            "no actor at all: teleop=none and the policy acts only with learner weights, which will not "
            f"come: every tick of the {s.episodes} episodes sends the safe action"
        )
    elif no_teleop and not acts_without:
        warnings.append("teleop=none: until the learner's first weights arrive nobody drives (safe actions)")
    if cfg.teleop.get("type") == "scripted" and cfg.robot.get("type") == "robosuite":
        from robot_rl.sim.experts import untuned_robot_warning

        untuned = untuned_robot_warning(cfg.robot.get("robots"))
        if untuned:
            warnings.append(untuned)
    return warnings


# --------------------------------------------------------------------------------------------- processes
def _spawn(module: str, config: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, **{PARENT_PID_ENV: str(os.getpid())})
    return subprocess.Popen([sys.executable, "-m", module, str(config), str(run_dir), *extra], env=env)


_SIGNALLED: set[int] = set()  # pids already told to stop (SIGTERM/SIGUSR1): not signalled again unless escalating


def _signal(proc: subprocess.Popen | None, sig: int) -> None:
    if proc is not None and proc.poll() is None:
        try:
            proc.send_signal(sig)
            _SIGNALLED.add(proc.pid)
        except ProcessLookupError:
            pass


def _stop(proc: subprocess.Popen, name: str, wait_s: float) -> int:
    """SIGTERM (unless it was told to stop already: it is stopping), wait, then SIGTERM again and SIGKILL: a
    child gets every chance to save its work, and the session still ends in bounded time."""
    stages = ((None, wait_s),) if proc.pid in _SIGNALLED else ((signal.SIGTERM, wait_s),)
    for sig, timeout in (*stages, (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            break
        if sig is not None:
            _signal(proc, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning(
                "%s did not stop within %.0f s%s; escalating",
                name,
                timeout,
                f" after {signal.Signals(sig).name}" if sig else " of being told to stop",
            )
    return proc.wait()


def _control_dir(names: list[str], name: str) -> str:
    return "control" if len(names) == 1 else f"control_{name}"


class SpaceReserve:
    """A few MB held in the run dir from the start and given back when the disk fills, so that the summaries, the
    tick records and the learning curve can still be written."""

    def __init__(self, run_dir: Path, mb: float):
        self.path, self.held = run_dir / RESERVE_FILE, False
        if mb <= 0:
            return
        try:
            with open(self.path, "wb") as f:
                block = b"\0" * (1 << 20)
                for _ in range(int(mb)):
                    f.write(block)
            self.held = True
        except OSError:
            self.path.unlink(missing_ok=True)

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        self.held = False


class Supervisor:
    """Runs the session's processes: restarts crashed ones, never a learner that exited for its disk, never a
    control process into a learner that is gone; forwards stop signals."""

    def __init__(self, cfg: DictConfig, run_dir: Path, config_path: Path, reserve: SpaceReserve):
        self.cfg, self.s, self.run_dir, self.config_path, self.reserve = cfg, cfg.session, run_dir, config_path, reserve
        self.limit = int(self.s.get("restart_crashed", 0) or 0)
        self.min_free = int(float(self.s.get("disk_full_below_mb", 0.25) or 0) * (1 << 20))
        self.names = (
            [self.s.sender_id]
            if self.s.num_robots == 1
            else [f"{self.s.sender_id}_{i}" for i in range(self.s.num_robots)]
        )
        self.controls: dict[str, subprocess.Popen] = {}
        self.learner: subprocess.Popen | None = None
        self.learner_code: int | None = None
        self.learner_gone = False  # exited and will not be restarted
        self.codes: dict[str, int] = {}
        self.restarts: dict[str, int] = {}
        self.stop_signal: int | None = None
        self.stopped_early: str | None = None  # why the session stopped before its episodes were done
        self.disk_full = False
        self.events: list[str] = []

    # -- signals
    def on_signal(self, signum, _frame) -> None:
        first = self.stop_signal is None
        self.stop_signal = self.stop_signal or signum
        if first:
            log.warning(
                "%s: stopping the robot(s) at the next tick, then draining and stopping the learner",
                signal.Signals(signum).name,
            )
        for proc in self.controls.values():  # at once, also a second time (the children take it idempotently)
            _signal(proc, signal.SIGTERM)
        if not self.controls:
            _signal(self.learner, signal.SIGTERM)

    # -- start
    def start(self, resume: bool) -> None:
        if self.s.learner == "local":
            self.learner = _spawn("robot_rl.learner", self.config_path, self.run_dir / "learner")
        for i, name in enumerate(self.names):
            self.controls[name] = self._spawn_control(i, name, resume)

    def _spawn_control(self, i: int, name: str, resume: bool) -> subprocess.Popen:
        return _spawn(
            "robot_rl.control",
            self.config_path,
            self.run_dir / _control_dir(self.names, name),
            name,
            str(i),
            *(("--resume",) if resume else ()),
        )

    # -- the loop
    def run(self) -> None:
        while len(self.codes) < len(self.controls):
            if self.stop_signal is not None:
                break
            self._check_disk()
            self._check_learner()
            for i, name in enumerate(self.names):
                if name in self.codes or (code := self.controls[name].poll()) is None:
                    continue
                if self._restartable_control(name, code):
                    self.restarts[name] = self.restarts.get(name, 0) + 1
                    log.warning(
                        "control process %s exited with %d: restarting it (%d/%d), resuming from its log and outbox",
                        name,
                        code,
                        self.restarts[name],
                        self.limit,
                    )
                    self.controls[name] = self._spawn_control(i, name, True)
                else:
                    self.codes[name] = code
            time.sleep(0.1)
        self._finish_controls()
        self._finish_learner()

    def _restartable_control(self, name: str, code: int) -> bool:
        if code in (0, CONTROL_UNACKED, CONTROL_STREAM_FAILED) or self.stop_signal is not None or self.stopped_early:
            return False
        if self.restarts.get(name, 0) >= self.limit:
            return False
        if self.learner_gone:
            log.error("control process %s exited with %d; not restarting it: the learner is gone", name, code)
            return False
        return True

    def _check_disk(self) -> None:
        """The run dir's filesystem nearly full: stop before the processes trip over it one by one."""
        if self.disk_full or self.min_free <= 0:
            return
        try:
            st = os.statvfs(self.run_dir)
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        if free < self.min_free:
            self.disk_full = True
            self._learner_gone(
                f"disk full: no space left on device under {self.run_dir} ({free // 1024} KB free, "
                "session.disk_full_below_mb): " + DISK_FULL_ADVICE
            )
            _signal(self.learner, signal.SIGTERM)

    def _check_learner(self) -> None:
        if self.learner is None or self.learner_gone or (code := self.learner.poll()) is None:
            return
        self.learner_code = code
        if code == LEARNER_DISK_FULL:
            self.disk_full = True
            self._learner_gone(
                "disk full: the learner exited with 'No space left on device' (see "
                "learner/summary.json): " + DISK_FULL_ADVICE
            )
        elif code == LEARNER_STORAGE_ERROR:
            self._learner_gone(
                "the learner could not write its storage (I/O error, see learner/summary.json): "
                "stopping the session early; the robots hold their safe action. Fix the storage, "
                "then resume with session.resume=true"
            )
        elif self.restarts.get("learner", 0) < self.limit:
            self.restarts["learner"] = self.restarts.get("learner", 0) + 1
            log.warning(
                "learner exited with %d: restarting it (%d/%d) from its checkpoint and replay",
                code,
                self.restarts["learner"],
                self.limit,
            )
            self.learner = _spawn("robot_rl.learner", self.config_path, self.run_dir / "learner")
            self.learner_code = None
        else:
            self._learner_gone(
                f"the learner exited with {code} and session.restart_crashed ({self.limit}) is "
                "spent: stopping the session early; the robots hold their safe action"
            )

    def _learner_gone(self, message: str) -> None:
        self.learner_gone = True
        self.stopped_early = message
        log.error("%s", message)
        self.reserve.release()  # room for the summaries
        for proc in self.controls.values():  # stop now, do not wait for acknowledgements that cannot come
            _signal(proc, signal.SIGUSR1)

    def _finish_controls(self) -> None:
        wait_s = float(self.s.drain_timeout_s) + 30.0
        for name, proc in self.controls.items():
            if name not in self.codes:
                t0 = time.monotonic()
                self.codes[name] = _stop(proc, f"control process {name}", wait_s)
                log.info(
                    "control process %s exited with %d after %.1f s", name, self.codes[name], time.monotonic() - t0
                )
        self._check_learner_exit_code()

    def _check_learner_exit_code(self) -> None:
        if self.learner is not None and not self.learner_gone and (code := self.learner.poll()) is not None:
            self.learner_code = code
            self.disk_full = self.disk_full or code == LEARNER_DISK_FULL

    def _finish_learner(self) -> None:
        if self.learner is None:
            return
        if self.learner.poll() is None:  # after a full disk it may be unable to finish: a shorter wait
            wait_s = 20.0 if self.disk_full else float(self.s.drain_timeout_s) + 60.0
            t0 = time.monotonic()
            self.learner_code = _stop(self.learner, "learner", wait_s)
            log.info("learner exited with %d after %.1f s", self.learner_code, time.monotonic() - t0)
        else:
            self.learner_code = self.learner.returncode
        if self.learner_code == LEARNER_DISK_FULL and not self.disk_full:
            self.disk_full = True
            self.stopped_early = self.stopped_early or "disk full: the learner exited with 'No space left on device'"
            log.error(
                "disk full: the learner exited with 'No space left on device' while finishing; see learner/summary.json"
            )
        if self.disk_full:
            self.reserve.release()


# ---------------------------------------------------------------------------------------- the truth at the top
def truth(
    sup: Supervisor, run_dir: Path, controls: dict[str, dict | None], learner: dict | None, warnings: list[str]
) -> dict:
    """The top of summary.json: what was sent, stored and lost, how each process ended, and every problem."""
    problems: list[str] = []
    if sup.stopped_early:
        problems.append(sup.stopped_early)
    senders = (learner or {}).get("senders") or {}
    streams = (learner or {}).get("streams") or {}
    sent = stored = unacked = duplicates = lost = 0
    sent_known = True
    drains, outages = {}, {"count": 0, "total_s": 0.0, "longest_s": 0.0}
    for name, c in controls.items():
        code = sup.codes.get(name)
        if c is None:
            problems.append(f"control process {name} wrote no summary (exit code {code})")
            sent_known = False
            continue
        t = c.get("transitions") or {}
        s_sent = int(t.get("stream_sent", t.get("submitted", 0)) or 0)
        s_unacked = int(t.get("unacked_at_exit", t.get("unacked", 0)) or 0)
        got = senders.get(name) or {}
        s_stored = int(got.get("transitions", 0))
        s_quarantined = sum(
            int(v.get("quarantined", 0) or 0) for k, v in streams.items() if str(k).split("/")[0] == name
        )
        sent, stored, unacked = sent + s_sent, stored + s_stored, unacked + s_unacked
        duplicates += s_stored - int(got.get("unique", s_stored))
        # acknowledged = stored or quarantined by the learner; what it holds beyond that was stored after the
        # control's last ack arrived (still in the outbox too: a resend is deduplicated)
        lost += max(0, (s_sent - s_unacked) - s_stored - s_quarantined)
        drain = c.get("drain") or {"result": "complete" if t.get("all_acknowledged") else "unknown"}
        drains[name] = drain.get("result")
        if drain.get("result") not in ("complete", "no learner"):
            problems.append(
                f"control process {name}: drain {drain.get('result')}, "
                f"{drain.get('unacknowledged')} transitions unacknowledged (kept in its outbox)"
            )
        o = c.get("watchdog_outages") or {}
        outages["count"] += int(o.get("count", c.get("watchdog_trips", 0)) or 0)
        outages["total_s"] = round(outages["total_s"] + float(o.get("total_s", 0.0) or 0.0), 3)
        outages["longest_s"] = max(outages["longest_s"], float(o.get("longest_s", 0.0) or 0.0))
        if code not in (0, None, CONTROL_UNACKED):  # unacknowledged transitions: the drain's problem above
            problems.append(f"control process {name} exited with {code} ({c.get('stop_reason')})")
    quarantined = int((learner or {}).get("quarantined", 0) or 0)
    learner_on = sup.s.learner == "local"
    if not (learner_on and sent_known and learner is not None):
        lost = None
    else:
        if lost > 0:
            problems.append(f"{lost} transitions acknowledged but not in the learner's replay")
        if duplicates:
            problems.append(f"{duplicates} transitions stored more than once")
    if unacked:
        problems.append(f"{unacked} transitions unacknowledged at exit (kept in the control outboxes)")
    if quarantined:
        warnings = [*warnings, f"{quarantined} transitions quarantined by the learner (non-finite values)"]
    warnings = [*warnings, *((learner or {}).get("algo_warnings") or [])]  # e.g. RLIF: no takeover, no signal
    if learner_on and learner is None:
        problems.append(f"the learner wrote no summary (exit code {sup.learner_code})")
    if learner_on and sup.learner_code not in (0, None) and not sup.stopped_early:
        problems.append(f"the learner exited with {sup.learner_code}")
    storage_errors = list((learner or {}).get("storage_errors") or [])
    if storage_errors and not sup.stopped_early:
        problems.append(f"learner storage errors: {'; '.join(map(str, storage_errors[:3]))}")

    # episodes: the control logs vs the learner's replay
    logged = {n: set(((c or {}).get("episode_log") or {}).get("numbers") or []) for n, c in controls.items()}
    in_replay = replay_episodes(run_dir / "learner") if learner_on else None
    episodes = {
        "control_logs": sum(len(v) for v in logged.values()),
        "replay": None if in_replay is None else sum(len(v) for v in in_replay.values()),
        "interrupted": sum(int(((c or {}).get("episode_log") or {}).get("interrupted", 0)) for c in controls.values()),
    }
    if in_replay is not None and sup.learner_code in (0, None) and not sup.disk_full:
        differ = {
            n: sorted(logged[n] ^ in_replay.get(n, set())) for n in logged if logged[n] != in_replay.get(n, set())
        }
        episodes["agree"] = not differ
        if differ:
            problems.append(f"episodes differ between the control log and the learner's replay: {differ}")
    # the robot and the learner's weights
    versions = [
        int((c or {}).get("final_policy_version", -1) if (c or {}).get("final_policy_version") is not None else -1)
        for c in controls.values()
    ]
    weights_loaded = any(v >= 0 for v in versions)
    policy_steps = sum(int((c or {}).get("policy_steps", 0) or 0) for c in controls.values())
    if learner_on and not weights_loaded:
        warnings = [
            *warnings,
            "the robot never loaded learner weights (weights v-1): no weights were published in "
            "time; the policy never drove with learned weights",
        ]
    status = "ok" if not problems else "error"
    code = EXIT_OK if not problems else (EXIT_DISK_FULL if sup.disk_full else EXIT_FAILED)
    return {
        "status": status,
        "exit_code": code,
        "problems": problems,
        "warnings": warnings,
        "stopped_early": sup.stopped_early,
        "transitions": {
            "sent": sent if sent_known else None,
            "stored": stored if learner_on else None,
            "quarantined": quarantined,
            "unacknowledged": unacked,
            "lost": lost,
            "duplicates": duplicates,
        },
        "drain": drains,
        "restarts": dict(sup.restarts),
        "storage_errors": len(storage_errors),
        "disk_full": sup.disk_full,
        "watchdog_outages": outages,
        "episodes_logged": episodes,
        "weights_loaded": weights_loaded,
        "policy_steps": policy_steps,
    }


def set_aside_previous(run_dir: Path) -> Path | None:
    """A new session (not session.resume) in a run dir that holds an earlier one: move the earlier one's outputs
    to previous/<time>/ (never deleted), so that its replay, checkpoints and logs do not mix with this one's."""
    old = [
        p
        for p in run_dir.iterdir()
        if p.name in ("learner", "control", "summary.json", "learning_curve.png") or p.name.startswith("control_")
    ]
    if not old:
        return None
    dest = run_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for p in old:
        os.replace(p, dest / p.name)
    log.warning(
        "run dir %s held an earlier session: moved it to %s (session.resume=true continues a session instead)",
        run_dir,
        dest,
    )
    return dest


def _robot_name(cfg: DictConfig) -> str:
    r = cfg.robot
    parts = [str(r.get(k)) for k in ("env_name", "robots", "lerobot_type") if r.get(k)]
    return " ".join(parts) or str(r.get("type", "?"))


def run_verb(verb: str, cfg: DictConfig, run_dir: Path) -> int:
    """`robot-rl session` runs both processes; `control` and `learner` run one side of a two-machine session."""
    if verb == "session":
        return run_session(cfg, run_dir)
    if verb == "control":
        from robot_rl.control.process import ControlProcess

        control = ControlProcess(cfg, run_dir / "control")
        return control.exit_code(control.run())  # non-zero when transitions were left unacknowledged, ...
    from robot_rl.learner.process import Learner

    learner = Learner(cfg, run_dir / "learner")
    learner.run()
    return learner.exit_code  # 28: disk full, 74: other storage errors (robot_rl/learner/process.py)


def run_session(cfg: DictConfig, run_dir: Path) -> int:
    config_path = run_dir / "config.yaml"
    t0 = time.time()
    if not cfg.session.get("resume", False):
        set_aside_previous(run_dir)
    warnings = preflight_warnings(cfg)
    for w in warnings:
        log.warning("%s", w)
    reserve = SpaceReserve(run_dir, float(cfg.session.get("space_reserve_mb", 4) or 0))
    sup = Supervisor(cfg, run_dir, config_path, reserve)
    for sig in (signal.SIGINT, signal.SIGTERM):  # explicitly: also when started with SIGINT ignored
        signal.signal(sig, sup.on_signal)
    sup.start(bool(cfg.session.get("resume", False)))
    try:
        sup.run()
    finally:
        for proc in [*sup.controls.values(), sup.learner]:  # an exception here must not orphan a child
            if proc is not None and proc.poll() is None:
                _stop(proc, "child", 10.0)
    names = sup.names
    controls = {n: read_json(run_dir / _control_dir(names, n) / "summary.json") for n in names}
    learner_summary = read_json(run_dir / "learner" / "summary.json")
    curve, curve_skipped = learning_curve(
        [run_dir / _control_dir(names, n) for n in names],
        run_dir / "learning_curve.png",
        title=f"session {run_dir.name}: algo={cfg.algo.name}, robot {_robot_name(cfg)}, "
        f"{len(names)} robot{'s' if len(names) > 1 else ''}",
    )
    first = controls[names[0]]
    episodes_all = [
        r
        for n in names
        for r in read_jsonl(run_dir / _control_dir(names, n) / "episodes.jsonl")
        if not r.get("interrupted")
    ]
    top = truth(sup, run_dir, controls, learner_summary, warnings)
    summary = {
        "verb": "session",
        **top,
        "run_dir": str(run_dir),
        "robot": OmegaConf.to_container(cfg.robot, resolve=True),
        "algo": cfg.algo.name,
        "learner_mode": cfg.session.learner,
        "interrupted": signal.Signals(sup.stop_signal).name if sup.stop_signal else False,
        "exit_codes": {"control": sup.codes, "learner": sup.learner_code},
        "episodes": sum(
            int(((c or {}).get("episode_log") or {}).get("episodes", (c or {}).get("episodes", 0)))
            for c in controls.values()
        ),
        "success_rate": (sum(bool(r["success"]) for r in episodes_all) / len(episodes_all)) if episodes_all else None,
        "policy_success_rate": first and first["policy_success_rate"],
        "final_policy_version": first and first["final_policy_version"],
        "learner_updates": learner_summary and learner_summary["updates"],
        "learning_curve": str(curve) if curve else None,
        "learning_curve_skipped": curve_skipped,
        "wall_s": time.time() - t0,
        "control": first,
        "other_robots": {n: controls[n] for n in names[1:]},
        "learner": learner_summary,
    }
    if len(names) > 1:
        summary["robots"] = robots_summary(names, controls, learner_summary)
    problem = write_json_safely(run_dir / "summary.json", summary)
    if problem:
        reserve.release()
        problem = write_json_safely(run_dir / "summary.json", summary)
        if problem:
            log.error("%s", problem)
    reserve.release()
    print(final_line(summary, top), flush=True)
    return top["exit_code"]
