"""Human teleop devices behind robot_rl's `Teleop`: keyboard, gamepad and 3Dconnexion SpaceMouse.

All three produce an end-effector delta action for an OSC delta-pose robot (robosuite Lift/Panda by default):
7 float32 values in [-1, 1] named ("dx", "dy", "dz", "dax", "day", "daz", "gripper"), gripper -1 = open,
+1 = close. For a robot with another action size pass `action_dim` and `gripper_index` (default: the last entry;
None = no gripper entry); a device then fills only the first 3 (keyboard, gamepad) or 6 (SpaceMouse) entries that
are not the gripper, and leaves the rest at 0.

Every device also carries `controls`, an `EpisodeControls` queue of "save" / "rerecord" / "stop" / "success" events
from its episode keys or buttons; the recorder polls it once per tick. "success" is the operator saying the task is
solved: the recorder labels the episode's steps from then on `success=True`, and a session's `OperatorSuccess`
reward takes it out of the queue with `take("success")`, leaving the other events where they are.

Each device keeps its raw state (keys pressed, axis values, buttons held) and turns it into an action with a
pure method, `_action_from_state(...)`, so the mapping is testable without hardware; the background reader threads
only update that state through `_handle_event` (evdev) / `_feed_bytes` (terminal) / `_press` (any key source).

A device that cannot be opened raises `DeviceUnavailableError` at `connect()`, saying why and what to do.
See docs/teleop.md for key maps and permission fixes.
"""

from __future__ import annotations

import atexit
import collections
import glob
import logging
import os
import re
import select
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from robot_rl.interfaces import Feature, Observation, Teleop

log = logging.getLogger(__name__)

__all__ = [
    "DeviceUnavailableError", "EpisodeControls", "KeyboardTeleop", "GamepadTeleop", "SpaceMouseTeleop",
    "make_device_teleop", "DEVICE_KINDS",
]

DEFAULT_ACTION_NAMES = ("dx", "dy", "dz", "dax", "day", "daz", "gripper")
GRIPPER_OPEN, GRIPPER_CLOSED = -1.0, 1.0
EPISODE_EVENTS = ("save", "rerecord", "stop", "success")
# what a key / button can be bound to on every device
DEVICE_ACTIONS = EPISODE_EVENTS + ("gripper_open", "gripper_close", "gripper_toggle", "takeover")

INPUT_DIR = "/dev/input"  # where evdev devices are searched (tests point it elsewhere)


class DeviceUnavailableError(RuntimeError):
    """A teleop device cannot be opened; the message says why and what to do."""


# ============================================================================================== episode controls
class EpisodeControls:
    """Thread-safe FIFO of episode events ("save", "rerecord", "stop", "success") pushed by devices, polled by the
    recorder; a consumer interested in one event only uses `take(event)`, which leaves the others queued."""

    def __init__(self, maxlen: int = 64):
        self._q: collections.deque[str] = collections.deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def push(self, event: str) -> None:
        if event not in EPISODE_EVENTS:
            raise ValueError(f"unknown episode event {event!r}; choose one of: {', '.join(EPISODE_EVENTS)}")
        with self._lock:
            self._q.append(event)
        log.info("episode control: %s", event)

    def poll(self) -> str | None:
        """Pop and return the oldest pending event, or None."""
        with self._lock:
            return self._q.popleft() if self._q else None

    def take(self, event: str) -> bool:
        """Remove every pending `event` and say whether there was one; other events stay queued, in order."""
        if event not in EPISODE_EVENTS:
            raise ValueError(f"unknown episode event {event!r}; choose one of: {', '.join(EPISODE_EVENTS)}")
        with self._lock:
            n = len(self._q)
            kept = [e for e in self._q if e != event]
            if len(kept) == n:
                return False
            self._q.clear()
            self._q.extend(kept)
            return True

    def clear(self) -> None:
        with self._lock:
            self._q.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._q)


