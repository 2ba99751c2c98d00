"""Human teleop devices: keyboard (terminal backend through a real pseudo-terminal), gamepad and SpaceMouse
mappings from injected states and evdev events, and the failure messages. No hardware, no display."""

from __future__ import annotations

import os
import sys
import time
import types

import numpy as np
import pytest

from robot_rl.hardware.teleop import (
    DeviceUnavailableError,
    EpisodeControls,
    GamepadTeleop,
    KeyboardTeleop,
    SpaceMouseTeleop,
    base,
    evdev_device,
    keyboard,
    make_device_teleop,
)

evdev = pytest.importorskip("evdev")
from evdev import InputEvent, ecodes as ec  # noqa: E402


class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def wait_for(pred, timeout: float = 3.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.002)


# ============================================================================================== episode controls
def test_episode_controls_fifo_and_validation():
    c = EpisodeControls()
    assert c.poll() is None
    for e in ("save", "rerecord", "stop"):
        c.push(e)
    assert len(c) == 3
    assert [c.poll(), c.poll(), c.poll(), c.poll()] == ["save", "rerecord", "stop", None]
    with pytest.raises(ValueError, match="save"):
        c.push("explode")


# ============================================================================================== keyboard (pty)
@pytest.fixture
def pty_keyboard():
    master, slave = os.openpty()
    clock = Clock()
    kb = KeyboardTeleop(backend="terminal", tty=slave, clock=clock, speed=0.5, hold_s=0.15)
    kb.connect()
    sent = [0]

    def press(data: bytes, keys: int | None = None):
        os.write(master, data)
        sent[0] += len(data) if keys is None else keys
        wait_for(lambda: kb.keys_seen >= sent[0])

    try:
        yield kb, press, clock, slave
    finally:
        kb.disconnect()
        os.close(master)
        os.close(slave)


def test_terminal_keyboard_motion_decay_and_takeover(pty_keyboard):
    kb, press, clock, slave = pty_keyboard
    assert kb.backend == "terminal"
    assert kb.action_feature.names == base.DEFAULT_ACTION_NAMES
    a = kb.get_action({})
    assert a.dtype == np.float32 and a.shape == (7,)
    np.testing.assert_array_equal(a, [0, 0, 0, 0, 0, 0, -1])
    assert not kb.intervening

    press(b"w")
    a = kb.get_action({})
    assert a[0] == pytest.approx(0.5) and np.all(a[1:6] == 0) and a[6] == -1
    assert kb.intervening
    clock.t += 0.1  # still inside hold_s
    assert kb.get_action({})[0] == pytest.approx(0.5) and kb.intervening
    clock.t += 0.1  # 0.2 s after the press: decayed
    assert kb.get_action({})[0] == 0 and not kb.intervening

    press(b"a")  # auto-repeat keeps it alive
    clock.t += 0.1
    press(b"a")
    clock.t += 0.1
    assert kb.get_action({})[1] == pytest.approx(0.5)
    clock.t += 0.1
    assert kb.get_action({})[1] == 0

    press(b"dF")  # -y and -z together (uppercase works)
    a = kb.get_action({})
    assert a[1] == pytest.approx(-0.5) and a[2] == pytest.approx(-0.5)
    press(b"s")
    assert kb.get_action({})[0] == pytest.approx(-0.5)
    clock.t += 1.0

    press(b"ws")  # opposite keys cancel
    assert kb.get_action({})[0] == 0
    clock.t += 1.0

    # arrow keys (escape sequences) are ignored, not read as Esc + letters; 'z' (unmapped) marks the end
    press(b"\x1b[A\x1b[Dz", keys=1)
    assert kb.controls.poll() is None and not kb.intervening and np.all(kb.get_action({})[:6] == 0)


def test_terminal_keyboard_gripper_toggle_and_takeover_latch(pty_keyboard):
    kb, press, clock, _ = pty_keyboard
    press(b" ")
    assert kb.get_action({})[6] == 1.0
    assert kb.intervening  # a gripper toggle is executed, so it counts as an intervention
    press(b" ")  # auto-repeat of the same press (within debounce_s): no second toggle
    assert kb.get_action({})[6] == 1.0
    clock.t += 1.0
    press(b" ")
    assert kb.get_action({})[6] == -1.0
    clock.t += 1.0
    assert not kb.intervening

    press(b"i")
    clock.t += 5.0
    assert kb.intervening  # latched
    np.testing.assert_array_equal(kb.get_action({})[:6], 0)
    clock.t += 1.0
    press(b"i")
    assert not kb.intervening

    press(b" ")
    kb.reset()  # episode start: gripper open, latch off
    assert kb.get_action({})[6] == -1.0


