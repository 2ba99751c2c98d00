"""The control process: drives one robot at a fixed rate and never waits on the learner.

Each tick: take the newest weights if any arrived (swap at the tick boundary), ask the teleop/expert and the
policy, pick who acts (takeover switch), pass the action through the safety filter, send it, stream the
transition. Transport runs on background threads; a silent learner trips the watchdog and the robot gets
the safe action until the learner is back.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from robot_rl.config import write_json
from robot_rl.control.telemetry import EpisodeLog
from robot_rl.control.pacing import PacedLoop
from robot_rl.control.safety import Watchdog, build_safety
from robot_rl.control.takeover import SOURCES
from robot_rl.algos import make_robot_policy
from robot_rl.factory import make_robot, make_teleop
from robot_rl.interfaces import OBS_PREFIX, Policy
from robot_rl.reward.success import make_success_detector
from robot_rl.rollout import Rollout, Step
from robot_rl.transport import TransitionSender, WeightSubscriber
from robot_rl.transport.security import load_client_keys

log = logging.getLogger("robot_rl.control")



class ControlProcess:
    def __init__(self, cfg: DictConfig, run_dir: Path, sender_id: str | None = None, robot_index: int = 0,
                 resume: bool = False):
        self.cfg, self.s = cfg, cfg.session
        self.run_dir = Path(run_dir)
        self.robot = make_robot(cfg.robot)
        self.teleop = make_teleop(cfg.teleop, self.robot)
        self.seed = int(cfg.seed) + 100_003 * robot_index  # each robot of a fleet gets its own seeded episodes
        self.policy = self._make_policy()
        self.policy_version = -1  # no weights yet
        self.success = make_success_detector(OmegaConf.to_container(cfg.get("reward") or {}, resolve=True),
                                             self.robot, self.teleop)
        self.safety = build_safety(cfg, self.robot)
        self.loop = PacedLoop(self.s.rate_hz)
        self.watchdog = Watchdog(self.s.watchdog_s, name="learner")
        self.sender_id = sender_id or self.s.sender_id
        self.log = EpisodeLog(self.run_dir, resume=resume or bool(self.s.get("resume", False)))
        self.sender = self.subscriber = None
        if self.s.learner != "none":
            keys = None
            if self.s.curve_keys_dir:
                keys = load_client_keys(self.s.curve_keys_dir, str(Path(self.s.curve_keys_dir) / "server.key"))
            self.sender = TransitionSender(self.s.endpoints.transitions, self.sender_id,
                                           batch_size=self.s.transition_batch,
                                           max_batch_delay_s=self.s.transition_max_delay_s,
                                           heartbeat_interval_s=self.s.heartbeat_s, curve=keys)
            self.subscriber = WeightSubscriber(self.s.endpoints.weights, curve=keys)
        self._stop = False
        self.episodes: list[dict] = []
        self.weight_updates: list[dict] = []
        self.ticks = {k: [] for k in ("t", "lateness", "episode", "source", "forced_safe", "policy_version")}

    def _make_policy(self) -> Policy:
        """The robot-side policy of the configured algorithm (the learner's weights load into it)."""
        return make_robot_policy(OmegaConf.to_container(self.cfg.algo, resolve=True),
                                 OmegaConf.to_container(self.cfg.policy, resolve=True), self.robot, self.seed)

    def request_stop(self, *_):
        if not self._stop:
            log.info("stop requested: finishing the current tick and holding the robot")
        self._stop = True

    # ------------------------------------------------------------------------------------------------ ticks
    def _take_new_weights(self, probe_obs) -> None:
        update = self.subscriber.latest() if self.subscriber else None
        if update is None:
            return
        self.policy.load_state_dict(update.tensors)  # the policy may stage them until its own boundary
        self.policy_version = update.version
        self.policy.apply_meta(update.meta)  # e.g. how to explore, as the learner decides
        probe = self.policy.select_action(probe_obs).tolist() if self.policy.probe_after_load else None
        self.weight_updates.append({"version": update.version, "t": time.time(), "probe_action": probe,
                                    "meta": update.meta})
        log.info("policy weights v%d loaded", update.version)

    def _policy_action(self, obs):
        """The policy acts once weights arrived, or from the first tick if it needs none (a frozen base)."""
        can_act = self.policy_version >= 0 or self.policy.acts_without_weights
        return self.policy.select_action(obs) if can_act else None

    def _feed_watchdog(self) -> None:
        if self.sender is not None and self.sender.last_contact is not None:
            self.watchdog.feed(self.sender.last_contact)

    def _must_hold(self, source: str) -> bool:
        """The safe action despite a proposal: the learner went silent while the policy drives, or we stop."""
        learner_lost = source == "policy" and self.sender is not None and self.watchdog.expired()
        return learner_lost or self._stop

    def _transition(self, step: Step, episode: int) -> dict:
        """What the learner gets for one tick: the observation, who proposed and who acted, the outcome."""
        nan = np.full(self.robot.action_feature.shape[0], np.nan, dtype=np.float32)
        transition = {OBS_PREFIX + k: np.asarray(v) for k, v in step.obs.items()}
        transition.update({
            "action": np.asarray(step.action, dtype=np.float32),
            "policy_action": nan if step.policy_action is None else np.asarray(step.policy_action, dtype=np.float32),
            "expert_action": nan if step.teleop_action is None else np.asarray(step.teleop_action, dtype=np.float32),
            "intervention": np.bool_(step.source == "teleop"),
            "forced_safe": np.bool_(step.forced_safe),
            "episode": np.int64(episode),
            "step": np.int64(step.index),
            "policy_version": np.int64(self.policy_version),
            "t": np.float64(step.t),
        })
        transition.update(self.policy.transition_extras(acted=step.policy_action is not None))
        transition.update(reward=np.float32(step.success), success=np.bool_(step.success), done=np.bool_(step.done))
        return transition

    # ---------------------------------------------------------------------------------------------- episodes
    def _wait_for_learner(self) -> None:
        """A learner may need a while to start (loading data, relabelling demos); episodes start once it answers."""
        deadline = time.monotonic() + float(self.s.get("learner_wait_s", 0))
        if self.sender is not None and time.monotonic() < deadline:
            log.info("waiting up to %.0f s for the learner at %s", deadline - time.monotonic(),
                     self.s.endpoints.transitions)
        while self.sender is not None and self.sender.last_contact is None and time.monotonic() < deadline:
            if self._stop:
                return
            time.sleep(0.05)

    def run(self) -> dict:
        torch.set_num_threads(1)  # small-network inference: extra threads only steal cores from sim and learner
        self.rollout = Rollout(self.robot, self.policy, act=self._policy_action, teleop=self.teleop,
                               safety=self.safety, success=self.success, pacer=self.loop,
                               stop_on_success=bool(self.s.stop_on_success))
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.request_stop)
        self.robot.connect()
        if self.teleop is not None:
            self.teleop.connect()
        if self.sender is not None:
            self.sender.start()
            self.subscriber.start()
            self._wait_for_learner()
            self.watchdog.arm()
        t_start = time.time()
        probe_obs = None
        first = self.log.next_episode  # > 0 when resuming: episode numbers and seeds continue
        if first:
            log.info("resuming at episode %d (%d env steps so far)", first, self.log.env_steps)
        try:
            for episode in range(first, self.s.episodes):
                if self._stop:
                    break
                obs = self._reset(self.seed + episode)
                probe_obs = probe_obs if probe_obs is not None else obs
                ep = self._run_episode(episode, obs, probe_obs)
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
            write_json(self.run_dir / "summary.json", summary)
            np.savez(self.run_dir / "ticks.npz", **{k: np.asarray(v) for k, v in self.ticks.items()})
            self.log.close()
        return summary

    def _reset(self, seed: int):
        wait = float(self.s.get("reset_time_s", 0) or 0)
        if wait > 0 and self.safety.last_sent is not None:  # hardware: the operator resets the scene meanwhile
            self._hold_safe()
            log.info("episode over: reset the scene (%.0f s, robot holding)", wait)
            end = time.monotonic() + wait
            while time.monotonic() < end and not self._stop:
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

        def before_step(index: int, obs) -> None:
            if not evaluating:
                self._take_new_weights(probe_obs)  # weights swap at a tick boundary
            self._feed_watchdog()

        def after_step(step: Step) -> None:
            transition = self._transition(step, episode)
            if "residual" in transition and np.isfinite(transition["residual"]).all():
                residual_abs.append(float(np.abs(transition["residual"]).mean()))
            if evaluating:
                return
            if self.sender is not None:
                self.sender.submit(transition)
            for key, value in (("t", step.t), ("lateness", step.lateness), ("episode", episode),
                               ("source", SOURCES.index(step.source)), ("forced_safe", step.forced_safe),
                               ("policy_version", self.policy_version)):
                self.ticks[key].append(value)

        r = self.rollout.episode(obs, self.s.max_episode_steps, teleop_drives=episode < self.s.expert_episodes,
                                 with_teleop=not evaluating, before_step=before_step, force_safe=self._must_hold,
                                 stop=lambda: self._stop, hooks=[after_step],
                                 keep_pacing_stats=bool(self.ticks["t"]))  # stats cover the session
        duration = r["duration_s"]
        return {"episode": episode, "success": r["success"], "return": float(r["success"]), "steps": r["steps"],
                "policy_steps": r["policy_steps"], "teleop_steps": r["teleop_steps"], "safe_steps": r["safe_steps"],
                "policy_version": self.policy_version,
                "residual_abs": float(np.mean(residual_abs)) if residual_abs else None,
                "exploration": getattr(self.policy, "exploration", None),
                "achieved_hz": r["steps"] / duration if duration > 0 else None}

    def _hold_safe(self) -> None:
        """Leave the robot on the safe action, whatever ended the run."""
        try:
            dim = self.robot.action_feature.shape[0]
            action, _ = self.safety(np.zeros(dim, dtype=np.float32), force_safe=True)
            if self.robot.is_connected:
                self.robot.send_action(action)
        except Exception:  # noqa: BLE001 - shutting down: report and keep going
            log.exception("could not send the final safe action")

    def _drain(self) -> bool:
        """Give the learner a bounded time to acknowledge everything before exiting."""
        if self.sender is None:
            return True
        deadline = time.monotonic() + self.s.drain_timeout_s
        while self.sender.unacked_count and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.sender.unacked_count:
            log.warning("%d transitions were not acknowledged by the learner before exit",
                        self.sender.unacked_count)
        return self.sender.unacked_count == 0

    def _close_transport(self) -> None:
        if self.sender is not None:
            self.sender.close()
            self.subscriber.close()

    def _summary(self, wall_s: float, drained: bool) -> dict:
        eps = self.episodes
        n = len(eps)
        policy_eps = [e for e in eps if e["policy_steps"] > e["teleop_steps"]]
        return {
            "process": "control",
            "sender_id": self.sender_id,
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
            "transitions": {**(self.sender.stats() if self.sender else {}), "all_acknowledged": drained},
            "weight_updates": self.weight_updates,
            "final_policy_version": self.policy_version,
            "wall_s": wall_s,
        }


def main(config_path: str, run_dir: str, sender_id: str | None = None, robot_index: str = "0",
         resume: str = "") -> int:
    from robot_rl.config import setup_logging

    setup_logging()
    cfg = OmegaConf.load(config_path)
    summary = ControlProcess(cfg, Path(run_dir), sender_id, int(robot_index), resume == "--resume").run()
    return 0 if summary["episodes"] else 1
