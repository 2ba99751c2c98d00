"""The control process: drives one robot at a fixed rate and never waits on the learner.

Each tick: take the newest weights if any arrived (swap at the tick boundary), ask the teleop/expert and the
policy, pick who acts (takeover switch), pass the action through the safety filter, send it, stream the
transition. Transport runs on background threads; a silent learner trips the watchdog and the robot gets
the safe action until the learner is back.

Stopping: SIGINT or SIGTERM (installed explicitly, also when the process started with SIGINT ignored, as a
background job does) stops the robot at the next tick on its safe action, then waits up to
session.drain_timeout_s for the learner to acknowledge every transition; SIGUSR1 (the session: "the learner is
gone for good") stops the same way without waiting for acknowledgements. Started by a session
(ROBOT_RL_PARENT_PID), the process also stops on its own when that parent dies. Every submitted transition is
kept in `<run dir>/outbox` until acknowledged, so a restarted control process (`--resume`) resends exactly what
its predecessor had not got acknowledged, and an episode it had cut short is logged as interrupted.

Exit codes (`python -m robot_rl.control`):
    0   the episodes ran (or a stop was requested) and every transition was acknowledged
    3   EXIT_UNACKED: transitions left unacknowledged (drain timed out, or the learner was gone); they stay in the
        outbox for a resumed session
    4   EXIT_STREAM_FAILED: the transition stream stopped working (see the log); the robot was stopped safely
"""

from __future__ import annotations

import collections
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from robot_rl.control.telemetry import EpisodeLog, save_npz_atomic, write_json_safely
from robot_rl.control.pacing import PacedLoop, set_priority
from robot_rl.control.safety import Watchdog, build_safety
from robot_rl.control.takeover import SOURCES
from robot_rl.control.viz import make_view
from robot_rl.algos import make_robot_policy
from robot_rl.factory import make_robot, make_teleop
from robot_rl.interfaces import OBS_PREFIX, Policy
from robot_rl.reward.success import make_success_detector
from robot_rl.rollout import Rollout, Step
from robot_rl.transport import TransitionSender, WeightSubscriber
from robot_rl.transport.security import load_client_keys

log = logging.getLogger("robot_rl.control")

EXIT_OK = 0
EXIT_UNACKED = 3
EXIT_STREAM_FAILED = 4
PARENT_PID_ENV = "ROBOT_RL_PARENT_PID"  # set by `robot-rl session` for its children: stop when it dies
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # SIGUSR1: the learner is gone for good


def watched_parent() -> int | None:
    """The session's pid when this process was started by one (and it is still our parent), else None. On
    Linux the kernel also sends SIGTERM when it dies (PR_SET_PDEATHSIG), which the stop handler catches."""
    try:
        pid = int(os.environ.get(PARENT_PID_ENV, ""))
    except ValueError:
        return None
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass
    return pid if os.getppid() == pid else None


