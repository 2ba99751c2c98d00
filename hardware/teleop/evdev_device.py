"""Linux evdev input devices: finding, opening and reading one, with fixes spelled out when that fails."""

from __future__ import annotations

import glob
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping

import numpy as np

from robot_rl.interfaces import Observation

from .base import DEVICE_ACTIONS, DeviceUnavailableError, _DeviceTeleop, _SelectReader
from .controls import EpisodeControls

log = logging.getLogger(__name__)

INPUT_DIR = "/dev/input"  # where evdev devices are searched (tests point it elsewhere)


def _import_evdev():
    if not sys.platform.startswith("linux"):
        raise DeviceUnavailableError(
            f"evdev (Linux input devices) is not available on {sys.platform}: gamepad/spacemouse teleop here is "
            f"Linux-only. Use the keyboard teleop (teleop=keyboard, backend=pynput), or a lerobot gamepad teleop."
        )
    try:
        import evdev
        from evdev import ecodes  # noqa: F401
    except ImportError as e:
        raise DeviceUnavailableError(
            f"cannot import evdev ({e}): install it with `pip install evdev` (needs the "
            f"Linux kernel headers and a C compiler to build)"
        ) from None
    return evdev


def _ecodes():
    try:
        from evdev import ecodes
    except ImportError:
        return None
    return ecodes


def _event_index(path: str) -> int:
    m = re.search(r"(\d+)$", str(path))
    return int(m.group(1)) if m else 1 << 30


def _permission_help(paths: list[str], udev_rule: str) -> str:
    shown = ", ".join(paths[:6]) + (f" (+{len(paths) - 6} more)" if len(paths) > 6 else "")
    return (
        f"permission denied on {shown}. Reading input devices needs read access to /dev/input/event*: add your "
        f"user to the `input` group (`sudo usermod -aG input $USER`, then log out and back in), or add a udev "
        f"rule, e.g. in /etc/udev/rules.d/99-robot-rl-teleop.rules:\n    {udev_rule}\nthen `sudo udevadm control "
        f"--reload-rules && sudo udevadm trigger` and re-plug the device. In a container also pass the device "
        f"through (docker run --device /dev/input/eventN, or -v /dev/input:/dev/input "
        f"--device-cgroup-rule='c 13:* rmw')."
    )


