"""Scripted experts for robosuite tasks (Panda + default OSC_POSE delta controller), behind `Teleop`.

Every expert is a proportional controller on the end-effector position (`robot0_eef_pos`) toward a target that a
small decision rule picks from the observation, a proportional controller turning the gripper back to pointing
straight down (from `robot0_eef_quat`, when observed: noise in the rotation dims does not accumulate), and an
open/close gripper command.

Markov decisions. `LiftExpert`, `PickPlaceCanExpert` and `StackExpert` decide from the current observation only
(relative poses, finger gap and finger speed), with no phase counters or remembered plans: the same observation
gives the same action whatever came before. A policy cloned from them sees one decision per state, and the labels
they give at states a learning policy reached (DAgger, RLIF takeovers) are right for that state, not for where the
expert's own plan would have been. It also makes them retry on their own: an object that slips out of the hand is
simply approached and grasped again.

Quality knob (an imperfect teacher), constructor kwargs on every expert; the defaults are the perfect expert:

- `noise_std`: Gaussian noise added to the six arm dims of every action.
- `hesitation`: probability per step of starting a pause of `pause_steps` (uniform, inclusive) steps during which
  the arm holds still (zero motion) and the gripper command is the previous one.
- `failed_grasp`: probability per grasp attempt (each time the expert starts closing the gripper on the object)
  that the grip fails: as soon as the fingers have closed on the object the gripper opens again (`drop_steps`
  steps of zero arm motion, gripper opening) and the expert, being Markov, sees an open gripper at the object and
  closes again (a new attempt, with a new draw). An episode may run out of time.
- `quality`: a preset in `QUALITY_PRESETS` ("expert", "mediocre", "poor") setting the three knobs above; any knob
  passed explicitly overrides the preset's value.

With `hesitation` or `failed_grasp` > 0 the expert carries a little state (the pause / drop in progress, whether
the current grasp attempt is doomed): the *decision rule* stays Markov, the perturbations are not.

Randomness: all of it (noise, pauses, failed grasps) comes from one `np.random.default_rng(seed)` owned by the
expert. `reset()` clears the per-episode state but keeps the rng stream, so successive episodes of one expert
differ, and a fresh expert with the same seed replays the same sequence of episodes exactly.
"""

from __future__ import annotations

import numpy as np

from robot_rl.interfaces import Feature, Observation, Teleop

OPEN, CLOSE = -1.0, 1.0
_PANDA_OSC_NAMES = ("dx", "dy", "dz", "dax", "day", "daz", "gripper")

# Quality presets. Measured success rates and episode lengths per task: benchmarks/bench_expert_quality.py (20
# seeds: expert 100% on Lift, PickPlaceCan, Stack; mediocre 100% in 1.4-1.6x the steps; poor 85-95% in 2.2-2.8x).
QUALITY_PRESETS: dict[str, dict[str, float]] = {
    "expert": {"noise_std": 0.0, "hesitation": 0.0, "failed_grasp": 0.0},  # the perfect scripted expert
    "mediocre": {"noise_std": 0.1, "hesitation": 0.03, "failed_grasp": 0.2},  # slower, a retry now and then
    "poor": {"noise_std": 0.2, "hesitation": 0.08, "failed_grasp": 0.4},  # jittery, hesitant, often fumbles
}


def _resolve_quality(quality: str | None, **knobs: float | None) -> dict[str, float]:
    if quality is None:
        base = QUALITY_PRESETS["expert"]
    else:
        try:
            base = QUALITY_PRESETS[quality]
        except KeyError:
            raise ValueError(f"quality={quality!r}; choose one of: {', '.join(QUALITY_PRESETS)} (or None)") from None
    out = {k: float(base[k] if v is None else v) for k, v in knobs.items()}
    for k, v in out.items():
        if v < 0 or (k != "noise_std" and v > 1):
            raise ValueError(f"{k}={v} out of range (noise_std >= 0, probabilities in [0, 1])")
    return out


# The gripper pointing straight down, fingers opening along the world y axis: the Panda's home orientation in
# robosuite (180 degrees about x), as a rotation matrix (columns: gripper axes in the world frame).
_DOWN = np.diag([1.0, -1.0, -1.0])


