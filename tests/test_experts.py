"""Scripted experts solve their sim tasks; their decisions are Markov; the quality knob is seeded; the simulated
intervener takes over when the policy deviates."""

import numpy as np
import pytest

from robot_rl.sim.experts import (
    PICK_PLACE_CAN_TARGET,
    QUALITY_PRESETS,
    LiftExpert,
    PickPlaceCanExpert,
    StackExpert,
    make_expert,
)
from robot_rl.sim.intervener import SimulatedIntervener
from robot_rl.sim.robosuite_robot import RobosuiteRobot

SEEDS = (0, 1, 2)


def _robot(env_name):
    robot = RobosuiteRobot(env_name=env_name, horizon=400)
    robot.connect()
    return robot


@pytest.fixture(scope="module")
def lift():
    robot = _robot("Lift")
    yield robot
    robot.disconnect()


@pytest.fixture(scope="module")
def can():
    robot = _robot("PickPlaceCan")
    yield robot
    robot.disconnect()


@pytest.fixture(scope="module")
def stack():
    robot = _robot("Stack")
    yield robot
    robot.disconnect()


def _rollout(robot, expert, seed, steps=200, until_success=True, record=None):
    """(success, steps taken); `record` (a list) collects (observation, action) pairs."""
    obs = robot.reset(seed=seed)
    expert.reset()
    for t in range(steps):
        a = expert.get_action(obs)
        if record is not None:
            record.append((obs, a))
        robot.send_action(a)
        obs = robot.get_observation()
        if until_success and robot.is_success():
            return True, t + 1
    return robot.is_success(), steps


def _assert_markov(expert_cls, record, **kw):
    """Observations of a rollout, fed in shuffled order to a fresh expert and to one with a long history, give
    exactly the recorded actions: the action is a function of the observation alone."""
    fresh, used = expert_cls(**kw), expert_cls(**kw)
    order = np.random.default_rng(0).permutation(len(record))
    for i in order:
        obs, a = record[i]
        np.testing.assert_array_equal(fresh.get_action(obs), a)
    for i in order[::-1]:
        obs, a = record[i]
        np.testing.assert_array_equal(used.get_action(obs), a)


# ------------------------------------------------------------------------------------------------ Lift
def test_lift_expert_success_rate(lift):
    expert = LiftExpert(noise_std=0.05, seed=0)
    results = [_rollout(lift, expert, seed)[0] for seed in range(5)]
    assert sum(results) >= 4, results
    # and it keeps the cube up: success still holds 40 steps later
    ok, t = _rollout(lift, expert, 11)
    assert ok
    for _ in range(40):
        lift.send_action(expert.get_action(lift.get_observation()))
    assert lift.is_success()


def test_expert_noise_is_seeded():
    obs = {
        "robot0_eef_pos": np.zeros(3),
        "cube_pos": np.array([0.1, 0, 0]),
        "robot0_gripper_qpos": np.array([0.04, -0.04]),
        "robot0_gripper_qvel": np.zeros(2),
    }
    a = LiftExpert(noise_std=0.1, seed=3).get_action(obs)
    b = LiftExpert(noise_std=0.1, seed=3).get_action(obs)
    c = LiftExpert(noise_std=0.1, seed=4).get_action(obs)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.float32 and a.shape == (7,)


def test_lift_expert_is_markov():
    """Same observation, same action, whatever came before: what a cloned policy (and DAgger labels) need."""
    open_far = {
        "robot0_eef_pos": np.array([0.0, 0.0, 1.0]),
        "cube_pos": np.array([0.1, 0, 0.82]),
        "robot0_gripper_qpos": np.array([0.04, -0.04]),
        "robot0_gripper_qvel": np.zeros(2),
    }
    holding = {
        "robot0_eef_pos": np.array([0.1, 0.0, 0.83]),
        "cube_pos": np.array([0.1, 0, 0.83]),
        "robot0_gripper_qpos": np.array([0.024, -0.024]),
        "robot0_gripper_qvel": np.zeros(2),
    }
    fresh, used = LiftExpert(), LiftExpert()
    for _ in range(30):
        used.get_action(holding)
    np.testing.assert_array_equal(fresh.get_action(open_far), used.get_action(open_far))
    assert used.get_action(holding)[2] > 0 and used.get_action(holding)[6] == 1.0  # lifts, gripper closed
    assert fresh.get_action(open_far)[6] == -1.0  # approaches with the gripper open


