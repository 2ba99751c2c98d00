"""3Dconnexion SpaceMouse teleop (6-D) through evdev, without spacenavd."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np


from .base import _deadzone
from .controls import EpisodeControls
from .evdev_device import _ecodes, _EvdevTeleop, _parse_axis_spec

_SM_AXES = ("X", "Y", "Z", "RX", "RY", "RZ")  # REL_X..REL_RZ and ABS_X..ABS_RZ are both codes 0..5


class SpaceMouseTeleop(_EvdevTeleop):
    """6-D end-effector delta teleop from a 3Dconnexion SpaceMouse through evdev (no spacenavd needed).

    Mapping (device axes are X right, Y toward you, Z down, RX/RY/RZ the rotations about them; check the signs of
    your model with `python -m evdev.evtest`)::

        push away / pull     +x / -x   axes["x"]  = "-Y"        tilt about the forward axis  axes["rx"] = "-RY"
        push left / right    +y / -y   axes["y"]  = "-X"        tilt about the left axis     axes["ry"] = "-RX"
        lift / press down    +z / -z   axes["z"]  = "-Z"        twist                        axes["rz"] = "-RZ"
        button 0 (left)      toggle gripper   (buttons["BTN_0"] = gripper_toggle)
        button 1 (right)     save episode     (buttons["BTN_1"] = save)
        (no spare button for "success": to label successes rebind one, e.g. buttons={"BTN_1": "success"};
        episodes are then saved when they reach record.max_episode_steps)

    Values (EV_REL or EV_ABS, whichever the device reports) are divided by `max_value` (full deflection, ~350 on
    current models), the `deadzone` is applied (and the rest rescaled), then translation is scaled by `pos_scale`
    and rotation by `rot_scale` (action units). Override `axes` / `buttons` like the gamepad's (merge; null removes).
    `intervening` is True while any axis is outside the deadzone, a button is held, or a "takeover" button latched.
    Device: `device_path`, else the first device whose name contains `device_name`, else the first with vendor id
    0x256f (3Dconnexion) or 0x046d (Logitech) whose name mentions 3Dconnexion/SpaceMouse/SpaceNavigator and that
    has the 6 axes. If spacenavd is running it may grab the device: stop it (`sudo systemctl stop spacenavd`).
    """

    name = "spacemouse"
    kind = "3Dconnexion SpaceMouse"
    n_mapped = 6
    VENDORS = (0x256F, 0x046D)
    NAME_HINTS = ("3dconnexion", "spacemouse", "spacenavigator", "space navigator", "spacepilot", "spaceexplorer")
    udev_rule = (
        'KERNEL=="event*", SUBSYSTEM=="input", ATTRS{idVendor}=="256f", MODE="0660", GROUP="input", TAG+="uaccess"'
    )
    default_axes = {"x": "-Y", "y": "-X", "z": "-Z", "rx": "-RY", "ry": "-RX", "rz": "-RZ"}
    default_buttons = {"BTN_0": "gripper_toggle", "BTN_1": "save"}

    def __init__(
        self,
        device_path: str | None = None,
        device_name: str | None = None,
        pos_scale: float = 1.0,
        rot_scale: float = 1.0,
        deadzone: float = 0.05,
        max_value: float = 350.0,
        axes: Mapping[str, str | None] | None = None,
        buttons: Mapping[str, str | None] | None = None,
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
        if float(max_value) <= 0:
            raise ValueError(f"max_value must be > 0, got {max_value}")
        self.pos_scale, self.rot_scale, self.max_value = float(pos_scale), float(rot_scale), float(max_value)
        self.axes = {k: v for k, v in {**self.default_axes, **dict(axes or {})}.items() if v}
        unknown = set(self.axes) - {"x", "y", "z", "rx", "ry", "rz"}
        if unknown:
            raise ValueError(f"spacemouse axes: unknown entries {sorted(unknown)}; the keys are x, y, z, rx, ry, rz")
        self._axis_codes: list[tuple[int, float] | None] = []
        for k in ("x", "y", "z", "rx", "ry", "rz"):
            if k not in self.axes:
                self._axis_codes.append(None)
                continue
            nm, sign = _parse_axis_spec(self.axes[k])
            nm = nm.upper().removeprefix("REL_").removeprefix("ABS_")
            if nm not in _SM_AXES:
                raise ValueError(
                    f"spacemouse axes[{k!r}] = {self.axes[k]!r}: choose one of {', '.join(_SM_AXES)} "
                    f"(optionally with a leading '-')"
                )
            self._axis_codes.append((_SM_AXES.index(nm), sign))
        self._abs_ranges: dict[int, tuple[float, float]] = {}

    # ----------------------------------------------------------------------------------------- pure mapping
    def _normalize(self, etype: int, code: int, raw: float) -> float:
        ec = _ecodes()
        if etype == ec.EV_ABS and code in self._abs_ranges:
            lo, hi = self._abs_ranges[code]
            if hi > lo:
                return float(np.clip((raw - (lo + hi) / 2.0) / ((hi - lo) / 2.0), -1.0, 1.0))
        return float(np.clip(raw / self.max_value, -1.0, 1.0))

    def _action_from_state(self, axes: Mapping[int, float], gripper: float) -> np.ndarray:
        """Action from normalized axis values (index 0..5 = X, Y, Z, RX, RY, RZ) and the gripper state."""
        v = []
        for j, c in enumerate(self._axis_codes):
            if c is None:
                v.append(0.0)
                continue
            code, sign = c
            scale = self.pos_scale if j < 3 else self.rot_scale
            v.append(sign * _deadzone(float(axes.get(code, 0.0)), self.deadzone) * scale)
        return self._finish(v, gripper)

    def _intervening_from_state(self, axes: Mapping[int, float], buttons_held, latched: bool) -> bool:
        return bool(latched or buttons_held or any(abs(v) > self.deadzone for c, v in axes.items() if c < 6))

    # ----------------------------------------------------------------------------------------- events
    def _on_axis(self, etype: int, code: int, value: int) -> None:
        if 0 <= code < 6:
            self._axes[code] = self._normalize(etype, code, value)

    def _matches(self, dev, caps) -> bool:
        ec = _ecodes()
        six = set(range(6))
        has_axes = six <= set(caps.get(ec.EV_REL, [])) or six <= set(caps.get(ec.EV_ABS, []))
        named = any(h in str(dev.name).lower() for h in self.NAME_HINTS)
        vendor = dev.info.vendor
        return has_axes and ((vendor in self.VENDORS and named) or vendor == 0x256F)

    def _setup_from_device(self, dev) -> None:
        ec = _ecodes()
        caps = dev.capabilities(absinfo=True)
        with self._lock:
            for code, info in caps.get(ec.EV_ABS, []):
                if 0 <= code < 6:
                    self._abs_ranges[code] = (float(info.min), float(info.max))
                    self._axes[code] = self._normalize(ec.EV_ABS, code, info.value)
