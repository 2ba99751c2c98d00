"""Scripted experts for robosuite tasks (Panda + default OSC_POSE delta controller), behind `Teleop`.

Each expert is a small waypoint state machine over the observation dict of `RobosuiteRobot`: a proportional
controller on the end-effector position (`robot0_eef_pos`) toward the current waypoint, orientation held, and an
open/close gripper command. `noise_std` adds Gaussian noise to the arm part of the action (for diverse demos or
imperfect "teachers"); `seed` makes that noise reproducible.
"""

from __future__ import annotations

import numpy as np

from robot_rl.interfaces import Feature, Observation, Teleop

OPEN, CLOSE = -1.0, 1.0
_PANDA_OSC_NAMES = ("dx", "dy", "dz", "dax", "day", "daz", "gripper")


class _WaypointExpert(Teleop):
    """Base: subclasses implement `_plan(obs) -> (target_pos, gripper)` and may use `self.phase`/`self.t`."""

    name = "expert"
    gain = 10.0  # action per metre of position error (OSC delta: 1.0 ≙ 5 cm/step at the default output_max)
    max_speed = 1.0

    def __init__(self, noise_std: float = 0.0, seed: int | None = None, eef_key: str = "robot0_eef_pos"):
        self.noise_std = float(noise_std)
        self.seed = seed
        self.eef_key = eef_key
        self._rng = np.random.default_rng(seed)
        self.reset()

    @property
    def action_feature(self) -> Feature:
        return Feature(shape=(7,), dtype="float32", names=_PANDA_OSC_NAMES, low=-np.ones(7, np.float32),
                       high=np.ones(7, np.float32))

    def reset(self) -> None:
        self.phase = 0
        self.t = 0  # steps in the current phase

    def _next(self) -> None:
        self.phase += 1
        self.t = 0

    def _plan(self, obs: Observation) -> tuple[np.ndarray, float]:
        raise NotImplementedError

    def get_action(self, observation: Observation) -> np.ndarray:
        target, grip = self._plan(observation)
        self.t += 1
        eef = np.asarray(observation[self.eef_key], dtype=np.float64)
        dpos = np.clip(self.gain * (target - eef), -self.max_speed, self.max_speed)
        a = np.zeros(7, dtype=np.float64)
        a[:3] = dpos
        a[6] = grip
        if self.noise_std > 0:
            a[:6] += self._rng.normal(0.0, self.noise_std, size=6)
        return np.clip(a, -1.0, 1.0).astype(np.float32)

    @staticmethod
    def _near(a: np.ndarray, b: np.ndarray, tol: float) -> bool:
        return bool(np.linalg.norm(np.asarray(a) - np.asarray(b)) < tol)


class _PickExpert(_WaypointExpert):
    """approach above the object → descend → close → lift → (subclass: carry and release)."""

    hover = 0.10  # m above the grasp point while approaching
    grasp_dz = 0.0  # eef height relative to the object's centre when closing
    close_steps = 8
    lift_height = 0.15

    def _object_pos(self, obs: Observation) -> np.ndarray:
        raise NotImplementedError

    def _after_lift(self, obs: Observation, eef: np.ndarray) -> tuple[np.ndarray, float]:
        return self._lift_target, CLOSE

    def _plan(self, obs: Observation) -> tuple[np.ndarray, float]:
        eef = np.asarray(obs[self.eef_key], dtype=np.float64)
        obj = np.asarray(self._object_pos(obs), dtype=np.float64)
        grasp = obj + np.array([0.0, 0.0, self.grasp_dz])
        above = grasp + np.array([0.0, 0.0, self.hover])
        if self.phase == 0:  # approach above, gripper open
            if self._near(eef[:2], above[:2], 0.01) and abs(eef[2] - above[2]) < 0.03 or self.t > 60:
                self._next()
            return above, OPEN
        if self.phase == 1:  # descend
            if self._near(eef, grasp, 0.01) or self.t > 40:
                self._next()
            return grasp, OPEN
        if self.phase == 2:  # close, holding position
            if self.t >= self.close_steps:
                self._lift_target = grasp + np.array([0.0, 0.0, self.lift_height])
                self._next()
            return grasp, CLOSE
        if self.phase == 3:  # lift
            return self._after_lift(obs, eef)
        return eef, CLOSE