def test_lift_expert_is_markov_along_a_rollout(lift):
    record = []
    assert _rollout(lift, LiftExpert(), seed=0, record=record)[0]
    _assert_markov(LiftExpert, record)


def test_make_expert_registry():
    assert isinstance(make_expert("Lift", noise_std=0.0), LiftExpert)
    assert isinstance(make_expert("PickPlaceCan"), PickPlaceCanExpert)
    assert isinstance(make_expert("Stack"), StackExpert)
    with pytest.raises(ValueError, match="no scripted expert.*Lift.*PickPlaceCan.*Stack"):
        make_expert("Door")
    assert make_expert("Lift").action_feature.names == RobosuiteRobot("Lift").action_feature.names
    e = make_expert("PickPlaceCan", quality="poor", seed=5, hesitation=0.0)  # knobs pass through; explicit wins
    assert (e.noise_std, e.hesitation, e.failed_grasp) == (
        QUALITY_PRESETS["poor"]["noise_std"],
        0.0,
        QUALITY_PRESETS["poor"]["failed_grasp"],
    )


# --------------------------------------------------------------------------------------- PickPlaceCan
def test_pick_place_can_target_matches_env(can):
    env = can.env
    np.testing.assert_allclose(env.target_bin_placements[env.object_id], PICK_PLACE_CAN_TARGET)
    np.testing.assert_allclose(PickPlaceCanExpert.for_env(can).target, PICK_PLACE_CAN_TARGET)
    # the aim point (reachable with the gripper vertical) is inside the can's quarter of bin2
    aim = PickPlaceCanExpert().aim
    assert not env.not_in_bin(np.array([aim[0], aim[1], 0.86]), env.object_id)


def test_pick_place_can_expert_succeeds_and_is_markov(can):
    record = []
    results = [
        _rollout(can, PickPlaceCanExpert(), seed, steps=400, record=record if seed == 0 else None) for seed in SEEDS
    ]
    assert all(ok for ok, _ in results), results
    expert = PickPlaceCanExpert()  # after success (seed 2) it stays away: the can stays placed
    for _ in range(30):
        can.send_action(expert.get_action(can.get_observation()))
    assert can.is_success()
    _assert_markov(PickPlaceCanExpert, record)


# ----------------------------------------------------------------------------------------------- Stack
def test_stack_expert_succeeds_and_is_markov(stack):
    record = []
    results = [
        _rollout(stack, make_expert("Stack"), seed, steps=300, record=record if seed == 0 else None) for seed in SEEDS
    ]
    assert all(ok for ok, _ in results), results
    _assert_markov(StackExpert, record)


# --------------------------------------------------------------------------------------- quality knob
def test_quality_presets_and_validation():
    assert set(QUALITY_PRESETS) == {"expert", "mediocre", "poor"}
    assert QUALITY_PRESETS["expert"] == {"noise_std": 0.0, "hesitation": 0.0, "failed_grasp": 0.0}
    e = LiftExpert(quality="mediocre")
    assert (e.noise_std, e.hesitation, e.failed_grasp) == tuple(QUALITY_PRESETS["mediocre"].values())
    d = LiftExpert()
    assert (d.noise_std, d.hesitation, d.failed_grasp) == (0.0, 0.0, 0.0)  # defaults: the perfect expert
    with pytest.raises(ValueError, match="quality"):
        LiftExpert(quality="great")
    with pytest.raises(ValueError, match="hesitation"):
        LiftExpert(hesitation=1.5)


