"""The learner's ingest path: acked = fsynced in the ingest log; a restart rebuilds the replay from zarr + the log's
tail exactly once; the schema survives restarts; NaN observations are quarantined; non-finite weights are never
published; a full disk stops acknowledging and exits with its own code. Real processes and sockets."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from robot_rl.learner.ingest_log import IngestLog, Record
from robot_rl.learner.process import EXIT_DISK_FULL
from robot_rl.learner.replay_buffer import ReplayBuffer
from robot_rl.transport import TransitionSender

DEADLINE_S = 120  # generous: the machine may be busy; every wait is for an event, never a duration


def transition(i: int, obs_dim: int = 10, image: int = 0) -> dict:
    t = {
        "obs.state": np.full(obs_dim, i, np.float32),
        "action": np.full(7, 0.1, np.float32),
        "expert_action": np.full(7, np.nan, np.float32),  # NaN = "nobody labelled it": legitimate
        "reward": np.float32(0),
        "episode": np.int64(i // 50),
        "step": np.int64(i % 50),
    }
    if image:
        t["obs.cam_image"] = np.random.default_rng(i).integers(0, 256, (image, image, 3), dtype=np.uint8)
    return t


def wait_for(predicate, what: str, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def learner_config(tmp_path: Path, ports, *overrides: str) -> Path:
    from hydra import compose, initialize_config_module

    with initialize_config_module("robot_rl.configs", version_base=None):
        cfg = compose(
            "session",
            overrides=[
                "algo.min_transitions=1000000000",
                "device=cpu",
                "tensorboard=false",
                "session.heartbeat_s=0.02",
                "session.learner_ingest.flush_s=0.2",
                "session.drain_timeout_s=5",
                f"session.transitions_port={ports[0]}",
                f"session.weights_port={ports[1]}",
                *overrides,
            ],
        )
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def start_learner(config: Path, run_dir: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "robot_rl.learner", str(config), str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def stop_learner(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 0, out
    return out


def send(endpoint: str, sender_id: str, seqs, start_seq: int = 0, **kw) -> TransitionSender:
    sender = TransitionSender(
        endpoint, sender_id, batch_size=8, max_batch_delay_s=0.0, heartbeat_interval_s=0.02, start_seq=start_seq
    ).start()
    for i in seqs:
        sender.submit(transition(i, **kw))
    return sender


def rebuilt(run_dir: Path) -> ReplayBuffer:
    """The replay exactly as a restarted learner rebuilds it: zarr's rows, then the log records after them."""
    replay = ReplayBuffer(run_dir / "replay.zarr")
    for rec in IngestLog(run_dir / "ingest_log").records(replay.lsn):
        replay.extend(rec.sender, rec.seqs, rec.arrays, rec.stream, end=rec.end, lsn=rec.lsn)
    return replay


# ---------------------------------------------------------------------------------------------- unit level
def test_log_tail_and_zarr_rebuild_exactly_once(tmp_path):
    """Records zarr committed are skipped, the ones after are applied, a torn last record is ignored."""
    ilog, replay = IngestLog(tmp_path / "log"), ReplayBuffer(tmp_path / "r.zarr")

    def batch(seq0, n):
        seqs = np.arange(seq0, seq0 + n)
        return Record("robot0", 0, seqs, {"obs.x": seqs[:, None].astype(np.float32).repeat(3, 1)}, seq0 + n)

    for recs in ([batch(0, 5), batch(5, 5)], [batch(10, 5)]):
        for rec, lsn in zip(recs, ilog.append(recs)):
            replay.extend(rec.sender, rec.seqs, rec.arrays, rec.stream, end=rec.end, lsn=lsn)
    replay.flush()  # zarr holds lsn 0..2
    assert ilog.trim(replay.disk_lsn) >= 1 and not list(ilog.records(0))  # trimmed: zarr has it all
    recs = [batch(15, 5), batch(20, 5)]
    for rec, lsn in zip(recs, ilog.append(recs)):
        replay.extend(rec.sender, rec.seqs, rec.arrays, rec.stream, end=rec.end, lsn=lsn)
    replay.flush()  # zarr holds lsn 0..4, the log still holds 3..4 (trim comes after the commit)
    ilog.append([batch(25, 5)])  # acked, never reached zarr
    ilog.close()
    seg = sorted((tmp_path / "log").glob("seg-*.log"))[-1]
    with seg.open("ab") as f:
        f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00partial")  # a crash mid-write of an unacknowledged record
    again = ReplayBuffer(tmp_path / "r.zarr")
    assert again.size == 25
    for rec in IngestLog(tmp_path / "log").records(again.lsn):
        again.extend(rec.sender, rec.seqs, rec.arrays, rec.stream, end=rec.end, lsn=rec.lsn)
    np.testing.assert_array_equal(again.seqs_by_sender()["robot0"], np.arange(30))
    np.testing.assert_array_equal(again.column("obs.x")[:, 0], np.arange(30))
    assert again.next_expected == {("robot0", 0): 30}
    assert IngestLog(tmp_path / "log").next_lsn == 6  # numbering continues after the last whole record


