"""Transition stream over real sockets and real OS processes (spawn)."""

import logging
import multiprocessing as mp
import os
import signal
import time

import msgpack
import numpy as np
import pytest
import zmq

from robot_rl.transport import TransitionReceiver, TransitionSender, encode_message

N = 2000


def _transition(i: int) -> dict:
    return {
        "obs": np.full(5, i, dtype=np.float32),
        "action": np.full(2, -i, dtype=np.float32),
        "reward": np.float32(i * 0.5),
        "done": np.bool_(i % 100 == 99),
    }


def _sender_proc(endpoint: str, n: int, pace_s: float) -> None:
    s = TransitionSender(endpoint, "robot-0", batch_size=16, max_batch_delay_s=0.005, resend_after_s=0.5).start()
    for i in range(n):
        s.submit(_transition(i))
        if pace_s:
            time.sleep(pace_s)
    left = s.close(linger_s=30.0)
    os._exit(0 if left == 0 else 3)


def _check_batch(b) -> None:
    np.testing.assert_array_equal(b.arrays["obs"][:, 0], b.seqs.astype(np.float32))
    np.testing.assert_array_equal(b.arrays["action"][:, 1], -b.seqs.astype(np.float32))
    assert b.arrays["reward"].shape == (len(b.seqs),) and b.arrays["done"].dtype == np.bool_


def _ipc(tmp_path, name="t") -> str:
    return f"ipc://{tmp_path}/{name}.ipc"


def test_stream_exactly_once_in_order_from_another_process(tmp_path):
    ep = _ipc(tmp_path)
    rx = TransitionReceiver(ep)
    proc = mp.get_context("spawn").Process(target=_sender_proc, args=(ep, N, 0.0))
    proc.start()
    got = []
    deadline = time.monotonic() + 30
    while len(got) < N and time.monotonic() < deadline:
        for b in rx.poll(100):
            assert b.sender_id == "robot-0"
            _check_batch(b)
            got.extend(b.seqs.tolist())
            rx.ack(b.sender_id, int(b.seqs[-1]))
    # keep serving heartbeats/acks until the sender has seen its last ack and exited
    while proc.is_alive() and time.monotonic() < deadline:
        assert rx.poll(50) == []
    proc.join(5)
    rx.close()
    assert got == list(range(N))
    assert proc.exitcode == 0  # sender saw every transition acked
    assert rx.rejected == 0 and "robot-0" in rx.senders


# ----------------------------------------------------------------------------- learner killed mid-stream
def _receiver_proc(endpoint: str, path: str) -> None:
    # restore: complete lines only (a SIGKILL may leave a partial last line)
    seqs = []
    if os.path.exists(path):
        data = open(path, "rb").read()
        cut = data.rfind(b"\n") + 1
        seqs = [int(x) for x in data[:cut].split()]
        with open(path, "r+b") as f:
            f.truncate(cut)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    rx = TransitionReceiver(endpoint, heartbeat_interval_s=0.05)
    if seqs:
        rx.set_next_expected("robot-0", seqs[-1] + 1)
    while True:
        for b in rx.poll(100):
            _check_batch(b)
            os.write(fd, b"".join(b"%d\n" % s for s in b.seqs.tolist()))
            os.fsync(fd)
            rx.ack(b.sender_id, int(b.seqs[-1]))


def _lines(path) -> int:
    try:
        return open(path, "rb").read().count(b"\n")
    except FileNotFoundError:
        return 0


def test_receiver_sigkill_and_restart_loses_nothing(tmp_path):
    ep, path = _ipc(tmp_path), str(tmp_path / "seqs.txt")
    ctx = mp.get_context("spawn")
    rx_proc = ctx.Process(target=_receiver_proc, args=(ep, path))
    rx_proc.start()
    tx = TransitionSender(ep, "robot-0", batch_size=16, max_batch_delay_s=0.002, resend_after_s=0.5,
                          heartbeat_interval_s=0.05).start()
    killed = restarted = False
    deadline = time.monotonic() + 60
    i = 0
    while time.monotonic() < deadline:
        if i < N:
            tx.submit(_transition(i))
            i += 1
            if i % 20 == 0:
                time.sleep(0.005)
        else:
            time.sleep(0.01)
        if not killed and _lines(path) >= 500:
            os.kill(rx_proc.pid, signal.SIGKILL)
            rx_proc.join()
            killed, t_kill = True, time.monotonic()
        if killed and not restarted and time.monotonic() - t_kill > 0.3:
            rx_proc = ctx.Process(target=_receiver_proc, args=(ep, path))
            rx_proc.start()
            restarted = True
        if restarted and tx.acked_upto == N - 1:
            break
    stats = tx.stats()
    assert tx.close(linger_s=0) == 0, stats
    rx_proc.kill()
    rx_proc.join()
    assert killed and restarted
    seqs = [int(x) for x in open(path, "rb").read().split()]
    assert seqs == list(range(N)), (len(seqs), stats)
    assert tx.last_contact is not None and tx.unacked_count == 0