def _quat_xyzw_to_mat(q: np.ndarray) -> np.ndarray:
    x, y, z, w = np.asarray(q, dtype=np.float64) / max(float(np.linalg.norm(q)), 1e-12)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _rotation_error(quat_xyzw: np.ndarray, target: np.ndarray = _DOWN) -> np.ndarray:
    """Axis-angle (world frame) of the rotation taking the current orientation to `target`: what OSC's delta
    orientation input (base frame = world frame for a Panda mounted upright) needs to turn the gripper there."""
    r = target @ _quat_xyzw_to_mat(quat_xyzw).T
    cos = np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)
    angle = float(np.arccos(cos))
    v = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    s = float(np.linalg.norm(v))
    if s < 1e-9:  # no rotation, or exactly 180 degrees (not reached from the Panda's workspace): do nothing
        return np.zeros(3)
    return v / s * angle


class _WaypointExpert(Teleop):
    """Base: subclasses implement `_plan(obs) -> (target_pos, gripper)`; this class adds the P-controller and the
    quality knobs. `_plan` may set `self.mode` (a name of what it is doing) for the failed-grasp logic and
    for inspection."""

    name = "expert"
    gain = 10.0  # action per metre of position error (OSC delta: 1.0 ≙ 5 cm/step at the default output_max)
    max_speed = 1.0
    ori_gain = 1.0  # rotation action per radian of orientation error (1.0 ≙ 0.5 rad/step at the default output_max)
    ori_key = "robot0_eef_quat"  # (x, y, z, w); without it in the observation the orientation is not corrected
    pause_steps = (3, 10)  # hesitation pause length, steps (inclusive)
    drop_steps = 10  # steps the gripper is opened (arm still) when a grasp fails
    object_key = "cube_pos"

    def __init__(
        self,
        noise_std: float | None = None,
        seed: int | None = None,
        eef_key: str = "robot0_eef_pos",
        *,
        hesitation: float | None = None,
        failed_grasp: float | None = None,
        quality: str | None = None,
    ):
        knobs = _resolve_quality(quality, noise_std=noise_std, hesitation=hesitation, failed_grasp=failed_grasp)
        self.noise_std = knobs["noise_std"]
        self.hesitation = knobs["hesitation"]
        self.failed_grasp = knobs["failed_grasp"]
        self.quality = quality
        self.seed = seed
        self.eef_key = eef_key
        self._rng = np.random.default_rng(seed)
        self.reset()

    @property
    def action_feature(self) -> Feature:
        return Feature(
            shape=(7,),
            dtype="float32",
            names=_PANDA_OSC_NAMES,
            low=-np.ones(7, np.float32),
            high=np.ones(7, np.float32),
        )

    def reset(self) -> None:
        """New episode: clear the per-episode state (pause, doomed grasp). The rng stream is kept on purpose, so
        successive episodes draw different noise/pauses/failures; re-create the expert to replay from `seed`."""
        self.phase = 0
        self.mode = "approach"
        self.t = 0  # steps since reset
        self._pause_left = 0
        self._drop_left = 0
        self._doomed = False  # the current grasp attempt will fail
        self._last_grip = OPEN  # last gripper command sent (a pause repeats it)
        self._prev_plan_grip = OPEN  # last gripper command the plan chose (grasp attempts start at OPEN -> CLOSE)

    def _plan(self, obs: Observation) -> tuple[np.ndarray, float]:
        raise NotImplementedError

    def _hold(self) -> np.ndarray:
        a = np.zeros(7, dtype=np.float32)
        a[6] = self._last_grip
        return a

    def get_action(self, observation: Observation) -> np.ndarray:
        self.t += 1
        if self._drop_left > 0:  # a failed grasp: arm still, gripper opening
            self._drop_left -= 1
            self._last_grip = OPEN
            return self._hold()
        if self._pause_left > 0:
            self._pause_left -= 1
            return self._hold()
        if self.hesitation > 0 and self._rng.random() < self.hesitation:
            self._pause_left = int(self._rng.integers(self.pause_steps[0], self.pause_steps[1] + 1)) - 1
            return self._hold()

        target, grip = self._plan(observation)
        fails = self.failed_grasp > 0 and self._grasp_fails_now(observation, grip)
        self._prev_plan_grip = OPEN if fails else grip
        if fails:
            self._drop_left = self.drop_steps - 1
            self._last_grip = OPEN
            self.mode = "drop"
            return self._hold()

        eef = np.asarray(observation[self.eef_key], dtype=np.float64)
        dpos = np.clip(self.gain * (np.asarray(target, dtype=np.float64) - eef), -self.max_speed, self.max_speed)
        a = np.zeros(7, dtype=np.float64)
        a[:3] = dpos
        if self.ori_key in observation:
            a[3:6] = np.clip(self.ori_gain * _rotation_error(observation[self.ori_key]), -1.0, 1.0)
        a[6] = grip
        if self.noise_std > 0:
            a[:6] += self._rng.normal(0.0, self.noise_std, size=6)
        self._last_grip = float(grip)
        return np.clip(a, -1.0, 1.0).astype(np.float32)

    def _grasp_fails_now(self, obs: Observation, grip: float) -> bool:
        """Failed-grasp bookkeeping: a grasp attempt starts when the plan closes the gripper on the object after
        commanding it open (one draw per attempt); a doomed attempt ends (True) as soon as the fingers have
        closed on the object (the first step the plan would lift it)."""
        if self.mode == "close" and grip == CLOSE and self._prev_plan_grip == OPEN:
            self._doomed = bool(self._rng.random() < self.failed_grasp)
        if self._doomed and self.mode in ("lift", "carry"):  # the fingers have just stopped on the object
            self._doomed = False
            return True
        return False