def test_log_segments_rotate_and_only_committed_ones_are_deleted(tmp_path):
    ilog = IngestLog(tmp_path / "log", segment_bytes=1000)
    recs = [
        Record("robot0", "s", np.arange(i * 10, i * 10 + 10), {"obs.x": np.zeros((10, 8), np.float32)}, i * 10 + 10)
        for i in range(6)
    ]
    for rec in recs:
        ilog.append([rec])  # each record ~400 bytes: a new segment every 3
    assert len(list((tmp_path / "log").glob("seg-*.log"))) == 2
    assert ilog.trim(4) == 1  # lsn 0..2 committed: their segment goes; lsn 3..5's stays (5 is not committed)
    assert [r.lsn for r in IngestLog(tmp_path / "log").records()] == [3, 4, 5]
    assert ilog.trim(6) == 1 and not list((tmp_path / "log").glob("seg-*.log"))
    assert ilog.append([recs[0]]) == [6]  # numbering goes on in a new segment


# -------------------------------------------------------------------------------------- real processes
def test_restart_rebuilds_once_schema_persists_mismatch_rejected(tmp_path, ports):
    config = learner_config(tmp_path, ports)
    run_dir, endpoint = tmp_path / "learner", f"tcp://127.0.0.1:{ports[0]}"
    learner = start_learner(config, run_dir)
    a = send(endpoint, "robot0", range(200))
    wait_for(lambda: a.acked_upto == 199, "the first 200 transitions acknowledged")
    # another sender with a different observation shape: rejected, never acknowledged, the replay untouched
    b = send(endpoint, "robot1", range(20), obs_dim=12)
    wait_for(lambda: b.rejected_reason is not None, "robot1 told why it is refused")
    assert "obs.state" in b.rejected_reason, b.rejected_reason
    learner.send_signal(signal.SIGKILL)  # no drain, no final flush: the log's tail must carry the rest
    learner.wait()
    learner = start_learner(config, run_dir)
    for i in range(200, 400):
        a.submit(transition(i))
    wait_for(lambda: a.acked_upto == 399, "all 400 acknowledged across the restart")
    assert b.acked_upto == -1, "a sender whose transitions do not fit the replay's schema is never acknowledged"
    b.rejected_reason = None
    wait_for(lambda: b.rejected_reason is not None, "robot1 refused by the restarted learner (schema persisted)")
    assert a.close() == 0
    b.close(linger_s=0)
    out = stop_learner(learner)
    assert "Traceback" not in out and "cannot schedule new futures" not in out, out

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restored_rows"] >= 200 and summary["drain"] == "all acknowledged"
    assert summary["senders"] == {"robot0": {"transitions": 400, "unique": 400, "min_seq": 0, "max_seq": 399}}
    # rejected by the receiver (told the replay's schema on restart) or by ingest: never stored either way
    assert summary["rejected_transitions_schema"] + summary["rejected_messages"] > 0
    assert summary["ack_latency_ms"]["acked_batches"] > 0 and summary["backlog"]["unacked"] == 0
    replay = rebuilt(run_dir)
    assert replay.size == 400 and replay.disk_rows == 400, "a clean stop leaves everything in zarr"
    np.testing.assert_array_equal(np.sort(replay.seqs_by_sender()["robot0"]), np.arange(400))
    assert replay.schema["obs.state"] == (np.dtype(np.float32).str, (10,))
    assert not list(IngestLog(run_dir / "ingest_log").records(replay.lsn)), "the log was trimmed"

    # after a clean stop (log trimmed): a restart numbers its records after zarr's, a kill loses nothing
    learner = start_learner(config, run_dir)
    c = send(endpoint, "robot0", range(400, 450), start_seq=400)
    wait_for(lambda: c.acked_upto == 449, "50 more acknowledged by the restarted learner")
    learner.send_signal(signal.SIGKILL)
    learner.wait()
    c.close(linger_s=0)
    replay = rebuilt(run_dir)
    np.testing.assert_array_equal(np.sort(replay.seqs_by_sender()["robot0"]), np.arange(450))


