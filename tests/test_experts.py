"""Scripted experts solve their sim tasks; noise is seeded."""

import numpy as np
import pytest

from robot_rl.sim.experts import LiftExpert, make_expert
from robot_rl.sim.robosuite_robot import RobosuiteRobot


def _rollout(robot, expert, seed, steps=200, until_success=True):
    obs = robot.reset(seed=seed)
    expert.reset()
    for t in range(steps):
        robot.send_action(expert.get_action(obs))
        obs = robot.get_observation()
        if until_success and robot.is_success():
            return True, t + 1
    return robot.is_success(), steps


def test_lift_expert_success_rate():
    robot = RobosuiteRobot(env_name="Lift")
    robot.connect()
    expert = LiftExpert(noise_std=0.05, seed=0)
    results = [_rollout(robot, expert, seed)[0] for seed in range(5)]
    assert sum(results) >= 4, results
    # and it keeps the cube up: success still holds 40 steps later
    ok, t = _rollout(robot, expert, 11)
    assert ok
    for _ in range(40):
        robot.send_action(expert.get_action(robot.get_observation()))
    assert robot.is_success()
    robot.disconnect()


def test_expert_noise_is_seeded():
    obs = {"robot0_eef_pos": np.zeros(3), "cube_pos": np.array([0.1, 0, 0]),
           "robot0_gripper_qpos": np.array([0.04, -0.04]), "robot0_gripper_qvel": np.zeros(2)}
    a = LiftExpert(noise_std=0.1, seed=3).get_action(obs)
    b = LiftExpert(noise_std=0.1, seed=3).get_action(obs)
    c = LiftExpert(noise_std=0.1, seed=4).get_action(obs)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.float32 and a.shape == (7,)


def test_lift_expert_is_markov():
    """Same observation, same action, whatever came before: what a cloned policy (and DAgger labels) need."""
    open_far = {"robot0_eef_pos": np.array([0.0, 0.0, 1.0]), "cube_pos": np.array([0.1, 0, 0.82]),
                "robot0_gripper_qpos": np.array([0.04, -0.04]), "robot0_gripper_qvel": np.zeros(2)}
    holding = {"robot0_eef_pos": np.array([0.1, 0.0, 0.83]), "cube_pos": np.array([0.1, 0, 0.83]),
               "robot0_gripper_qpos": np.array([0.024, -0.024]), "robot0_gripper_qvel": np.zeros(2)}
    fresh, used = LiftExpert(), LiftExpert()
    for _ in range(30):
        used.get_action(holding)
    np.testing.assert_array_equal(fresh.get_action(open_far), used.get_action(open_far))
    assert used.get_action(holding)[2] > 0 and used.get_action(holding)[6] == 1.0  # lifts, gripper closed
    assert fresh.get_action(open_far)[6] == -1.0  # approaches with the gripper open


def test_make_expert_registry():
    assert isinstance(make_expert("Lift", noise_std=0.0), LiftExpert)
    with pytest.raises(ValueError, match="no scripted expert.*Lift"):
        make_expert("Door")
    assert make_expert("Lift").action_feature.names == RobosuiteRobot("Lift").action_feature.names


def test_stack_expert_one_episode():
    robot = RobosuiteRobot(env_name="Stack")
    robot.connect()
    ok, _ = _rollout(robot, make_expert("Stack"), seed=0)
    robot.disconnect()
    assert ok