class _MarkovPickExpert(_WaypointExpert):
    """Markov grasping: approach above the object with the gripper open, descend, close, and once the fingers
    have stopped on the object (gap in `held_gap`, finger speed below `still`, eef at the object) hand over to
    `_holding` (lift / carry / place). Closed on nothing → open and start over from above. `_placed` (object at
    its goal, not held) → retreat up with the gripper open."""

    hover = 0.10  # m above the grasp point while approaching
    grasp_dz = 0.0  # eef height relative to the object's centre when closing
    align_tol = 0.015  # m, eef above the object in x-y: descend (the descent target also corrects x-y)
    grasp_tol = 0.012  # m, eef this close above the grasp point: close the gripper
    held_gap = (0.03, 0.072)  # finger gap (m) closed on the object; narrower = closed on nothing
    still = 0.01  # finger speed (m/s) below which the fingers have stopped: the grip is firm
    hold_tol = 0.03  # m, eef-object distance for "the object is in the hand"
    funnel = 0.25  # x-y tolerance added per metre of height above the grasp/release point: a descent, once
    # started, is not aborted by a small x-y error high up (the descent target corrects it), only near the bottom

    def __init__(self, noise_std: float | None = None, seed: int | None = None, object_key: str | None = None, **kw):
        if object_key is not None:
            self.object_key = object_key
        super().__init__(noise_std=noise_std, seed=seed, **kw)

    # -- subclass hooks
    def _holding(self, obs: Observation, eef: np.ndarray, obj: np.ndarray) -> tuple[np.ndarray, float]:
        self.mode = "lift"
        return eef + np.array([0.0, 0.0, 0.05]), CLOSE

    def _placed(self, obs: Observation, obj: np.ndarray) -> bool:
        return False

    retreat_dz = 0.15  # m above the placed object to retreat to

    # -- the decision rule
    @staticmethod
    def _gap(obs: Observation) -> float:
        return float(obs["robot0_gripper_qpos"][0] - obs["robot0_gripper_qpos"][1])

    def _plan(self, obs: Observation) -> tuple[np.ndarray, float]:
        eef = np.asarray(obs[self.eef_key], dtype=np.float64)
        obj = np.asarray(obs[self.object_key], dtype=np.float64)
        grasp = obj + np.array([0.0, 0.0, self.grasp_dz])
        gap = self._gap(obs)
        off_xy = float(np.linalg.norm((eef - grasp)[:2]))
        still = float(np.abs(obs["robot0_gripper_qvel"]).max()) < self.still
        holding = self.held_gap[0] < gap < self.held_gap[1] and still and np.linalg.norm(eef - obj) < self.hold_tol
        if holding:
            self.phase = 3
            return self._holding(obs, eef, obj)
        if (
            self.held_gap[0] < gap < self.held_gap[1]
            and np.linalg.norm(eef - obj) < self.hold_tol
            and float(obs["robot0_gripper_qvel"][0] - obs["robot0_gripper_qvel"][1]) < 0.0
        ):
            # fingers still closing on the object (or shaken while holding it): keep closing, do not let go
            self.phase, self.mode = 2, "close"
            return grasp, CLOSE
        if self._placed(obs, obj):  # done: let go and move up, away from the object
            self.phase, self.mode = 4, "retreat"
            return np.array([eef[0], eef[1], obj[2] + self.retreat_dz]), OPEN
        if gap <= self.held_gap[0]:  # closed on nothing: open and start over from above
            self.phase, self.mode = 0, "reopen"
            return grasp + np.array([0.0, 0.0, self.hover]), OPEN
        if off_xy < self.align_tol and eef[2] - grasp[2] < self.grasp_tol:  # at the grasp point: close
            self.phase, self.mode = 2, "close"
            return grasp, CLOSE
        if off_xy < self.align_tol + self.funnel * max(eef[2] - grasp[2], 0.0):  # above the object: descend
            self.phase, self.mode = 1, "descend"
            return grasp, OPEN
        self.phase, self.mode = 0, "approach"  # approach above the object
        return grasp + np.array([0.0, 0.0, self.hover]), OPEN