class ControlProcess:
    def __init__(
        self,
        cfg: DictConfig,
        run_dir: Path,
        sender_id: str | None = None,
        robot_index: int | None = None,
        resume: bool = False,
    ):
        """`robot_index`: this robot's place in a fleet (a session numbers its robots; `robot-rl control` on one
        machine of several takes session.robot_index)."""
        self.cfg, self.s = cfg, cfg.session
        self.run_dir = Path(run_dir)
        robot_index = int(self.s.get("robot_index", 0) or 0) if robot_index is None else int(robot_index)
        self.robot_index = robot_index
        self.robot = make_robot(cfg.robot)
        self.teleop = make_teleop(cfg.teleop, self.robot)
        self.seed = int(cfg.seed) + 100_003 * robot_index  # each robot of a fleet gets its own seeded episodes
        self.policy = self._make_policy()
        self.policy_version = -1  # no weights yet
        self.success = make_success_detector(
            OmegaConf.to_container(cfg.get("reward") or {}, resolve=True), self.robot, self.teleop
        )
        self.safety = build_safety(cfg, self.robot)
        self.loop = PacedLoop(self.s.rate_hz)
        self.watchdog = Watchdog(self.s.watchdog_s, name="learner")
        self.sender_id = sender_id or self.s.sender_id
        resume = resume or bool(self.s.get("resume", False))
        self.log = EpisodeLog(self.run_dir, resume=resume)
        self.sender = self.subscriber = None
        self.priority: dict | None = None  # what set_priority applied to the control thread
        self.outbox_dir = self.run_dir / "outbox"
        if self.s.learner != "none":
            keys = None
            if self.s.curve_keys_dir:
                keys = load_client_keys(self.s.curve_keys_dir, str(Path(self.s.curve_keys_dir) / "server.key"))
            if not resume and self.outbox_dir.exists():
                log.info("not resuming: starting a new transition stream (removing %s)", self.outbox_dir)
                shutil.rmtree(self.outbox_dir, ignore_errors=True)
            self.sender = TransitionSender(
                self.s.endpoints.transitions,
                self.sender_id,
                batch_size=self.s.transition_batch,
                max_batch_delay_s=self.s.transition_max_delay_s,
                heartbeat_interval_s=self.s.heartbeat_s,
                curve=keys,
                outbox_dir=self.outbox_dir,
            )
            self.subscriber = WeightSubscriber(self.s.endpoints.weights, curve=keys)
        self.first_seq = self.sender.next_seq if self.sender is not None else 0  # this process's first new seq
        self._stop = False
        self._safe_since_stop = False  # a stop was requested and a tick has sent the safe action since
        self.stream_failed = False
        self.stop_reason: str | None = None
        self.learner_gone = False  # SIGUSR1: do not wait for acknowledgements
        self.parent_pid = watched_parent()
        self.interrupted_episodes: list[dict] = []
        self._hold_reasons: collections.Counter = collections.Counter()
        self.episodes: list[dict] = []
        self.weight_updates: list[dict] = []
        self._contact_age = math.nan  # seconds since the learner was last heard, at the current tick's start
        self.ticks = {
            k: [] for k in ("t", "lateness", "episode", "source", "forced_safe", "policy_version", "contact_age")
        }
        self.view = make_view(self.s, self.run_dir)  # session.viz=rerun: a live view that never holds up the loop

    def _make_policy(self) -> Policy:
        """The robot-side policy of the configured algorithm (the learner's weights load into it)."""
        return make_robot_policy(
            OmegaConf.to_container(self.cfg.algo, resolve=True),
            OmegaConf.to_container(self.cfg.policy, resolve=True),
            self.robot,
            self.seed,
        )

    def request_stop(self, signum=None, _frame=None, reason: str | None = None):
        """Signal handler (and the parent watch): the robot gets its safe action from the next tick on."""
        if signum == signal.SIGUSR1:
            self.learner_gone = True
            reason = reason or "the session says the learner is gone"
        elif reason is None:
            reason = f"{signal.Signals(signum).name}" if signum else "stop requested"
        if not self._stop:
            self.stop_reason = reason
            log.info(
                "stop (%s): safe action from the next tick, then %s",
                reason,
                "exit without waiting for the learner" if self.learner_gone else "drain and exit",
            )
        self._stop = True

    def _check_health(self) -> None:
        """Per tick: the session that started us is alive, the transition stream still runs."""
        if self._stop:
            return
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            self.request_stop(reason="the session (parent process) died")
        thread = getattr(self.sender, "_thread", None) if self.sender is not None else None
        if thread is not None and not thread.is_alive():
            self.stream_failed = True
            log.error(
                "the transition stream to the learner stopped working (see the error above): stopping the "
                "robot; unacknowledged transitions stay in %s",
                self.outbox_dir,
            )
            self.request_stop(reason="the transition stream failed")

    # ------------------------------------------------------------------------------------------------ ticks
    def _take_new_weights(self, probe_obs) -> None:
        update = self.subscriber.latest() if self.subscriber else None
        if update is None:
            return
        self.policy.load_state_dict(update.tensors)  # the policy may stage them until its own boundary
        self.policy_version = update.version
        self.policy.apply_meta(update.meta)  # e.g. how to explore, as the learner decides
        probe = self.policy.select_action(probe_obs).tolist() if self.policy.probe_after_load else None
        self.weight_updates.append(
            {"version": update.version, "t": time.time(), "probe_action": probe, "meta": update.meta}
        )
        log.info("policy weights v%d loaded", update.version)

    def _policy_action(self, obs):
        """The policy acts once weights arrived, or from the first tick if it needs none (a frozen base)."""
        can_act = self.policy_version >= 0 or self.policy.acts_without_weights
        return self.policy.select_action(obs) if can_act else None

    def _feed_watchdog(self) -> None:
        """Also keeps, for ticks.npz, the silence the watchdog sees at this tick's start (NaN: no learner or never
        heard), so a held tick can be traced to when the learner was last heard."""
        if self.sender is not None and self.sender.last_contact is not None:
            self.watchdog.feed(self.sender.last_contact)
        self._contact_age = self.watchdog.silence_s() if self.sender is not None else math.nan

    def _must_hold(self, source: str) -> bool:
        """The safe action despite a proposal: the learner went silent while the policy drives, or we stop."""
        if self._stop:
            self._hold_reasons["stopping"] += 1
            return True
        # the watchdog is asked every tick (outages are counted whoever drives); it holds only the policy
        if self.sender is not None and self.watchdog.expired() and source == "policy":
            self._hold_reasons["learner silent"] += 1
            return True
        return False

    def _transition(self, step: Step, episode: int) -> dict:
        """What the learner gets for one tick: the observation, who proposed and who acted, the outcome."""
        nan = np.full(self.robot.action_feature.shape[0], np.nan, dtype=np.float32)
        transition = {OBS_PREFIX + k: np.asarray(v) for k, v in step.obs.items()}
        transition.update(
            {
                "action": np.asarray(step.action, dtype=np.float32),
                "policy_action": nan
                if step.policy_action is None
                else np.asarray(step.policy_action, dtype=np.float32),
                "expert_action": nan
                if step.teleop_action is None
                else np.asarray(step.teleop_action, dtype=np.float32),
                "intervention": np.bool_(step.source == "teleop"),
                "forced_safe": np.bool_(step.forced_safe),
                "episode": np.int64(episode),
                "step": np.int64(step.index),
                "policy_version": np.int64(self.policy_version),
                "t": np.float64(step.t),
            }
        )
        transition.update(self.policy.transition_extras(acted=step.policy_action is not None))
        transition.update(reward=np.float32(step.success), success=np.bool_(step.success), done=np.bool_(step.done))
        return transition

    # ---------------------------------------------------------------------------------------------- episodes
    def _wait_for_learner(self) -> None:
        """A learner may need a while to start (loading data, relabelling demos); episodes start once it answers."""
        deadline = time.monotonic() + float(self.s.get("learner_wait_s", 0))
        if self.sender is not None and time.monotonic() < deadline:
            log.info(
                "waiting up to %.0f s for the learner at %s", deadline - time.monotonic(), self.s.endpoints.transitions
            )
        while self.sender is not None and self.sender.last_contact is None and time.monotonic() < deadline:
            self._check_health()
            if self._stop:
                return
            time.sleep(0.05)

    def run(self) -> dict:
        torch.set_num_threads(1)  # small-network inference: extra threads only steal cores from sim and learner
        self.rollout = Rollout(
            self.robot,
            self.policy,
            act=self._policy_action,
            teleop=self.teleop,
            safety=self.safety,
            success=self.success,
            pacer=self.loop,
            stop_on_success=bool(self.s.stop_on_success),
        )
        for sig in STOP_SIGNALS:  # explicitly: a process started with SIGINT ignored would otherwise ignore Ctrl-C
            signal.signal(sig, self.request_stop)
        self._warn_if_nobody_acts()
        self.robot.connect()
        if self.teleop is not None:
            self.teleop.connect()
        self._log_interrupted_episode()
        if self.sender is not None:
            self.sender.start()
            self.subscriber.start()
            self._wait_for_learner()
            self.watchdog.arm()
        # this (control) thread ahead of the learner and other work; the transport threads started above keep theirs
        self.priority = set_priority(
            str(self.s.get("control_priority") or "none"),
            int(self.s.get("control_nice") or 0),
            int(self.s.get("control_rt_priority") or 50),
            list(self.s.get("control_cpus") or []),
        )
        if self.priority["mode"] == "fifo":
            self.loop.spin_s = 0.0  # a spinning real-time thread trips the kernel's RT throttle (pacing.py)
        t_start = time.time()
        probe_obs = None
        first = self.log.next_episode  # > 0 when resuming: episode numbers and seeds continue
        if first:
            log.info("resuming at episode %d (%d env steps so far)", first, self.log.env_steps)
        drained = {"result": "not reached", "unacknowledged": None, "waited_s": 0.0}
        try:
            for episode in range(first, self.s.episodes):
                if self._stop:
                    break
                obs = self._reset(self.seed + episode)
                probe_obs = probe_obs if probe_obs is not None else obs
                if self.sender is not None:
                    self.log.started(episode, self.sender.next_seq)
                ep = self._run_episode(episode, obs, probe_obs)
                if self.sender is not None and not self.sender.flush(timeout_s=5.0):
                    log.warning("episode %d: not every transition reached the outbox within 5 s", episode)
                self.episodes.append(ep)
                self.log.episode(ep)
                every = int(self.s.get("eval_every_episodes", 0) or 0)
                if every and (episode + 1) % every == 0 and not self._stop:
                    self._evaluate(episode)
        finally:
            self._hold_safe()
            drained = self._drain()
            self.robot.disconnect()
            if self.teleop is not None:
                self.teleop.disconnect()
            summary = self._summary(time.time() - t_start, drained)
            self._close_transport()
            left = self.sender.unacked_count if self.sender else 0
            summary["transitions"]["unacked_at_exit"] = left
            if not left and drained["result"] not in ("complete", "no learner"):  # the last acks came while closing
                summary["drain"] = {**drained, "result": "complete", "unacknowledged": 0}
                summary["transitions"]["all_acknowledged"] = True
            if self.view is not None:
                summary["viz"] = self.view.close()
            for problem in (
                write_json_safely(self.run_dir / "summary.json", summary),
                save_npz_atomic(self.run_dir / "ticks.npz", {k: np.asarray(v) for k, v in self.ticks.items()}),
            ):
                if problem:
                    log.error("%s", problem)
            self.log.close()
        return summary

    def exit_code(self, summary: dict) -> int:
        if self.stream_failed:
            return EXIT_STREAM_FAILED
        return EXIT_OK if summary["drain"]["result"] in ("complete", "no learner") else EXIT_UNACKED

    def _warn_if_nobody_acts(self) -> None:
        """No teleop, a policy that waits for weights, and no learner to send any: every tick is the safe action."""
        if self.teleop is None and not self.policy.acts_without_weights and self.sender is None:
            log.warning(
                "nobody can act: no teleop, no learner and the policy needs weights first: every tick of "
                "these %d episodes sends the safe action",
                self.s.episodes,
            )

    def _log_interrupted_episode(self) -> None:
        """A predecessor killed mid-episode: that episode's transitions that reached the outbox are delivered (the
        sender resends them), so the episode exists in the learner's replay: log it as interrupted, so that the
        episode log and the replay agree, and continue with the next episode number."""
        started = self.log.interrupted() if self.sender is not None else None
        if not started or started.get("first_seq") is None:
            return
        streamed = max(0, self.sender.next_seq - int(started["first_seq"]))
        if streamed == 0:
            return  # nothing of it left this process: it simply runs again under the same number and seed
        row = {
            "episode": int(started["episode"]),
            "interrupted": True,
            "success": False,
            "return": 0.0,
            "steps": streamed,
            "policy_steps": None,
            "teleop_steps": None,
            "safe_steps": None,
            "policy_version": None,
            "residual_abs": None,
            "exploration": None,
            "achieved_hz": None,
            "driven_by": "interrupted: the control process was restarted mid-episode",
            "first_seq": int(started["first_seq"]),
        }
        self.interrupted_episodes.append(row)
        self.log.episode(row)

    def _reset(self, seed: int):
        wait = float(self.s.get("reset_time_s", 0) or 0)
        if wait > 0 and self.safety.last_sent is not None:  # hardware: the operator resets the scene meanwhile
            self._hold_safe()
            log.info("episode over: reset the scene (%.0f s, robot holding)", wait)
            end = time.monotonic() + wait
            while time.monotonic() < end and not self._stop:
                self._check_health()
                time.sleep(0.05)
        return self.rollout.reset(seed)

    def _evaluate(self, after_episode: int) -> None:
        """Evaluation block: no exploration noise, no takeover, nothing sent to the learner, the same seeds
        every time, in each of the policy's evaluation modes (a residual policy: its base alone, then with the
        residual; `eval_once` modes such as the frozen base only in the first block)."""
        for mode in self._eval_modes():
            results = []
            for j in range(int(self.s.eval_episodes)):
                if self._stop:
                    return
                obs = self._reset(int(self.s.eval_seed) + j)
                with self.policy.evaluating(mode):
                    results.append(self._run_episode(after_episode, obs, None, evaluating=True))
            self.log.evaluation(mode, after_episode, self.policy_version, results)

    def _eval_modes(self) -> list[str]:
        evaluated = {"base"} if self.log.base_eval is not None else set()  # the log keeps a run's base result
        return [m for m in self.policy.eval_modes if m not in self.policy.eval_once or m not in evaluated]

    def _run_episode(self, episode: int, obs, probe_obs, evaluating: bool = False) -> dict:
        """One episode of the rollout loop; a training episode also takes new weights between ticks, streams its
        transitions and records its ticks. Evaluation episodes measure the policy alone (no teleop)."""
        residual_abs = []
        takeovers = {"count": 0, "last_source": None}  # a takeover: a teleop tick after a tick that was not one
        self._hold_reasons.clear()
        teleop_drives = episode < self.s.expert_episodes and not evaluating and self.teleop is not None

        def before_step(index: int, obs) -> str | None:
            if self._safe_since_stop:  # stopping, and the robot already got its safe action: end the episode here
                return "stop"
            self._check_health()
            if not evaluating:
                self._take_new_weights(probe_obs)  # weights swap at a tick boundary
            self._feed_watchdog()

        def after_step(step: Step) -> None:
            if self._stop and step.forced_safe:
                self._safe_since_stop = True
            transition = self._transition(step, episode)
            if self.view is not None:
                self.view.log_step(step, episode, transition)
            if "residual" in transition and np.isfinite(transition["residual"]).all():
                residual_abs.append(float(np.abs(transition["residual"]).mean()))
            takeovers["count"] += step.source == "teleop" and takeovers["last_source"] != "teleop"
            takeovers["last_source"] = step.source
            if evaluating:
                return
            if self.sender is not None:
                self.sender.submit(transition)
            for key, value in (
                ("t", step.t),
                ("lateness", step.lateness),
                ("episode", episode),
                ("source", SOURCES.index(step.source)),
                ("forced_safe", step.forced_safe),
                ("policy_version", self.policy_version),
                ("contact_age", self._contact_age if math.isfinite(self._contact_age) else math.nan),
            ):
                self.ticks[key].append(value)

        r = self.rollout.episode(
            obs,
            self.s.max_episode_steps,
            teleop_drives=teleop_drives,
            with_teleop=not evaluating,
            before_step=before_step,
            force_safe=self._must_hold,
            hooks=[after_step],
            keep_pacing_stats=bool(self.ticks["t"]),
        )  # stats cover the session
        duration = r["duration_s"]
        return {
            "episode": episode,
            "success": r["success"],
            "return": float(r["success"]),
            "steps": r["steps"],
            "policy_steps": r["policy_steps"],
            "teleop_steps": r["teleop_steps"],
            "interventions": None if teleop_drives else int(takeovers["count"]),  # takeovers of the policy
            "safe_steps": r["safe_steps"],
            "policy_version": self.policy_version,
            "residual_abs": float(np.mean(residual_abs)) if residual_abs else None,
            "exploration": getattr(self.policy, "exploration", None),
            "achieved_hz": r["steps"] / duration if duration > 0 else None,
            "driven_by": self._driven_by(r, teleop_drives, episode),
        }

    def _driven_by(self, r: dict, teleop_drives: bool, episode: int) -> str:
        """Who drove the episode and why, in words (the status line and episodes.jsonl)."""
        if teleop_drives:
            return f"expert (expert episode {episode + 1} of {self.s.expert_episodes})"
        parts = []
        if r["policy_steps"]:
            parts.append(
                f"policy (weights v{self.policy_version})"
                if self.policy_version >= 0
                else "policy (no learner weights yet: acts without them)"
            )
        if r["teleop_steps"]:
            why = (
                "the policy has no weights yet"
                if self.policy_version < 0 and not self.policy.acts_without_weights
                else "took over"
            )
            parts.append(f"expert {r['teleop_steps']} steps ({why})")
        unexplained = r["safe_steps"] - sum(self._hold_reasons.values())
        reasons = dict(self._hold_reasons)
        if unexplained > 0:
            no_actor = "no weights yet and no teleop" if self.policy_version < 0 else "no action proposed"
            reasons[no_actor] = reasons.get(no_actor, 0) + unexplained
        for why, n in reasons.items():
            if n:
                parts.append(f"safe actions {n} steps ({why})")
        if len(parts) == 1 and not r["policy_steps"] and not r["teleop_steps"]:
            return parts[0].replace(f" {r['safe_steps']} steps", "")
        return ", ".join(parts) or "nobody (no steps)"

    def _hold_safe(self) -> None:
        """Leave the robot on the safe action, whatever ended the run."""
        try:
            dim = self.robot.action_feature.shape[0]
            action, _ = self.safety(np.zeros(dim, dtype=np.float32), force_safe=True)
            if self.robot.is_connected:
                self.robot.send_action(action)
        except Exception:  # noqa: BLE001 - shutting down: report and keep going
            log.exception("could not send the final safe action")

    def _drain(self) -> dict:
        """Wait until the learner acknowledged every transition, at most session.drain_timeout_s; not at all when
        the session said the learner is gone. What is not acknowledged stays in the outbox (a resumed session
        delivers it) and is an error of this run."""
        if self.sender is None:
            return {"result": "no learner", "unacknowledged": 0, "waited_s": 0.0}
        t0 = time.monotonic()
        deadline = t0 + float(self.s.drain_timeout_s)
        while (
            self.sender.unacked_count
            and time.monotonic() < deadline
            and not self.learner_gone
            and not self.stream_failed
        ):
            self._check_health()
            time.sleep(0.02)
        left = self.sender.unacked_count
        waited = time.monotonic() - t0
        if not left:
            result = "complete"
        elif self.learner_gone or self.stream_failed:
            result = "learner gone" if self.learner_gone else "stream failed"
            log.error(
                "%d transitions not acknowledged (%s): they stay in %s for a resumed session",
                left,
                result,
                self.outbox_dir,
            )
        else:
            result = "timed out"
            log.error(
                "drain timed out: %d transitions not acknowledged within session.drain_timeout_s=%.1f s; they "
                "stay in %s for a resumed session",
                left,
                float(self.s.drain_timeout_s),
                self.outbox_dir,
            )
        return {"result": result, "unacknowledged": int(left), "waited_s": round(waited, 3)}

    def _close_transport(self) -> None:
        if self.sender is not None:
            self.sender.close(linger_s=0.2 if self.learner_gone or self.stream_failed else 1.0)
            self.subscriber.close()

    def _summary(self, wall_s: float, drained: dict) -> dict:
        eps = self.episodes
        n = len(eps)
        logged = [*self.log.past, *self.interrupted_episodes, *eps]
        stream = self.sender.stats() if self.sender else {}
        if self.sender is not None:
            # the whole stream across restarts (the outbox keeps ids and seqs): seqs 0 .. next_seq-1 were produced
            stream.update(
                stream_sent=int(self.sender.next_seq - self.sender_start_seq()),
                stream_acked=int(self.sender.acked_upto + 1 - self.sender_start_seq()),
                first_seq_this_run=int(self.first_seq),
            )
        policy_eps = [e for e in eps if e["policy_steps"] > e["teleop_steps"]]
        return {
            "process": "control",
            "sender_id": self.sender_id,
            "robot_index": self.robot_index,
            "seed": self.seed,
            "priority": getattr(self, "priority", None),
            "robot": getattr(self.robot, "name", type(self.robot).__name__),
            "episodes": n,
            "steps": int(sum(e["steps"] for e in eps)),
            "success_rate": (sum(e["success"] for e in eps) / n) if n else None,
            "policy_success_rate": (sum(e["success"] for e in policy_eps) / len(policy_eps)) if policy_eps else None,
            "policy_episodes": len(policy_eps),
            "episodes_detail": eps,
            "pacing": self.loop.stats(),
            "safety_events": dict(self.safety.counts),
            "watchdog_trips": self.watchdog.trips,
            "watchdog_outages": self.watchdog.outages(),
            "transitions": {**stream, "all_acknowledged": drained["result"] in ("complete", "no learner")},
            "drain": drained,
            "stop_reason": self.stop_reason or "episodes done",
            "stream_failed": self.stream_failed,
            "episode_log": {
                "episodes": len({e["episode"] for e in logged}),
                "interrupted": sum(bool(e.get("interrupted")) for e in logged),
                "numbers": sorted({int(e["episode"]) for e in logged}),
                "write_errors": self.log.write_errors,
            },
            "weight_updates": self.weight_updates,
            "final_policy_version": self.policy_version,
            "policy_steps": int(sum(e["policy_steps"] for e in eps)),
            "wall_s": wall_s,
        }

    def sender_start_seq(self) -> int:
        """The stream's first seq (0 unless the stream was started elsewhere)."""
        return (
            int(getattr(self.sender.outbox, "start_seq", 0) or 0)
            if self.sender.outbox is not None
            else int(self.first_seq)
        )


def main(config_path: str, run_dir: str, sender_id: str | None = None, robot_index: str = "0", resume: str = "") -> int:
    from robot_rl.config import setup_logging

    setup_logging()
    # stop signals from the very start (building the robot and policy takes seconds): remembered, then applied
    holder: dict = {"proc": None, "pending": []}

    def early(signum, frame):
        if holder["proc"] is not None:
            holder["proc"].request_stop(signum, frame)
        else:
            holder["pending"].append(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, early)
    cfg = OmegaConf.load(config_path)
    proc = ControlProcess(cfg, Path(run_dir), sender_id, int(robot_index), resume == "--resume")
    holder["proc"] = proc
    for signum in holder["pending"]:
        proc.request_stop(signum)
    summary = proc.run()
    return proc.exit_code(summary)
