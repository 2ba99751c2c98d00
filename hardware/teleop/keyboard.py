"""Keyboard teleop: one device, two ways to read keys (pynput needs a display, the terminal works over ssh)."""

from __future__ import annotations

import atexit
import logging
import os
import select
import sys
import time
from collections.abc import Callable, Mapping

import numpy as np

from robot_rl.interfaces import Observation

from .base import DeviceUnavailableError, _DeviceTeleop, _SelectReader
from .controls import EpisodeControls

log = logging.getLogger(__name__)

_KEY_MOTION = {"w": (0, +1.0), "s": (0, -1.0), "a": (1, +1.0), "d": (1, -1.0), "r": (2, +1.0), "f": (2, -1.0)}
_KEY_ACTIONS = {
    "space": "gripper_toggle",
    "i": "takeover",
    "enter": "save",
    "n": "save",
    "backspace": "rerecord",
    "x": "rerecord",
    "esc": "stop",
    "q": "stop",
    "y": "success",
}
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
            return (
                "this is a Wayland session (WAYLAND_DISPLAY is set) and there is no X display: pynput cannot read "
                "global keys under Wayland. Use backend=terminal (keys from this terminal, works over ssh), log in "
                "to an X11 (Xorg) session instead, or set PYNPUT_BACKEND_KEYBOARD=uinput (reads /dev/input "
                "directly; needs the `input` group, see docs/teleop.md)"
            )
        return (
            "there is no X display (DISPLAY is not set; headless machine or ssh without -X): pynput needs one. "
            "Set DISPLAY (e.g. DISPLAY=:0 with access to that X server), run under X11 (ssh -X / a desktop "
            "session), or use backend=terminal"
        )
    return None


def _wayland_with_xwayland(env: Mapping[str, str]) -> bool:
    return bool(env.get("DISPLAY")) and (
        bool(env.get("WAYLAND_DISPLAY")) or env.get("XDG_SESSION_TYPE", "").lower() == "wayland"
    )


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

    def __init__(
        self,
        backend: str = "auto",
        speed: float = 0.5,
        hold_s: float = 0.15,
        debounce_s: float = 0.6,
        tty: str | int | None = None,
        action_dim: int = 7,
        gripper_index: int | None = -1,
        controls: EpisodeControls | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
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
        log.info(
            "keyboard teleop (%s): w/s a/d r/f = x/y/z, space = gripper, i = takeover latch, Enter/n = save, "
            "Backspace/x = re-record, Esc/q = stop, y = success",
            backend,
        )

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
            problem = "Wayland session: pynput would only see keys typed into X11 (XWayland) windows"
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
            f"interactive terminal (ssh -t host ...), pass tty=/dev/pts/N, or use a gamepad/spacemouse teleop."
        )

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
                log.warning(
                    "keyboard backend=pynput in a Wayland session: only keys typed into X11 (XWayland) "
                    "windows are seen; use backend=terminal or an X11 session if keys do not register"
                )
        err = self._pynput_import_error()
        if err is not None:
            raise DeviceUnavailableError(
                f"keyboard backend=pynput: cannot start pynput: {err}. Check DISPLAY={os.environ.get('DISPLAY')!r} "
                f"and that you may use that X server (xhost / XAUTHORITY), or use backend=terminal."
            )
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
            raise DeviceUnavailableError(
                f"keyboard backend=pynput: the key listener failed to start: {e}. Use backend=terminal."
            ) from e
        self._listener = listener

    def _connect_terminal(self) -> None:
        try:
            import termios
            import tty as ttymod
        except ImportError:
            raise DeviceUnavailableError(
                "keyboard backend=terminal needs termios, which this platform (Windows?) lacks; use backend=pynput"
            ) from None
        if self.tty is None:
            if sys.stdin is None:
                raise DeviceUnavailableError(
                    "keyboard backend=terminal: there is no stdin; run in an interactive "
                    "terminal or pass tty=/dev/pts/N"
                )
            try:
                fd, own, what = sys.stdin.fileno(), False, "stdin"
            except (OSError, ValueError, AttributeError) as e:
                raise DeviceUnavailableError(
                    f"keyboard backend=terminal: stdin has no file descriptor ({e}); run in "
                    f"an interactive terminal or pass tty=/dev/pts/N"
                ) from None
        elif isinstance(self.tty, int):
            fd, own, what = self.tty, False, f"fd {self.tty}"
        else:
            try:
                fd = os.open(str(self.tty), os.O_RDONLY | os.O_NOCTTY)
            except OSError as e:
                raise DeviceUnavailableError(
                    f"keyboard backend=terminal: cannot open tty={self.tty!r}: {e}. Give "
                    f"the terminal's device (run `tty` in it) or leave tty empty for "
                    f"stdin"
                ) from None
            own, what = True, str(self.tty)
        if not os.isatty(fd):
            if own:
                os.close(fd)
            raise DeviceUnavailableError(
                f"keyboard backend=terminal: {what} is not a terminal (TTY) - input is piped or redirected, or the "
                f"process runs under nohup/systemd/an IDE console - so keys cannot be read from it. Run in an "
                f"interactive terminal (over ssh use `ssh -t`), pass tty=/dev/pts/N of a terminal you type in, or "
                f"use backend=pynput (X display) or a gamepad/spacemouse teleop."
            )
        try:
            self._saved_attrs = termios.tcgetattr(fd)
            ttymod.setcbreak(fd, termios.TCSANOW)  # no line buffering, no echo; Ctrl-C still signals
        except termios.error as e:
            if own:
                os.close(fd)
            self._saved_attrs = None
            raise DeviceUnavailableError(
                f"keyboard backend=terminal: cannot switch {what} to cbreak mode: {e}"
            ) from None
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