class _EvdevTeleop(_DeviceTeleop):
    """Finds and opens one evdev input device, reads its events on a background thread into raw state."""

    kind = "input device"
    udev_rule = 'KERNEL=="event*", SUBSYSTEM=="input", MODE="0660", GROUP="input", TAG+="uaccess"'
    default_buttons: dict[str, str] = {}

    def __init__(
        self,
        device_path: str | None = None,
        device_name: str | None = None,
        buttons: Mapping[str, str | None] | None = None,
        deadzone: float = 0.1,
        action_dim: int = 7,
        gripper_index: int | None = -1,
        controls: EpisodeControls | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__(action_dim=action_dim, gripper_index=gripper_index, controls=controls, clock=clock)
        if not 0.0 <= float(deadzone) < 1.0:
            raise ValueError(f"deadzone must be in [0, 1), got {deadzone}")
        self.device_path, self.device_name, self.deadzone = device_path, device_name, float(deadzone)
        self.buttons = {k: v for k, v in {**self.default_buttons, **dict(buttons or {})}.items() if v}
        for k, v in self.buttons.items():
            if v not in DEVICE_ACTIONS:
                raise ValueError(
                    f"{self.name}: button {k} -> {v!r}: unknown action; choose one of: {', '.join(DEVICE_ACTIONS)}"
                )
        self._button_actions: dict[int, str] = {self._code(k, "BTN_", "KEY_"): v for k, v in self.buttons.items()}
        self._axes: dict[int, float] = {}  # normalized axis values by event code
        self._buttons_held: set[int] = set()
        self._dropping = False
        self._dev = None
        self._reader: _SelectReader | None = None

    # ----------------------------------------------------------------------------------------- codes
    def _code(self, name: str | int, *prefixes: str) -> int:
        """An event code from its evdev name (e.g. "BTN_SOUTH", "ABS_RY") or a number."""
        if isinstance(name, int) or str(name).lstrip("-").isdigit():
            return int(name)
        ec = _ecodes()
        if ec is None:  # no evdev here (non-Linux): placeholder; connect() raises DeviceUnavailableError anyway
            return -1 - (hash(str(name)) & 0xFFFF)
        code = ec.ecodes.get(str(name).upper())
        if code is None or (prefixes and not str(name).upper().startswith(prefixes)):
            raise ValueError(
                f"{self.name}: unknown event code name {name!r} (expected one of the evdev names "
                f"starting with {'/'.join(prefixes)}; list a device's codes with "
                f"`python -m evdev.evtest`)"
            )
        return int(code)

    # ----------------------------------------------------------------------------------------- device search
    def _matches(self, dev, caps: dict[int, list[int]]) -> bool:
        raise NotImplementedError

    def _describe(self, dev) -> str:
        return f"{dev.path}: {dev.name!r} (vendor {dev.info.vendor:04x}, product {dev.info.product:04x})"

    def _open_device(self, evdev):
        if self.device_path:
            try:
                dev = evdev.InputDevice(self.device_path)
            except PermissionError:
                raise DeviceUnavailableError(
                    f"{self.name}: {_permission_help([self.device_path], self.udev_rule)}"
                ) from None
            except FileNotFoundError:
                raise DeviceUnavailableError(
                    f"{self.name}: device_path={self.device_path!r} does not exist (unplugged? event numbers change "
                    f"across reboots: prefer a stable /dev/input/by-id/... path). {self._inventory(evdev)}"
                ) from None
            except OSError as e:
                raise DeviceUnavailableError(
                    f"{self.name}: cannot open device_path={self.device_path!r}: {e}"
                ) from None
            caps = dev.capabilities(absinfo=False)
            if not self._matches(dev, caps):
                log.warning(
                    "%s: %s does not look like a %s; using it because device_path names it",
                    self.name,
                    self._describe(dev),
                    self.kind,
                )
            return dev
        found, denied, failed, candidates = self._scan(evdev)
        if candidates:
            dev = candidates[0]
            log.info("%s: using %s", self.name, self._describe(dev))
            for other in candidates[1:]:
                log.info(
                    "%s: also found %s (not used; select it with device_path=%s)",
                    self.name,
                    self._describe(other),
                    other.path,
                )
                other.close()
            return dev
        what = f"no {self.kind}" + (f" with a name containing {self.device_name!r}" if self.device_name else "")
        if denied:
            raise DeviceUnavailableError(
                f"{self.name}: {what} could be opened: {_permission_help(denied, self.udev_rule)}"
                + (f" Readable devices: {'; '.join(found)}." if found else "")
            )
        if not found and not failed:
            if not os.path.isdir(INPUT_DIR):
                raise DeviceUnavailableError(
                    f"{self.name}: {what} found: there is no {INPUT_DIR} on this machine (a container or VM without "
                    f"input devices?). Plug the {self.kind} into this machine, or pass /dev/input into the container "
                    f"(docker run -v /dev/input:/dev/input --device-cgroup-rule='c 13:* rmw')."
                )
            raise DeviceUnavailableError(
                f"{self.name}: {what} found: no input devices at all under {INPUT_DIR}/event*. Plug the {self.kind} "
                f"in (check `dmesg | tail` and `ls -l /dev/input/by-id/`), or set device_path=/dev/input/eventN."
            )
        listing = "; ".join(found + [f"{p} ({r})" for p, r in failed])
        raise DeviceUnavailableError(
            f"{self.name}: {what} among the input devices found: {listing}. Plug the {self.kind} in (check "
            f"`dmesg | tail`), or select it with device_path=/dev/input/eventN or device_name=<part of its name> "
            f"(`python -m evdev.evtest` lists devices and their axes)."
        )

    def _list_paths(self, evdev) -> tuple[list[str], list[str]]:
        """(readable event device paths, existing but unreadable ones)."""
        try:
            paths = list(evdev.list_devices(INPUT_DIR, writable=False))
        except PermissionError:
            return [], [INPUT_DIR]
        unreadable = [p for p in glob.glob(f"{INPUT_DIR}/event*") if p not in paths and not os.access(p, os.R_OK)]
        return sorted(paths, key=_event_index), sorted(unreadable, key=_event_index)

    def _scan(self, evdev):
        paths, denied = self._list_paths(evdev)
        found: list[str] = []
        failed: list[tuple[str, str]] = []
        candidates = []
        for p in paths:
            try:
                dev = evdev.InputDevice(p)
            except PermissionError:
                denied.append(p)
                continue
            except OSError as e:
                failed.append((p, str(e)))
                continue
            try:
                caps = dev.capabilities(absinfo=False)
                if self.device_name:
                    ok = self.device_name.lower() in str(dev.name).lower()
                else:
                    ok = self._matches(dev, caps)
            except Exception as e:
                failed.append((p, f"cannot read its capabilities: {e}"))
                dev.close()
                continue
            if ok:
                candidates.append(dev)
            else:
                found.append(self._describe(dev))
                dev.close()
        return found, denied, failed, candidates

    def _inventory(self, evdev) -> str:
        try:
            found, denied, failed, candidates = self._scan(evdev)
        except Exception as e:  # pragma: no cover
            return f"(listing input devices failed: {e})"
        for c in candidates:
            found.insert(0, self._describe(c))
            c.close()
        parts = []
        if found:
            parts.append("input devices found: " + "; ".join(found))
        if denied:
            parts.append("not readable (permissions): " + ", ".join(denied))
        return ". ".join(parts) + "." if parts else f"No readable input devices under {INPUT_DIR}."

    # ----------------------------------------------------------------------------------------- lifecycle
    def connect(self) -> None:
        if self._connected:
            return
        evdev = _import_evdev()
        dev = self._open_device(evdev)
        try:
            self._setup_from_device(dev)
        except Exception:
            dev.close()
            raise
        self._dev = dev
        self.error = None
        self._reader = _SelectReader(dev.fd, self._read_device, name=f"{self.name}-evdev", on_error=self._fail)
        self._connected = True

    def disconnect(self) -> None:
        if self._reader is not None:
            self._reader.stop()
            self._reader = None
        if self._dev is not None:
            try:
                self._dev.close()
            except OSError:
                pass
            self._dev = None
        self._connected = False

    def _setup_from_device(self, dev) -> None:
        """Read axis ranges / initial values from the opened device (subclasses)."""

    def _read_device(self) -> bool:
        try:
            for ev in self._dev.read():
                self._handle_event(ev)
        except BlockingIOError:
            return True
        except OSError as e:  # ENODEV: unplugged
            self._fail(
                f"reading {self._dev.path} failed ({e}; unplugged?): the {self.kind} is dead, motion "
                f"stopped. Re-plug it and restart."
            )
            return False
        return True

    def _on_fail(self) -> None:
        with self._lock:
            self._axes.clear()
            self._buttons_held.clear()
            self._takeover_latched = False

    # ----------------------------------------------------------------------------------------- events
    def _handle_event(self, ev) -> None:
        """One evdev InputEvent (the reader thread calls this for every event)."""
        ec = _ecodes()
        with self._lock:
            if ev.type == ec.EV_SYN:
                if ev.code == ec.SYN_DROPPED:
                    self._dropping = True
                elif ev.code == ec.SYN_REPORT and self._dropping:
                    self._dropping = False
                    self._resync()
                return
            if self._dropping:  # kernel buffer overrun: ignore until the next report, then re-read the state
                return
            if ev.type == ec.EV_KEY:
                if ev.value == 1:
                    self._buttons_held.add(ev.code)
                    action = self._button_actions.get(ev.code)
                    if action:
                        self._dispatch(action)
                elif ev.value == 0:
                    self._buttons_held.discard(ev.code)
            elif ev.type in (ec.EV_ABS, ec.EV_REL):
                self._on_axis(ev.type, ev.code, ev.value)

    def _on_axis(self, etype: int, code: int, value: int) -> None:
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------- Teleop API
    def get_action(self, observation: Observation | None = None) -> np.ndarray:
        with self._lock:
            return self._action_from_state(dict(self._axes), self._gripper)

    @property
    def intervening(self) -> bool:
        with self._lock:
            return self._intervening_from_state(self._axes, self._takeover_buttons_held(), self._takeover_latched)

    def _action_from_state(self, axes: Mapping[int, float], gripper: float) -> np.ndarray:
        """The action from a snapshot of the normalized axes and the gripper (subclasses)."""
        raise NotImplementedError

    def _intervening_from_state(self, axes: Mapping[int, float], buttons_held: set[int], latched: bool) -> bool:
        """Whether the human acts, from the axes, the held takeover buttons and the latch (subclasses)."""
        raise NotImplementedError

    def _takeover_buttons_held(self) -> set[int]:
        """Held buttons that count as the human acting: all but those bound to "success" (the operator marking
        the task solved is not taking over the robot)."""
        return {b for b in self._buttons_held if self._button_actions.get(b) != "success"}

    def _resync(self) -> None:
        dev = self._dev
        log.warning("%s: input events were dropped (SYN_DROPPED); re-reading the device state", self.name)
        self._axes.clear()
        self._buttons_held.clear()
        if dev is None:
            return
        try:
            self._buttons_held.update(dev.active_keys())
            self._setup_from_device(dev)
        except OSError as e:
            log.warning("%s: re-reading the device state failed: %s", self.name, e)


def _parse_axis_spec(spec: str) -> tuple[str, float]:
    """ "-ABS_Y" -> ("ABS_Y", -1.0): a leading "-" flips the axis."""
    s = str(spec).strip()
    return (s[1:], -1.0) if s.startswith("-") else (s.lstrip("+"), 1.0)
