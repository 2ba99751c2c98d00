"""RobosuiteRobot: features, validation, seeded resets, clipping, sim-state round trip, one tiny camera run."""

import numpy as np
import pytest

from robot_rl.sim.robosuite_robot import RobosuiteRobot


@pytest.fixture(scope="module")
def lift():
    robot = RobosuiteRobot(env_name="Lift")
    robot.connect()
    yield robot
    robot.disconnect()


def test_features_before_connect():
    robot = RobosuiteRobot(env_name="Lift")
    feats = robot.observation_features
    assert not robot.is_connected
    for key in ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "cube_pos", "object-state"):
        assert key in feats and feats[key].dtype == "float32"
    assert feats["robot0_eef_pos"].shape == (3,)
    act = robot.action_feature
    assert act.names == ("dx", "dy", "dz", "dax", "day", "daz", "gripper")
    np.testing.assert_array_equal(act.low, -np.ones(7))
    np.testing.assert_array_equal(act.high, np.ones(7))
    robot.disconnect()


@pytest.mark.parametrize(
    "kw, field",
    [({"env_name": "Lfit"}, "env_name"), ({"robots": "Pnda"}, "robots"), ({"controller": "NOPE"}, "controller")],
)
def test_bad_names_raise_value_error(kw, field):
    with pytest.raises(ValueError, match=f"robot.{field}=.*choose one of"):
        RobosuiteRobot(**kw)


def test_observation_matches_features(lift):
    obs = lift.reset(seed=0)
    feats = lift.observation_features
    assert set(obs) == set(feats)
    for k, f in feats.items():
        assert obs[k].shape == f.shape and obs[k].dtype == np.float32, k


def test_reset_is_deterministic_per_seed(lift):
    a = lift.reset(seed=7)["cube_pos"].copy()
    lift.reset(seed=8)
    b = lift.reset(seed=7)["cube_pos"]
    c = lift.reset(seed=8)["cube_pos"]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # the global numpy RNG is left alone
    np.random.seed(123)
    x = np.random.rand()
    np.random.seed(123)
    lift.reset(seed=1)
    assert np.random.rand() == x


def test_send_action_clips_and_steps(lift):
    obs0 = lift.reset(seed=0)
    sent = lift.send_action(np.array([3.0, 0, 0, 0, 0, 0, -5.0]))
    assert sent.dtype == np.float32
    np.testing.assert_array_equal(sent, [1, 0, 0, 0, 0, 0, -1])
    obs1 = lift.get_observation()
    assert obs1["robot0_eef_pos"][0] > obs0["robot0_eef_pos"][0]  # moved along +x
    assert lift.get_observation()["robot0_eef_pos"][0] == obs1["robot0_eef_pos"][0]  # cached, no new step
    with pytest.raises(ValueError):
        lift.send_action(np.zeros(3))
    with pytest.raises(ValueError):
        lift.send_action(np.full(7, np.nan))
    assert lift.is_success() is False
    assert lift.reward() == 0.0


def test_sim_state_round_trip(lift):
    rng = np.random.default_rng(0)
    lift.reset(seed=3)
    initial = lift.get_sim_state()
    assert set(initial) == {"model_xml", "states"} and isinstance(initial["model_xml"], str)
    actions = rng.uniform(-1, 1, (6, 7))
    traj = []
    for i, a in enumerate(actions):
        lift.send_action(a)
        traj.append(lift.get_observation())
        if i == 2:
            mid, mid_obs = lift.get_sim_state(), lift.get_observation()
    # mid-episode restore reproduces the observation recorded at that state exactly
    lift.reset(seed=99)
    restored = lift.set_sim_state(mid)
    for k in mid_obs:
        np.testing.assert_allclose(restored[k], mid_obs[k], atol=1e-6, err_msg=k)
    # replaying the actions from the restored initial state reproduces the trajectory (as robomimic replays)
    lift.reset(seed=98)
    lift.set_sim_state(initial)
    for a, ref in zip(actions, traj):
        lift.send_action(a)
        obs = lift.get_observation()
        for k in ("cube_pos", "robot0_eef_pos", "robot0_gripper_qpos"):
            np.testing.assert_allclose(obs[k], ref[k], atol=1e-5, err_msg=k)


