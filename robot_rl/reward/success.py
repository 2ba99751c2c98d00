"""Where the control process gets its sparse success reward each tick.

In sim the env knows (`robot.is_success()`); on hardware nothing does, so the reward comes from the operator (a
"success" key on the teleop device) or from an image classifier trained on labelled frames (HIL-SERL's recipe:
probability above a high threshold, optionally for a few consecutive ticks and only where a proprio gate agrees,
e.g. the end effector is high enough for "lifted").

    detector = make_success_detector(cfg.get("reward"), robot, teleop)
    detector.reset()                       # episode start
    success = detector(obs, robot)         # every tick; detector.last_probability for telemetry

cfg (a dict or DictConfig; None = sim)::

    source: sim | operator | classifier
    classifier: outputs/.../classifier.safetensors   # classifier: the file or its run directory
    threshold: null        # classifier: null = the threshold stored with the classifier (0.85 by default)
    consecutive: 1         # classifier: ticks in a row above threshold (and inside the gate) to count
    gate: {key: robot0_eef_pos, index: 2, min: 0.84, max: null}   # classifier: optional proprio check
    device: cpu            # classifier: where it runs
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import numpy as np

from robot_rl.config import ConfigError
from robot_rl.interfaces import Robot

log = logging.getLogger("robot_rl.reward.success")

SOURCES = ("sim", "operator", "classifier")
CONFIG_KEYS = ("source", "classifier", "threshold", "consecutive", "gate", "device")
GATE_KEYS = ("key", "index", "min", "max")


class SuccessDetector:
    """Decides each tick whether the task is solved (the sparse reward). Subclasses implement `__call__`."""

    last_probability: float | None = None  # the classifier's last P(success), for telemetry; None otherwise

    def reset(self) -> None:
        """Episode start: forget anything carried over from the previous episode."""
        self.last_probability = None

    def __call__(self, obs: Mapping[str, Any], robot: Robot) -> bool:
        raise NotImplementedError


class SimSuccess(SuccessDetector):
    """The simulator's own check (a real robot's `is_success()` is False unless its driver implements one)."""

    def __call__(self, obs: Mapping[str, Any], robot: Robot) -> bool:
        return bool(robot.is_success())


class OperatorSuccess(SuccessDetector):
    """True from the tick the operator presses the success key until the episode ends.

    Takes only "success" events out of the device's `EpisodeControls` (`take`), so save / rerecord / stop stay
    queued for whoever handles them. A press before `reset()` (between episodes) is dropped, not credited to the
    next episode."""

    def __init__(self, controls):
        if not callable(getattr(controls, "take", None)):
            raise TypeError(
                f"OperatorSuccess needs an EpisodeControls (with take(event)), got {type(controls).__name__}"
            )
        self.controls = controls
        self._pressed = False

    def reset(self) -> None:
        super().reset()
        self.controls.take("success")
        self._pressed = False

    def __call__(self, obs: Mapping[str, Any], robot: Robot) -> bool:
        if not self._pressed and self.controls.take("success"):
            self._pressed = True
            log.info("operator marked success")
        return self._pressed


def check_gate(gate: Mapping[str, Any] | None) -> dict | None:
    """Validate a proprio gate `{key, index, min, max}`; returns it normalised (or None). Raises ValueError."""
    if gate is None:
        return None
    gate = dict(gate)
    unknown = set(gate) - set(GATE_KEYS)
    if unknown:
        raise ValueError(f"gate: unknown entries {sorted(unknown)}; known: {', '.join(GATE_KEYS)}")
    if not gate.get("key"):
        raise ValueError("gate needs `key`, the observation to check (e.g. robot0_eef_pos)")
    lo, hi = gate.get("min"), gate.get("max")
    if lo is None and hi is None:
        raise ValueError("gate needs `min` and/or `max` (null = unbounded on that side)")
    for name, v in (("min", lo), ("max", hi)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ValueError(f"gate.{name} must be a number or null, got {v!r}")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"gate.min ({lo}) is above gate.max ({hi}): nothing would pass")
    index = gate.get("index")
    if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
        raise ValueError(f"gate.index must be an integer or null (a scalar observation), got {index!r}")
    return {
        "key": str(gate["key"]),
        "index": index,
        "min": None if lo is None else float(lo),
        "max": None if hi is None else float(hi),
    }


class ClassifierSuccess(SuccessDetector):
    """Success when the classifier's probability is >= `threshold` for `consecutive` ticks in a row, each inside
    the optional proprio `gate` (HIL-SERL: classifier AND end effector above a height). `classifier` is anything
    with `predict_proba(obs) -> float` (a `SuccessClassifier`). The probability is computed every tick, gate or
    not, so `last_probability` is always current and the tick cost constant."""

    def __init__(
        self, classifier, threshold: float = 0.85, consecutive: int = 1, gate: Mapping[str, Any] | None = None
    ):
        if not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if isinstance(consecutive, bool) or int(consecutive) != consecutive or int(consecutive) < 1:
            raise ValueError(f"consecutive must be a positive integer, got {consecutive!r}")
        self.classifier = classifier
        self.threshold = float(threshold)
        self.consecutive = int(consecutive)
        self.gate = check_gate(gate)
        self.streak = 0  # consecutive ticks above threshold and inside the gate
        self.last_gate_ok: bool | None = None

    def reset(self) -> None:
        super().reset()
        self.streak = 0
        self.last_gate_ok = None

    def gate_ok(self, obs: Mapping[str, Any]) -> bool:
        if self.gate is None:
            return True
        g = self.gate
        if g["key"] not in obs:
            raise KeyError(f"success gate: observation has no {g['key']!r}; it has {sorted(obs)}")
        v = np.asarray(obs[g["key"]], dtype=np.float64).reshape(-1)
        if g["index"] is None:
            if v.size != 1:
                raise ValueError(f"success gate: {g['key']!r} has {v.size} entries; set gate.index")
            x = float(v[0])
        else:
            x = float(v[g["index"]])
        return (g["min"] is None or x >= g["min"]) and (g["max"] is None or x <= g["max"])

    def __call__(self, obs: Mapping[str, Any], robot: Robot | None = None) -> bool:
        p = float(self.classifier.predict_proba(obs))
        self.last_probability = p
        self.last_gate_ok = self.gate_ok(obs)
        self.streak = self.streak + 1 if (p >= self.threshold and self.last_gate_ok) else 0
        return self.streak >= self.consecutive


# ================================================================================================== factory
def _plain(cfg) -> dict:
    from omegaconf import DictConfig, OmegaConf

    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def _has_success_check(robot: Robot) -> bool:
    """Whether `is_success()` can ever be True: the robot (or, for a lerobot wrapper, the wrapped driver)
    implements it rather than inheriting the interface's always-False default."""
    if type(robot).is_success is Robot.is_success:
        return False
    inner = getattr(robot, "robot", None)  # LeRobotRobot forwards to its lerobot Robot's is_success, if any
    return inner is None or callable(getattr(inner, "is_success", None))


