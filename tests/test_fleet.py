"""A fleet: several robots feed one learner over CURVE, each with its own sender id, keys, seeds and statistics; a
robot that joins late, leaves or restarts is handled without touching the others; the learner's telemetry and
summary show every robot's rate and health. The launch/ recipe for 4 robots on 4 machines runs here over loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from conftest import REPO, free_port
from robot_rl.transport import TransitionSender
from robot_rl.transport.security import fleet_keys, load_client_keys


def transition(i: int, robot: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 * robot + i)
    return {
        "obs.state": rng.standard_normal(4).astype(np.float32),
        "action": rng.uniform(-1, 1, 2).astype(np.float32),
        "reward": np.float32(0),
        "done": np.bool_(i % 10 == 9),
        "episode": np.int64(i // 10),
        "step": np.int64(i % 10),
    }


def learner_config(path: Path, keys: str, ports) -> Path:
    with initialize_config_module("robot_rl.configs", version_base=None):
        cfg = compose(
            "session",
            overrides=[
                "session.learner=remote",
                f"session.curve_keys_dir={keys}",
                f"session.transitions_port={ports[0]}",
                f"session.weights_port={ports[1]}",
                "session.learner_metrics_s=0.3",
                "algo.min_transitions=1000000",  # this test is about ingest: no training
                "device=cpu",
                "tensorboard=false",
            ],
        )
    OmegaConf.save(cfg, path, resolve=True)
    return path


class Robot:
    """One robot's stream: a TransitionSender with its own keys and outbox (a restart reopens the outbox)."""

    def __init__(self, k: int, keys: dict, endpoint: str, outbox: Path):
        self.k, self.name = k, f"robot{k}"
        curve = load_client_keys(keys[self.name], str(Path(keys[self.name]) / "server.key"))
        self.sender = TransitionSender(
            endpoint, self.name, batch_size=8, max_batch_delay_s=0.01, heartbeat_interval_s=0.02, curve=curve,
            outbox_dir=outbox,
        ).start()  # fmt: skip

    def send(self, n: int, rate_hz: float = 200.0) -> None:
        for _ in range(n):
            self.sender.submit(transition(self.sender.next_seq, self.k))
            time.sleep(1.0 / rate_hz)

    def close(self) -> int:
        return self.sender.close(linger_s=30.0)


def test_robots_join_late_leave_and_restart_without_touching_the_others(tmp_path):
    ports = free_port(), free_port()
    keys = fleet_keys(str(tmp_path / "keys"), 3)
    cfg = learner_config(tmp_path / "learner.yaml", keys["learner"], ports)
    learner = subprocess.Popen(
        [sys.executable, "-m", "robot_rl.learner", str(cfg), str(tmp_path / "learner")],
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    endpoint = f"tcp://127.0.0.1:{ports[0]}"
    try:
        r0 = Robot(0, keys, endpoint, tmp_path / "out0")
        r1 = Robot(1, keys, endpoint, tmp_path / "out1")
        r0.send(40)
        r1.send(40)
        r2 = Robot(2, keys, endpoint, tmp_path / "out2")  # joins late
        r2.send(30)
        assert r1.close() == 0  # leaves, everything acknowledged ...
        r0.send(40)  # ... while the others go on
        r1 = Robot(1, keys, endpoint, tmp_path / "out1")  # restarts on its outbox: the same stream, next seq
        assert r1.sender.next_seq == 40
        r1.send(20)
        r2.send(30)
        time.sleep(0.8)  # a telemetry line with all three connected
        left = {r.name: r.close() for r in (r0, r1, r2)}
    finally:
        learner.send_signal(signal.SIGINT)
        code = learner.wait(timeout=120)
    assert code == 0 and left == {"robot0": 0, "robot1": 0, "robot2": 0}
    summary = json.loads((tmp_path / "learner" / "summary.json").read_text())
    robots = summary["robots"]
    expected = {"robot0": 80, "robot1": 60, "robot2": 60}
    assert {n: r["stored"] for n, r in robots.items()} == expected
    assert all(r["unacked"] == 0 and r["streams"] == 1 and r["rate_hz"] > 0 for r in robots.values()), robots
    for name, n in expected.items():  # every seq exactly once, per robot
        s = summary["senders"][name]
        assert (s["transitions"], s["unique"], s["min_seq"], s["max_seq"]) == (n, n, 0, n - 1)
    assert all(r["health"] in ("ok", "silent") and r["ack_p99_ms"] is not None for r in robots.values())
    lines = [json.loads(x) for x in (tmp_path / "learner" / "robots.jsonl").read_text().splitlines()]
    seen = [x["robots"] for x in lines if len(x.get("robots", {})) == 3]
    assert seen, "no telemetry line with the three robots"
    assert any(all(r["health"] == "ok" for r in line.values()) for line in seen)


@pytest.mark.skipif(not Path("/usr/bin/bash").exists() and not Path("/bin/bash").exists(), reason="needs bash")
def test_fleet_recipe_four_robots_on_loopback_with_keys(tmp_path):
    """launch/fleet_local.sh: keys for 4 robots, the learner bound with them, 4 control processes (sim Lift, each its
    own keys, sender id and seeds) started by fleet_robot.sh, the last one late; nothing lost."""
    ports = free_port(), free_port()
    env = dict(
        os.environ,
        OUT=str(tmp_path / "fleet"),
        N="4",
        LATE_S="2",
        TRANSITIONS_PORT=str(ports[0]),
        WEIGHTS_PORT=str(ports[1]),
        PYTHON=sys.executable,
        ROBOT_RL=str(Path(sys.executable).parent / "robot-rl"),
        OMP_NUM_THREADS="1",
        MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"),
    )
    overrides = [
        "session.episodes=1",
        "session.expert_episodes=1",
        "session.max_episode_steps=20",
        "session.stop_on_success=false",
        "session.rate_hz=40",
        "robot.control_freq=40",
        "session.watchdog_s=1.0",
        "device=cpu",
        "tensorboard=false",
    ]
    res = subprocess.run(
        ["bash", "launch/fleet_local.sh", *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=400
    )
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [x for x in res.stdout.splitlines() if x.startswith("robot")]
    assert len(lines) == 4 and all("lost 0" in x and "sent 20" in x for x in lines), res.stdout
    learner = json.loads((tmp_path / "fleet/learner/learner/summary.json").read_text())
    assert sorted(learner["robots"]) == [f"robot{k}" for k in range(4)]
    assert learner["replay_rows"] == 80
    seeds = {json.loads((tmp_path / f"fleet/robot{k}/control/summary.json").read_text())["seed"] for k in range(4)}
    assert len(seeds) == 4
    assert len(list((tmp_path / "fleet/keys/learner/authorized_clients").glob("robot*.key"))) == 4
