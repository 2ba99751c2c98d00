"""A session under faults, through the real CLI (two or more OS processes over ZMQ): a stop signal to the session
alone (also when it started with SIGINT ignored), the session itself killed, a control process SIGKILLed and
resumed, a drain that times out, a full disk, nobody to drive. Each checks what matters: the robot stops at the
next tick, nothing is lost or stored twice, and the final line, summary.json and exit code tell the truth.

Every wait is an event wait with a generous deadline (the machine may be busy); nothing asserts a duration."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module

from conftest import REPO
from test_session import FAST, endpoints

from robot_rl.commands.session import preflight_warnings
from robot_rl.control.learning_curve import learning_curve
from robot_rl.control.telemetry import read_jsonl


def start_session(run_dir, ports, *extra, ignore_sigint=False):
    """The session as a script's background job would start it: its own process group (a signal reaches only
    the process it is sent to), optionally with SIGINT ignored (what a shell does for `cmd &`)."""

    def preexec():
        if ignore_sigint:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    env = dict(os.environ, OMP_NUM_THREADS="1")
    log_path = Path(str(run_dir) + ".log")  # a file, not a pipe: nobody has to keep reading it
    proc = subprocess.Popen(
        [sys.executable, "-m", "robot_rl.cli", "session", *FAST, *endpoints(ports), f"hydra.run.dir={run_dir}", *extra],
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=preexec,
        cwd=REPO,
        env=env,
    )
    proc.log_path = log_path
    return proc


def finish(proc, timeout_s=300.0) -> str:
    """Wait for the session to exit; its output."""
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"the session did not exit:\n{proc.log_path.read_text()[-4000:]}") from None
    return proc.log_path.read_text()


def wait_for(predicate, what, timeout_s=180.0, proc=None):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out = proc.log_path.read_text()
            raise AssertionError(f"the session ended before {what}:\n{out[-4000:]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def policy_drives(control_dir):
    """An episode driven by the policy with learner weights is logged."""
    return lambda: any(
        str(e.get("driven_by", "")).startswith("policy (weights v") for e in read_jsonl(control_dir / "episodes.jsonl")
    )


def pids(pattern):
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def tree(pid):
    """`pid` and its descendants (the learner may run helper processes, e.g. its ingest)."""
    out = [pid]
    for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split():
        out += tree(int(child))
    return out


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def truthful(summary):
    """The invariants of a clean session's top-level summary."""
    t = summary["transitions"]
    assert summary["status"] == "ok" and summary["exit_code"] == 0 and not summary["problems"], summary["problems"]
    assert t["sent"] == t["stored"] > 0 and t["unacknowledged"] == 0 and t["lost"] == 0 and t["duplicates"] == 0
    assert set(summary["drain"].values()) == {"complete"}
    assert summary["episodes_logged"]["agree"]
    assert summary["episodes_logged"]["control_logs"] == summary["episodes_logged"]["replay"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_to_the_session_alone_stops_the_robot_at_the_next_tick(tmp_path, ports, sig):
    """SIGINT/SIGTERM to the parent only (a supervisor, `kill -INT PID`), the session started with SIGINT ignored
    (a background job): the robot is on its safe action from the next tick, everything is acknowledged, and the
    session exits 0 with a true summary."""
    run = tmp_path / "run"
    proc = start_session(run, ports, "session.episodes=200", ignore_sigint=True)
    wait_for(policy_drives(run / "control"), "the policy driving with learner weights", proc=proc)
    t_signal = time.time()
    os.kill(proc.pid, sig)
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    ticks = np.load(run / "control" / "ticks.npz")
    after = np.flatnonzero(ticks["t"] > t_signal)
    # the tick in progress when the signal came may finish; the next one is the safe action and the last
    assert len(after) <= 2 and ticks["forced_safe"][after[-1]], (len(after), ticks["forced_safe"][after])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["interrupted"] == signal.Signals(sig).name
    assert summary["exit_codes"] == {"control": {"robot0": 0}, "learner": 0}
    truthful(summary)
    assert summary["control"]["stop_reason"] == "SIGTERM"  # forwarded by the session
    assert "session done" in out and "0 unacknowledged" in out and "Traceback" not in out


def test_children_stop_on_their_own_when_the_session_dies(tmp_path, ports):
    run = tmp_path / "run"
    proc = start_session(run, ports, "session.episodes=200")
    wait_for(policy_drives(run / "control"), "the policy driving with learner weights", proc=proc)
    children = pids(f"robot_rl.(control|learner) .*{run}")
    assert len(children) == 2, children
    proc.kill()
    proc.wait(60)
    wait_for(lambda: not any(alive(p) for p in children), "the control process and the learner to exit", 120)
    control = json.loads((run / "control" / "summary.json").read_text())
    assert control["stop_reason"] in ("the session (parent process) died", "SIGTERM"), control["stop_reason"]
    ticks = np.load(run / "control" / "ticks.npz")
    assert ticks["forced_safe"][-1], "the robot is left on its safe action"


def test_control_process_killed_resumes_exactly_once(tmp_path, ports):
    """SIGKILL the control process mid-episode: the session restarts it (--resume, as session.resume=true); its
    outbox resends what was not acknowledged under the same stream and seqs, the cut episode is logged as
    interrupted, and the learner ends with every transition once and the same episodes as the control log."""
    run = tmp_path / "run"
    proc = start_session(run, ports, "session.episodes=6", "session.restart_crashed=1", "session.stop_on_success=false")
    wait_for(lambda: len(read_jsonl(run / "control" / "episodes.jsonl")) >= 2, "two episodes", proc=proc)
    wait_for(
        lambda: (run / "control" / "episode_started.json").exists()
        and json.loads((run / "control" / "episode_started.json").read_text())["episode"] >= 2,
        "episode 2 to start",
        proc=proc,
    )
    time.sleep(1.0)  # somewhere inside the episode (any moment will do)
    [control] = pids(f"robot_rl.control .*{run}")
    os.kill(control, signal.SIGKILL)
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    truthful(summary)
    assert summary["restarts"] == {"robot0": 1}
    episodes = read_jsonl(run / "control" / "episodes.jsonl")
    numbers = [e["episode"] for e in episodes]
    assert numbers == sorted(set(numbers)) and numbers[-1] == 5, numbers
    stored = summary["learner"]["senders"]["robot0"]
    sent = summary["control"]["transitions"]["stream_sent"]
    assert stored == {"transitions": sent, "unique": sent, "min_seq": 0, "max_seq": sent - 1}
    assert sum(e["steps"] for e in episodes) == sent  # every logged step reached the learner, once


def test_a_drain_that_times_out_is_an_error(tmp_path, ports):
    """The learner frozen (SIGSTOP) when the session is stopped: the control process waits drain_timeout_s for
    acknowledgements that cannot come, then says so: drain 'timed out', an ERROR line, exit code 1."""
    run = tmp_path / "run"
    proc = start_session(run, ports, "session.episodes=200", "session.drain_timeout_s=2", "session.watchdog_s=0.5")
    wait_for(policy_drives(run / "control"), "the policy driving with learner weights", proc=proc)
    [learner] = pids(f"robot_rl.learner .*{run}")
    frozen = tree(learner)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(0.5)  # a few transitions go unacknowledged
        os.kill(proc.pid, signal.SIGTERM)
        wait_for(lambda: (run / "control" / "summary.json").exists(), "the control process's summary", proc=proc)
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    out = finish(proc)
    assert proc.returncode == 1, out[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "error" and summary["exit_code"] == 1
    assert summary["drain"] == {"robot0": "timed out"}
    t = summary["transitions"]
    # unacknowledged ones stay in the outbox; the learner may have stored some of them after the control left
    assert t["unacknowledged"] > 0 and t["lost"] == 0 and t["stored"] + t["unacknowledged"] >= t["sent"]
    assert summary["exit_codes"]["control"] == {"robot0": 3}
    assert "session FAILED" in out and "ERROR: control process robot0: drain timed out" in out


def _can_mount_tmpfs(tmp_path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    r = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m none {probe}"], capture_output=True)
    if r.returncode == 0:
        return True
    r = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m none {probe}"], capture_output=True)
    return r.returncode == 0


def test_disk_full_stops_early_with_one_message_and_a_true_summary(tmp_path, ports):
    """The run dir on a small tmpfs (a private mount namespace; skipped where mounting is not permitted): the
    learner exits for the full disk and is not restarted, the control process is stopped (not restarted into a
    dead learner) with the robot on its safe action, everything acknowledged before the fault is stored, the
    summary is written, and nothing half-written is left (no .tmp, no 0-byte png)."""
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("mounting a tmpfs is not permitted here")
    run = tmp_path / "disk"
    run.mkdir()
    keep = tmp_path / "kept"
    unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    args = [
        sys.executable,
        "-m",
        "robot_rl.cli",
        "session",
        *FAST,
        *endpoints(ports),
        f"hydra.run.dir={run}",
        "session.episodes=400",
        "session.restart_crashed=2",
        "session.space_reserve_mb=1",
        "session.stop_on_success=false",
    ]
    # after the session, copy the run dir out of the tmpfs (the namespace and its mount end with the shell)
    script = f'mount -t tmpfs -o size=3m none {run} && "$@"; code=$?; cp -a {run} {keep}; exit $code'
    proc = subprocess.run(
        [*unshare, "sh", "-c", script, "sh", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 28, out[-5000:]
    assert out.count("robot_rl.commands.session ERROR: disk full:") == 1, out[-5000:]  # one clear message
    assert "session FAILED" in out and "restarts none" in out
    assert "Traceback" not in out, out[-5000:]
    summary = json.loads((keep / "summary.json").read_text())
    assert summary["disk_full"] and summary["status"] == "error" and summary["exit_code"] == 28
    assert summary["stopped_early"].startswith("disk full:")
    assert summary["restarts"] == {}, "nothing restarted: not the learner, not a control into a dead learner"
    control = summary["control"]
    assert control["stop_reason"] == "the session says the learner is gone"  # stopped, not restarted
    assert control["drain"]["result"] in ("learner gone", "complete")  # the last acks may still have come
    ticks = np.load(keep / "control" / "ticks.npz")
    assert ticks["forced_safe"][-1], "the robot is left on its safe action"
    # every transition the learner acknowledged before the fault is stored, once
    acked = control["transitions"]["stream_acked"]
    stored = summary["learner"]["senders"]["robot0"]
    assert stored["transitions"] == stored["unique"] >= acked > 0
    t = summary["transitions"]
    assert t["lost"] == 0 and t["sent"] == t["stored"] + t["unacknowledged"]
    leftovers = [
        p for p in keep.rglob("*") if p.name.endswith(".tmp") or (p.suffix == ".png" and p.stat().st_size == 0)
    ]
    assert not leftovers, leftovers


def test_nobody_to_drive_is_said_at_start_and_at_the_end(tmp_path, ports):
    """teleop=none with online BC: no labels, so no update, no weights, no actor: every tick is the safe action.
    The session warns before it starts and in its final line and summary.json."""
    run = tmp_path / "run"
    proc = start_session(run, ports, "teleop=none", "session.episodes=2", "session.max_episode_steps=20")
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    start = out.index("no actor at all")
    assert start < out.index("episode 0:"), "warned before the first episode"
    assert "WARNING: no actor at all" in out and "never loaded learner weights" in out
    summary = json.loads((run / "summary.json").read_text())
    assert any(w.startswith("no actor at all") for w in summary["warnings"])
    assert not summary["weights_loaded"] and summary["policy_steps"] == 0
    assert summary["control"]["safety_events"]["forced_safe"] == summary["control"]["steps"] + 1
    assert all("safe actions" in e["driven_by"] for e in read_jsonl(run / "control" / "episodes.jsonl"))


# ----------------------------------------------------------------------------------------- no processes
def _cfg(*overrides):
    with initialize_config_module("robot_rl.configs", version_base=None):
        return compose("session", overrides=list(overrides))


def test_preflight_warns_when_the_budget_cannot_reach_the_first_update():
    assert preflight_warnings(_cfg()) == []
    [w] = preflight_warnings(_cfg("session.episodes=1", "session.max_episode_steps=50"))
    assert w.startswith("budget cannot reach the first update") and "200" in w
    [w] = preflight_warnings(_cfg("session.episodes=1", "session.max_episode_steps=230"))
    assert w.startswith("budget cannot reach the first published weights")
    ws = preflight_warnings(_cfg("teleop=none"))
    assert ws[0].startswith("algo=online_bc learns from the teleop's labels") and ws[1].startswith("no actor at all")


def test_learning_curve_is_never_a_zero_byte_file(tmp_path, monkeypatch):
    out = tmp_path / "learning_curve.png"
    path, why = learning_curve([tmp_path / "control"], out)
    assert path is None and why and not out.exists()
    (tmp_path / "control").mkdir()
    rows = [{"episode": i, "success": i % 2 == 0, "steps": 10, "env_steps": 10 * (i + 1)} for i in range(5)]
    (tmp_path / "control" / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import matplotlib.figure

    def full_disk(self, fname, **kw):
        Path(fname).write_bytes(b"")  # what a full disk leaves: a created, empty file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    path, why = learning_curve([tmp_path / "control"], out)
    assert path is None and "No space left on device" in why
    assert list(tmp_path.glob("*.png")) == [] and list(tmp_path.glob(".*tmp")) == []
    monkeypatch.undo()
    path, why = learning_curve([tmp_path / "control"], out)
    assert path == out and why is None and out.stat().st_size > 0


def test_a_new_session_sets_an_earlier_one_aside(tmp_path):
    """Not resuming, in a run dir that holds an earlier session: its outputs move to previous/<time>/ (kept, never
    mixed with the new session's replay and counts)."""
    from robot_rl.commands.session import set_aside_previous

    assert set_aside_previous(tmp_path) is None
    for d in ("learner", "control"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "summary.json").write_text("{}")
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "config.yaml").write_text("this run's")
    dest = set_aside_previous(tmp_path)
    assert sorted(p.name for p in dest.iterdir()) == ["control", "learner", "summary.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "previous"]