# ------------------------------------------------------------------------------------------- bad input
def _raw_dealer(ep: str, routing_id: bytes) -> zmq.Socket:
    """A hand-driven peer, to send the receiver exactly the frames a test wants (good or bad)."""
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.ROUTING_ID, routing_id)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(ep)
    return raw


def test_bad_messages_are_rejected_and_counted(tmp_path, caplog):
    ep = _ipc(tmp_path)
    rx = TransitionReceiver(ep)
    raw = _raw_dealer(ep, b"evil")
    bad_v = msgpack.packb({"v": 2, "type": "transitions", "arrays": [], "seq": 0, "n": 1, "base": 0})
    raw.send_multipart([b"this is not msgpack \xc1"])
    raw.send_multipart([bad_v])
    # arrays that disagree on length
    raw.send_multipart(encode_message("transitions", {"seq": 0, "n": 2, "base": 0},
                                      {"a": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}))
    # a good batch establishes the stream's shapes, then one with a different per-key shape
    raw.send_multipart(encode_message("transitions", {"seq": 0, "n": 1, "base": 0}, {"a": np.zeros((1, 3), np.float32)}))
    raw.send_multipart(encode_message("transitions", {"seq": 1, "n": 1, "base": 0}, {"a": np.zeros((1, 4), np.float32)}))
    raw.send_multipart(encode_message("nonsense", {}))
    with caplog.at_level(logging.WARNING):
        got = []
        deadline = time.monotonic() + 5
        while rx.rejected < 5 and time.monotonic() < deadline:
            got += rx.poll(50)
    assert rx.rejected == 5
    assert [len(b) for b in got] == [1] and got[0].sender_id == "evil"
    text = caplog.text
    assert "'evil'" in text and "not valid msgpack" in text
    assert "peer speaks protocol v2, this build speaks v1" in text
    assert "n=2" in text and "shape (4,) per transition" in text and "nonsense" in text
    # the receiver keeps working for a real sender
    tx = TransitionSender(ep, "robot-1", max_batch_delay_s=0).start()
    for i in range(10):
        tx.submit(_transition(i))
    seqs = []
    deadline = time.monotonic() + 5
    while len(seqs) < 10 and time.monotonic() < deadline:
        for b in rx.poll(50):
            assert b.sender_id == "robot-1"
            seqs += b.seqs.tolist()
            rx.ack("robot-1", int(b.seqs[-1]))
    assert seqs == list(range(10))
    assert tx.close() == 0
    raw.close()
    rx.close()


def test_duplicates_and_gaps_are_never_delivered(tmp_path):
    ep = _ipc(tmp_path)
    rx = TransitionReceiver(ep)
    raw = _raw_dealer(ep, b"r")

    def batch(seq0, n):
        a = np.arange(seq0, seq0 + n, dtype=np.int64)
        raw.send_multipart(encode_message("transitions", {"seq": seq0, "n": n, "base": 0}, {"x": a}))

    batch(0, 4)
    batch(2, 4)  # 2,3 duplicate; 4,5 new
    batch(10, 2)  # gap: dropped, sender told to resend from 6
    batch(0, 2)  # all duplicates
    batch(6, 4)
    out, deadline = [], time.monotonic() + 5
    while sum(map(len, out)) < 10 and time.monotonic() < deadline:
        out += rx.poll(50)
    seqs = np.concatenate([b.seqs for b in out]).tolist()
    assert seqs == list(range(10))
    assert np.concatenate([b.arrays["x"] for b in out]).tolist() == seqs
    assert rx.duplicates == 4 and rx.gaps == 1
    # the gap made the receiver ask for a resend from 6
    msgs = []
    while raw.poll(200):
        msgs.append(msgpack.unpackb(raw.recv_multipart()[0]))
    assert any(m.get("resend_from") == 6 for m in msgs)
    with pytest.raises(ValueError):
        rx.ack("r", 10)
    raw.close()
    rx.close()


def test_submit_never_blocks_without_learner(tmp_path):
    tx = TransitionSender(_ipc(tmp_path, "nobody"), "robot-0").start()
    t0 = time.perf_counter()
    for i in range(5000):
        tx.submit(_transition(i))
    assert time.perf_counter() - t0 < 2.0
    assert tx.unacked_count == 5000 and tx.acked_upto == -1 and tx.last_contact is None
    with pytest.raises(ValueError, match="obs"):
        tx.submit({**_transition(0), "obs": np.zeros(6, np.float32)})
    assert tx.close(linger_s=0.1) == 5000
