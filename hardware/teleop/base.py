"""What every teleop device shares: action layout, gripper / takeover state, key-or-button actions.

Devices keep raw input state and map it to an action with a pure `_action_from_state(...)`, so mappings are
testable without hardware; reader threads only update that state.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable

import numpy as np

from robot_rl.interfaces import Feature, Teleop

from .controls import EPISODE_EVENTS, EpisodeControls

log = logging.getLogger(__name__)

DEFAULT_ACTION_NAMES = ("dx", "dy", "dz", "dax", "day", "daz", "gripper")
GRIPPER_OPEN, GRIPPER_CLOSED = -1.0, 1.0
# what a key / button can be bound to on every device
DEVICE_ACTIONS = EPISODE_EVENTS + ("gripper_open", "gripper_close", "gripper_toggle", "takeover")


class DeviceUnavailableError(RuntimeError):
    """A teleop device cannot be opened; the message says why and what to do."""


class _DeviceTeleop(Teleop):
    """Shared action layout, gripper / takeover state and key-or-button actions of the human devices."""

    name = "device"
    n_mapped = 3  # leading non-gripper action entries this device drives

    def __init__(
        self,
        action_dim: int = 7,
        gripper_index: int | None = -1,
        controls: EpisodeControls | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
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
        return Feature(
            shape=(self.action_dim,),
            dtype="float32",
            names=names,
            low=np.full(self.action_dim, -1.0, np.float32),
            high=np.full(self.action_dim, 1.0, np.float32),
        )

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

    def __init__(
        self, fd: int, on_readable: Callable[[], bool], name: str, on_error: Callable[[str], None] | None = None
    ):
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