def _check_classifier_inputs(classifier, robot: Robot, name: str) -> None:
    """The robot must produce what the classifier was trained on (keys and image sizes), checked before the loop."""
    try:
        feats = robot.observation_features
    except Exception:  # noqa: BLE001 - a robot that cannot describe itself before connect: checked per tick instead
        return
    for k, shape in getattr(classifier, "image_shapes", {}).items():
        if k not in feats:
            raise ConfigError(
                f"{name}.classifier was trained on camera {k!r}, which this robot does not produce "
                f"(its observations: {', '.join(sorted(feats))}); enable that camera or retrain"
            )
        if tuple(feats[k].shape) != tuple(shape):
            raise ConfigError(
                f"{name}.classifier was trained on {k!r} at {tuple(shape)} (H, W, C), the robot "
                f"produces {tuple(feats[k].shape)}: set the camera resolution to match or retrain"
            )
    for k in getattr(classifier, "lowdim_dims", {}):
        if k not in feats:
            raise ConfigError(
                f"{name}.classifier uses {k!r}, which this robot does not produce "
                f"(its observations: {', '.join(sorted(feats))})"
            )


def make_success_detector(
    cfg: Mapping[str, Any] | None, robot: Robot, teleop=None, *, name: str = "reward"
) -> SuccessDetector:
    """Build the configured success source (see the module docstring); `name` is the config path used in error
    messages. Every mistake is a `ConfigError` saying what to set."""
    c = _plain(cfg)
    unknown = set(c) - set(CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"{name}: unknown entries {sorted(unknown)}; known: {', '.join(CONFIG_KEYS)}")
    source = c.get("source") or "sim"
    if source not in SOURCES:
        raise ConfigError(f"{name}.source={source!r}; choose one of: {', '.join(SOURCES)}")
    if source == "sim":
        if not _has_success_check(robot):
            log.warning(
                "%s.source=sim but %s has no success check (is_success() is always False): the reward "
                "will be 0; use %s.source=operator or classifier on hardware",
                name,
                type(robot).__name__,
                name,
            )
        return SimSuccess()
    if source == "operator":
        controls = getattr(teleop, "controls", None)
        if controls is None or not callable(getattr(controls, "take", None)):
            what = "no teleop" if teleop is None else f"the teleop {type(teleop).__name__}, which has no episode keys"
            raise ConfigError(
                f"{name}.source=operator needs a teleop device with a success key (teleop=keyboard: "
                f"'y'; teleop=gamepad: Y/triangle), but this session has {what}. Choose such a "
                f"teleop, or use {name}.source=classifier (a trained success classifier)"
            )
        return OperatorSuccess(controls)
    # classifier
    path = c.get("classifier")
    if not path:
        raise ConfigError(
            f"{name}.source=classifier needs {name}.classifier: the classifier.safetensors (or run "
            f"directory) written by robot-rl train-classifier"
        )
    from robot_rl.reward.classifier import load_classifier

    try:
        classifier = load_classifier(path, device=c.get("device") or "cpu")
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{name}.classifier: {e}") from None
    _check_classifier_inputs(classifier, robot, name)
    threshold = c.get("threshold")
    threshold = classifier.threshold if threshold is None else threshold
    consecutive = c.get("consecutive")
    try:
        detector = ClassifierSuccess(
            classifier, threshold=threshold, consecutive=1 if consecutive is None else consecutive, gate=c.get("gate")
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}: {e}") from None
    if detector.gate is not None:
        try:
            feats = robot.observation_features
        except Exception:  # noqa: BLE001 - checked per tick instead
            feats = None
        if feats is not None:
            g = detector.gate
            if g["key"] not in feats:
                raise ConfigError(
                    f"{name}.gate.key={g['key']!r} is not an observation of this robot; it has: "
                    f"{', '.join(sorted(feats))}"
                )
            size = int(np.prod(feats[g["key"]].shape, dtype=np.int64))
            if (g["index"] is None and size != 1) or (g["index"] is not None and not -size <= g["index"] < size):
                raise ConfigError(
                    f"{name}.gate.index={g['index']!r} does not fit {g['key']!r}, which has {size} "
                    f"entries (null only for a single value)"
                )
    log.info(
        "success from classifier %s: p >= %.2f for %d tick(s)%s",
        path,
        detector.threshold,
        detector.consecutive,
        f", gate {detector.gate}" if detector.gate else "",
    )
    return detector
