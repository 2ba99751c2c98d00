"""Sparse success rewards: the image success classifier trained on a real (MuJoCo Lift, 48x48 camera) episode
store, its save/load round trip, the per-tick detectors (classifier threshold / consecutive / gate, operator key),
the factory's config errors, and the success key through the teleop devices and the recorder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from robot_rl.config import ConfigError
from robot_rl.data.episode_store import EpisodeStore
from robot_rl.hardware.teleop import EPISODE_EVENTS, EpisodeControls, KeyboardTeleop
from robot_rl.interfaces import OBS_PREFIX, Feature, Robot
from robot_rl.reward import ClassifierSuccess, OperatorSuccess, SimSuccess, SuccessDetector, make_success_detector
from robot_rl.reward.classifier import (
    ClassifierDataError,
    SuccessClassifier,
    load_classifier,
    save_classifier,
    train_classifier,
)

from builders import ScriptedControls, record_config
from conftest import REPO, robot_rl_cli

pytestmark = pytest.mark.usefixtures("one_thread")

CAM = 48  # camera size of the test store: small enough to record and train in seconds
EPISODES, STEPS = 6, 60  # the scripted Lift expert lifts the cube at ~step 35: both classes in every episode
TINY_ENCODER = {"channels": [16, 32, 32], "strides": [2, 2, 1], "feature_dim": 32, "num_keypoints": 16}


# ================================================================================================== fixtures
def build_lift_store(path, episodes: int = EPISODES, steps: int = STEPS, size: int = CAM, seed: int = 0):
    """Scripted Lift expert episodes with an agentview camera; `success` labels the state the frame shows."""
    from robot_rl.factory import make_robot
    from robot_rl.sim.experts import make_expert

    cfg = OmegaConf.load(REPO / "configs" / "robot" / "lift.yaml")
    cfg.cameras, cfg.camera_height, cfg.camera_width = ["agentview"], size, size
    robot = make_robot(cfg)
    robot.connect()
    try:
        feats = {OBS_PREFIX + k: f for k, f in robot.observation_features.items()}
        feats["action"] = robot.action_feature
        feats["success"] = Feature((), "bool")
        store = EpisodeStore.create(path, feats, fps=20)
        writer, expert = store.writer(), make_expert("Lift", seed=seed)
        for ep in range(episodes):
            obs = robot.reset(seed=seed + ep)
            expert.reset()
            writer.begin({"seed": seed + ep})
            for _ in range(steps):
                action = expert.get_action(obs)
                writer.add(
                    {
                        **{OBS_PREFIX + k: v for k, v in obs.items()},
                        "action": action,
                        "success": np.bool_(robot.is_success()),
                    }
                )
                robot.send_action(action)
                obs = robot.get_observation()
            writer.save()
        store.close()
    finally:
        robot.disconnect()
    return path


@pytest.fixture(scope="module")
def lift_store(tmp_path_factory):
    return build_lift_store(tmp_path_factory.mktemp("reward") / "store")


@pytest.fixture(scope="module")
def trained(lift_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("clf")
    result = train_classifier(
        lift_store,
        out,
        ["agentview_image"],
        steps=300,
        batch_size=32,
        lr=1e-3,
        val_fraction=0.34,
        seed=0,
        device="cpu",
        encoder=TINY_ENCODER,
        hidden=[64],
        log_every=100,
    )
    return out, result


class StubRobot(Robot):
    """Describes its observations, nothing else (the factory checks a classifier / gate against them)."""

    def __init__(self, features: dict[str, Feature], success: bool = False):
        self._features, self._success = features, success

    @property
    def observation_features(self):
        return self._features

    @property
    def action_feature(self):
        return Feature((7,))

    @property
    def is_connected(self):
        return True

    def connect(self):
        pass

    def disconnect(self):
        pass

    def get_observation(self):
        return {}

    def send_action(self, action):
        return action

    def is_success(self) -> bool:
        return self._success


def cam_robot(size: int = CAM, **kw) -> StubRobot:
    return StubRobot(
        {
            "agentview_image": Feature((size, size, 3), "uint8"),
            "robot0_eef_pos": Feature((3,)),
            "gripper": Feature((2,)),
        },
        **kw,
    )


class StubClassifier:
    """predict_proba returns the scripted probabilities in order."""

    def __init__(self, probs):
        self.probs = list(probs)

    def predict_proba(self, obs):
        return self.probs.pop(0)


# ================================================================================================== training
def test_classifier_learns_lift_success_from_frames(trained, lift_store):
    out, r = trained
    labels = EpisodeStore.open(lift_store).array("success")
    assert r["frames"] == {"positive": int(labels.sum()), "negative": int((~labels).sum())}
    assert r["frames"]["positive"] > 0 and r["frames"]["negative"] > 0
    val = r["val"]
    assert len(r["episodes"]["val"]) == 2 and not set(r["episodes"]["val"]) & set(r["episodes"]["train"])
    assert val["frames"] == 2 * STEPS and val["positive"] + val["negative"] == val["frames"]
    # far above always answering the majority class (~55-60 % here), at the deployment threshold 0.85
    assert val["accuracy"] >= 0.9 and val["accuracy"] > val["majority_rate"] + 0.25, val
    assert val["precision"] >= 0.85 and val["recall"] >= 0.85 and r["train"]["accuracy"] >= 0.9
    c = val["confusion"]
    assert c["tp"] + c["fp"] + c["tn"] + c["fn"] == val["frames"] and c["tp"] + c["fn"] == val["positive"]
    saved = json.loads((out / "classifier.json").read_text())
    assert saved["val"]["accuracy"] == val["accuracy"] and saved["steps"] == 300 and saved["wall_s"] > 0


def test_loaded_classifier_reproduces_the_reported_metrics(trained, lift_store):
    out, r = trained
    clf = load_classifier(out)  # the directory; rebuilt from the safetensors metadata alone
    assert not clf.training and clf.image_keys == ["agentview_image"] and clf.threshold == 0.85
    store = EpisodeStore.open(lift_store)
    rows = np.concatenate([np.arange(*store.episode_bounds(i)) for i in r["episodes"]["val"]])
    frames = store.array("obs.agentview_image")[rows]
    prob = clf.predict_proba({"agentview_image": frames})
    acc = float(np.mean((prob >= 0.85) == store.array("success")[rows]))
    assert acc == pytest.approx(r["val"]["accuracy"])
    # one frame -> a float equal to that frame's batched probability; torch input works as well
    p0 = clf.predict_proba({"agentview_image": frames[5]})
    assert isinstance(p0, float) and p0 == pytest.approx(float(prob[5]), abs=1e-6)
    assert clf.predict_proba({"agentview_image": torch.as_tensor(frames[5])}) == pytest.approx(p0, abs=1e-6)


def test_save_load_round_trip_is_exact_with_lowdim_stats(tmp_path):
    torch.manual_seed(0)
    clf = SuccessClassifier({"cam": (16, 16, 3)}, {"eef": 3}, encoder=TINY_ENCODER, hidden=[8], threshold=0.9)
    clf.set_lowdim_stats(np.array([1.0, 2.0, 3.0]), np.array([0.5, 0.0, 2.0]))  # a constant entry: std floored
    path = save_classifier(clf, tmp_path / "c.safetensors")
    loaded = load_classifier(path)
    assert loaded.config == clf.config and loaded.threshold == 0.9
    rng = np.random.default_rng(0)
    obs = {"cam": rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8), "eef": rng.normal(size=(5, 3))}
    clf.eval()
    np.testing.assert_array_equal(loaded.predict_proba(obs), clf.predict_proba(obs))
    assert loaded.lowdim_std.min() > 0
    clf.train()  # predict_proba never augments, whatever the mode
    np.testing.assert_array_equal(clf.predict_proba(obs), loaded.predict_proba(obs))
    assert clf.training
    with pytest.raises(ValueError, match=r"trained on \(16, 16, 3\)"):
        loaded.predict_proba({"cam": np.zeros((32, 32, 3), np.uint8), "eef": np.zeros(3)})
    with pytest.raises(KeyError, match="lacks"):
        loaded.predict_proba({"cam": np.zeros((16, 16, 3), np.uint8)})
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        load_classifier(tmp_path / "nowhere")


def test_training_data_errors_name_the_problem(lift_store, tmp_path):
    with pytest.raises(ClassifierDataError, match=r"no observation key\(s\) \['wristcam_image'\].*agentview_image"):
        train_classifier(lift_store, tmp_path, ["wristcam_image"], steps=1)
    with pytest.raises(ClassifierDataError, match="put it in lowdim_keys"):
        train_classifier(lift_store, tmp_path, ["robot0_eef_pos"], steps=1)
    with pytest.raises(ClassifierDataError, match="no label key 'reward'"):
        train_classifier(lift_store, tmp_path, ["agentview_image"], label_key="reward", steps=1)
    # a store whose frames are all failures: nothing to learn "success" from
    src = EpisodeStore.open(lift_store)
    store = EpisodeStore.create(tmp_path / "neg", src.features, fps=20)
    w = store.writer()
    ep = src.episode(0)
    for t in range(10):
        w.add({k: (np.bool_(False) if k == "success" else v[t]) for k, v in ep.items()})
    w.save()
    store.close()
    with pytest.raises(ClassifierDataError, match="no positive"):
        train_classifier(tmp_path / "neg", tmp_path / "out", ["agentview_image"], steps=1)


def test_train_classifier_cli_writes_run_info(lift_store, tmp_path):
    proc = robot_rl_cli(
        "train-classifier",
        f"classifier.data={lift_store}",
        "classifier.steps=5",
        "classifier.batch_size=8",
        "classifier.device=cpu",
        "classifier.num_threads=1",
        "classifier.encoder.channels=[8,8]",
        "classifier.encoder.strides=[2,2]",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "run"
    assert (run / "classifier.safetensors").is_file() and (run / "classifier.json").is_file()
    assert "classifier:" in (run / "config.yaml").read_text() and (run / "run_info.json").is_file()
    assert "val: accuracy" in proc.stdout
    assert load_classifier(run).encoder_cfg["channels"] == [8, 8]


def test_train_classifier_config_errors(tmp_path):
    from hydra import compose, initialize_config_module

    from robot_rl.reward.classifier import main

    def cfg(*overrides):
        with initialize_config_module("robot_rl.configs", version_base=None):
            return compose("classifier", overrides=list(overrides))

    for overrides, msg in [
        ((), "classifier.data is empty"),
        ((f"classifier.data={tmp_path / 'nope'}",), "classifier.data: .* not an episode store"),
        (("classifier.data=x", "classifier.image_keys=[]"), "image_keys is empty"),
        (("classifier.data=x", "classifier.steps=0"), "steps must be a positive integer"),
        (("classifier.data=x", "classifier.threshold=1.5"), r"threshold must be in \(0, 1\)"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            main(cfg(*overrides), tmp_path / "run")


# ================================================================================================== detectors
def test_classifier_success_threshold_consecutive_and_gate():
    high = {"robot0_eef_pos": np.array([0.0, 0.0, 0.90])}
    low = {"robot0_eef_pos": np.array([0.0, 0.0, 0.80])}
    d = ClassifierSuccess(
        StubClassifier([0.9, 0.95, 0.5, 0.9, 0.9, 0.99, 0.99]),
        threshold=0.85,
        consecutive=2,
        gate={"key": "robot0_eef_pos", "index": 2, "min": 0.84, "max": None},
    )
    assert isinstance(d, SuccessDetector)
    assert [d(high), d(high)] == [False, True]  # two ticks in a row above threshold
    assert d(high) is False and d.last_probability == 0.5 and d.streak == 0  # a dip resets the count
    assert [d(high), d(low)] == [False, False] and d.last_gate_ok is False  # the gate breaks the streak
    assert d.last_probability == 0.9  # computed even when the gate fails (telemetry)
    d.reset()
    assert d.last_probability is None and d.streak == 0
    assert [d(high), d(high)] == [False, True]

    one = ClassifierSuccess(StubClassifier([0.85, 0.8499]), threshold=0.85)
    assert one({}) is True and one({}) is False  # >= threshold, no gate, consecutive 1
    with pytest.raises(KeyError, match="robot0_eef_pos"):
        ClassifierSuccess(StubClassifier([0.9]), gate={"key": "robot0_eef_pos", "index": 2, "min": 0.8})({})
    for bad, msg in [
        ({"key": "x"}, "min.*max"),
        ({"min": 1.0}, "needs `key`"),
        ({"key": "x", "min": 2, "max": 1}, "above"),
        ({"key": "x", "min": 1, "idx": 2}, "unknown"),
    ]:
        with pytest.raises(ValueError, match=msg):
            ClassifierSuccess(StubClassifier([]), gate=bad)
    with pytest.raises(ValueError, match="consecutive"):
        ClassifierSuccess(StubClassifier([]), consecutive=0)


def test_episode_controls_take_leaves_other_events():
    assert "success" in EPISODE_EVENTS
    c = EpisodeControls()
    for e in ("save", "success", "stop", "success"):
        c.push(e)
    assert c.take("success") is True and c.take("success") is False
    assert [c.poll(), c.poll(), c.poll()] == ["save", "stop", None]
    with pytest.raises(ValueError, match="unknown episode event"):
        c.take("explode")


def test_operator_success_latches_per_episode_and_leaves_other_keys():
    c = EpisodeControls()
    d = OperatorSuccess(c)
    c.push("success")  # pressed between episodes: not credited to the next one
    d.reset()
    c.push("save")
    assert d({}, None) is False
    c.push("success")
    assert d({}, None) is True and d({}, None) is True  # latched until the episode ends
    assert c.poll() == "save" and c.poll() is None  # the recorder's event is still there
    d.reset()
    assert d({}, None) is False


def test_success_key_on_keyboard_and_gamepad():
    kb = KeyboardTeleop(backend="terminal")
    kb._press("y")
    assert kb.controls.poll() == "success" and not kb.intervening  # marking success is not a takeover
    evdev = pytest.importorskip("evdev")
    from robot_rl.hardware.teleop import GamepadTeleop

    ec = evdev.ecodes
    g = GamepadTeleop()
    g._handle_event(evdev.InputEvent(1, 0, ec.EV_KEY, ec.BTN_NORTH, 1))
    assert g.controls.poll() == "success" and not g.intervening
    g._handle_event(evdev.InputEvent(1, 0, ec.EV_KEY, ec.BTN_SOUTH, 1))  # any other button still counts
    assert g.intervening


class NoCheckRobot(StubRobot):
    is_success = Robot.is_success  # a real robot's driver: no success check


def test_make_success_detector_sources_and_errors(tmp_path, caplog):
    robot = cam_robot(success=True)
    assert isinstance(make_success_detector(None, robot, None), SimSuccess)
    assert "no success check" not in caplog.text
    make_success_detector({"source": "sim"}, NoCheckRobot({}), None)
    assert "reward.source=operator or classifier" in caplog.text  # sim on hardware: warned, reward always 0
    d = make_success_detector(OmegaConf.create({"source": "sim", "threshold": 0.85, "classifier": None}), robot, None)
    assert isinstance(d, SimSuccess) and d({}, robot) is True
    kb = KeyboardTeleop(backend="terminal")
    assert isinstance(make_success_detector({"source": "operator"}, robot, kb), OperatorSuccess)
    with pytest.raises(ConfigError, match="reward.source=operator needs a teleop device.*teleop=keyboard"):
        make_success_detector({"source": "operator"}, robot, None)
    with pytest.raises(ConfigError, match="has no episode keys"):
        make_success_detector({"source": "operator"}, robot, object())
    with pytest.raises(ConfigError, match="choose one of: sim, operator, classifier"):
        make_success_detector({"source": "oracle"}, robot, None)
    with pytest.raises(ConfigError, match=r"unknown entries \['treshold'\]"):
        make_success_detector({"source": "sim", "treshold": 0.9}, robot, None)
    with pytest.raises(ConfigError, match="needs reward.classifier"):
        make_success_detector({"source": "classifier"}, robot, None)
    with pytest.raises(ConfigError, match="no success classifier at"):
        make_success_detector({"source": "classifier", "classifier": str(tmp_path / "x")}, robot, None)

    torch.manual_seed(0)
    save_classifier(
        SuccessClassifier({"agentview_image": (CAM, CAM, 3)}, encoder=TINY_ENCODER, hidden=[8], threshold=0.7),
        tmp_path / "classifier.safetensors",
    )
    gate = {"key": "robot0_eef_pos", "index": 2, "min": 0.84, "max": None}
    d = make_success_detector(
        {"source": "classifier", "classifier": str(tmp_path), "threshold": None, "consecutive": 3, "gate": gate},
        robot,
        None,
    )
    assert isinstance(d, ClassifierSuccess) and d.threshold == 0.7 and d.consecutive == 3 and d.gate == gate
    obs = {"agentview_image": np.zeros((CAM, CAM, 3), np.uint8), "robot0_eef_pos": np.array([0, 0, 1.0])}
    d.reset()
    d(obs, robot)
    assert 0.0 <= d.last_probability <= 1.0
    ok = {"source": "classifier", "classifier": str(tmp_path)}
    with pytest.raises(ConfigError, match=r"trained on 'agentview_image' at \(48, 48, 3\).*\(84, 84, 3\)"):
        make_success_detector(ok, cam_robot(size=84), None)
    with pytest.raises(ConfigError, match="gate.key='eef'"):
        make_success_detector({**ok, "gate": {"key": "eef", "min": 0.8}}, robot, None)
    with pytest.raises(ConfigError, match="gate.index=5"):
        make_success_detector({**ok, "gate": {"key": "robot0_eef_pos", "index": 5, "min": 0.8}}, robot, None)
    with pytest.raises(ConfigError, match="consecutive"):
        make_success_detector({**ok, "consecutive": 0}, robot, None)


# ================================================================================================== recorder
def test_recorder_success_key_labels_this_and_later_steps(tmp_path):
    from robot_rl.commands.record import Recorder

    rec = Recorder(
        record_config(
            tmp_path / "store",
            "record.episodes=2",
            "record.max_episode_steps=15",
            "record.fps=1000",
            "record.stop_on_success=false",
            "record.min_free_gb=0",
        ),
        tmp_path / "run",
    )
    # the key is pressed at step 7 of episode 0; the cube is not lifted by step 15
    rec.controls = ScriptedControls({8: "success"})
    summary = rec.run()
    store = EpisodeStore.open(tmp_path / "store")
    first, second = store.episode(0)["success"], store.episode(1)["success"]
    np.testing.assert_array_equal(first, np.arange(15) >= 7)
    assert not second.any()
    assert store.episodes[0]["operator_success_step"] == 7 and store.episodes[0]["success"] is True
    assert "operator_success_step" not in store.episodes[1] and store.episodes[1]["success"] is False
    assert summary["saved"] == 2
