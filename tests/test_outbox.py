"""The sender's outbox: a restarted control process resends what was not acknowledged, exactly once."""

import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest

from robot_rl.transport import Outbox, TransitionReceiver, TransitionSender


def _arrays(seq0: int, n: int) -> dict:
    s = np.arange(seq0, seq0 + n)
    return {"obs": np.repeat(s[:, None], 3, 1).astype(np.float32), "step": s.astype(np.int64)}


def _segments(d) -> list:
    return sorted(p for p in os.listdir(d) if p.startswith("seg-"))


def test_reopen_returns_unacked_records_under_the_same_stream(tmp_path):
    ob = Outbox(tmp_path, "robot-0")
    stream = ob.stream
    assert len(stream) == 16 and int(stream, 16) >= 0
    for s0 in range(0, 20, 5):
        ob.append(s0, _arrays(s0, 5))
    ob.set_acked(7, force=True)
    with pytest.raises(RuntimeError, match="in use"):
        Outbox(tmp_path, "robot-0")  # one live process per outbox
    ob.close()
    with pytest.raises(ValueError, match="belongs to sender 'robot-0'"):
        Outbox(tmp_path, "robot-1")
    again = Outbox(tmp_path, "robot-0")
    assert again.stream == stream and again.acked == 7 and again.next_seq == 20
    assert [(r.seq0, r.n) for r in again.records] == [(8, 2), (10, 5), (15, 5)]  # the partly acked one trimmed
    np.testing.assert_array_equal(np.concatenate([r.arrays["step"] for r in again.records]), np.arange(8, 20))
    again.append(20, _arrays(20, 1))  # numbering continues
    again.close()


def test_torn_last_record_is_dropped(tmp_path):
    ob = Outbox(tmp_path, "r")
    for s0 in range(0, 9, 3):
        ob.append(s0, _arrays(s0, 3))
    ob.close()
    seg = tmp_path / _segments(tmp_path)[-1]
    size = seg.stat().st_size
    with open(seg, "r+b") as f:  # a kill in the middle of the last write
        f.truncate(size - 10)
    again = Outbox(tmp_path, "r")
    assert [(r.seq0, r.n) for r in again.records] == [(0, 3), (3, 3)] and again.next_seq == 6
    assert seg.stat().st_size < size - 10  # the torn bytes are cut off the file
    again.append(6, _arrays(6, 2))
    again.close()
    with open(seg, "ab") as f:  # garbage (a bad block) after the last record
        f.write(b"RRLr" + os.urandom(40))
    third = Outbox(tmp_path, "r")
    assert [(r.seq0, r.n) for r in third.records] == [(0, 3), (3, 3), (6, 2)]
    flipped = bytearray(seg.read_bytes())
    flipped[-5] ^= 0xFF  # a corrupt byte inside the last record: its crc fails
    third.close()
    seg.write_bytes(bytes(flipped))
    fourth = Outbox(tmp_path, "r")
    assert [(r.seq0, r.n) for r in fourth.records] == [(0, 3), (3, 3)]
    fourth.close()


def test_acked_segments_are_deleted(tmp_path):
    ob = Outbox(tmp_path, "r", segment_bytes=2000)
    for s0 in range(0, 400, 10):
        ob.append(s0, _arrays(s0, 10))
    assert len(_segments(tmp_path)) > 5
    ob.set_acked(199)
    segs = [int(p[4:24]) for p in _segments(tmp_path)]
    assert segs[0] <= 200 and (len(segs) == 1 or segs[1] > 200)  # only segments holding seqs > 199 are left
    ob.set_acked(399)
    assert _segments(tmp_path) == []  # everything acked: nothing left on disk
    ob.append(400, _arrays(400, 1))
    ob.close()
    again = Outbox(tmp_path, "r", segment_bytes=2000)
    assert again.acked == 399 and [(r.seq0, r.n) for r in again.records] == [(400, 1)]
    again.close()


def test_reopen_with_a_fully_acknowledged_active_segment(tmp_path):
    """The active segment is kept while small even once acked; reopening deletes it (a restart after a clean
    session: nothing to resend, numbering continues)."""
    ob = Outbox(tmp_path, "r", segment_bytes=1 << 20)
    ob.append(0, _arrays(0, 10))
    ob.set_acked(9, force=True)
    assert len(_segments(tmp_path)) == 1  # small: kept for the next appends
    ob.close()
    again = Outbox(tmp_path, "r", segment_bytes=1 << 20)
    assert again.records == [] and again.next_seq == 10 and _segments(tmp_path) == []
    again.append(10, _arrays(10, 1))
    again.close()