class _MarkovPlaceExpert(_MarkovPickExpert):
    """Markov pick-and-place: while holding, the object goes straight up until its bottom clears the obstacles
    (`clear_z`), then over the goal at `carry_z`, then down; it is released at `release_z` (object centre height)
    and the expert retreats once `_placed`. Lowering keeps going (with x-y correction) while the object is within
    `lower_tol` of the goal, so a small swing does not send it back up; it starts within `place_tol` of the goal
    plus the `funnel` allowance for the height above the release point, and the object is let go only within
    `release_tol`."""

    place_tol = 0.012  # m, object over the goal (x-y): start lowering
    lower_tol = 0.04  # m, keep lowering while within this of the goal
    release_tol = 0.04  # m, let go only within this of the goal (else hold at the release height, correcting x-y)
    placed_tol = 0.03  # m, object within this (x-y) of the goal and low: placed

    def _goal(self, obs: Observation) -> tuple[np.ndarray, float, float, float]:
        """(goal x-y of the object centre, release height, clearance height, carry height) of the object centre."""
        raise NotImplementedError

    def _holding(self, obs: Observation, eef: np.ndarray, obj: np.ndarray) -> tuple[np.ndarray, float]:
        goal_xy, release_z, clear_z, carry_z = self._goal(obs)
        grip_off = eef - obj  # keep the grasp offset so the object (not the eef) lands on the goal
        d = float(np.linalg.norm(obj[:2] - goal_xy))
        low = obj[2] < clear_z
        if d < self.place_tol + self.funnel * max(obj[2] - release_z, 0.0) or (low and d < self.lower_tol):
            if obj[2] <= release_z and d < self.release_tol:
                self.mode = "release"
                return eef, OPEN
            self.mode = "lower"
            return np.array([goal_xy[0], goal_xy[1], release_z - 0.01]) + grip_off, CLOSE
        if low:  # lift straight up until clear
            self.mode = "lift"
            return np.array([eef[0], eef[1], carry_z + grip_off[2]]), CLOSE
        self.mode = "carry"
        return np.array([goal_xy[0] + grip_off[0], goal_xy[1] + grip_off[1], carry_z + grip_off[2]]), CLOSE

    def _placed(self, obs: Observation, obj: np.ndarray) -> bool:
        goal_xy, release_z, clear_z, _ = self._goal(obs)
        return bool(np.linalg.norm(obj[:2] - goal_xy) < self.placed_tol and obj[2] < clear_z)


class LiftExpert(_MarkovPickExpert):
    """robosuite Lift: grasp the cube and lift it (success: cube 4 cm above the table). Markov."""

    name = "lift_expert"
    object_key = "cube_pos"


# Default PickPlace geometry (robosuite 1.5.1 defaults: bin2_pos=(0.1, 0.28, 0.8), bins arena 0.39 x 0.49 m):
# `env.target_bin_placements[env.object_id]` for the can (object id 3) is the centre of bin2's +x/+y quarter.
PICK_PLACE_CAN_TARGET = (0.1975, 0.4025, 0.8)


