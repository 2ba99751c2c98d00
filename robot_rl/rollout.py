"""The one episode loop: every place where a policy (or a teleop) drives a robot runs it.

`robot-rl eval` and train's sim evaluation, the control process of a session, `robot-rl deploy` and `robot-rl
record` all run the same tick: the teleop labels, the policy proposes, `pick_source` decides who acts, the safety
filter passes or replaces the action, the robot executes it and is observed, success is checked. What differs
between them comes in as arguments (who may act, which filter, which pace, when to stop) and as hooks that see
each finished step (the transition stream, the episode-store writer, video frames, latency statistics), so the
loop itself exists once.

    rollout = Rollout(robot, policy, safety=safety, pacer=PacedLoop(20))
    obs = rollout.reset(seed)
    result = rollout.episode(obs, max_steps=200, hooks=[lambda step: frames.append(step.next_obs)])
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from robot_rl.control.pacing import PacedLoop
from robot_rl.control.safety import SafetyFilter
from robot_rl.control.takeover import pick_source
from robot_rl.interfaces import Observation, Robot, Teleop
from robot_rl.reward.success import SimSuccess

Action = Optional[np.ndarray]


@dataclass
class Step:
    """One finished tick, as the hooks see it."""

    index: int
    obs: Observation  # the observation the action was chosen from
    policy_action: Action  # None: the policy was not asked, or had nothing (a starved chunk runner)
    teleop_action: Action  # the teleop/expert's action: the label, also when the policy acted
    source: str  # who acted: "policy", "teleop" or "none" (control.takeover.SOURCES)
    action: np.ndarray  # what the robot executed (send_action's return)
    forced_safe: bool  # the safety filter sent its safe action instead of the proposal
    next_obs: Observation
    success: bool
    done: bool  # the episode ends with this step
    t: float  # wall clock (time.time()) when the tick began
    policy_s: float  # seconds in the policy call (latency statistics)
    lateness: float | None = None  # how late the pacer woke for the next tick (None: not paced)


def seed_policy_noise(policy, seed: int) -> None:
    """Same seed, same sampling noise: two policies evaluated on one seed start from identical noise (a diffusion
    policy's `generator`; `seed_episode` for policies that seed themselves, e.g. a residual on a diffusion base)."""
    if hasattr(policy, "generator"):
        policy.generator = torch.Generator(device=policy.device).manual_seed(int(seed))
    if hasattr(policy, "seed_episode"):
        policy.seed_episode(int(seed))


@dataclass
class Rollout:
    """What stays fixed from episode to episode: the robot, who may act, the filter, the pace, when to stop."""

    robot: Robot
    policy: Any = None  # reset/seeded per episode; acts through `act` or select_action
    act: Callable[[Observation], Action] | None = None  # replaces policy.select_action (deploy's chunk runner)
    teleop: Teleop | None = None
    safety: SafetyFilter | None = None  # None: the proposal is sent as is (sim evaluation)
    success: Callable[[Observation, Robot], bool] | None = None  # a SuccessDetector; None: robot.is_success()
    pacer: PacedLoop | None = None  # None: as fast as the robot steps (evaluation in sim)
    stop_on_success: bool = True
    success_extra_steps: int = 0  # keep going this many successful steps before stopping (recording)
    teleop_fills_gaps: bool = True  # no policy action: the teleop acts (False: the safe action; deploy)

    def __post_init__(self):
        if self.success is None:
            self.success = SimSuccess()

    def reset(self, seed: int) -> Observation:
        """Start an episode from `seed`: the robot's scene, the policy's queues and noise, the filter's memory of
        the last action, the success detector and the teleop (a scripted expert re-plans)."""
        obs = self.robot.reset(seed=seed)
        if self.policy is not None:
            seed_policy_noise(self.policy, seed)
            self.policy.reset()
        if self.safety is not None:
            self.safety.reset()
        if hasattr(self.success, "reset"):
            self.success.reset()
        if self.teleop is not None:
            self.teleop.reset()
        return obs

    def episode(
        self,
        obs: Observation,
        max_steps: int,
        *,
        teleop_drives: bool = False,
        with_teleop: bool = True,
        before_step: Callable[[int, Observation], str | None] | None = None,
        force_safe: Callable[[str], bool] | None = None,
        stop: Callable[[], bool] | None = None,
        hooks: Iterable[Callable[[Step], Any]] = (),
        keep_pacing_stats: bool = False,
    ) -> dict:
        """Run one episode from `obs` (what `reset` returned) for at most `max_steps` steps.

        `teleop_drives`: the teleop acts every step (demonstrations, expert episodes); `with_teleop=False`: the
        policy alone (evaluation). `before_step(index, obs)` may end the episode before the step by returning a
        reason (an operator's save key, a stop request, a failed inference process). `force_safe(source)` sends
        the safe action although there is a proposal (a silent learner). `stop()` is asked after each step and
        ends the episode with it (the step is marked done). `hooks` get each Step after the pacer's wait.
        `keep_pacing_stats`: pacing statistics accumulate over episodes (the pacer re-anchors either way)."""
        teleop = self.teleop if with_teleop else None
        act = self.act or (self.policy.select_action if self.policy is not None else None)
        no_proposal = np.full(self.robot.action_feature.shape[0], np.nan, np.float32)  # the filter replaces it
        hooks = list(hooks)
        counts = {"steps": 0, "policy_steps": 0, "teleop_steps": 0, "safe_steps": 0}
        success, successes_in_a_row, ended_by = False, 0, None
        if self.pacer is not None:
            self.pacer.start(keep_stats=keep_pacing_stats)  # an episode reset is not an overrun
        t0 = time.perf_counter()
        for index in range(int(max_steps)):
            if before_step is not None and (ended_by := before_step(index, obs)):
                break
            t = time.time()
            label = teleop.get_action(obs) if teleop is not None else None
            t_policy = time.perf_counter()
            with self._section("policy"):
                policy_action = act(obs) if act is not None else None
            policy_s = time.perf_counter() - t_policy
            source, proposal = self._who_acts(teleop, label, policy_action, teleop_drives)
            forced = proposal is None or bool(force_safe is not None and force_safe(source))
            action = proposal
            if self.safety is not None:
                action, _ = self.safety(no_proposal if proposal is None else proposal, force_safe=forced)
            with self._section("robot"):
                sent = self.robot.send_action(action)
            with self._section("robot"):
                next_obs = self.robot.get_observation()
            success = bool(self.success(next_obs, self.robot))
            successes_in_a_row = successes_in_a_row + 1 if success else 0
            done = (
                (self.stop_on_success and successes_in_a_row > self.success_extra_steps)
                or index == max_steps - 1
                or bool(stop is not None and stop())
            )
            step = Step(index, obs, policy_action, label, source, sent, forced, next_obs, success, done, t, policy_s)
            counts["steps"] += 1
            counts["policy_steps"] += source == "policy"
            counts["teleop_steps"] += source == "teleop"
            counts["safe_steps"] += forced
            if self.pacer is not None:
                step.lateness = self.pacer.wait()
            for hook in hooks:
                hook(step)
            obs = next_obs
            if done:
                break
        return {"success": success, **counts, "ended_by": ended_by, "duration_s": time.perf_counter() - t0}

    def run_episodes(
        self,
        episodes: int,
        seed: int,
        max_steps: int,
        *,
        on_start: Callable[[int, int], Any] | None = None,
        on_end: Callable[[dict], Any] | None = None,
        stop: Callable[[], bool] | None = None,
        **episode_kwargs,
    ) -> list[dict]:
        """A seeded block: episode i starts from `reset(seed + i)`, so equal seeds give equal initial states and
        equal policy noise. `on_start(i, seed)` runs after the reset (a video's first frame), `on_end(result)`
        after the episode; `stop()` is asked before each episode. Other arguments go to `episode`."""
        results = []
        for i in range(int(episodes)):
            if stop is not None and stop():
                break
            t0 = time.monotonic()
            obs = self.reset(seed + i)
            if on_start is not None:
                on_start(i, seed + i)
            result = {"episode": i, "seed": seed + i, **self.episode(obs, max_steps, **episode_kwargs)}
            result["wall_s"] = time.monotonic() - t0
            results.append(result)
            if on_end is not None:
                on_end(result)
        return results

    def _who_acts(self, teleop, label: Action, policy_action: Action, teleop_drives: bool) -> tuple[str, Action]:
        """`pick_source`; without `teleop_fills_gaps` a starved policy holds unless the teleop takes over."""
        source, proposal = pick_source(teleop, label, policy_action, teleop_drives)
        if (
            source == "teleop"
            and policy_action is None
            and not (self.teleop_fills_gaps or teleop_drives or teleop.intervening)
        ):
            return "none", None
        return source, proposal

    def _section(self, name: str):
        return self.pacer.section(name) if self.pacer is not None else contextlib.nullcontext()