# ============================================================================================== common base
class _DeviceTeleop(Teleop):
    """Shared action layout, gripper / takeover state and key-or-button actions of the human devices."""

    name = "device"
    n_mapped = 3  # leading non-gripper action entries this device drives

    def __init__(self, action_dim: int = 7, gripper_index: int | None = -1, controls: EpisodeControls | None = None,
                 clock: Callable[[], float] = time.monotonic):
        action_dim = int(action_dim)
        if action_dim < 1:
            raise ValueError(f"action_dim must be >= 1, got {action_dim}")
        if gripper_index is not None:
            gi = int(gripper_index)
            if not -action_dim <= gi < action_dim:
                raise ValueError(f"gripper_index={gripper_index} is out of range for action_dim={action_dim}")
            gripper_index = gi % action_dim
        self.action_dim = action_dim
        self.gripper_index = gripper_index
        self._mapped = [i for i in range(action_dim) if i != gripper_index][: self.n_mapped]
        self.controls = controls if controls is not None else EpisodeControls()
        self._clock = clock
        self._lock = threading.RLock()
        self._gripper = GRIPPER_OPEN
        self._takeover_latched = False
        self._connected = False
        self.error: str | None = None  # set when a running device fails (unplugged, ...); logged as an error

    # ----------------------------------------------------------------------------------------- Teleop API
    @property
    def action_feature(self) -> Feature:
        if self.action_dim == 7 and self.gripper_index == 6:
            names = DEFAULT_ACTION_NAMES
        else:
            n = [f"a{i}" for i in range(self.action_dim)]
            for j, i in enumerate(self._mapped):
                n[i] = DEFAULT_ACTION_NAMES[j]
            if self.gripper_index is not None:
                n[self.gripper_index] = "gripper"
            names = tuple(n)
        return Feature(shape=(self.action_dim,), dtype="float32", names=names,
                       low=np.full(self.action_dim, -1.0, np.float32), high=np.full(self.action_dim, 1.0, np.float32))

    @property
    def is_connected(self) -> bool:
        return self._connected

    def reset(self) -> None:
        """Episode start: gripper open (as the robot resets), takeover latch off."""
        with self._lock:
            self._gripper = GRIPPER_OPEN
            if self._takeover_latched:
                log.info("%s: takeover latch released at episode start", self.name)
            self._takeover_latched = False

    @property
    def gripper(self) -> float:
        return self._gripper

    # ----------------------------------------------------------------------------------------- helpers
    def _finish(self, values, gripper: float) -> np.ndarray:
        """Lay `values` (the device's mapped entries, in order) and the gripper into a clipped float32 action."""
        out = np.zeros(self.action_dim, dtype=np.float32)
        for i, v in zip(self._mapped, values):
            out[i] = v
        if self.gripper_index is not None:
            out[self.gripper_index] = gripper
        return np.clip(out, -1.0, 1.0).astype(np.float32)

    def _dispatch(self, action: str) -> None:
        """Run one bound key/button action (called on the press edge)."""
        if action in EPISODE_EVENTS:
            self.controls.push(action)
        elif action == "gripper_open":
            self._gripper = GRIPPER_OPEN
        elif action == "gripper_close":
            self._gripper = GRIPPER_CLOSED
        elif action == "gripper_toggle":
            self._gripper = GRIPPER_OPEN if self._gripper > 0 else GRIPPER_CLOSED
        elif action == "takeover":
            self._takeover_latched = not self._takeover_latched
            log.info("%s: takeover latched %s", self.name, "ON" if self._takeover_latched else "OFF")
        else:  # validated at construction; a bug if reached
            raise ValueError(f"unknown device action {action!r}")

    def _fail(self, message: str) -> None:
        """A running device broke: log it loudly, drop motion and takeover so the robot is not driven blind."""
        if self.error is None:
            log.error("%s: %s", self.name, message)
        self.error = message
        self._on_fail()

    def _on_fail(self) -> None:
        pass

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, *exc):
        self.disconnect()


def _deadzone(v: float, dz: float) -> float:
    """0 inside |v| < dz, then rescaled so that the output still spans [-1, 1] continuously."""
    a = abs(v)
    if a <= dz:
        return 0.0
    return float(np.sign(v) * min(1.0, (a - dz) / max(1e-9, 1.0 - dz)))


class _SelectReader:
    """Background thread: select() on `fd`, call `on_readable()` when it has data, stop promptly on `stop()`."""

    def __init__(self, fd: int, on_readable: Callable[[], bool], name: str,
                 on_error: Callable[[str], None] | None = None):
        self.fd, self.on_readable, self.on_error = fd, on_readable, on_error
        self._wake_r, self._wake_w = os.pipe()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                r, _, _ = select.select([self.fd, self._wake_r], [], [], 0.5)
            except (OSError, ValueError):  # fd closed under us
                return
            if self._wake_r in r or self._stop.is_set():
                return
            if self.fd in r:
                try:
                    if not self.on_readable():
                        return
                except Exception as e:  # a bug in event handling must not kill the device silently
                    log.exception("%s: reader thread failed", self.thread.name)
                    if self.on_error is not None:
                        self.on_error(f"reader thread failed: {e!r}; motion stopped")
                    return

    def stop(self) -> None:
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=2.0)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