def test_nan_observations_are_quarantined_and_acknowledged(tmp_path, ports):
    config = learner_config(tmp_path, ports)
    run_dir, endpoint = tmp_path / "learner", f"tcp://127.0.0.1:{ports[0]}"
    learner = start_learner(config, run_dir)
    sender = TransitionSender(endpoint, "robot0", batch_size=8, max_batch_delay_s=0.0).start()
    bad = {5, 17, 18, 40}
    for i in range(60):
        t = transition(i)
        if i in bad:
            t["obs.state"][3] = np.nan if i % 2 else np.inf
        if i == 40:
            t["reward"] = np.float32(np.nan)
        sender.submit(t)
    wait_for(lambda: sender.acked_upto == 59, "every transition acknowledged (quarantined ones too)")
    sender.close()
    stop_learner(learner)
    summary = json.loads((run_dir / "summary.json").read_text())
    (stream,) = summary["streams"].values()  # one sender, one stream
    assert summary["quarantined"] == len(bad) and stream["quarantined"] == len(bad)
    assert stream["received"] == 60 and stream["stored"] == 60 - len(bad)
    replay = rebuilt(run_dir)
    assert replay.size == 60 - len(bad) and np.isfinite(replay.column("obs.state")).all()
    assert np.isnan(replay.column("expert_action")).all(), "NaN where it means 'not applicable' is kept"
    assert set(replay.seqs_by_sender()["robot0"].tolist()) == set(range(60)) - bad
    lines = [json.loads(x) for x in (run_dir / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(s for line in lines for s in line["seqs"]) == sorted(bad)


def test_nonfinite_weights_are_never_published_or_checkpointed(tmp_path, ports):
    from robot_rl.learner.process import Learner

    config = OmegaConf.load(learner_config(tmp_path, ports, "algo.min_transitions=10", "algo.batch_size=8"))
    learner = Learner(config, tmp_path / "learner")
    try:
        n = 64
        arrays = {k: np.stack([transition(i)[k] for i in range(n)]) for k in transition(0)}
        arrays["expert_action"][:] = 0.1
        learner.replay.append("robot0", np.arange(n), arrays)
        assert learner._train_step()
        learner.publish()
        assert learner.version == 1 and (tmp_path / "learner" / "checkpoints" / "v1").exists()
        published = []
        learner.publisher.publish = lambda *a, **k: published.append(a)
        with torch.no_grad():
            next(iter(learner.algo.policy.parameters())).fill_(float("nan"))
        learner.publish()
        assert published == [] and learner.version == 1 and learner.nonfinite_weights == 1
        assert not (tmp_path / "learner" / "checkpoints" / "v2").exists()
        assert learner.training_stopped and "non-finite" in learner.training_stopped
        assert not learner._train_step(), "training stops; the last good checkpoint stays the newest"
        learner._checkpoint()
        assert learner.nonfinite_weights == 2 and not (tmp_path / "learner" / "checkpoints" / "v2").exists()
    finally:
        learner.publisher.close()


@pytest.fixture
def small_disk(tmpfs):
    return tmpfs("3m")


def test_full_disk_stops_acking_and_exits_with_its_code(tmp_path, small_disk, ports):
    config = learner_config(tmp_path, ports, "session.learner_ingest.flush_s=0.5")
    run_dir, endpoint = small_disk / "learner", f"tcp://127.0.0.1:{ports[0]}"
    learner = start_learner(config, run_dir)
    sender = TransitionSender(endpoint, "robot0", batch_size=4, max_batch_delay_s=0.0).start()
    i = 0
    while learner.poll() is None and i < 5000:  # incompressible images: the 3 MB disk fills within ~100
        if sender.unacked_count < 64:
            sender.submit(transition(i, image=64))
            i += 1
        else:
            time.sleep(0.01)
    out, _ = learner.communicate(timeout=DEADLINE_S)
    assert learner.returncode == EXIT_DISK_FULL, out
    assert out.count("No space left on device") == 1 and "Traceback" not in out, out
    acked = sender.acked_upto
    assert sender.unacked_count > 0, "the robot keeps what was not acknowledged"
    sender.close(linger_s=0)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["disk_full"] and summary["exit_code"] == EXIT_DISK_FULL
    assert "No space left on device" in " ".join(summary["storage_errors"])
    replay = rebuilt(run_dir)  # every acknowledged transition is on the disk, exactly once
    seqs = replay.seqs_by_sender()["robot0"]
    assert len(np.unique(seqs)) == len(seqs) and set(range(acked + 1)) <= set(seqs.tolist())


def test_log_append_error_is_raised_after_cutting_the_partial_record(tmp_path, monkeypatch):
    """The simulated ENOSPC (no tmpfs needed): the log stays a sequence of whole records."""
    ilog = IngestLog(tmp_path / "log")
    rec = Record("robot0", 0, np.arange(3), {"obs.x": np.zeros((3, 2), np.float32)}, 3)
    ilog.append([rec])

    def full(fd, parts):
        os.write(fd, bytes(parts[0]))  # part of the record reaches the file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("robot_rl.learner.ingest_log.os.writev", full)
    with pytest.raises(OSError, match="No space left"):
        ilog.append([Record("robot0", 0, np.arange(3, 6), {"obs.x": np.ones((3, 2), np.float32)}, 6)])
    monkeypatch.undo()
    ilog.close()
    assert [r.lsn for r in IngestLog(tmp_path / "log").records()] == [0]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_exiting_tells_a_running_process_from_an_exited_one():
    """The ingest process leaves as soon as its learner begins to exit (not when the kernel's parent-death signal
    comes, after the dead learner's memory is torn down): `exiting` is the check it makes every heartbeat."""
    from robot_rl.learner.ingest_process import exiting

    assert not exiting(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 60
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":  # exited, not reaped
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.01)
    assert exiting(child.pid)
    child.wait()
    assert exiting(child.pid)  # reaped: gone from /proc
