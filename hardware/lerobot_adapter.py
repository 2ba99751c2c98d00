"""Any lerobot `Robot` / `Teleoperator` (SO-100/101, Koch, leader arms, gamepad, our `robot_rl_sim`, ...) behind
robot_rl's `Robot` / `Teleop` interfaces.

Mapping: lerobot's scalar float features (`"shoulder_pan.pos": float`, ...) become one float32 vector `state`
whose entry names are lerobot's keys in lerobot's order; image features (`"front": (H, W, 3)`) keep their key;
depth maps (`"front_depth": (H, W, 1)`, lerobot >= 0.6 cameras with `use_depth=True`) keep their key as uint16
millimetres (never squeezed into uint8); other array features keep their key as float32. The action vector's entries are the `action_features` keys in
order, so `vector[i] <-> action_dict[names[i]]`.

lerobot robots do not publish action bounds: pass `action_low`/`action_high` (arrays or name→value dicts) to give
the safety filter real limits; without them the bounds are ±inf and the filter can only catch NaNs.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Mapping
from typing import Any

import numpy as np

from robot_rl.interfaces import Feature, Observation, Robot, Teleop

log = logging.getLogger(__name__)

STATE_KEY = "state"

_OPEN_HELP = (
    "Check that the device is plugged in and powered, that the port / id / camera indices in its config are right "
    "(`lerobot-find-port`, `lerobot-find-cameras`), that no other process holds it, and that you may open it "
    "(on Linux: add your user to the `dialout` group for serial ports, or fix udev rules). If it asks for "
    "calibration, run `lerobot-calibrate` first."
)


# ---------------------------------------------------------------------------------------------- feature mapping
def _is_scalar(v: Any) -> bool:
    return v in (float, int) or v == "float" or v == "float32" or v == "float64"


def _vector_names(features: Mapping[str, Any]) -> list[str]:
    """Names of the scalar entries of a lerobot feature dict, in lerobot's order.

    Handles both conventions lerobot uses: `{"name": float, ...}` and the gym-style
    `{"dtype": ..., "shape": (n,), "names": {"delta_x": 0, ...} | {"motors": [...]} | [...]}` (gamepad, keyboard)."""
    if "shape" in features and "names" in features and "dtype" in features:
        names = features["names"]
        if isinstance(names, Mapping):
            vals = list(names.values())
            if vals and all(isinstance(v, int) for v in vals):
                return [k for k, _ in sorted(names.items(), key=lambda kv: kv[1])]
            flat: list[str] = []
            for v in vals:
                flat += list(v) if isinstance(v, (list, tuple)) else [str(v)]
            return flat
        return list(names)
    return [k for k, v in features.items() if _is_scalar(v)]


def _bounds(spec, names: list[str], default: float, which: str) -> np.ndarray:
    if spec is None:
        return np.full(len(names), default, dtype=np.float32)
    if isinstance(spec, Mapping):
        unknown = set(spec) - set(names)
        if unknown:
            raise ValueError(f"{which}: unknown action names {sorted(unknown)}; action names are {names}")
        return np.array([spec.get(n, default) for n in names], dtype=np.float32)
    arr = np.broadcast_to(np.asarray(spec, dtype=np.float32), (len(names),)).copy()
    return arr


def _import_registered(package) -> None:
    """lerobot registers a device's config class only when its subpackage is imported: import them all (skipping
    ones whose optional SDKs are missing) plus installed third-party `lerobot_*` plugins and our own plugin."""
    for m in pkgutil.iter_modules(package.__path__):
        if m.ispkg:
            try:
                importlib.import_module(f"{package.__name__}.{m.name}")
            except Exception as e:  # optional hardware SDK not installed
                log.debug("skipping %s.%s: %s", package.__name__, m.name, e)
    try:
        from lerobot.utils.import_utils import register_third_party_plugins

        register_third_party_plugins()
    except Exception as e:
        log.debug("third-party lerobot plugins not registered: %s", e)


def _build_config(base, kind: str, type: str, config_kwargs: dict):
    try:
        cls = base.get_choice_class(type)
    except KeyError:
        if kind == "robot":
            import robot_rl.sim.lerobot_plugin  # noqa: F401  (registers robot_rl_sim)
        _import_registered(importlib.import_module(base.__module__.rsplit(".", 1)[0]))
        try:
            cls = base.get_choice_class(type)
        except KeyError:
            raise ValueError(
                f"{kind}.type={type!r} is not a registered lerobot {kind}; choose one of: "
                f"{', '.join(sorted(base.get_known_choices()))}"
            ) from None
    import draccus

    try:  # draccus decodes nested dicts (cameras={"front": {"type": "opencv", ...}}) and str paths
        return draccus.decode(cls, dict(config_kwargs))
    except Exception:
        return cls(**config_kwargs)


def make_lerobot_robot(type: str, **config_kwargs):
    """A lerobot Robot from its registered type name and config fields, via lerobot's own factory."""
    from lerobot.robots import RobotConfig, make_robot_from_config

    return _instantiate(make_robot_from_config, _build_config(RobotConfig, "robot", type, config_kwargs), type)