# ------------------------------------------------------------------------------ a real kill and restart
def _control(endpoint: str, outbox: str, first: int, n: int, ready_path: str) -> None:
    tx = TransitionSender(
        endpoint,
        "robot-0",
        batch_size=8,
        max_batch_delay_s=0.002,
        heartbeat_interval_s=0.02,
        outbox_dir=outbox,
        outbox_segment_bytes=16384,
    ).start()
    assert tx.next_seq == first, (tx.next_seq, first)
    for i in range(first, first + n):
        assert tx.submit({"obs": np.full(3, i, np.float32), "step": np.int64(i)}) == i
        if i % 10 == 0:
            time.sleep(0.002)
    assert tx.flush(30.0)  # everything submitted is in the outbox: "episode logged as complete"
    with open(ready_path, "w") as f:
        f.write(tx.stream)
    if first == 0:
        time.sleep(3600)  # the parent SIGKILLs us
    os._exit(0 if tx.close(linger_s=30.0) == 0 else 3)


def test_sigkilled_control_resends_unacked_under_its_stream_exactly_once(tmp_path):
    ep, outbox = f"ipc://{tmp_path}/t.ipc", str(tmp_path / "control" / "outbox")
    ctx = mp.get_context("spawn")
    rx = TransitionReceiver(ep, heartbeat_interval_s=0.02, peer_timeout_s=60.0)
    ready1, ready2 = str(tmp_path / "ready1"), str(tmp_path / "ready2")
    p1 = ctx.Process(target=_control, args=(ep, outbox, 0, 300, ready1))
    p1.start()
    got, acked = [], -1
    deadline = time.monotonic() + 60
    while not (os.path.exists(ready1) and sum(map(len, got)) >= 120) and time.monotonic() < deadline:
        for b in rx.poll(20):
            got.append(b)
            if b.seqs[-1] < 100:  # slow storage: only the first ~100 are acked before the crash
                rx.ack(b.sender_id, b.stream, int(b.seqs[-1]))
                acked = int(b.seqs[-1])
    assert os.path.exists(ready1) and acked >= 0
    os.kill(p1.pid, signal.SIGKILL)
    p1.join()
    stream = open(ready1).read()
    # the learner delivered more than it acked: those sit unacked in the dead process's outbox
    # the same outbox: its stream takes the sender id over at once (peer_timeout_s is 60 s) and resends first
    p2 = ctx.Process(target=_control, args=(ep, outbox, 300, 200, ready2))
    p2.start()
    while p2.is_alive() and time.monotonic() < deadline:
        for b in rx.poll(20):
            got.append(b)
            rx.ack(b.sender_id, b.stream, int(b.seqs[-1]))
    p2.join(10)
    assert p2.exitcode == 0  # the restarted control process saw everything acknowledged
    assert open(ready2).read() == stream
    seqs = [s for b in got for s in b.seqs.tolist()]
    assert seqs == list(range(500))  # exactly once, in order, across the kill
    assert {b.stream for b in got} == {stream}
    for b in got:
        np.testing.assert_array_equal(b.arrays["step"], b.seqs)
        np.testing.assert_array_equal(b.arrays["obs"][:, 0], b.seqs.astype(np.float32))
    assert rx.all_acked and rx.duplicates > 0  # the resent unacked ones the learner had were dropped, not stored
    assert sum(os.path.getsize(os.path.join(outbox, p)) for p in _segments(outbox)) < 16384
    rx.close()


def test_abandoned_stream_is_not_resumed(tmp_path):
    ob = Outbox(tmp_path, "r")
    ob.append(0, _arrays(0, 4))
    old = ob.stream
    ob.abandon()  # what the sender does when a write fails (disk full)
    ob.close()
    again = Outbox(tmp_path, "r")
    assert again.stream != old and again.records == [] and again.next_seq == 0
    assert list((tmp_path / "abandoned").rglob("seg-*.rec"))
    again.close()


def test_unreachable_learner_everything_kept_on_disk_for_the_next_process(tmp_path):
    ep, outbox = f"ipc://{tmp_path}/nobody.ipc", tmp_path / "outbox"
    tx = TransitionSender(ep, "robot-0", batch_size=16, outbox_dir=outbox).start()
    for i in range(1000):
        assert tx.submit({"obs": np.full(3, i, np.float32), "step": np.int64(i)}) == i
    assert tx.flush(30.0)
    stream = tx.stream
    assert tx.close(linger_s=0) == 1000
    tx2 = TransitionSender(ep, "robot-0", batch_size=16, outbox_dir=outbox)
    assert tx2.stream == stream and tx2.unacked_count == 1000 and tx2.next_seq == 1000
    assert tx2.submit({"obs": np.zeros(3, np.float32), "step": np.int64(1000)}) == 1000
    with pytest.raises(ValueError, match="missing key 'step'"):
        tx2.submit({"obs": np.zeros(3, np.float32)})  # the reloaded stream's schema holds
    assert tx2.close(linger_s=0) == 1001
