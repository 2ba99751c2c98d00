"""robot_rl.rollout: the one episode loop, on a tiny deterministic robot (no simulator)."""

from __future__ import annotations

import numpy as np
import torch

from robot_rl.control.pacing import PacedLoop
from robot_rl.control.safety import SafetyFilter
from robot_rl.interfaces import Feature, Robot, Teleop
from robot_rl.rollout import Rollout


class LineRobot(Robot):
    """A point on a line: the action moves it; success past x = 1. The start is drawn from the reset seed."""

    name = "line"

    def __init__(self):
        self.x, self.connected, self.sent = 0.0, False, []

    @property
    def observation_features(self):
        return {"x": Feature((1,))}

    @property
    def action_feature(self):
        return Feature((1,), low=np.array([-1.0]), high=np.array([1.0]))

    @property
    def is_connected(self):
        return self.connected

    def connect(self):
        self.connected = True

    def disconnect(self):
        self.connected = False

    def reset(self, seed=None):
        self.x = float(np.random.default_rng(seed).uniform(-1.0, 0.0))
        return self.get_observation()

    def get_observation(self):
        return {"x": np.array([self.x], np.float32)}

    def send_action(self, action):
        a = np.asarray(action, np.float32)
        self.sent.append(a.copy())
        self.x += 0.1 * float(a[0])
        return a

    def is_success(self):
        return self.x > 1.0


class NoisyPolicy:
    """Moves right with noise from its own generator (as a diffusion policy samples)."""

    device = torch.device("cpu")

    def __init__(self, drift=0.5, nan_at=()):
        self.generator, self.drift, self.nan_at, self.calls, self.resets = None, drift, set(nan_at), 0, 0

    def reset(self):
        self.resets += 1

    def select_action(self, obs):
        self.calls += 1
        a = self.drift + 0.1 * torch.randn(1, generator=self.generator).numpy()
        return np.full(1, np.nan, np.float32) if self.calls in self.nan_at else a.astype(np.float32)


class Expert(Teleop):
    def __init__(self, intervene_from=None):
        self.intervene_from, self.t = intervene_from, 0

    @property
    def action_feature(self):
        return Feature((1,))

    @property
    def intervening(self):
        return self.intervene_from is not None and self.t >= self.intervene_from

    def get_action(self, obs):
        self.t += 1
        return np.array([1.0], np.float32)


def safety():
    return SafetyFilter(np.array([-1.0]), np.array([1.0]), safe_action=np.array([0.0]))


def test_same_seed_same_episode_and_per_episode_noise():
    def block(seed):
        robot, policy = LineRobot(), NoisyPolicy(drift=0.0)
        results = Rollout(robot, policy).run_episodes(3, seed, max_steps=8)
        return results, np.concatenate(robot.sent), policy

    (a, sent_a, policy), (b, sent_b, _) = block(5), block(5)
    np.testing.assert_array_equal(sent_a, sent_b)  # same initial states and the same policy noise
    assert [r["seed"] for r in a] == [5, 6, 7] and policy.resets == 3
    strip = [{k: v for k, v in r.items() if k not in ("wall_s", "duration_s")} for r in a]
    assert strip == [{k: v for k, v in r.items() if k not in ("wall_s", "duration_s")} for r in b]
    _, sent_c, _ = block(6)
    np.testing.assert_array_equal(sent_c[:8], sent_a[8:16])  # episode i depends on seed + i alone
    assert not np.array_equal(sent_a[:8], sent_a[8:16])  # each episode draws its own noise


def test_stop_on_success_and_success_extra_steps():
    robot = LineRobot()
    rollout = Rollout(robot, NoisyPolicy(drift=1.0))
    steps = []
    r = rollout.episode(rollout.reset(0), max_steps=100, hooks=[steps.append])
    assert r["success"] and r["steps"] == len(robot.sent) == len(steps)
    assert [s.success for s in steps] == [False] * (len(steps) - 1) + [True] and steps[-1].done
    first = r["steps"]
    rollout.success_extra_steps = 3  # recording keeps a few successful steps
    assert rollout.episode(rollout.reset(0), max_steps=100)["steps"] == first + 3
    rollout.stop_on_success = False
    assert rollout.episode(rollout.reset(0), max_steps=40)["steps"] == 40


def test_nan_proposal_gets_the_safe_action_and_is_counted():
    robot, filt = LineRobot(), safety()
    rollout = Rollout(robot, NoisyPolicy(nan_at={2, 3}), safety=filt, stop_on_success=False)
    steps = []
    r = rollout.episode(rollout.reset(1), max_steps=5, hooks=[steps.append])
    assert filt.counts["nan"] == 2 and r["steps"] == 5
    np.testing.assert_array_equal(robot.sent[1], [0.0])  # the safe action, not NaN
    np.testing.assert_array_equal(robot.sent[2], [0.0])
    assert r["safe_steps"] == 0  # invalid proposals are the filter's events; forced_safe is asked for
    held = Rollout(robot, NoisyPolicy(), safety=safety(), stop_on_success=False).episode(
        robot.get_observation(), max_steps=4, force_safe=lambda source: True
    )
    assert held["safe_steps"] == 4 and all(a[0] == 0.0 for a in robot.sent[-4:])


def test_hooks_see_every_step_with_who_acted_and_the_pacer_waits():
    robot, policy = LineRobot(), NoisyPolicy(drift=0.0)
    pacer = PacedLoop(1000.0)
    rollout = Rollout(
        robot, policy, teleop=Expert(intervene_from=3), safety=safety(), pacer=pacer, stop_on_success=False
    )
    seen, before = [], []
    r = rollout.episode(rollout.reset(2), max_steps=6, hooks=[seen.append], before_step=lambda i, obs: before.append(i))
    assert [s.index for s in seen] == before == list(range(6)) and seen[-1].done and not seen[0].done
    assert [s.source for s in seen] == ["policy"] * 2 + ["teleop"] * 4
    assert r["policy_steps"] == 2 and r["teleop_steps"] == 4 and policy.calls == 6  # the policy still proposes
    assert all(s.lateness is not None and s.policy_s >= 0 for s in seen) and pacer.ticks == 6
    np.testing.assert_array_equal(seen[1].next_obs["x"], seen[2].obs["x"])  # obs chains step to step
    # a reason from before_step ends the episode before the step; stop() ends it after one
    r = rollout.episode(rollout.reset(2), max_steps=6, before_step=lambda i, obs: "save key" if i == 2 else None)
    assert r["steps"] == 2 and r["ended_by"] == "save key"
    r = rollout.episode(rollout.reset(2), max_steps=6, stop=lambda: True)
    assert r["steps"] == 1 and r["ended_by"] is None


def test_teleop_drives_and_starved_policy_without_teleop_fill():
    robot = LineRobot()
    r = Rollout(robot, NoisyPolicy(), teleop=Expert(), stop_on_success=False).episode(
        robot.reset(0), max_steps=3, teleop_drives=True
    )
    assert r["teleop_steps"] == 3
    starved = Rollout(
        robot, act=lambda obs: None, teleop=Expert(), safety=safety(), stop_on_success=False, teleop_fills_gaps=False
    )  # deploy: a starved policy holds, the teleop acts only on takeover
    r = starved.episode(robot.reset(0), max_steps=3)
    assert r["safe_steps"] == 3 and r["teleop_steps"] == 0 and r["policy_steps"] == 0