def make_lerobot_teleop(type: str, **config_kwargs):
    """A lerobot Teleoperator from its registered type name and config fields."""
    from lerobot.teleoperators import TeleoperatorConfig, make_teleoperator_from_config

    cfg = _build_config(TeleoperatorConfig, "teleop", type, config_kwargs)
    return _instantiate(make_teleoperator_from_config, cfg, type)


def _instantiate(factory, cfg, type: str):
    try:
        return factory(cfg)
    except ImportError as e:  # lerobot's device SDKs are optional extras
        missing = getattr(e, "name", None) or str(e)
        raise ImportError(
            f"lerobot device {type!r} needs the optional package {missing!r}: install lerobot's "
            f"extra for this hardware, e.g. `pip install 'lerobot[feetech]'` (SO-100/101), "
            f"'lerobot[dynamixel]' (Koch, OMX), 'lerobot[gamepad]' or 'lerobot[intelrealsense]'"
        ) from e


def _open(device, what: str, calibrate: bool) -> None:
    try:
        device.connect(calibrate=calibrate)
    except Exception as e:
        if type(e).__name__ == "DeviceAlreadyConnectedError":
            return
        raise ConnectionError(
            f"could not open lerobot {what} {device!s} ({type(device).__name__}): {type(e).__name__}: {e}. {_OPEN_HELP}"
        ) from e


# ------------------------------------------------------------------------------------------------------- robot
class LeRobotRobot(Robot):
    """Drives any lerobot `Robot` through robot_rl's `Robot` interface."""

    def __init__(self, robot, action_low=None, action_high=None, calibrate: bool = True):
        self.robot = robot
        self.name = f"lerobot_{getattr(robot, 'name', type(robot).__name__)}"
        self.calibrate = calibrate
        self._last_frames: dict[str, np.ndarray] = {}
        self._dropped = 0
        obs_feats = dict(robot.observation_features)
        self.state_names = [k for k, v in obs_feats.items() if _is_scalar(v)]
        self.depth_keys = [
            k
            for k, v in obs_feats.items()
            if k.endswith("_depth") and isinstance(v, tuple) and len(v) == 3 and v[-1] == 1
        ]
        self.image_keys = [
            k
            for k, v in obs_feats.items()
            if k not in self.depth_keys and isinstance(v, tuple) and len(v) == 3 and v[-1] in (1, 3, 4)
        ]
        self.array_keys = {
            k: tuple(v)
            for k, v in obs_feats.items()
            if isinstance(v, tuple) and k not in self.image_keys and k not in self.depth_keys
        }
        self.action_names = _vector_names(robot.action_features)
        if not self.action_names:
            raise ValueError(f"{self.name}: no scalar action features in {robot.action_features!r}")
        if action_low is None or action_high is None:
            log.warning(
                "%s: no action bounds given (lerobot robots do not publish them): bounds are ±inf, so the "
                "safety filter can only catch NaNs. Pass action_low/action_high.",
                self.name,
            )
        self._low = _bounds(action_low, self.action_names, -np.inf, "action_low")
        self._high = _bounds(action_high, self.action_names, np.inf, "action_high")
        if np.any(self._low > self._high):
            raise ValueError(
                f"{self.name}: action_low > action_high for "
                f"{[n for n, lo, hi in zip(self.action_names, self._low, self._high) if lo > hi]}"
            )

    @classmethod
    def from_type(cls, type: str, action_low=None, action_high=None, calibrate: bool = True, **config_kwargs):
        return cls(
            make_lerobot_robot(type, **config_kwargs),
            action_low=action_low,
            action_high=action_high,
            calibrate=calibrate,
        )

    @property
    def observation_features(self) -> dict[str, Feature]:
        feats: dict[str, Feature] = {}
        if self.state_names:
            feats[STATE_KEY] = Feature(shape=(len(self.state_names),), dtype="float32", names=tuple(self.state_names))
        for k in self.image_keys:
            feats[k] = Feature(shape=tuple(self.robot.observation_features[k]), dtype="uint8")
        for k in self.depth_keys:
            feats[k] = Feature(shape=tuple(self.robot.observation_features[k]), dtype="uint16")
        for k, shape in self.array_keys.items():
            feats[k] = Feature(shape=shape, dtype="float32")
        return feats

    @property
    def action_feature(self) -> Feature:
        return Feature(
            shape=(len(self.action_names),),
            dtype="float32",
            names=tuple(self.action_names),
            low=self._low.copy(),
            high=self._high.copy(),
        )

    @property
    def is_connected(self) -> bool:
        return bool(self.robot.is_connected)

    def connect(self) -> None:
        if not self.is_connected:
            _open(self.robot, "robot", self.calibrate)

    def disconnect(self) -> None:
        if self.is_connected:
            self.robot.disconnect()

    def get_observation(self) -> Observation:
        raw = self.robot.get_observation()
        out: Observation = {}
        if self.state_names:
            out[STATE_KEY] = np.array([raw[k] for k in self.state_names], dtype=np.float32)
        for k in self.image_keys:
            out[k] = np.asarray(raw[k], dtype=np.uint8)
            self._count_stale(k, out[k])
        for k in self.depth_keys:
            out[k] = np.asarray(raw[k], dtype=np.uint16)
        for k in self.array_keys:
            out[k] = np.asarray(raw[k], dtype=np.float32)
        return out

    def _count_stale(self, key: str, frame: np.ndarray) -> None:
        """A camera frame bit-identical to the previous tick's is a stale buffer, i.e. a dropped frame: sensor
        noise makes two real consecutive frames differ. (A perfectly static *simulated* camera would be counted
        too, so the count is meaningful for hardware cameras.)"""
        last = self._last_frames.get(key)
        if last is not None and last.shape == frame.shape and np.array_equal(last, frame):
            self._dropped += 1
        self._last_frames[key] = frame

    @property
    def dropped_frames(self) -> int:
        """Camera frames that were not new when read, since connect (all cameras)."""
        return self._dropped

    def send_action(self, action: np.ndarray) -> np.ndarray:
        a = np.asarray(action, dtype=np.float32).reshape(-1)
        if a.shape[0] != len(self.action_names):
            raise ValueError(
                f"{self.name}: action has {a.shape[0]} entries, expected {len(self.action_names)} "
                f"({', '.join(self.action_names)})"
            )
        a = np.clip(a, self._low, self._high)
        sent = self.robot.send_action({n: float(x) for n, x in zip(self.action_names, a)})
        if sent is None:
            return a
        return np.array([float(sent.get(n, x)) for n, x in zip(self.action_names, a)], dtype=np.float32)

    # Sim robots offered through lerobot (our plugin) expose these; hardware falls back to the defaults.
    def reset(self, seed: int | None = None) -> Observation:
        if hasattr(self.robot, "reset"):
            self.robot.reset(seed=seed)
        return self.get_observation()

    def is_success(self) -> bool:
        fn = getattr(self.robot, "is_success", None)
        return bool(fn()) if callable(fn) else False


