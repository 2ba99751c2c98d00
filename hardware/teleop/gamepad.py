"""Gamepad teleop (Xbox, PlayStation, generic) through evdev."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np


from .base import DEVICE_ACTIONS, _deadzone
from .controls import EpisodeControls
from .evdev_device import _ecodes, _EvdevTeleop, _parse_axis_spec

log = logging.getLogger(__name__)


class GamepadTeleop(_EvdevTeleop):
    """End-effector delta teleop from a gamepad (Xbox, PlayStation, generic) through evdev.

    Default mapping (Linux names; Xbox / PlayStation with the xpad / hid-playstation drivers)::

        left stick up/down     +x / -x      axes["x"] = "-ABS_Y"
        left stick left/right  +y / -y      axes["y"] = "-ABS_X"
        right stick up/down    +z / -z      axes["z"] = "-ABS_RY"
        right trigger / RB     close gripper  (triggers["ABS_RZ"], buttons["BTN_TR"])
        left trigger / LB      open gripper   (triggers["ABS_Z"],  buttons["BTN_TL"])
        A / cross              save episode      (BTN_SOUTH)
        B / circle             re-record episode (BTN_EAST)
        Back / Select / Share  stop recording    (BTN_SELECT)
        Start / Options        latch takeover on/off (BTN_START)
        Y / triangle           the task is solved, "success" (BTN_NORTH)

    Override with `axes` ({"x"|"y"|"z": "[-]ABS_..."}), `triggers` ({"ABS_...": action}) and `buttons`
    ({"BTN_...": action}); entries merge with the defaults, a null value removes one. Actions: save, rerecord,
    stop, success, gripper_open, gripper_close, gripper_toggle, takeover. Stick values are normalized to [-1, 1]
    from the device's axis ranges, `deadzone` is applied (and the rest rescaled), then scaled by `speed` (action
    units). `intervening` is True while any stick is outside the deadzone, a trigger is pressed, any button is held
    (except one bound to "success": marking success is not a takeover), or the takeover latch is on. Device:
    `device_path`, else the first device whose name contains `device_name`, else the first input device with X/Y
    absolute axes and gamepad/joystick buttons (touchpads excluded).
    """

    name = "gamepad"
    kind = "gamepad"
    udev_rule = (
        'KERNEL=="event*", SUBSYSTEM=="input", ENV{ID_INPUT_JOYSTICK}=="1", MODE="0660", GROUP="input", TAG+="uaccess"'
    )
    default_axes = {"x": "-ABS_Y", "y": "-ABS_X", "z": "-ABS_RY"}
    default_triggers = {"ABS_RZ": "gripper_close", "ABS_Z": "gripper_open"}
    default_buttons = {
        "BTN_TR": "gripper_close",
        "BTN_TL": "gripper_open",
        "BTN_SOUTH": "save",
        "BTN_EAST": "rerecord",
        "BTN_SELECT": "stop",
        "BTN_START": "takeover",
        "BTN_NORTH": "success",
    }
    STICK_AXES = ("ABS_X", "ABS_Y", "ABS_RX", "ABS_RY")
    DEFAULT_STICK_RANGE = (-32768, 32767)
    DEFAULT_TRIGGER_RANGE = (0, 255)

    def __init__(
        self,
        device_path: str | None = None,
        device_name: str | None = None,
        speed: float = 0.5,
        deadzone: float = 0.15,
        axes: Mapping[str, str | None] | None = None,
        triggers: Mapping[str, str | None] | None = None,
        buttons: Mapping[str, str | None] | None = None,
        trigger_threshold: float = 0.5,
        axis_ranges: Mapping[str, Any] | None = None,
        action_dim: int = 7,
        gripper_index: int | None = -1,
        controls: EpisodeControls | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__(
            device_path=device_path,
            device_name=device_name,
            buttons=buttons,
            deadzone=deadzone,
            action_dim=action_dim,
            gripper_index=gripper_index,
            controls=controls,
            clock=clock,
        )
        self.speed, self.trigger_threshold = float(speed), float(trigger_threshold)
        self.axes = {k: v for k, v in {**self.default_axes, **dict(axes or {})}.items() if v}
        unknown = set(self.axes) - {"x", "y", "z"}
        if unknown:
            raise ValueError(f"gamepad axes: unknown entries {sorted(unknown)}; the keys are x, y, z")
        self._axis_codes: list[tuple[int, float] | None] = []
        for k in ("x", "y", "z"):
            if k in self.axes:
                nm, sign = _parse_axis_spec(self.axes[k])
                self._axis_codes.append((self._code(nm, "ABS_"), sign))
            else:
                self._axis_codes.append(None)
        self.triggers = {k: v for k, v in {**self.default_triggers, **dict(triggers or {})}.items() if v}
        for k, v in self.triggers.items():
            if v not in DEVICE_ACTIONS:
                raise ValueError(
                    f"gamepad trigger {k} -> {v!r}: unknown action; choose one of: {', '.join(DEVICE_ACTIONS)}"
                )
        self._trigger_actions = {self._code(k, "ABS_"): v for k, v in self.triggers.items()}
        self._stick_codes = {self._code(n, "ABS_") for n in self.STICK_AXES} | {c[0] for c in self._axis_codes if c}
        self._stick_codes -= set(self._trigger_actions)
        self._ranges: dict[int, tuple[float, float]] = {}
        for k, v in dict(axis_ranges or {}).items():
            lo, hi = v
            self._ranges[self._code(k, "ABS_")] = (float(lo), float(hi))
        self._triggers_down: set[int] = set()

    # ----------------------------------------------------------------------------------------- pure mapping
    def _normalize(self, code: int, raw: float) -> float:
        """Raw axis value -> [-1, 1] (sticks) or [0, 1] (triggers), from the device's axis range."""
        is_trigger = code in self._trigger_actions
        lo, hi = self._ranges.get(code, self.DEFAULT_TRIGGER_RANGE if is_trigger else self.DEFAULT_STICK_RANGE)
        if hi <= lo:
            return 0.0
        if is_trigger:
            return float(np.clip((raw - lo) / (hi - lo), 0.0, 1.0))
        return float(np.clip((raw - (lo + hi) / 2.0) / ((hi - lo) / 2.0), -1.0, 1.0))

    def _action_from_state(self, axes: Mapping[int, float], gripper: float) -> np.ndarray:
        """Action from normalized axis values (by event code) and the gripper state."""
        v = []
        for c in self._axis_codes:
            if c is None:
                v.append(0.0)
                continue
            code, sign = c
            v.append(sign * _deadzone(float(axes.get(code, 0.0)), self.deadzone) * self.speed)
        return self._finish(v, gripper)

    def _intervening_from_state(self, axes: Mapping[int, float], buttons_held, latched: bool) -> bool:
        if latched or buttons_held:
            return True
        for code, val in axes.items():
            if code in self._trigger_actions:
                if val > self.trigger_threshold:
                    return True
            elif code in self._stick_codes and abs(val) > self.deadzone:
                return True
        return False

    # ----------------------------------------------------------------------------------------- events
    def _on_axis(self, etype: int, code: int, value: int) -> None:
        ec = _ecodes()
        if etype != ec.EV_ABS:
            return
        v = self._normalize(code, value)
        self._axes[code] = v
        action = self._trigger_actions.get(code)
        if action:
            if v > self.trigger_threshold and code not in self._triggers_down:
                self._triggers_down.add(code)
                self._dispatch(action)
            elif v < self.trigger_threshold * 0.8:  # a little hysteresis against chatter
                self._triggers_down.discard(code)

    def _matches(self, dev, caps) -> bool:
        ec = _ecodes()
        abs_codes = set(caps.get(ec.EV_ABS, []))
        keys = set(caps.get(ec.EV_KEY, []))
        pad_buttons = any(0x120 <= k < 0x140 for k in keys)  # BTN_JOYSTICK.. / BTN_GAMEPAD.. ranges
        touch = ec.BTN_TOUCH in keys or ec.ABS_MT_POSITION_X in abs_codes
        return ec.ABS_X in abs_codes and ec.ABS_Y in abs_codes and pad_buttons and not touch

    def _setup_from_device(self, dev) -> None:
        ec = _ecodes()
        caps = dev.capabilities(absinfo=True)
        present = {}
        for code, info in caps.get(ec.EV_ABS, []):
            present[code] = info
        for code, info in present.items():
            self._ranges[code] = (float(info.min), float(info.max))
        with self._lock:
            for code, info in present.items():
                self._axes[code] = self._normalize(code, info.value)
        for k, c in zip(("x", "y", "z"), self._axis_codes):
            if c is not None and c[0] not in present:
                log.warning(
                    "gamepad: %s has no axis %s, so %s stays 0 (override `axes`; `python -m evdev.evtest` "
                    "lists its axes)",
                    dev.name,
                    self.axes[k],
                    k,
                )
        for code, action in self._trigger_actions.items():
            if code not in present:
                log.info(
                    "gamepad: %s has no trigger axis %s (%s); use the shoulder buttons",
                    dev.name,
                    ec.ABS.get(code, code),
                    action,
                )