# ============================================================================================== keyboard
_KEY_MOTION = {"w": (0, +1.0), "s": (0, -1.0), "a": (1, +1.0), "d": (1, -1.0), "r": (2, +1.0), "f": (2, -1.0)}
_KEY_ACTIONS = {"space": "gripper_toggle", "i": "takeover", "enter": "save", "n": "save", "backspace": "rerecord",
                "x": "rerecord", "esc": "stop", "q": "stop", "y": "success"}
_KEY_INTERVENE = set(_KEY_MOTION) | {"space"}


def _parse_terminal_bytes(data: bytes, final: bool = True) -> tuple[list[str], bytes]:
    """Bytes from a terminal in cbreak/raw mode -> (key names, unparsed tail).

    Printable ASCII -> the lowercase character, ' ' -> "space", CR/LF -> "enter", DEL/BS -> "backspace", a lone
    ESC -> "esc". Escape sequences (arrows, F-keys: ESC [ ... / ESC O x) are skipped. With final=False an
    incomplete escape sequence at the end is returned as the tail (more bytes may follow)."""
    keys: list[str] = []
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b == 0x1B:
            if i + 1 >= n:
                if not final:
                    return keys, data[i:]
                keys.append("esc")
                i += 1
                continue
            nxt = data[i + 1]
            if nxt == ord("["):  # CSI: parameters then one final byte in 0x40..0x7e
                j = i + 2
                while j < n and not 0x40 <= data[j] <= 0x7E:
                    j += 1
                if j >= n:
                    if not final:
                        return keys, data[i:]
                    i = n
                    continue
                i = j + 1
                continue
            if nxt == ord("O"):  # SS3: one more byte
                if i + 2 >= n and not final:
                    return keys, data[i:]
                i += 3
                continue
            keys.append("esc")  # ESC then an ordinary key (Esc pressed, or Alt+key): Esc
            i += 1
            continue
        if b in (0x0D, 0x0A):
            keys.append("enter")
        elif b in (0x7F, 0x08):
            keys.append("backspace")
        elif b == 0x20:
            keys.append("space")
        elif 0x21 <= b <= 0x7E:
            keys.append(chr(b).lower())
        i += 1
    return keys, b""


def _pynput_backend_chosen(env: Mapping[str, str]) -> bool:
    return bool(env.get("PYNPUT_BACKEND") or env.get("PYNPUT_BACKEND_KEYBOARD"))


def _x_session_problem(env: Mapping[str, str]) -> str | None:
    """Why pynput's X11 backend cannot read global keys in this environment (None: it should work)."""
    if _pynput_backend_chosen(env):
        return None  # the user chose pynput's backend (e.g. uinput) explicitly
    wayland = bool(env.get("WAYLAND_DISPLAY")) or env.get("XDG_SESSION_TYPE", "").lower() == "wayland"
    if not env.get("DISPLAY"):
        if wayland:
            return ("this is a Wayland session (WAYLAND_DISPLAY is set) and there is no X display: pynput cannot read "
                    "global keys under Wayland. Use backend=terminal (keys from this terminal, works over ssh), log in "
                    "to an X11 (Xorg) session instead, or set PYNPUT_BACKEND_KEYBOARD=uinput (reads /dev/input "
                    "directly; needs the `input` group, see docs/teleop.md)")
        return ("there is no X display (DISPLAY is not set; headless machine or ssh without -X): pynput needs one. "
                "Set DISPLAY (e.g. DISPLAY=:0 with access to that X server), run under X11 (ssh -X / a desktop "
                "session), or use backend=terminal")
    return None


def _wayland_with_xwayland(env: Mapping[str, str]) -> bool:
    return bool(env.get("DISPLAY")) and (bool(env.get("WAYLAND_DISPLAY"))
                                         or env.get("XDG_SESSION_TYPE", "").lower() == "wayland")