# ------------------------------------------------------------------------------------------------------ teleop
class LeRobotTeleop(Teleop):
    """Wraps any lerobot `Teleoperator`. `intervening` follows the device's `TeleopEvents.IS_INTERVENTION` when it
    reports events (gamepad, keyboard_ee); otherwise it is the constant given (True for a leader arm whose
    actions always drive the robot)."""

    def __init__(self, teleop, intervening: bool = False, calibrate: bool = True, action_low=None, action_high=None):
        self.teleop = teleop
        self.name = f"lerobot_{getattr(teleop, 'name', type(teleop).__name__)}"
        self.calibrate = calibrate
        self.action_names = _vector_names(teleop.action_features)
        if not self.action_names:
            raise ValueError(f"{self.name}: no scalar action features in {teleop.action_features!r}")
        self._low = _bounds(action_low, self.action_names, -np.inf, "action_low")
        self._high = _bounds(action_high, self.action_names, np.inf, "action_high")
        self._default_intervening = bool(intervening)
        self._intervening = bool(intervening)
        self.last_events: dict = {}

    @classmethod
    def from_type(cls, type: str, intervening: bool = False, calibrate: bool = True, **config_kwargs):
        return cls(make_lerobot_teleop(type, **config_kwargs), intervening=intervening, calibrate=calibrate)

    @property
    def action_feature(self) -> Feature:
        return Feature(
            shape=(len(self.action_names),),
            dtype="float32",
            names=tuple(self.action_names),
            low=self._low.copy(),
            high=self._high.copy(),
        )

    def connect(self) -> None:
        if not self.teleop.is_connected:
            _open(self.teleop, "teleoperator", self.calibrate)

    def disconnect(self) -> None:
        if self.teleop.is_connected:
            self.teleop.disconnect()

    def get_action(self, observation: Observation | None = None) -> np.ndarray:
        raw = self.teleop.get_action()
        events_fn = getattr(self.teleop, "get_teleop_events", None)
        if callable(events_fn):
            self.last_events = dict(events_fn() or {})
            flag = next((v for k, v in self.last_events.items() if getattr(k, "value", k) == "is_intervention"), None)
            self._intervening = self._default_intervening if flag is None else bool(flag)
        # devices such as keyboards only report the keys in use: absent entries are 0
        return np.array([float(raw.get(n, 0.0)) for n in self.action_names], dtype=np.float32)

    @property
    def intervening(self) -> bool:
        return self._intervening
