"""Any robosuite environment behind robot_rl's `Robot` interface.

The control loop owns episode length and pacing, so the env is built with `ignore_done=True`; `reset(seed)` is
deterministic per seed; `get_sim_state`/`set_sim_state` use robomimic's `{"model_xml", "states"}` convention so a
recorded episode can be replayed from its first state.

Features before `connect()`: robosuite has no static observation spec, so the first time features are asked for
on a disconnected robot we build the env once *without cameras or renderer* (a lightweight probe, ~1 s), read the
keys/shapes of one observation and `action_spec`, and cache them per (env, robots, controller). `connect()` adopts
the probe env, so the probe costs nothing extra. Cameras are rendered by our own `mujoco.Renderer` after each step
(robosuite's camera observables are off), so images show the current state.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import sys
from typing import Any

import numpy as np

from robot_rl.interfaces import Feature, Observation, Robot

log = logging.getLogger(__name__)

_IMAGE_SUFFIX = "_image"
RENDER_QUALITIES = ("fast", "full")


# ------------------------------------------------------------------------------------------------ rendering backend
def select_gl_backend() -> str | None:
    """Choose MUJOCO_GL for offscreen rendering when the user has not: EGL (GPU, or Mesa's software EGL on a
    CPU-only machine; checked working here), else OSMesa (`apt-get install libosmesa6`). Must run before mujoco
    is first imported (mujoco picks its GL backend at import). Returns the backend in effect."""
    current = os.environ.get("MUJOCO_GL")
    if current:
        return current
    if "mujoco" in sys.modules:  # too late to choose: mujoco has picked its default (GLFW, needs a display)
        return os.environ.get("MUJOCO_GL")
    if sys.platform == "darwin":
        return None  # robosuite picks cgl
    if ctypes.util.find_library("EGL"):
        os.environ["MUJOCO_GL"] = "egl"
    elif ctypes.util.find_library("OSMesa"):
        os.environ["MUJOCO_GL"] = "osmesa"
        os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    else:
        log.warning(
            "No EGL or OSMesa library found: camera observations will fail. Install libegl1 (GPU or "
            "Mesa) or libosmesa6, or set MUJOCO_GL yourself."
        )
        return None
    log.info("MUJOCO_GL unset; using %s for offscreen rendering", os.environ["MUJOCO_GL"])
    return os.environ["MUJOCO_GL"]


ROBOSUITE_NOISE = (  # robosuite's import-time and per-env messages that mean nothing to a robot_rl user
    "private macro file",
    "setup_macros.py",
    "robosuite_models",
    "mink-based whole-body IK",
    "Loading controller configuration",
)


def _quiet(record: logging.LogRecord) -> bool:
    return not any(n in record.getMessage() for n in ROBOSUITE_NOISE)


def _import_robosuite():
    """robosuite, imported once, without its meaningless warnings (each printed twice: by its own console handler
    and by the root logger): those are dropped, anything else it logs reaches the root logger once."""
    if "robosuite" in sys.modules:
        return sys.modules["robosuite"]
    import warnings

    logging.getLogger("OpenGL.acceleratesupport").setLevel(logging.WARNING)  # "No OpenGL_accelerate module"
    rs_log = logging.getLogger("robosuite_logs")
    if _quiet not in rs_log.filters:
        rs_log.addFilter(_quiet)
    chosen = os.environ.get("MUJOCO_GL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)  # invalid escape sequences in robosuite's docstrings
        import robosuite  # heavy: imported lazily so that `import robot_rl.sim...` stays cheap
    # robosuite's MUJOCO_GPU_RENDERING macro rewrites MUJOCO_GL to egl at import (for its own renderer); put the
    # choice back so that processes started from here (a session's control processes) import mujoco with it: on a
    # machine without libEGL, MUJOCO_GL=egl makes `import mujoco` itself fail
    if chosen is None:
        os.environ.pop("MUJOCO_GL", None)
    else:
        os.environ["MUJOCO_GL"] = chosen
    for handler in list(rs_log.handlers):  # its console handler: the root logger already prints its records
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            rs_log.removeHandler(handler)
    if not logging.getLogger().handlers:  # no logging set up (a library user): keep robosuite audible
        rs_log.addHandler(logging.StreamHandler())
    return robosuite


select_gl_backend()  # at import, before anything imports mujoco: only sets MUJOCO_GL if the user has not


# ------------------------------------------------------------------------------------------------------ registries
# Registered robosuite robots that do not build (robosuite 1.5.1, mujoco 3; found by building Lift with each,
# `probe_robots()`): robot name -> (why, the module whose absence is the cause, or None when nothing fixes it).
UNBUILDABLE_ROBOTS = {
    "Sawyer": ("its mesh 'robot0_head_1' is rejected by MuJoCo (mesh volume is too small)", None),
    "Baxter": ("its mesh 'robot0_H1_1' is rejected by MuJoCo (mesh volume is too small)", None),
    "GR1FixedLowerBody": ("its default controller (WHOLE_BODY_MINK_IK) needs the mink package", "mink"),
    "SpotArm": ("its model lives in robosuite_models, which is not installed", "robosuite_models"),
    "LeggedManipulatorModel": ("an abstract base model, not a robot", None),
}


def buildable_robots(registered) -> list[str]:
    """The registered robot names that build here: robosuite's registry minus UNBUILDABLE_ROBOTS (unless the
    missing package that broke one is installed now)."""
    import importlib.util

    def builds(name: str) -> bool:
        why = UNBUILDABLE_ROBOTS.get(name)
        return why is None or (why[1] is not None and importlib.util.find_spec(why[1]) is not None)

    return sorted(r for r in registered if builds(r))


def probe_robots(env_name: str = "Lift") -> dict[str, str]:
    """Build `env_name` with every registered robot: name -> "ok" or the error (slow: seconds per robot; how
    UNBUILDABLE_ROBOTS was found, rerun it after a robosuite upgrade)."""
    suite = _import_robosuite()
    from robosuite.controllers import load_composite_controller_config
    from robosuite.models.robots.robot_model import REGISTERED_ROBOTS

    out = {}
    for name in sorted(REGISTERED_ROBOTS):
        try:
            suite.make(
                env_name,
                robots=name,
                controller_configs=load_composite_controller_config(controller=None, robot=name),
                has_renderer=False,
                has_offscreen_renderer=False,
                use_camera_obs=False,
                ignore_done=True,
            ).close()
            out[name] = "ok"
        except Exception as e:  # robosuite raises anything: every failure is the answer here
            out[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return out


def robosuite_choices() -> dict[str, list[str]]:
    """Valid names for env_name / robots / controller, straight from robosuite's registries (robots: only those
    that build, see UNBUILDABLE_ROBOTS)."""
    _import_robosuite()
    from robosuite.controllers.composite.composite_controller import REGISTERED_COMPOSITE_CONTROLLERS_DICT
    from robosuite.environments.base import REGISTERED_ENVS
    from robosuite.models.robots.robot_model import REGISTERED_ROBOTS

    return {
        "env_name": sorted(REGISTERED_ENVS),
        "robots": buildable_robots(REGISTERED_ROBOTS),
        "controller": sorted(REGISTERED_COMPOSITE_CONTROLLERS_DICT),
    }


def _validate(env_name: str, robots: list[str], controller: str | None) -> None:
    ch = robosuite_choices()
    if env_name not in ch["env_name"]:
        raise ValueError(
            f"robot.env_name={env_name!r} is not a robosuite environment; choose one of: {', '.join(ch['env_name'])}"
        )
    for r in robots:
        if r in UNBUILDABLE_ROBOTS and r not in ch["robots"]:
            raise ValueError(
                f"robot.robots={r!r} does not build with this robosuite: {UNBUILDABLE_ROBOTS[r][0]}; choose one "
                f"of: {', '.join(ch['robots'])}"
            )
        if r not in ch["robots"]:
            raise ValueError(f"robot.robots={r!r} is not a robosuite robot; choose one of: {', '.join(ch['robots'])}")
    if controller is not None:
        if controller.endswith(".json"):
            if not os.path.isfile(controller):
                raise ValueError(f"robot.controller={controller!r}: no such controller config file")
        elif controller not in ch["controller"]:
            raise ValueError(
                f"robot.controller={controller!r} is not a robosuite composite controller; choose one "
                f"of: {', '.join(ch['controller'])}, a path to a .json config, or None for the "
                f"robot's default"
            )


def _part_names(part_name: str, ctrl: Any, dim: int, is_gripper: bool) -> list[str]:
    """Human names for one part controller's slice of the action vector."""
    if is_gripper:
        return ["gripper"] if dim == 1 else [f"gripper_{i}" for i in range(dim)]
    cname = getattr(ctrl, "name", "")
    delta = getattr(ctrl, "input_type", "delta") == "delta"
    fixed = getattr(ctrl, "impedance_mode", "fixed") == "fixed"
    if cname.startswith("OSC_") and fixed:
        pos = ["dx", "dy", "dz"] if delta else ["x", "y", "z"]
        ori = ["dax", "day", "daz"] if delta else ["ax", "ay", "az"]
        if dim == 6:
            return pos + ori
        if dim == 3:
            return pos
    return [f"{part_name}_{i}" for i in range(dim)]