class KeyboardTeleop(_DeviceTeleop):
    """End-effector delta teleop from the keyboard.

    Key map (letters are case-insensitive)::

        w / s      +x / -x   (forward / back)          space   toggle gripper (open <-> close)
        a / d      +y / -y   (left / right)            i       latch takeover on / off
        r / f      +z / -z   (up / down)
        Enter / n  save the episode ("save")
        Backspace / x  discard and re-record it ("rerecord")
        Esc / q    stop recording ("stop")
        y          the task is solved ("success": operator success label / sparse reward)

    A motion key drives its axis at `speed` (action units) while it is held and for `hold_s` after its last press
    or auto-repeat (a terminal only reports key repeats, never releases; for smooth motion from the terminal make
    `hold_s` longer than your keyboard's repeat delay, or shorten that delay, e.g. `xset r rate 200 30`).
    `intervening` is True while a motion key (or space) is active, or while takeover is latched with 'i'.
    Toggle and episode keys act once per press: repeats within `debounce_s` of the previous press are ignored.

    Backends (`backend=`):
      - "pynput": global key listener. Needs an X display (no DISPLAY or a pure Wayland session cannot work); it
        sees keys typed in *any* window, so don't type in other windows while recording.
      - "terminal": reads keys from a TTY (`tty`: None = stdin, or a path like /dev/pts/3, or an open fd) in cbreak
        mode on a background thread; works over ssh with no display. Ctrl-C still interrupts.
      - "auto": pynput if an X display is usable (and not a Wayland session), else terminal if stdin is a TTY,
        else DeviceUnavailableError. The choice and its reason are logged.
    """

    name = "keyboard"
    BACKENDS = ("auto", "pynput", "terminal")

    def __init__(self, backend: str = "auto", speed: float = 0.5, hold_s: float = 0.15, debounce_s: float = 0.6,
                 tty: str | int | None = None, action_dim: int = 7, gripper_index: int | None = -1,
                 controls: EpisodeControls | None = None, clock: Callable[[], float] = time.monotonic):
        super().__init__(action_dim=action_dim, gripper_index=gripper_index, controls=controls, clock=clock)
        if backend not in self.BACKENDS:
            raise ValueError(f"keyboard backend={backend!r}; choose one of: {', '.join(self.BACKENDS)}")
        self.backend_request = backend
        self.backend: str | None = None  # the backend in use once connected
        self.speed, self.hold_s, self.debounce_s = float(speed), float(hold_s), float(debounce_s)
        self.tty = tty
        self._last_press: dict[str, float] = {}
        self._held: set[str] = set()  # keys physically down (only backends that report releases: pynput)
        self.keys_seen = 0  # keys processed so far (tests wait on it)
        # terminal backend state
        self._fd: int | None = None
        self._own_fd = False
        self._saved_attrs = None
        self._reader: _SelectReader | None = None
        self._tail = b""
        # pynput backend state
        self._listener = None

    # ----------------------------------------------------------------------------------------- pure mapping
    def _active_keys(self, now: float) -> set[str]:
        return {k for k, t in self._last_press.items() if k in self._held or now - t < self.hold_s} | self._held

    def _action_from_state(self, active: set[str] | frozenset[str], gripper: float) -> np.ndarray:
        """Action for the set of active (held / recently pressed) keys and the gripper state."""
        v = [0.0, 0.0, 0.0]
        for k in active:
            if k in _KEY_MOTION:
                axis, sign = _KEY_MOTION[k]
                v[axis] += sign * self.speed
        return self._finish(v, gripper)

    @staticmethod
    def _intervening_from_state(active: set[str] | frozenset[str], latched: bool) -> bool:
        return bool(latched or (set(active) & _KEY_INTERVENE))

    # ----------------------------------------------------------------------------------------- key input
    def _press(self, key: str, physical: bool = False) -> None:
        """A key press or auto-repeat from any backend. `physical`: the backend also reports its release."""
        with self._lock:
            now = self._clock()
            prev = self._last_press.get(key)
            edge = key not in self._held and (prev is None or now - prev > self.debounce_s)
            self._last_press[key] = now
            if physical:
                self._held.add(key)
            if edge and key in _KEY_ACTIONS:
                self._dispatch(_KEY_ACTIONS[key])
            self.keys_seen += 1

    def _release(self, key: str) -> None:
        with self._lock:
            self._held.discard(key)

    def _feed_bytes(self, data: bytes, final: bool = True) -> None:
        """Terminal bytes -> key presses (the terminal reader thread calls this)."""
        keys, self._tail = _parse_terminal_bytes(self._tail + data, final=final)
        for k in keys:
            self._press(k)

    def _on_fail(self) -> None:
        with self._lock:
            self._last_press.clear()
            self._held.clear()
            self._takeover_latched = False

    # ----------------------------------------------------------------------------------------- Teleop API
    def get_action(self, observation: Observation | None = None) -> np.ndarray:
        with self._lock:
            return self._action_from_state(self._active_keys(self._clock()), self._gripper)

    @property
    def intervening(self) -> bool:
        with self._lock:
            return self._intervening_from_state(self._active_keys(self._clock()), self._takeover_latched)

    def reset(self) -> None:
        super().reset()
        with self._lock:
            self._last_press.clear()

    def connect(self) -> None:
        if self._connected:
            return
        backend = self._choose_backend()
        if backend == "pynput":
            self._connect_pynput()
        else:
            self._connect_terminal()
        self.backend = backend
        self._connected = True
        log.info("keyboard teleop (%s): w/s a/d r/f = x/y/z, space = gripper, i = takeover latch, Enter/n = save, "
                 "Backspace/x = re-record, Esc/q = stop, y = success", backend)

    def disconnect(self) -> None:
        if self._reader is not None:
            self._reader.stop()
            self._reader = None
        self._restore_tty()
        if self._fd is not None and self._own_fd:
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = None
        if self._listener is not None:
            try:
                self._listener.stop()
            except Exception as e:  # pragma: no cover - pynput internals
                log.warning("keyboard: stopping the pynput listener failed: %s", e)
            self._listener = None
        self._connected = False

    # ----------------------------------------------------------------------------------------- backends
    def _stdin_is_tty(self) -> bool:
        try:
            return sys.stdin is not None and os.isatty(sys.stdin.fileno())
        except (OSError, ValueError, AttributeError):
            return False

    def _choose_backend(self, env: Mapping[str, str] | None = None) -> str:
        env = os.environ if env is None else env
        if self.backend_request != "auto":
            return self.backend_request
        x11_platform = not (sys.platform.startswith("win") or sys.platform == "darwin")
        tty_ok = self.tty is not None or self._stdin_is_tty()
        problem = _x_session_problem(env) if x11_platform else None
        if problem is None and x11_platform and _wayland_with_xwayland(env) and not _pynput_backend_chosen(env):
            problem = ("Wayland session: pynput would only see keys typed into X11 (XWayland) windows")
            if not tty_ok:
                log.warning("keyboard backend=auto: %s, and stdin is not a terminal; using pynput anyway", problem)
                return "pynput"
        if problem is None:
            import_error = self._pynput_import_error()
            if import_error is None:
                log.info("keyboard backend=auto: using pynput (X display %s)", env.get("DISPLAY", "(native)"))
                return "pynput"
            problem = f"pynput is unusable: {import_error}"
        if tty_ok:
            log.info("keyboard backend=auto: using the terminal backend because %s", problem)
            return "terminal"
        raise DeviceUnavailableError(
            f"keyboard backend=auto found no usable keyboard: {problem}; and stdin is not a terminal (input is piped "
            f"or the process runs without a TTY), so the terminal backend cannot read keys either. Run in an "
            f"interactive terminal (ssh -t host ...), pass tty=/dev/pts/N, or use a gamepad/spacemouse teleop.")

    @staticmethod
    def _pynput_import_error() -> str | None:
        try:
            from pynput import keyboard  # noqa: F401  (connects to the X server on import)
        except Exception as e:  # ImportError with pynput's own explanation, Xlib errors, ...
            return " ".join(str(e).split())[:400]
        return None

    def _connect_pynput(self) -> None:
        if not (sys.platform.startswith("win") or sys.platform == "darwin"):
            problem = _x_session_problem(os.environ)
            if problem:
                raise DeviceUnavailableError(f"keyboard backend=pynput: {problem}")
            if _wayland_with_xwayland(os.environ) and not _pynput_backend_chosen(os.environ):
                log.warning("keyboard backend=pynput in a Wayland session: only keys typed into X11 (XWayland) "
                            "windows are seen; use backend=terminal or an X11 session if keys do not register")
        err = self._pynput_import_error()
        if err is not None:
            raise DeviceUnavailableError(
                f"keyboard backend=pynput: cannot start pynput: {err}. Check DISPLAY={os.environ.get('DISPLAY')!r} "
                f"and that you may use that X server (xhost / XAUTHORITY), or use backend=terminal.")
        from pynput import keyboard

        def name_of(key) -> str | None:
            ch = getattr(key, "char", None)
            if ch:
                return "space" if ch == " " else ch.lower()
            nm = getattr(key, "name", None)
            return {"space": "space", "enter": "enter", "backspace": "backspace", "esc": "esc"}.get(nm)

        def on_press(key):
            k = name_of(key)
            if k:
                self._press(k, physical=True)

        def on_release(key):
            k = name_of(key)
            if k:
                self._release(k)

        try:
            listener = keyboard.Listener(on_press=on_press, on_release=on_release)
            listener.start()
            listener.wait()
        except Exception as e:
            raise DeviceUnavailableError(f"keyboard backend=pynput: the key listener failed to start: {e}. "
                                         f"Use backend=terminal.") from e
        self._listener = listener

    def _connect_terminal(self) -> None:
        try:
            import termios
            import tty as ttymod
        except ImportError:
            raise DeviceUnavailableError("keyboard backend=terminal needs termios, which this platform (Windows?) "
                                         "lacks; use backend=pynput") from None
        if self.tty is None:
            if sys.stdin is None:
                raise DeviceUnavailableError("keyboard backend=terminal: there is no stdin; run in an interactive "
                                             "terminal or pass tty=/dev/pts/N")
            try:
                fd, own, what = sys.stdin.fileno(), False, "stdin"
            except (OSError, ValueError, AttributeError) as e:
                raise DeviceUnavailableError(f"keyboard backend=terminal: stdin has no file descriptor ({e}); run in "
                                             f"an interactive terminal or pass tty=/dev/pts/N") from None
        elif isinstance(self.tty, int):
            fd, own, what = self.tty, False, f"fd {self.tty}"
        else:
            try:
                fd = os.open(str(self.tty), os.O_RDONLY | os.O_NOCTTY)
            except OSError as e:
                raise DeviceUnavailableError(f"keyboard backend=terminal: cannot open tty={self.tty!r}: {e}. Give "
                                             f"the terminal's device (run `tty` in it) or leave tty empty for "
                                             f"stdin") from None
            own, what = True, str(self.tty)
        if not os.isatty(fd):
            if own:
                os.close(fd)
            raise DeviceUnavailableError(
                f"keyboard backend=terminal: {what} is not a terminal (TTY) - input is piped or redirected, or the "
                f"process runs under nohup/systemd/an IDE console - so keys cannot be read from it. Run in an "
                f"interactive terminal (over ssh use `ssh -t`), pass tty=/dev/pts/N of a terminal you type in, or "
                f"use backend=pynput (X display) or a gamepad/spacemouse teleop.")
        try:
            self._saved_attrs = termios.tcgetattr(fd)
            ttymod.setcbreak(fd, termios.TCSANOW)  # no line buffering, no echo; Ctrl-C still signals
        except termios.error as e:
            if own:
                os.close(fd)
            self._saved_attrs = None
            raise DeviceUnavailableError(f"keyboard backend=terminal: cannot switch {what} to cbreak mode: {e}") \
                from None
        self._fd, self._own_fd, self._tail = fd, own, b""
        atexit.register(self._restore_tty)
        self._reader = _SelectReader(fd, self._read_tty, name="keyboard-tty", on_error=self._fail)

    def _read_tty(self) -> bool:
        try:
            data = os.read(self._fd, 1024)
        except BlockingIOError:
            return True
        except OSError as e:  # EIO: the terminal went away (ssh closed, pty master closed)
            self._fail(f"reading the terminal failed ({e}); keyboard teleop is dead, motion stopped")
            return False
        if not data:
            self._fail("the terminal closed (EOF); keyboard teleop is dead, motion stopped")
            return False
        self._feed_bytes(data, final=False)
        if self._tail:  # an escape sequence may be split across reads: wait briefly for the rest
            r, _, _ = select.select([self._fd], [], [], 0.05)
            if not r:
                self._feed_bytes(b"", final=True)
        return True

    def _restore_tty(self) -> None:
        if self._saved_attrs is None or self._fd is None:
            return
        try:
            import termios

            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved_attrs)
        except Exception as e:  # terminal already gone
            log.debug("keyboard: restoring terminal mode failed: %s", e)
        self._saved_attrs = None
        try:
            atexit.unregister(self._restore_tty)
        except Exception:  # pragma: no cover
            pass