def test_set_sim_state_across_instances():
    a = RobosuiteRobot(env_name="Lift")
    a.connect()
    a.reset(seed=5)
    a.send_action(np.array([0.5, 0.2, 0, 0, 0, 0, 1.0]))
    state, ref = a.get_sim_state(), a.get_observation()
    a.disconnect()
    b = RobosuiteRobot(env_name="Lift")
    b.connect()
    b.reset(seed=0)
    obs = b.set_sim_state(state)
    np.testing.assert_allclose(obs["cube_pos"], ref["cube_pos"], atol=1e-6)
    np.testing.assert_allclose(obs["robot0_joint_pos"], ref["robot0_joint_pos"], atol=1e-6)
    b.disconnect()


def test_camera_observation_tiny():
    robot = RobosuiteRobot(env_name="Lift", cameras=["agentview"], camera_height=32, camera_width=32)
    assert robot.observation_features["agentview_image"].shape == (32, 32, 3)
    robot.connect()
    try:
        frames = [robot.reset(seed=0)["agentview_image"]]
        for _ in range(3):
            robot.send_action(np.array([1.0, 0, 1.0, 0, 0, 0, 1.0]))
            frames.append(robot.get_observation()["agentview_image"])
        for f in frames:
            assert f.shape == (32, 32, 3) and f.dtype == np.uint8
        assert not np.array_equal(frames[0], frames[-1])
        # upright: the (bright) table/floor region is at the bottom in OpenCV convention, sky/background on top
        assert frames[0][-8:].mean() != frames[0][:8].mean()
    finally:
        robot.disconnect()


def test_unknown_camera_raises():
    robot = RobosuiteRobot(env_name="Lift", cameras=["nope_cam"], camera_height=16, camera_width=16)
    with pytest.raises(ValueError, match="agentview"):
        robot.connect()


def test_robosuite_says_nothing_meaningless_when_a_robot_is_built(tmp_path):
    """robosuite's import and env warnings (macro file, robosuite_models, mink IK, controller config; each printed
    twice before) are not shown; a verb's output starts with what robot_rl has to say."""
    import subprocess
    import sys

    code = (
        "from robot_rl.config import setup_logging; setup_logging()\n"
        "from robot_rl.sim.robosuite_robot import RobosuiteRobot\n"
        "r = RobosuiteRobot(env_name='Lift'); r.connect(); r.disconnect(); print('built')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0 and "built" in out.stdout, out.stderr[-2000:]
    noise = [ln for ln in (out.stdout + out.stderr).splitlines() if "robosuite" in ln or "OpenGL" in ln]
    assert noise == []


def test_only_robots_that_build_are_offered():
    """Sawyer is in robosuite's registry but fails inside MuJoCo: it is refused up front with why, and the list
    offered instead builds (one non-Panda member built here; probe_robots() builds them all, slowly)."""
    from robot_rl.sim.robosuite_robot import UNBUILDABLE_ROBOTS, robosuite_choices

    offered = robosuite_choices()["robots"]
    assert "Panda" in offered and "UR5e" in offered and not set(offered) & {"Sawyer", "Baxter", "SpotArm"}
    with pytest.raises(ValueError, match="robot.robots='Sawyer' does not build .*mesh volume.*choose one of: .*Panda"):
        RobosuiteRobot(env_name="Lift", robots="Sawyer")
    assert all(why for why, _ in UNBUILDABLE_ROBOTS.values())
    robot = RobosuiteRobot(env_name="Lift", robots="Kinova3")
    robot.connect()
    assert robot.get_observation()["robot0_eef_pos"].shape == (3,)
    robot.disconnect()


@pytest.mark.parametrize("chosen", ["disable", None])
def test_importing_robosuite_keeps_the_users_mujoco_gl(chosen):
    """robosuite's import rewrites MUJOCO_GL to egl; a session's control processes inherit the environment, and on a
    machine without libEGL `import mujoco` fails with egl. The choice (or its absence) must survive the import."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}
    if chosen is not None:
        env["MUJOCO_GL"] = chosen
    code = (
        "import os, robot_rl.sim.robosuite_robot as r; before = os.environ.get('MUJOCO_GL'); r._import_robosuite(); "
        "print(before, os.environ.get('MUJOCO_GL'))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = out.stdout.split()[-2:]
    assert after == before, f"MUJOCO_GL was {before!r} before importing robosuite and {after!r} after"