def _action_names(env) -> tuple[str, ...]:
    names: list[str] = []
    multi = len(env.robots) > 1
    for ri, robot in enumerate(env.robots):
        cc = robot.composite_controller
        parts = list(cc._action_split_indexes.items())
        multi_part = sum(1 for p, _ in parts if p not in cc.grippers) > 1  # bimanual: prefix the part name
        robot_names: list[str] = []
        for part, (a, b) in parts:
            is_grip = part in cc.grippers
            n = _part_names(part, cc.part_controllers.get(part), b - a, is_grip)
            if multi_part and not n[0].startswith(part):
                n = [f"{part}_{x}" for x in n]
            robot_names += n
        if len(robot_names) != robot.action_dim:  # controller we do not know how to name
            robot_names = [f"a{i}" for i in range(robot.action_dim)]
        names += [f"robot{ri}_{x}" for x in robot_names] if multi else robot_names
    if len(set(names)) != len(names):
        names = [f"a{i}" for i in range(len(names))]
    return tuple(names)


_SPEC_CACHE: dict[tuple, dict] = {}


class RobosuiteRobot(Robot):
    """A robosuite env (any task, any robot) driven one control step per `send_action`."""

    name = "robosuite"

    def __init__(
        self,
        env_name: str = "Lift",
        robots: str | list[str] = "Panda",
        control_freq: float = 20,
        horizon: int = 200,
        cameras: list[str] | tuple[str, ...] = (),
        camera_height: int = 84,
        camera_width: int = 84,
        controller: str | None = None,
        reward_shaping: bool = False,
        render_quality: str = "fast",
    ):
        self.env_name = env_name
        self.robots = [robots] if isinstance(robots, str) else list(robots)
        self.control_freq = float(control_freq)
        self.horizon = int(horizon)
        self.cameras = list(cameras or ())
        self.camera_height = int(camera_height)
        self.camera_width = int(camera_width)
        self.controller = controller
        self.reward_shaping = bool(reward_shaping)
        if render_quality not in RENDER_QUALITIES:
            raise ValueError(f"robot.render_quality={render_quality!r}; choose one of: {', '.join(RENDER_QUALITIES)}")
        self.render_quality = render_quality
        self._renderer = None
        self._render_model = None
        self.name = f"robosuite_{env_name}_{'_'.join(self.robots)}"
        _validate(env_name, self.robots, controller)

        self._env = None
        self._probe_env = None
        self._connected = False
        self._obs: Observation | None = None  # cached converted observation of the current state
        self._xml: str | None = None  # xml of the currently loaded model (for set_sim_state)
        self._low = self._high = None

    # ------------------------------------------------------------------------------------------- env building
    def _make_env(self):
        _import_robosuite()
        import robosuite as suite
        from robosuite.controllers import load_composite_controller_config

        controller_configs = None
        if self.controller is not None or len(self.robots) > 0:
            controller_configs = [
                load_composite_controller_config(controller=self.controller, robot=r) for r in self.robots
            ]
            if len(controller_configs) == 1:
                controller_configs = controller_configs[0]
        kw = dict(
            env_name=self.env_name,
            robots=self.robots if len(self.robots) > 1 else self.robots[0],
            controller_configs=controller_configs,
            has_renderer=False,
            has_offscreen_renderer=False,  # cameras are rendered by _render_cameras (current state, faster)
            use_camera_obs=False,
            ignore_done=True,
            horizon=self.horizon,
            control_freq=self.control_freq,
            reward_shaping=self.reward_shaping,
            hard_reset=False,  # reload-free resets: ~1 ms instead of ~1 s; determinism comes from seeding
        )
        kw.update(camera_names=[])
        # robosuite draws some model properties (e.g. Lift's cube size) from numpy's global RNG while building the
        # model: seed it so every process builds the same scene (seeded resets, replays and evals then agree).
        saved = np.random.get_state()
        try:
            np.random.seed(0)
            return suite.make(**kw)
        except Exception as e:  # robosuite errors for bad combos (e.g. TwoArm env with one arm) are obscure
            raise ValueError(
                f"robosuite could not build env_name={self.env_name!r} robots={self.robots!r} "
                f"controller={self.controller!r}: {e}"
            ) from e
        finally:
            np.random.set_state(saved)

    def _spec(self) -> dict:
        key = (self.env_name, tuple(self.robots), self.controller, self.control_freq)
        spec = _SPEC_CACHE.get(key)
        if spec is not None:
            return spec
        env = self._env
        if env is None:
            env = self._probe_env = self._make_env()
        obs = env._get_observations(force_update=True) if self._env is not None else env.reset()
        low, high = env.action_spec
        spec = {
            "lowdim": {
                k: tuple(np.shape(v))
                for k, v in obs.items()
                if not k.endswith(_IMAGE_SUFFIX) and not k.endswith("_depth") and not k.endswith("_segmentation")
            },
            "low": np.asarray(low, np.float32),
            "high": np.asarray(high, np.float32),
            "names": _action_names(env),
            "cameras": list(env.sim.model.camera_names),
        }
        _SPEC_CACHE[key] = spec
        return spec

    def _check_cameras(self, available: list[str]) -> None:
        for c in self.cameras:
            if c not in available:
                raise ValueError(
                    f"robot.cameras: {c!r} is not a camera of {self.env_name}; choose from: {', '.join(available)}"
                )

    # ---------------------------------------------------------------------------------------------- features
    @property
    def observation_features(self) -> dict[str, Feature]:
        spec = self._spec()
        feats = {k: Feature(shape=s, dtype="float32") for k, s in spec["lowdim"].items()}
        for c in self.cameras:
            feats[f"{c}{_IMAGE_SUFFIX}"] = Feature(shape=(self.camera_height, self.camera_width, 3), dtype="uint8")
        return feats

    @property
    def action_feature(self) -> Feature:
        spec = self._spec()
        return Feature(
            shape=(len(spec["low"]),),
            dtype="float32",
            names=spec["names"],
            low=spec["low"].copy(),
            high=spec["high"].copy(),
        )

    # -------------------------------------------------------------------------------------------- lifecycle
    @property
    def is_connected(self) -> bool:
        return self._connected

    @property
    def env(self):
        """The underlying robosuite env (None while disconnected)."""
        return self._env

    def connect(self) -> None:
        if self._connected:
            return
        if self.cameras:
            self._check_cameras(self._spec()["cameras"])
        if self._probe_env is not None:
            self._env, self._probe_env = self._probe_env, None
        else:
            self._env = self._make_env()
        spec = self._spec()
        self._low, self._high = spec["low"], spec["high"]
        self._lowdim_observables = [ob for ob in self._env._observables.values() if ob.modality != "image"]
        self._warm_up()
        self._connected = True
        self._xml = None
        self._obs = None

    def _warm_up(self) -> None:
        """One step with a zero action before any episode: robosuite's controllers JIT-compile with numba on their
        first step (~5 s on a fresh install, whose disk cache is empty), which must not land in a paced loop.
        Episodes start with `reset(seed)`, which restores the scene, so this step changes nothing."""
        self._env.reset()
        self._env.step(np.zeros(self._env.action_dim))

    def disconnect(self) -> None:
        for e in (self._env, self._probe_env):
            if e is not None:
                try:
                    e.close()
                except Exception:  # closing a half-built GL context must not mask the real error
                    log.debug("robosuite env close failed", exc_info=True)
        if self._renderer is not None:
            try:
                self._renderer.close()
            except Exception:  # noqa: BLE001
                log.debug("renderer close failed", exc_info=True)
        self._env = self._probe_env = self._renderer = self._render_model = None
        self._connected = False
        self._obs = None

    def _require(self):
        if not self._connected:
            raise RuntimeError(f"{self.name} is not connected; call connect() first")
        return self._env

    # ----------------------------------------------------------------------------------------- observations
    def _convert(self, raw: dict) -> Observation:
        out: Observation = {}
        lowdim = self._spec()["lowdim"]
        for k in lowdim:
            out[k] = np.asarray(raw[k], dtype=np.float32)
        if self.cameras:
            out.update(self._render_cameras())
        return out

    def _render_cameras(self) -> Observation:
        """Render every camera at the current simulator state with one mujoco.Renderer.

        "fast" turns off mirror reflections and multisampling: on a CPU-only machine (Mesa's software EGL) that
        renders two 96x96 cameras ~4x faster (about 17 ms instead of 75 ms here), enough for 30 Hz; "full" keeps
        robosuite's look."""
        import mujoco

        model, data = self._env.sim.model._model, self._env.sim.data._data
        if self._renderer is None or self._render_model is not model:  # first frame, or the model was reloaded
            if self._renderer is not None:
                self._renderer.close()
            if self.render_quality == "fast":
                model.vis.quality.offsamples = 0
            try:
                self._renderer = mujoco.Renderer(model, self.camera_height, self.camera_width)
            except Exception as e:
                raise RuntimeError(
                    f"cannot render cameras {self.cameras}: {e}. mujoco chose its GL backend "
                    f"(MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}) when it was first imported; set MUJOCO_GL=egl "
                    f"(GPU or Mesa: apt-get install libegl1) or osmesa (libosmesa6) before starting, or import "
                    f"robot_rl.sim.robosuite_robot before mujoco"
                ) from e
            self._render_model = model
        out: Observation = {}
        for c in self.cameras:
            self._renderer.update_scene(data, camera=c)
            if self.render_quality == "fast":
                self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
            out[f"{c}{_IMAGE_SUFFIX}"] = self._renderer.render().copy()
        return out

    def get_observation(self) -> Observation:
        env = self._require()
        if self._obs is None:
            self._obs = self._convert(env._get_observations(force_update=True))
        return dict(self._obs)

    def send_action(self, action: np.ndarray) -> np.ndarray:
        env = self._require()
        a = np.asarray(action, dtype=np.float32).reshape(-1)
        if a.shape != self._low.shape:
            raise ValueError(
                f"{self.name}: action has shape {a.shape}, expected {self._low.shape} "
                f"({', '.join(self._spec()['names'])})"
            )
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{self.name}: non-finite action {a}")
        a = np.clip(a, self._low, self._high)
        env.step(a.astype(np.float64))
        self._obs = self._convert(self._post_step_observation(env))
        return a

    def _post_step_observation(self, env) -> dict:
        # robosuite reads observables right after the last mj_step, whose kinematics (xpos, site poses) are those
        # of the state *before* that 2 ms integration step. One mj_forward (~20 us) makes the observation a
        # function of the simulator state, so that set_sim_state(get_sim_state()) reproduces it exactly; cameras
        # are rendered after it, so images show the same state.
        env.sim.forward()
        for ob in self._lowdim_observables:
            ob.update(timestep=env.model_timestep, obs_cache=env._obs_cache, force=True)
        return env._get_observations()

    def reset(self, seed: int | None = None) -> Observation:
        env = self._require()
        if seed is None:
            raw = env.reset()
        else:
            # robosuite's placement samplers and robot init noise draw from numpy's *global* RNG (and a few
            # things from env.rng): seed both, then put the global state back so we do not disturb anyone else.
            saved = np.random.get_state()
            try:
                np.random.seed(int(seed) % (2**32))
                env.rng = np.random.default_rng(int(seed))
                raw = env.reset()
            finally:
                np.random.set_state(saved)
        self._obs = self._convert(raw)
        return dict(self._obs)

    # -------------------------------------------------------------------------------------------- task info
    def is_success(self) -> bool:
        return bool(self._require()._check_success())

    def reward(self) -> float:
        """The env's reward for the current state (sparse unless built with reward_shaping=True)."""
        return float(self._require().reward(None))

    # ------------------------------------------------------------------------------------------- sim state
    def get_sim_state(self) -> dict:
        """robomimic convention: the model XML and the flattened MuJoCo state (time, qpos, qvel, ...)."""
        env = self._require()
        if self._xml is None:
            self._xml = env.sim.model.get_xml()
        return {"model_xml": self._xml, "states": np.asarray(env.sim.get_state().flatten(), dtype=np.float64)}

    def set_sim_state(self, state: dict) -> Observation:
        """Restore a state from `get_sim_state` (reloading the model only if its XML differs) and return the
        observation there."""
        env = self._require()
        xml = state.get("model_xml")
        if xml is not None:
            if self._xml is None:
                self._xml = env.sim.model.get_xml()
            if xml != self._xml:
                env.reset_from_xml_string(xml)
                self._xml = env.sim.model.get_xml() if xml is None else xml
        env.sim.reset()  # as robomimic: clears solver warm-start, ctrl, act... so a restore is a clean start
        env.sim.set_state_from_flattened(np.asarray(state["states"], dtype=np.float64))
        env.sim.forward()
        # controllers keep goals/filters from before the restore: rebuild them at the restored pose exactly as
        # robosuite's own reset does (Robot.reset -> _load_controller)
        for robot in env.robots:
            robot._load_controller()
            for arm in robot.arms:
                if robot.has_gripper[arm]:
                    robot.gripper[arm].current_action = np.zeros(robot.gripper[arm].dof)
            robot.composite_controller.reset()
        self._obs = self._convert(env._get_observations(force_update=True))
        return dict(self._obs)

    def __repr__(self) -> str:
        return (
            f"RobosuiteRobot(env_name={self.env_name!r}, robots={self.robots!r}, cameras={self.cameras!r}, "
            f"connected={self._connected})"
        )