# ============================================================================================== evdev devices
def _import_evdev():
    if not sys.platform.startswith("linux"):
        raise DeviceUnavailableError(
            f"evdev (Linux input devices) is not available on {sys.platform}: gamepad/spacemouse teleop here is "
            f"Linux-only. Use the keyboard teleop (teleop=keyboard, backend=pynput), or a lerobot gamepad teleop.")
    try:
        import evdev
        from evdev import ecodes  # noqa: F401
    except ImportError as e:
        raise DeviceUnavailableError(f"cannot import evdev ({e}): install it with `pip install evdev` (needs the "
                                     f"Linux kernel headers and a C compiler to build)") from None
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
    return (f"permission denied on {shown}. Reading input devices needs read access to /dev/input/event*: add your "
            f"user to the `input` group (`sudo usermod -aG input $USER`, then log out and back in), or add a udev "
            f"rule, e.g. in /etc/udev/rules.d/99-robot-rl-teleop.rules:\n    {udev_rule}\nthen `sudo udevadm control "
            f"--reload-rules && sudo udevadm trigger` and re-plug the device. In a container also pass the device "
            f"through (docker run --device /dev/input/eventN, or -v /dev/input:/dev/input "
            f"--device-cgroup-rule='c 13:* rmw').")


class _EvdevTeleop(_DeviceTeleop):
    """Finds and opens one evdev input device, reads its events on a background thread into raw state."""

    kind = "input device"
    udev_rule = 'KERNEL=="event*", SUBSYSTEM=="input", MODE="0660", GROUP="input", TAG+="uaccess"'
    default_buttons: dict[str, str] = {}

    def __init__(self, device_path: str | None = None, device_name: str | None = None,
                 buttons: Mapping[str, str | None] | None = None, deadzone: float = 0.1, action_dim: int = 7,
                 gripper_index: int | None = -1, controls: EpisodeControls | None = None,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(action_dim=action_dim, gripper_index=gripper_index, controls=controls, clock=clock)
        if not 0.0 <= float(deadzone) < 1.0:
            raise ValueError(f"deadzone must be in [0, 1), got {deadzone}")
        self.device_path, self.device_name, self.deadzone = device_path, device_name, float(deadzone)
        self.buttons = {k: v for k, v in {**self.default_buttons, **dict(buttons or {})}.items() if v}
        for k, v in self.buttons.items():
            if v not in DEVICE_ACTIONS:
                raise ValueError(f"{self.name}: button {k} -> {v!r}: unknown action; choose one of: "
                                 f"{', '.join(DEVICE_ACTIONS)}")
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
            raise ValueError(f"{self.name}: unknown event code name {name!r} (expected one of the evdev names "
                             f"starting with {'/'.join(prefixes)}; list a device's codes with `python -m evdev.evtest`)")
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
                raise DeviceUnavailableError(f"{self.name}: {_permission_help([self.device_path], self.udev_rule)}") \
                    from None
            except FileNotFoundError:
                raise DeviceUnavailableError(
                    f"{self.name}: device_path={self.device_path!r} does not exist (unplugged? event numbers change "
                    f"across reboots: prefer a stable /dev/input/by-id/... path). {self._inventory(evdev)}") from None
            except OSError as e:
                raise DeviceUnavailableError(f"{self.name}: cannot open device_path={self.device_path!r}: {e}") \
                    from None
            caps = dev.capabilities(absinfo=False)
            if not self._matches(dev, caps):
                log.warning("%s: %s does not look like a %s; using it because device_path names it",
                            self.name, self._describe(dev), self.kind)
            return dev
        found, denied, failed, candidates = self._scan(evdev)
        if candidates:
            dev = candidates[0]
            log.info("%s: using %s", self.name, self._describe(dev))
            for other in candidates[1:]:
                log.info("%s: also found %s (not used; select it with device_path=%s)", self.name,
                         self._describe(other), other.path)
                other.close()
            return dev
        what = f"no {self.kind}" + (f" with a name containing {self.device_name!r}" if self.device_name else "")
        if denied:
            raise DeviceUnavailableError(
                f"{self.name}: {what} could be opened: {_permission_help(denied, self.udev_rule)}"
                + (f" Readable devices: {'; '.join(found)}." if found else ""))
        if not found and not failed:
            if not os.path.isdir(INPUT_DIR):
                raise DeviceUnavailableError(
                    f"{self.name}: {what} found: there is no {INPUT_DIR} on this machine (a container or VM without "
                    f"input devices?). Plug the {self.kind} into this machine, or pass /dev/input into the container "
                    f"(docker run -v /dev/input:/dev/input --device-cgroup-rule='c 13:* rmw').")
            raise DeviceUnavailableError(
                f"{self.name}: {what} found: no input devices at all under {INPUT_DIR}/event*. Plug the {self.kind} "
                f"in (check `dmesg | tail` and `ls -l /dev/input/by-id/`), or set device_path=/dev/input/eventN.")
        listing = "; ".join(found + [f"{p} ({r})" for p, r in failed])
        raise DeviceUnavailableError(
            f"{self.name}: {what} among the input devices found: {listing}. Plug the {self.kind} in (check "
            f"`dmesg | tail`), or select it with device_path=/dev/input/eventN or device_name=<part of its name> "
            f"(`python -m evdev.evtest` lists devices and their axes).")

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
            self._fail(f"reading {self._dev.path} failed ({e}; unplugged?): the {self.kind} is dead, motion "
                       f"stopped. Re-plug it and restart.")
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
    s = str(spec).strip()
    return (s[1:], -1.0) if s.startswith("-") else (s.lstrip("+"), 1.0)


# ---------------------------------------------------------------------------------------------- gamepad
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
    udev_rule = ('KERNEL=="event*", SUBSYSTEM=="input", ENV{ID_INPUT_JOYSTICK}=="1", MODE="0660", GROUP="input", '
                 'TAG+="uaccess"')
    default_axes = {"x": "-ABS_Y", "y": "-ABS_X", "z": "-ABS_RY"}
    default_triggers = {"ABS_RZ": "gripper_close", "ABS_Z": "gripper_open"}
    default_buttons = {"BTN_TR": "gripper_close", "BTN_TL": "gripper_open", "BTN_SOUTH": "save",
                       "BTN_EAST": "rerecord", "BTN_SELECT": "stop", "BTN_START": "takeover",
                       "BTN_NORTH": "success"}
    STICK_AXES = ("ABS_X", "ABS_Y", "ABS_RX", "ABS_RY")
    DEFAULT_STICK_RANGE = (-32768, 32767)
    DEFAULT_TRIGGER_RANGE = (0, 255)

    def __init__(self, device_path: str | None = None, device_name: str | None = None, speed: float = 0.5,
                 deadzone: float = 0.15, axes: Mapping[str, str | None] | None = None,
                 triggers: Mapping[str, str | None] | None = None, buttons: Mapping[str, str | None] | None = None,
                 trigger_threshold: float = 0.5, axis_ranges: Mapping[str, Any] | None = None, action_dim: int = 7,
                 gripper_index: int | None = -1, controls: EpisodeControls | None = None,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(device_path=device_path, device_name=device_name, buttons=buttons, deadzone=deadzone,
                         action_dim=action_dim, gripper_index=gripper_index, controls=controls, clock=clock)
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
                raise ValueError(f"gamepad trigger {k} -> {v!r}: unknown action; choose one of: "
                                 f"{', '.join(DEVICE_ACTIONS)}")
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
                log.warning("gamepad: %s has no axis %s, so %s stays 0 (override `axes`; `python -m evdev.evtest` "
                            "lists its axes)", dev.name, self.axes[k], k)
        for code, action in self._trigger_actions.items():
            if code not in present:
                log.info("gamepad: %s has no trigger axis %s (%s); use the shoulder buttons", dev.name,
                         ec.ABS.get(code, code), action)

    # ----------------------------------------------------------------------------------------- Teleop API
    def get_action(self, observation: Observation | None = None) -> np.ndarray:
        with self._lock:
            return self._action_from_state(dict(self._axes), self._gripper)

    @property
    def intervening(self) -> bool:
        with self._lock:
            return self._intervening_from_state(self._axes, self._takeover_buttons_held(), self._takeover_latched)


# ---------------------------------------------------------------------------------------------- spacemouse
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
    udev_rule = 'KERNEL=="event*", SUBSYSTEM=="input", ATTRS{idVendor}=="256f", MODE="0660", GROUP="input", ' \
                'TAG+="uaccess"'
    default_axes = {"x": "-Y", "y": "-X", "z": "-Z", "rx": "-RY", "ry": "-RX", "rz": "-RZ"}
    default_buttons = {"BTN_0": "gripper_toggle", "BTN_1": "save"}

    def __init__(self, device_path: str | None = None, device_name: str | None = None, pos_scale: float = 1.0,
                 rot_scale: float = 1.0, deadzone: float = 0.05, max_value: float = 350.0,
                 axes: Mapping[str, str | None] | None = None, buttons: Mapping[str, str | None] | None = None,
                 action_dim: int = 7, gripper_index: int | None = -1, controls: EpisodeControls | None = None,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(device_path=device_path, device_name=device_name, buttons=buttons, deadzone=deadzone,
                         action_dim=action_dim, gripper_index=gripper_index, controls=controls, clock=clock)
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
                raise ValueError(f"spacemouse axes[{k!r}] = {self.axes[k]!r}: choose one of {', '.join(_SM_AXES)} "
                                 f"(optionally with a leading '-')")
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

    # ----------------------------------------------------------------------------------------- Teleop API
    def get_action(self, observation: Observation | None = None) -> np.ndarray:
        with self._lock:
            return self._action_from_state(dict(self._axes), self._gripper)

    @property
    def intervening(self) -> bool:
        with self._lock:
            return self._intervening_from_state(self._axes, self._takeover_buttons_held(), self._takeover_latched)


# ============================================================================================== factory
DEVICE_KINDS: dict[str, type[_DeviceTeleop]] = {
    "keyboard": KeyboardTeleop, "gamepad": GamepadTeleop, "spacemouse": SpaceMouseTeleop,
}


def make_device_teleop(kind: str, **kw) -> Teleop:
    """A human teleop device by kind ("keyboard", "gamepad", "spacemouse"); `kw` go to its constructor."""
    cls = DEVICE_KINDS.get(kind)
    if cls is None:
        raise ValueError(f"unknown teleop device {kind!r}; choose one of: {', '.join(DEVICE_KINDS)}")
    return cls(**kw)