def test_terminal_keyboard_episode_keys_in_order(pty_keyboard):
    kb, press, clock, _ = pty_keyboard
    press(b"\r")  # Enter (CR -> LF in cbreak mode)
    press(b"x")
    press(b"q")
    assert [kb.controls.poll() for _ in range(4)] == ["save", "rerecord", "stop", None]
    clock.t += 1.0
    press(b"n\x7f")  # n = save, Backspace = rerecord
    clock.t += 1.0
    press(b"\x1b", keys=1)  # lone Esc = stop
    assert [kb.controls.poll() for _ in range(4)] == ["save", "rerecord", "stop", None]


def test_terminal_keyboard_restores_tty_mode():
    import termios

    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        kb = KeyboardTeleop(backend="terminal", tty=slave)
        kb.connect()
        assert not termios.tcgetattr(slave)[3] & termios.ICANON
        kb.disconnect()
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_terminal_keyboard_pushes_to_given_controls_and_tty_path():
    master, slave = os.openpty()
    controls = EpisodeControls()
    kb = make_device_teleop("keyboard", backend="terminal", tty=os.ttyname(slave), controls=controls)
    try:
        kb.connect()
        os.write(master, b"q")
        wait_for(lambda: len(controls) == 1)
        assert kb.controls is controls and controls.poll() == "stop"
    finally:
        kb.disconnect()
        os.close(master)
        os.close(slave)


def test_parse_terminal_bytes():
    keys, rest = keyboard._parse_terminal_bytes(b"W \n\r\x7f\x08\x1b[1;5A\x1bOPq\x1b")
    assert keys == ["w", "space", "enter", "enter", "backspace", "backspace", "q", "esc"] and rest == b""
    keys, rest = keyboard._parse_terminal_bytes(b"w\x1b[1;", final=False)
    assert keys == ["w"] and rest == b"\x1b[1;"
    keys, rest = keyboard._parse_terminal_bytes(b"\x1b", final=False)
    assert keys == [] and rest == b"\x1b"


def test_keyboard_action_dim_and_gripper_index():
    kb = KeyboardTeleop(backend="terminal", action_dim=4, gripper_index=0, speed=2.0)
    a = kb._action_from_state({"w", "d"}, gripper=1.0)
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, [1.0, 1.0, -1.0, 0.0])  # clipped; gripper first, then x y z
    assert kb.action_feature.names == ("gripper", "dx", "dy", "dz")
    a = KeyboardTeleop(action_dim=10)._action_from_state({"r"}, gripper=-1.0)
    assert a.shape == (10,) and a[2] == 0.5 and a[9] == -1 and np.all(a[3:9] == 0)
    assert KeyboardTeleop(action_dim=3, gripper_index=None)._action_from_state({"f"}, 1.0).tolist() == [0, 0, -0.5]
    with pytest.raises(ValueError):
        KeyboardTeleop(action_dim=3, gripper_index=5)
    with pytest.raises(ValueError, match="terminal"):
        KeyboardTeleop(backend="magic")