def test_hesitation_holds_still():
    obs = {
        "robot0_eef_pos": np.zeros(3),
        "cube_pos": np.array([0.1, 0, 0]),
        "robot0_gripper_qpos": np.array([0.04, -0.04]),
        "robot0_gripper_qvel": np.zeros(2),
    }
    e = LiftExpert(hesitation=1.0, seed=0)
    for _ in range(5):
        a = e.get_action(obs)
        np.testing.assert_array_equal(a[:6], 0.0)
        assert a[6] == -1.0  # the gripper command is unchanged (open)


def test_hesitation_makes_episodes_longer(lift):
    base = [_rollout(lift, LiftExpert(), s) for s in SEEDS]
    slow_expert = LiftExpert(hesitation=0.2, seed=0)
    slow = [_rollout(lift, slow_expert, s) for s in SEEDS]
    assert all(ok for ok, _ in base + slow), (base, slow)
    assert np.mean([t for _, t in slow]) > np.mean([t for _, t in base]) + 5, (base, slow)


def _closings(actions):
    g = np.asarray([a[6] for a in actions])
    return int(np.sum((g[:-1] < 0) & (g[1:] > 0)) + (g[0] > 0))


def test_failed_grasp_makes_the_expert_retry(lift):
    expert = LiftExpert(failed_grasp=0.5, seed=0)
    closings, oks = [], []
    for s in SEEDS:
        rec = []
        ok, _ = _rollout(lift, expert, s, record=rec)
        oks.append(ok)
        closings.append(_closings([a for _, a in rec]))
    perfect = []
    for s in SEEDS:
        rec = []
        _rollout(lift, LiftExpert(), s, record=rec)
        perfect.append(_closings([a for _, a in rec]))
    assert perfect == [1, 1, 1]
    assert sum(closings) > sum(perfect), closings  # failed grasps were retried...
    assert sum(oks) >= 2, (oks, closings)  # ...and the retries can succeed


def test_presets_are_deterministic_and_reset_keeps_the_stream(lift):
    def actions(expert, seed, n=60):
        rec = []
        _rollout(lift, expert, seed, steps=n, until_success=False, record=rec)
        return np.stack([a for _, a in rec])

    for q in ("mediocre", "poor"):
        a = actions(make_expert("Lift", quality=q, seed=7), 0)
        b = actions(make_expert("Lift", quality=q, seed=7), 0)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, actions(make_expert("Lift", quality=q, seed=8), 0))
    e = make_expert("Lift", quality="mediocre", seed=7)
    first, second = actions(e, 0), actions(e, 0)  # same env seed, successive episodes: the stream moved on
    assert not np.array_equal(first, second)


# ---------------------------------------------------------------------------------------- intervener
_OBS = {
    "robot0_eef_pos": np.array([0.0, 0.0, 1.0]),
    "cube_pos": np.array([0.1, 0, 0.82]),
    "robot0_gripper_qpos": np.array([0.04, -0.04]),
    "robot0_gripper_qvel": np.zeros(2),
}


def _tick(iv, policy):
    """One control-loop tick in the loop's order; `policy(label)` makes the policy's proposal."""
    label = iv.get_action(_OBS)
    iv.observe_policy_action(policy(label))
    return iv.intervening


def test_intervener_takes_over_from_a_bad_policy_and_holds_min_steps():
    iv = SimulatedIntervener(LiftExpert(), threshold=0.5, patience=3, min_steps=8, release_patience=2)
    flags = [_tick(iv, lambda lab: -lab) for _ in range(3)]
    assert flags == [False, False, True]  # fires after `patience` deviating steps
    assert iv.deviation > 0.5 and iv.n_interventions == 1
    held = [_tick(iv, lambda lab: lab.copy()) for _ in range(8)]  # the policy now agrees at once
    assert held[:7] == [True] * 7 and held[7] is False  # expert drove min_steps ticks in all, then hands back
    assert iv.intervention_steps == 8
    # a bad policy keeps it intervening past min_steps
    iv.reset()
    flags = [_tick(iv, lambda lab: np.zeros_like(lab)) for _ in range(30)]
    assert flags[:2] == [False, False] and all(flags[2:])
    # release needs release_patience agreeing steps in a row
    flags = [_tick(iv, lambda lab: lab.copy()) for _ in range(2)]
    assert flags == [True, False]


