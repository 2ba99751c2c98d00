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
from robot_rl.control.pacing import PacedLoop
from robot_rl.control.safety import SafetyFilter, Watchdog
from robot_rl.control.takeover import SOURCES, pick_source
from robot_rl.factory import make_policy, make_robot, make_teleop
from robot_rl.interfaces import OBS_PREFIX
from robot_rl.transport import TransitionSender, WeightSubscriber
from robot_rl.transport.security import load_client_keys

log = logging.getLogger("robot_rl.control")



def build_safety(cfg: DictConfig, robot) -> SafetyFilter:
    feat = robot.action_feature
    safety = OmegaConf.to_container(cfg.robot.get("safety", {}) or {}, resolve=True)
    dim = feat.shape[0]
    low = np.asarray(feat.low if feat.low is not None else np.full(dim, -np.inf), dtype=np.float64)
    high = np.asarray(feat.high if feat.high is not None else np.full(dim, np.inf), dtype=np.float64)
    if safety.get("low") is not None:  # configured bounds may only tighten the device's own
        low = np.maximum(low, np.asarray(safety["low"], dtype=np.float64))
        high = np.minimum(high, np.asarray(safety["high"], dtype=np.float64))
    safe = safety.get("safe_action")
    return SafetyFilter(low, high, max_delta=safety.get("max_delta"),
                        safe_action=None if safe is None else np.asarray(safe, dtype=np.float64))


class ControlProcess:
    def __init__(self, cfg: DictConfig, run_dir: Path, sender_id: str | None = None, robot_index: int = 0):
        self.cfg, self.s = cfg, cfg.session
        self.run_dir = Path(run_dir)
        self.robot = make_robot(cfg.robot)
        self.teleop = make_teleop(cfg.teleop, self.robot)
        self.policy = make_policy(cfg.policy, self.robot)
        self.policy_version = -1  # no weights yet: the policy cannot act
        self.safety = build_safety(cfg, self.robot)
        self.loop = PacedLoop(self.s.rate_hz)
        self.watchdog = Watchdog(self.s.watchdog_s, name="learner")
        self.sender_id = sender_id or self.s.sender_id
        self.seed = int(cfg.seed) + 100_003 * robot_index  # each robot of a fleet gets its own seeded episodes
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

    def request_stop(self, *_):
        if not self._stop:
            log.info("stop requested: finishing the current tick and holding the robot")
        self._stop = True

    # ------------------------------------------------------------------------------------------------ ticks
    def _take_new_weights(self, probe_obs) -> None:
        update = self.subscriber.latest() if self.subscriber else None
        if update is None:
            return
        self.policy.load_state_dict(update.tensors)
        self.policy_version = update.version
        probe = self.policy.select_action(probe_obs)
        self.weight_updates.append({"version": update.version, "t": time.time(), "probe_action": probe.tolist()})
        log.info("policy weights v%d loaded", update.version)

    def _tick(self, obs, episode: int, step: int):
        if self.sender is not None and self.sender.last_contact is not None:
            self.watchdog.feed(self.sender.last_contact)
        dim = self.robot.action_feature.shape[0]
        nan = np.full(dim, np.nan, dtype=np.float32)

        label = self.teleop.get_action(obs) if self.teleop is not None else None
        policy_action = self.policy.select_action(obs) if self.policy_version >= 0 else None
        source, proposal = pick_source(self.teleop, label, policy_action, episode < self.s.expert_episodes)
        learner_lost = source == "policy" and self.sender is not None and self.watchdog.expired()
        force_safe = proposal is None or learner_lost or self._stop
        action, _ = self.safety(proposal if proposal is not None else nan, force_safe=force_safe)
        sent = self.robot.send_action(action)
        success = bool(self.robot.is_success())

        transition = {OBS_PREFIX + k: np.asarray(v) for k, v in obs.items()}
        transition.update({
            "action": np.asarray(sent, dtype=np.float32),
            "policy_action": nan if policy_action is None else np.asarray(policy_action, dtype=np.float32),
            "expert_action": nan if label is None else np.asarray(label, dtype=np.float32),
            "reward": np.float32(success),
            "success": np.bool_(success),
            "intervention": np.bool_(source == "teleop"),
            "forced_safe": np.bool_(force_safe),
            "episode": np.int64(episode),
            "step": np.int64(step),
            "policy_version": np.int64(self.policy_version),
            "t": np.float64(time.time()),
        })
        return transition, source, force_safe, success

    # ---------------------------------------------------------------------------------------------- episodes
    def run(self) -> dict:
        torch.set_num_threads(1)  # small-network inference: extra threads only steal cores from sim and learner
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.request_stop)
        self.robot.connect()
        if self.teleop is not None:
            self.teleop.connect()
        if self.sender is not None:
            self.sender.start()
            self.subscriber.start()
            self.watchdog.arm()
        t_start = time.time()
        probe_obs = None
        try:
            for episode in range(self.s.episodes):
                if self._stop:
                    break
                obs = self.robot.reset(seed=self.seed + episode)
                probe_obs = probe_obs if probe_obs is not None else obs
                self.policy.reset()
                self.safety.reset()
                if self.teleop is not None:
                    self.teleop.reset()
                self.episodes.append(self._run_episode(episode, obs, probe_obs))
                ep = self.episodes[-1]
                log.info("episode %d: success=%s steps=%d policy_steps=%d safe_steps=%d weights=v%d",
                         episode, ep["success"], ep["steps"], ep["policy_steps"], ep["safe_steps"],
                         self.policy_version)
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
        return summary

    def _run_episode(self, episode: int, obs, probe_obs) -> dict:
        steps = policy_steps = safe_steps = teleop_steps = 0
        success = False
        self.loop.start(keep_stats=episode > 0)  # resets are not overruns; stats cover the whole session
        for step in range(self.s.max_episode_steps):
            self._take_new_weights(probe_obs)
            t_decide = time.time()
            transition, source, forced_safe, success = self._tick(obs, episode, step)
            steps += 1
            policy_steps += source == "policy"
            teleop_steps += source == "teleop"
            safe_steps += forced_safe
            done = (success and self.s.stop_on_success) or step == self.s.max_episode_steps - 1 or self._stop
            transition["done"] = np.bool_(done)
            if self.sender is not None:
                self.sender.submit(transition)
            obs = self.robot.get_observation()
            lateness = self.loop.wait()
            for key, value in (("t", t_decide), ("lateness", lateness), ("episode", episode),
                               ("source", SOURCES.index(source)), ("forced_safe", forced_safe),
                               ("policy_version", self.policy_version)):
                self.ticks[key].append(value)
            if done:
                break
        return {"episode": episode, "success": bool(success), "steps": steps, "policy_steps": policy_steps,
                "teleop_steps": teleop_steps, "safe_steps": safe_steps, "policy_version": self.policy_version}

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


def main(config_path: str, run_dir: str, sender_id: str | None = None, robot_index: str = "0") -> int:
    from robot_rl.cli import setup_logging

    setup_logging()
    cfg = OmegaConf.load(config_path)
    summary = ControlProcess(cfg, Path(run_dir), sender_id, int(robot_index)).run()
    return 0 if summary["episodes"] else 1