class PickPlaceCanExpert(_MarkovPlaceExpert):
    """robosuite PickPlaceCan: grasp the can in bin1, lift it clear of the bin walls, carry it over the can's
    quarter of bin2, lower, release and move away (success counts only once the gripper is > ~4 cm from the can).

    `target` is the centre of the can's quarter of bin2 (x, y, z of the bin body), the env's
    `target_bin_placements[object_id]`; the default is robosuite's default geometry, for a customised env use
    `for_env(env)`. The expert aims `aim_offset` from it, toward the robot: the quarter's centre is at the edge of
    the Panda's reach with the gripper vertical, and any point of the quarter counts (the can's centre must be
    inside it; aiming 3.5 cm / 4.5 cm off-centre keeps it >= 2 cm from the dividers). The can is a cylinder, so its
    yaw does not matter for the top-down grasp; a can that fell over is not handled (approached like a standing
    one)."""

    name = "pick_place_can_expert"
    object_key = "Can_pos"
    grasp_dz = 0.0
    held_gap = (0.045, 0.078)  # the can is ~6.6 cm across
    hold_tol = 0.04
    walls_top = 0.90  # bin walls are 10 cm tall on a bin at z=0.8
    can_half = 0.04  # can half-height (centre 0.86 when standing on the 0.82 bin floor)

    aim_offset = (-0.035, -0.045)  # m, x-y from the quarter's centre toward the robot base
    lower_tol = 0.025
    release_tol = 0.035  # a can standing on the floor off the aim point is let go (x-y is not corrected there)

    def __init__(
        self,
        noise_std: float | None = None,
        seed: int | None = None,
        target: tuple[float, float, float] | np.ndarray | None = None,
        **kw,
    ):
        self.target = np.asarray(PICK_PLACE_CAN_TARGET if target is None else target, dtype=np.float64)
        self.aim = self.target[:2] + np.asarray(self.aim_offset)
        super().__init__(noise_std=noise_std, seed=seed, **kw)

    @classmethod
    def for_env(cls, env, **kw) -> PickPlaceCanExpert:
        """An expert aimed at `env`'s own target bin placement (a robosuite PickPlace env or a RobosuiteRobot)."""
        env = getattr(env, "env", None) or env
        return cls(target=np.asarray(env.target_bin_placements[env.object_id]), **kw)

    def _goal(self, obs: Observation):
        floor = self.target[2] + 0.02  # bin floor top (bin body at target z, 2 cm thick)
        release_z = floor + self.can_half + 0.02  # let go with the can's bottom 2 cm above the floor
        clear_z = self.walls_top + self.can_half + 0.03  # can bottom 3 cm above the walls
        carry_z = clear_z + 0.05
        return self.aim, release_z, clear_z, carry_z


class StackExpert(_MarkovPlaceExpert):
    """robosuite Stack: pick cubeA, carry it above cubeB, lower and release it there, move up. Markov."""

    name = "stack_expert"
    object_key = "cubeA_pos"
    stack_dz = 0.045  # cubeA centre above cubeB centre when stacked (half sizes 0.02 + 0.025)
    place_tol = 0.006
    lower_tol = 0.02
    release_tol = 0.01
    placed_tol = 0.02

    def _goal(self, obs: Observation):
        b = np.asarray(obs["cubeB_pos"], dtype=np.float64)
        release_z = b[2] + self.stack_dz + 0.005
        clear_z = b[2] + self.stack_dz + 0.03
        carry_z = clear_z + 0.04
        return b[:2], release_z, clear_z, carry_z

    def _placed(self, obs: Observation, obj: np.ndarray) -> bool:
        b = np.asarray(obs["cubeB_pos"], dtype=np.float64)
        return bool(np.linalg.norm(obj[:2] - b[:2]) < self.placed_tol and abs(obj[2] - b[2] - self.stack_dz) < 0.01)


_EXPERTS: dict[str, type[_WaypointExpert]] = {
    "Lift": LiftExpert,
    "PickPlaceCan": PickPlaceCanExpert,
    "Stack": StackExpert,
}


TUNED_ROBOTS = ("Panda",)  # waypoints, grasp heights and gains were tuned on Panda with its default OSC controller


def untuned_robot_warning(robots) -> str | None:
    """A warning in words when a scripted expert will drive a robot it was not tuned for (it then fails often,
    e.g. Lift on UR5e fails every episode), else None."""
    names = [robots] if isinstance(robots, str) else list(robots or [])
    other = [r for r in names if r not in TUNED_ROBOTS]
    if not other:
        return None
    return (
        f"the scripted experts are tuned for {', '.join(TUNED_ROBOTS)} only; on {', '.join(other)} expect them to "
        "fail often (drive yourself with teleop=keyboard / spacemouse, or use robot.robots=Panda)"
    )


def make_expert(env_name: str, **kw) -> Teleop:
    """The scripted expert for a robosuite env name (Panda, default OSC controller). Keyword arguments go to the
    expert: `noise_std`, `seed`, `hesitation`, `failed_grasp`, `quality` (see `QUALITY_PRESETS`), and the
    expert's own (e.g. `target` for PickPlaceCan)."""
    try:
        cls = _EXPERTS[env_name]
    except KeyError:
        raise ValueError(
            f"no scripted expert for env_name={env_name!r}; experts exist for: {', '.join(sorted(_EXPERTS))}"
        ) from None
    return cls(**kw)