def test_intervener_never_intervenes_on_a_matching_policy():
    iv = SimulatedIntervener(make_expert("Lift", noise_std=0.1, seed=0), patience=1)
    assert not any(_tick(iv, lambda lab: lab.copy()) for _ in range(50))
    # the gripper is not part of the deviation by default
    assert not any(_tick(iv, lambda lab: np.r_[lab[:6], -lab[6]]) for _ in range(20))


def test_intervener_none_policy_action_takes_over():
    iv = SimulatedIntervener(LiftExpert(), patience=5, min_steps=2, probability=0.0)
    assert _tick(iv, lambda lab: None)  # at once, whatever patience/probability
    assert _tick(iv, lambda lab: None)
    assert _tick(iv, lambda lab: None)  # no proposal: never hands back
    iv.reset()
    assert not iv.intervening and iv.n_interventions == 0


def test_intervener_probability_is_seeded():
    def first_takeovers(seed, p, episodes=10):
        """Tick of the first takeover in each episode (40 = never) against an always-wrong policy."""
        iv = SimulatedIntervener(LiftExpert(), patience=1, probability=p, seed=seed)
        out = []
        for _ in range(episodes):
            iv.reset()
            flags = [_tick(iv, lambda lab: -lab) for _ in range(40)]
            out.append(flags.index(True) if any(flags) else 40)
        return out

    assert first_takeovers(0, 0.0) == [40] * 10
    assert first_takeovers(0, 1.0) == [0] * 10
    a = first_takeovers(3, 0.3)
    assert a == first_takeovers(3, 0.3)  # seeded
    assert len(set(a)) > 1 and max(a) > 0  # a noisy human reacts late, and differently per episode


def test_intervener_in_sim_rescues_a_bad_policy(lift):
    """A policy that does nothing: the intervener takes over and the expert lifts the cube. The gripper is
    included in the deviation here: near a waypoint the expert's arm action is small, so an idle arm alone is
    not "wrong" by the arm-only default, but an idle gripper is."""
    iv = SimulatedIntervener(LiftExpert(), patience=2, min_steps=10, dims=range(7))
    obs = lift.reset(seed=0)
    iv.reset()
    ok = False
    for _ in range(200):
        label = iv.get_action(obs)
        policy_action = np.zeros(7, np.float32)
        iv.observe_policy_action(policy_action)
        lift.send_action(label if iv.intervening else policy_action)
        obs = lift.get_observation()
        if lift.is_success():
            ok = True
            break
    assert ok and iv.n_interventions >= 1
    assert iv.action_feature.names == LiftExpert().action_feature.names


def test_an_expert_on_a_robot_it_was_not_tuned_for_is_warned_about():
    """The scripted experts were tuned on Panda; the Lift expert on UR5e fails every episode: say so at start."""
    from hydra import compose, initialize_config_module

    from robot_rl.commands.session import preflight_warnings
    from robot_rl.sim.experts import untuned_robot_warning

    assert untuned_robot_warning("Panda") is None and untuned_robot_warning(["Panda"]) is None
    assert "tuned for Panda only; on UR5e" in untuned_robot_warning("UR5e")
    with initialize_config_module("robot_rl.configs", version_base=None):
        on_ur5e = compose("session", overrides=["robot.robots=UR5e"])
        no_expert = compose("session", overrides=["robot.robots=UR5e", "teleop=keyboard"])
    assert any("tuned for Panda only" in w for w in preflight_warnings(on_ur5e))
    assert not any("tuned for Panda" in w for w in preflight_warnings(no_expert))
