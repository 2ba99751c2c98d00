"""Human teleop devices behind robot_rl's `Teleop`: keyboard, gamepad and 3Dconnexion SpaceMouse.

Each device emits an OSC end-effector delta action (7 float32 in [-1, 1]: dx dy dz dax day daz gripper, gripper
-1 = open, +1 = close; other layouts via `action_dim` / `gripper_index`), says when the human is `intervening`,
and pushes episode events ("save", "rerecord", "stop", "success") into its `controls` queue. A device that cannot
be opened raises `DeviceUnavailableError` at `connect()`, saying why and what to do. See docs/teleop.md.
"""

from __future__ import annotations

from robot_rl.interfaces import Teleop

from .base import DeviceUnavailableError, _DeviceTeleop
from .controls import EPISODE_EVENTS, EpisodeControls
from .gamepad import GamepadTeleop
from .keyboard import KeyboardTeleop
from .spacemouse import SpaceMouseTeleop

__all__ = [
    "DeviceUnavailableError",
    "EpisodeControls",
    "EPISODE_EVENTS",
    "KeyboardTeleop",
    "GamepadTeleop",
    "SpaceMouseTeleop",
    "make_device_teleop",
    "DEVICE_KINDS",
]

DEVICE_KINDS: dict[str, type[_DeviceTeleop]] = {
    "keyboard": KeyboardTeleop,
    "gamepad": GamepadTeleop,
    "spacemouse": SpaceMouseTeleop,
}


def make_device_teleop(kind: str, **kw) -> Teleop:
    """A human teleop device by kind ("keyboard", "gamepad", "spacemouse"); `kw` go to its constructor."""
    cls = DEVICE_KINDS.get(kind)
    if cls is None:
        raise ValueError(f"unknown teleop device {kind!r}; choose one of: {', '.join(DEVICE_KINDS)}")
    return cls(**kw)