# ============================================================================================== keyboard errors
def test_pynput_without_display(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("PYNPUT_BACKEND", raising=False)
    monkeypatch.delenv("PYNPUT_BACKEND_KEYBOARD", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    with pytest.raises(DeviceUnavailableError) as e:
        KeyboardTeleop(backend="pynput").connect()
    msg = str(e.value)
    assert "DISPLAY" in msg and "X11" in msg and "backend=terminal" in msg


def test_pynput_under_wayland(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("PYNPUT_BACKEND", raising=False)
    monkeypatch.delenv("PYNPUT_BACKEND_KEYBOARD", raising=False)
    monkeypatch.setenv("WAYLAND_DISPLAY", "wayland-0")
    monkeypatch.setattr(sys, "platform", "linux")
    with pytest.raises(DeviceUnavailableError) as e:
        KeyboardTeleop(backend="pynput").connect()
    msg = str(e.value)
    assert "Wayland" in msg and "backend=terminal" in msg and "global keys" in msg


def test_auto_backend_choice(monkeypatch, caplog):
    monkeypatch.setattr(sys, "platform", "linux")
    kb = KeyboardTeleop(backend="auto")
    monkeypatch.setattr(kb, "_stdin_is_tty", lambda: True)
    with caplog.at_level("INFO", logger=keyboard.__name__):
        assert kb._choose_backend({}) == "terminal"
    assert "DISPLAY" in caplog.text  # the fallback is logged with its reason
    assert kb._choose_backend({"DISPLAY": ":0", "WAYLAND_DISPLAY": "wayland-0"}) == "terminal"
    monkeypatch.setattr(kb, "_pynput_import_error", lambda: None)
    assert kb._choose_backend({"DISPLAY": ":0"}) == "pynput"
    monkeypatch.setattr(kb, "_pynput_import_error", lambda: "cannot connect to X server :0")
    assert kb._choose_backend({"DISPLAY": ":0"}) == "terminal"
    monkeypatch.setattr(kb, "_stdin_is_tty", lambda: False)
    with pytest.raises(DeviceUnavailableError) as e:
        kb._choose_backend({"DISPLAY": ":0"})
    assert "cannot connect to X server" in str(e.value) and "not a terminal" in str(e.value)
    with pytest.raises(DeviceUnavailableError, match="WAYLAND|Wayland"):
        kb._choose_backend({"WAYLAND_DISPLAY": "wayland-0"})


def test_terminal_backend_on_a_pipe():
    r, w = os.pipe()
    try:
        with pytest.raises(DeviceUnavailableError) as e:
            KeyboardTeleop(backend="terminal", tty=r).connect()
        msg = str(e.value)
        assert "not a terminal" in msg and "ssh -t" in msg
    finally:
        os.close(r)
        os.close(w)


def test_terminal_backend_with_missing_tty_path(tmp_path):
    with pytest.raises(DeviceUnavailableError, match="cannot open tty"):
        KeyboardTeleop(backend="terminal", tty=str(tmp_path / "nope")).connect()


def test_terminal_backend_when_stdin_is_not_a_tty(monkeypatch):
    r, w = os.pipe()
    f = os.fdopen(r, "r")
    try:
        monkeypatch.setattr(sys, "stdin", f)
        with pytest.raises(DeviceUnavailableError, match="stdin is not a terminal"):
            KeyboardTeleop(backend="terminal").connect()
    finally:
        f.close()
        os.close(w)


# ============================================================================================== evdev errors
@pytest.fixture
def no_input_dir(monkeypatch, tmp_path):
    d = tmp_path / "input"
    d.mkdir()
    monkeypatch.setattr(evdev_device, "INPUT_DIR", str(d))
    return d


@pytest.mark.parametrize("cls", [GamepadTeleop, SpaceMouseTeleop])
def test_evdev_no_devices(monkeypatch, no_input_dir, cls):
    monkeypatch.setattr(evdev, "list_devices", lambda *a, **k: [])
    with pytest.raises(DeviceUnavailableError) as e:
        cls().connect()
    msg = str(e.value)
    assert "no input devices" in msg and "device_path" in msg


def test_evdev_no_input_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(evdev_device, "INPUT_DIR", str(tmp_path / "missing"))
    monkeypatch.setattr(evdev, "list_devices", lambda *a, **k: [])
    with pytest.raises(DeviceUnavailableError, match="container"):
        GamepadTeleop().connect()


@pytest.mark.parametrize("cls,rule", [(GamepadTeleop, "ID_INPUT_JOYSTICK"), (SpaceMouseTeleop, "256f")])
def test_evdev_permission_denied_listing(monkeypatch, no_input_dir, cls, rule):
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(evdev, "list_devices", denied)
    with pytest.raises(DeviceUnavailableError) as e:
        cls().connect()
    msg = str(e.value)
    assert "permission denied" in msg and "`input` group" in msg and "udev" in msg and rule in msg


class FakeDevice:
    def __init__(self, path, name, vendor=0x045E, product=0x028E, caps=None, absinfo=None):
        self.path, self.name = path, name
        self.info = types.SimpleNamespace(vendor=vendor, product=product)
        self._caps = caps or {}
        self._absinfo = absinfo or {}
        self.closed = False
        self.fd = None

    def capabilities(self, absinfo=True, verbose=False):
        if not absinfo:
            return self._caps
        out = dict(self._caps)
        if ec.EV_ABS in out:
            out[ec.EV_ABS] = [(c, self._absinfo[c]) for c in self._caps[ec.EV_ABS]]
        return out

    def close(self):
        self.closed = True


def _fake_evdev(monkeypatch, devices: dict, denied=()):
    monkeypatch.setattr(evdev, "list_devices", lambda *a, **k: list(devices) + list(denied))

    def open_(path):
        if path in denied:
            raise PermissionError(13, "Permission denied", path)
        if path not in devices:
            raise FileNotFoundError(2, "No such file or directory", path)
        return devices[path]

    monkeypatch.setattr(evdev, "InputDevice", open_)


def test_evdev_permission_denied_on_devices_lists_found(monkeypatch, no_input_dir):
    kbd = FakeDevice("/dev/input/event0", "AT keyboard", caps={ec.EV_KEY: [ec.KEY_A]})
    _fake_evdev(monkeypatch, {"/dev/input/event0": kbd}, denied=["/dev/input/event7"])
    with pytest.raises(DeviceUnavailableError) as e:
        GamepadTeleop().connect()
    msg = str(e.value)
    assert "/dev/input/event7" in msg and "`input` group" in msg and "AT keyboard" in msg
    assert kbd.closed


def test_evdev_no_matching_device_lists_found(monkeypatch, no_input_dir):
    kbd = FakeDevice("/dev/input/event0", "AT keyboard", caps={ec.EV_KEY: [ec.KEY_A]})
    pad_touch = FakeDevice(
        "/dev/input/event3", "Touchpad", caps={ec.EV_ABS: [ec.ABS_X, ec.ABS_Y], ec.EV_KEY: [ec.BTN_TOUCH, 0x130]}
    )
    _fake_evdev(monkeypatch, {"/dev/input/event0": kbd, "/dev/input/event3": pad_touch})
    for cls in (GamepadTeleop, SpaceMouseTeleop):
        with pytest.raises(DeviceUnavailableError) as e:
            cls().connect()
        msg = str(e.value)
        assert "AT keyboard" in msg and "Touchpad" in msg and "/dev/input/event0" in msg and "device_path" in msg
    with pytest.raises(DeviceUnavailableError, match="does not exist"):
        GamepadTeleop(device_path="/dev/input/event9").connect()
    with pytest.raises(DeviceUnavailableError, match="name containing 'xbox'"):
        GamepadTeleop(device_name="xbox").connect()


def test_evdev_device_path_permission(monkeypatch, no_input_dir):
    _fake_evdev(monkeypatch, {}, denied=["/dev/input/event5"])
    with pytest.raises(DeviceUnavailableError, match="usermod -aG input"):
        SpaceMouseTeleop(device_path="/dev/input/event5").connect()


def test_device_search_picks_matching_devices(monkeypatch, no_input_dir):
    AbsInfo = evdev.AbsInfo
    pad = FakeDevice(
        "/dev/input/event4",
        "Xbox Wireless Controller",
        caps={ec.EV_ABS: [ec.ABS_X, ec.ABS_Y, ec.ABS_RY, ec.ABS_Z, ec.ABS_RZ], ec.EV_KEY: [ec.BTN_SOUTH, ec.BTN_EAST]},
        absinfo={
            ec.ABS_X: AbsInfo(0, -100, 100, 0, 0, 0),
            ec.ABS_Y: AbsInfo(0, -100, 100, 0, 0, 0),
            ec.ABS_RY: AbsInfo(0, -100, 100, 0, 0, 0),
            ec.ABS_Z: AbsInfo(0, 0, 1023, 0, 0, 0),
            ec.ABS_RZ: AbsInfo(0, 0, 1023, 0, 0, 0),
        },
    )
    sm = FakeDevice(
        "/dev/input/event12",
        "3Dconnexion SpaceMouse Compact",
        vendor=0x256F,
        product=0xC635,
        caps={ec.EV_REL: list(range(6)), ec.EV_KEY: [ec.BTN_0, ec.BTN_1]},
    )
    kbd = FakeDevice("/dev/input/event0", "AT keyboard", caps={ec.EV_KEY: [ec.KEY_A]})
    _fake_evdev(monkeypatch, {"/dev/input/event0": kbd, "/dev/input/event4": pad, "/dev/input/event12": sm})
    g = GamepadTeleop()
    assert g._open_device(evdev) is pad
    g._setup_from_device(pad)  # ranges from the device: -100..100 sticks, 0..1023 triggers
    assert g._normalize(ec.ABS_Y, -100) == -1.0 and g._normalize(ec.ABS_RZ, 1023) == 1.0
    assert SpaceMouseTeleop()._open_device(evdev) is sm
    assert GamepadTeleop(device_name="spacemouse")._open_device(evdev) is sm  # name override


def test_evdev_not_importable(monkeypatch):
    monkeypatch.setitem(sys.modules, "evdev", None)
    with pytest.raises(DeviceUnavailableError, match="pip install evdev"):
        GamepadTeleop().connect()
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(DeviceUnavailableError, match="Linux-only"):
        SpaceMouseTeleop().connect()


# ============================================================================================== gamepad mapping
def test_gamepad_mapping_deadzone_scaling_clipping():
    g = GamepadTeleop(speed=0.5, deadzone=0.2)
    a = g._action_from_state({ec.ABS_Y: -1.0, ec.ABS_X: 0.1, ec.ABS_RY: 0.6}, gripper=1.0)
    assert a.dtype == np.float32 and a.shape == (7,)
    assert a[0] == pytest.approx(0.5)  # stick up -> +x at speed
    assert a[1] == 0  # inside the deadzone
    assert a[2] == pytest.approx(-0.5 * (0.6 - 0.2) / 0.8)  # rescaled outside the deadzone; stick down -> -z
    assert np.all(a[3:6] == 0) and a[6] == 1.0
    a = GamepadTeleop(speed=3.0)._action_from_state({ec.ABS_X: -1.0}, gripper=-1.0)
    assert a[1] == 1.0  # clipped
    assert not g._intervening_from_state({ec.ABS_X: 0.1, ec.ABS_Z: 0.3}, set(), False)
    assert g._intervening_from_state({ec.ABS_RX: 0.5}, set(), False)  # any stick
    assert g._intervening_from_state({ec.ABS_RZ: 0.9}, set(), False)  # trigger
    assert g._intervening_from_state({}, {ec.BTN_SOUTH}, False)
    assert g._intervening_from_state({}, set(), True)


def test_gamepad_normalization_and_overrides():
    g = GamepadTeleop(
        axis_ranges={"ABS_X": [0, 255]},
        axes={"z": "ABS_RZ"},
        triggers={"ABS_RZ": None},
        buttons={"BTN_NORTH": "gripper_toggle", "BTN_SELECT": None},
        action_dim=5,
        gripper_index=0,
    )
    assert g._normalize(ec.ABS_X, 0) == -1.0 and g._normalize(ec.ABS_X, 255) == 1.0
    assert g._normalize(ec.ABS_Y, 32767) == pytest.approx(1.0)
    assert g._normalize(ec.ABS_Z, 255) == 1.0 and g._normalize(ec.ABS_Z, 0) == 0.0  # trigger: [0, 1]
    a = g._action_from_state({ec.ABS_RZ: 1.0, ec.ABS_X: 1.0}, gripper=-1.0)
    np.testing.assert_allclose(a, [-1.0, 0.0, -0.5, 0.5, 0.0])
    assert ec.BTN_SELECT not in g._button_actions and g._button_actions[ec.BTN_NORTH] == "gripper_toggle"
    with pytest.raises(ValueError, match="unknown action"):
        GamepadTeleop(buttons={"BTN_SOUTH": "dance"})
    with pytest.raises(ValueError, match="unknown event code"):
        GamepadTeleop(axes={"x": "ABS_NOPE"})
    with pytest.raises(ValueError, match="x, y, z"):
        GamepadTeleop(axes={"w": "ABS_X"})


def ev(etype, code, value):
    return InputEvent(1, 0, etype, code, value)


def syn():
    return ev(ec.EV_SYN, ec.SYN_REPORT, 0)


def test_gamepad_events():
    controls = EpisodeControls()
    g = GamepadTeleop(controls=controls, speed=1.0, deadzone=0.1)
    for e in (ev(ec.EV_ABS, ec.ABS_Y, -32768), ev(ec.EV_ABS, ec.ABS_RY, 32767), syn()):
        g._handle_event(e)
    a = g.get_action({})
    assert a[0] == pytest.approx(1.0) and a[2] == pytest.approx(-1.0) and a[6] == -1.0 and g.intervening
    g._handle_event(ev(ec.EV_ABS, ec.ABS_Y, 0))
    g._handle_event(ev(ec.EV_ABS, ec.ABS_RY, 0))
    assert not g.intervening and np.all(g.get_action({})[:6] == 0)

    g._handle_event(ev(ec.EV_ABS, ec.ABS_RZ, 255))  # right trigger: close
    assert g.get_action({})[6] == 1.0 and g.intervening
    g._handle_event(ev(ec.EV_ABS, ec.ABS_RZ, 0))
    g._handle_event(ev(ec.EV_KEY, ec.BTN_TL, 1))  # left shoulder: open
    assert g.get_action({})[6] == -1.0 and g.intervening
    g._handle_event(ev(ec.EV_KEY, ec.BTN_TL, 0))
    g._handle_event(ev(ec.EV_KEY, ec.BTN_TR, 1))
    g._handle_event(ev(ec.EV_KEY, ec.BTN_TR, 0))
    assert g.get_action({})[6] == 1.0 and not g.intervening

    for code in (ec.BTN_SOUTH, ec.BTN_EAST, ec.BTN_SELECT):
        g._handle_event(ev(ec.EV_KEY, code, 1))
        g._handle_event(ev(ec.EV_KEY, code, 2))  # autorepeat: ignored
        g._handle_event(ev(ec.EV_KEY, code, 0))
    assert [controls.poll() for _ in range(4)] == ["save", "rerecord", "stop", None]

    g._handle_event(ev(ec.EV_KEY, ec.BTN_START, 1))
    g._handle_event(ev(ec.EV_KEY, ec.BTN_START, 0))
    assert g.intervening  # takeover latched
    g.reset()
    assert not g.intervening and g.get_action({})[6] == -1.0

    # events between SYN_DROPPED and the next report are discarded, then the state is re-read
    g._handle_event(ev(ec.EV_ABS, ec.ABS_X, -32768))
    g._handle_event(ev(ec.EV_SYN, ec.SYN_DROPPED, 0))
    g._handle_event(ev(ec.EV_ABS, ec.ABS_Y, -32768))
    g._handle_event(syn())
    assert np.all(g.get_action({})[:6] == 0)


def test_gamepad_unplugged_stops_motion(caplog):
    g = GamepadTeleop()
    g._handle_event(ev(ec.EV_ABS, ec.ABS_Y, -32768))
    assert g.get_action({})[0] > 0

    class Gone:
        path = "/dev/input/event4"

        def read(self):
            raise OSError(19, "No such device")

    g._dev = Gone()
    with caplog.at_level("ERROR", logger=base.__name__):  # _fail logs it
        assert g._read_device() is False
    assert "unplugged" in caplog.text and g.error
    assert np.all(g.get_action({})[:6] == 0) and not g.intervening


# ============================================================================================== spacemouse
def test_spacemouse_mapping():
    sm = SpaceMouseTeleop(pos_scale=0.5, rot_scale=2.0, deadzone=0.1)
    # normalized values by axis index X, Y, Z, RX, RY, RZ
    a = sm._action_from_state({1: -1.0, 0: 0.05, 2: 0.55, 3: 0.3, 4: -0.1, 5: 1.0}, gripper=1.0)
    assert a.dtype == np.float32 and a.shape == (7,)
    assert a[0] == pytest.approx(0.5)  # push away (-Y) -> +x, scaled by pos_scale
    assert a[1] == 0  # deadzone
    assert a[2] == pytest.approx(-0.5 * 0.5)  # pressed down -> -z; (0.55 - 0.1) / 0.9 = 0.5
    assert a[3] == pytest.approx(0.0)  # RY inside the deadzone
    assert a[4] == pytest.approx(-2.0 * (0.3 - 0.1) / 0.9)  # -RX * rot_scale
    assert a[5] == -1.0  # -RZ * 2, clipped
    assert a[6] == 1.0
    assert sm._intervening_from_state({2: 0.5}, set(), False)
    assert not sm._intervening_from_state({2: 0.05}, set(), False)
    a = SpaceMouseTeleop(action_dim=6, gripper_index=None, axes={"z": "Z", "rz": None})._action_from_state(
        {2: 1.0, 5: 1.0}, gripper=1.0
    )
    np.testing.assert_allclose(a, [0, 0, 1, 0, 0, 0])
    with pytest.raises(ValueError, match="RX"):
        SpaceMouseTeleop(axes={"x": "W"})


def test_spacemouse_events():
    controls = EpisodeControls()
    sm = SpaceMouseTeleop(controls=controls, max_value=350.0)
    sm._handle_event(ev(ec.EV_REL, ec.REL_Y, -350))
    sm._handle_event(ev(ec.EV_REL, ec.REL_RZ, 175))
    sm._handle_event(syn())
    a = sm.get_action({})
    assert a[0] == pytest.approx(1.0) and a[5] < 0 and sm.intervening
    sm._handle_event(ev(ec.EV_REL, ec.REL_Y, 0))
    sm._handle_event(ev(ec.EV_REL, ec.REL_RZ, 0))
    assert not sm.intervening and np.all(sm.get_action({})[:6] == 0)
    # EV_ABS devices: normalized from the device's range
    sm._abs_ranges[ec.ABS_Z] = (-500.0, 500.0)
    sm._handle_event(ev(ec.EV_ABS, ec.ABS_Z, 500))
    assert sm.get_action({})[2] == pytest.approx(-1.0)
    sm._handle_event(ev(ec.EV_ABS, ec.ABS_Z, 0))

    sm._handle_event(ev(ec.EV_KEY, ec.BTN_0, 1))  # toggle gripper
    assert sm.get_action({})[6] == 1.0 and sm.intervening
    sm._handle_event(ev(ec.EV_KEY, ec.BTN_0, 0))
    sm._handle_event(ev(ec.EV_KEY, ec.BTN_0, 1))
    sm._handle_event(ev(ec.EV_KEY, ec.BTN_0, 0))
    assert sm.get_action({})[6] == -1.0
    sm._handle_event(ev(ec.EV_KEY, ec.BTN_1, 1))
    sm._handle_event(ev(ec.EV_KEY, ec.BTN_1, 0))
    assert controls.poll() == "save" and controls.poll() is None


def test_spacemouse_matching():
    sm = SpaceMouseTeleop()
    six_rel = {ec.EV_REL: list(range(6)), ec.EV_KEY: [ec.BTN_0, ec.BTN_1]}
    assert sm._matches(FakeDevice("p", "3Dconnexion SpaceMouse Wireless", vendor=0x256F), six_rel)
    assert sm._matches(FakeDevice("p", "3Dconnexion SpaceNavigator", vendor=0x046D), six_rel)
    assert not sm._matches(FakeDevice("p", "Logitech USB Receiver Mouse", vendor=0x046D), six_rel)
    assert not sm._matches(FakeDevice("p", "3Dconnexion KMJ", vendor=0x256F), {ec.EV_KEY: [ec.KEY_A]})


# ============================================================================================== factory
def test_factory_and_configs():
    from pathlib import Path

    from omegaconf import OmegaConf

    with pytest.raises(ValueError) as e:
        make_device_teleop("joystick")
    assert "gamepad" in str(e.value) and "keyboard" in str(e.value) and "spacemouse" in str(e.value)
    root = Path(__file__).resolve().parents[1] / "configs" / "teleop"
    for kind, cls in (("keyboard", KeyboardTeleop), ("gamepad", GamepadTeleop), ("spacemouse", SpaceMouseTeleop)):
        cfg = OmegaConf.to_container(OmegaConf.load(root / f"{kind}.yaml"))
        assert cfg.pop("type") == "device" and cfg["device"] == kind
        t = make_device_teleop(cfg.pop("device"), **cfg)
        assert isinstance(t, cls) and isinstance(t.controls, EpisodeControls)
        assert t.action_feature.shape == (7,)
