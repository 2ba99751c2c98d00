"""The shapes of a robosuite Lift (Panda, OSC pose) transition, for benchmarks that build synthetic ones.

Low-dim observation keys as sim/robosuite_robot.py publishes them (this includes robosuite's concatenated
robot0_proprio-state / object-state, which repeat the other keys), and the camera names of the two-camera setup.
"""

LIFT_LOWDIM = {
    "robot0_joint_pos": 7,
    "robot0_joint_pos_cos": 7,
    "robot0_joint_pos_sin": 7,
    "robot0_joint_vel": 7,
    "robot0_eef_pos": 3,
    "robot0_eef_quat": 4,
    "robot0_eef_quat_site": 4,
    "robot0_gripper_qpos": 2,
    "robot0_gripper_qvel": 2,
    "cube_pos": 3,
    "cube_quat": 4,
    "gripper_to_cube_pos": 3,
    "robot0_proprio-state": 43,
    "object-state": 10,
}
CAMERAS = ("agentview", "robot0_eye_in_hand")