class LiftExpert(_PickExpert):
    """robosuite Lift: grasp the cube and lift it (success: cube 4 cm above the table)."""

    name = "lift_expert"

    def __init__(self, noise_std: float = 0.0, seed: int | None = None, object_key: str = "cube_pos"):
        super().__init__(noise_std=noise_std, seed=seed)
        self.object_key = object_key

    def _object_pos(self, obs: Observation) -> np.ndarray:
        return obs[self.object_key]

    # Markov: the action depends on the observation only (no phase counters). A policy cloned from it sees the
    # same decision for the same state, and the labels it gives at states a learning policy reached (DAgger)
    # are right for that state, not for where the expert's own plan would have been.
    align_tol = 0.015  # m, eef above the object in x-y: descend (the descent target also corrects x-y)
    grasp_tol = 0.012  # m, eef this close above the grasp point: close the gripper
    held_gap = (0.03, 0.072)  # finger gap (m) closed on the cube (any size/yaw); narrower = closed on nothing
    still = 0.01  # finger speed (m/s) below which the fingers have stopped: the grip is firm

    def _plan(self, obs: Observation) -> tuple[np.ndarray, float]:
        eef = np.asarray(obs[self.eef_key], dtype=np.float64)
        obj = np.asarray(self._object_pos(obs), dtype=np.float64)
        grasp = obj + np.array([0.0, 0.0, self.grasp_dz])
        gap = float(obs["robot0_gripper_qpos"][0] - obs["robot0_gripper_qpos"][1])
        off_xy = float(np.linalg.norm((eef - grasp)[:2]))
        still = float(np.abs(obs["robot0_gripper_qvel"]).max()) < self.still
        holding = self.held_gap[0] < gap < self.held_gap[1] and still and np.linalg.norm(eef - obj) < 0.03
        if holding:  # lift
            self.phase = 3
            return eef + np.array([0.0, 0.0, 0.05]), CLOSE
        if gap <= self.held_gap[0]:  # closed on nothing: open and start over from above
            self.phase = 0
            return grasp + np.array([0.0, 0.0, self.hover]), OPEN
        if off_xy < self.align_tol and eef[2] - grasp[2] < self.grasp_tol:  # at the grasp point: close
            self.phase = 2
            return grasp, CLOSE
        if off_xy < self.align_tol:  # above the object: descend
            self.phase = 1
            return grasp, OPEN
        self.phase = 0  # approach above the object
        return grasp + np.array([0.0, 0.0, self.hover]), OPEN


class StackExpert(_PickExpert):
    """robosuite Stack: pick cubeA, carry it above cubeB, lower and release."""

    name = "stack_expert"

    def reset(self) -> None:
        super().reset()
        self._sub = 0  # sub-phase after the lift
        self._release_t = 0
        self._retreat: np.ndarray | None = None

    def _object_pos(self, obs: Observation) -> np.ndarray:
        return obs["cubeA_pos"]

    def _after_lift(self, obs: Observation, eef: np.ndarray) -> tuple[np.ndarray, float]:
        # phases 3.. : lift, carry above B, lower onto B, release, retreat
        b = np.asarray(obs["cubeB_pos"], dtype=np.float64)
        a = np.asarray(obs["cubeA_pos"], dtype=np.float64)
        off = eef - a  # keep the grasp offset so cube A (not the eef) lands on B
        sub = self._sub
        if sub == 0:  # lift
            if eef[2] > self._lift_target[2] - 0.02 or self.t > 30:
                self._sub = 1
            return self._lift_target, CLOSE
        carry = np.array([b[0], b[1], self._lift_target[2]]) + np.array([off[0], off[1], 0.0])
        if sub == 1:  # carry over B
            if self._near(a[:2], b[:2], 0.006) or self.t > 100:
                self._sub = 2
            return carry, CLOSE
        place = np.array([b[0] + off[0], b[1] + off[1], b[2] + 0.047 + off[2]])
        if sub == 2:  # lower
            if a[2] - b[2] < 0.05 or self.t > 140:
                self._sub, self._release_t = 3, self.t
            return place, CLOSE
        if sub == 3:  # release
            if self.t - self._release_t > 6:
                self._sub, self._retreat = 4, eef + np.array([0.0, 0.0, 0.08])
            return eef, OPEN
        return self._retreat, OPEN  # retreat straight up


_EXPERTS: dict[str, type[_WaypointExpert]] = {"Lift": LiftExpert, "Stack": StackExpert}


def make_expert(env_name: str, **kw) -> Teleop:
    """The scripted expert for a robosuite env name (Panda, default OSC controller)."""
    try:
        cls = _EXPERTS[env_name]
    except KeyError:
        raise ValueError(f"no scripted expert for env_name={env_name!r}; experts exist for: "
                         f"{', '.join(sorted(_EXPERTS))}") from None
    return cls(**kw)
