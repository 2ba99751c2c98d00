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

from robot_rl.transport import PROTOCOL_VERSION, TransitionReceiver, TransitionSender, encode_message

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
            rx.ack(b.sender_id, b.stream, int(b.seqs[-1]))
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
    # restore: complete lines "stream seq" only (a SIGKILL may leave a partial last line)
    lines = []
    if os.path.exists(path):
        data = open(path, "rb").read()
        cut = data.rfind(b"\n") + 1
        lines = [ln.split() for ln in data[:cut].decode().splitlines()]
        with open(path, "r+b") as f:
            f.truncate(cut)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    rx = TransitionReceiver(endpoint, heartbeat_interval_s=0.05)
    if lines:
        rx.set_next_expected("robot-0", lines[-1][0], int(lines[-1][1]) + 1)
    while True:
        for b in rx.poll(100):
            _check_batch(b)
            os.write(fd, b"".join(b"%s %d\n" % (b.stream.encode(), s) for s in b.seqs.tolist()))
            os.fsync(fd)
            rx.ack(b.sender_id, b.stream, int(b.seqs[-1]))


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
    tx = TransitionSender(
        ep, "robot-0", batch_size=16, max_batch_delay_s=0.002, resend_after_s=0.5, heartbeat_interval_s=0.05
    ).start()
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
    lines = [ln.split() for ln in open(path).read().splitlines()]
    assert {ln[0] for ln in lines} == {tx.stream}
    seqs = [int(ln[1]) for ln in lines]
    assert seqs == list(range(N)), (len(seqs), stats)
    assert tx.last_contact is not None and tx.unacked_count == 0


# ------------------------------------------------------------------------------------------- bad input
def _raw_dealer(ep: str) -> zmq.Socket:
    """A hand-driven peer, to send the receiver exactly the frames a test wants (good or bad)."""
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(ep)
    return raw


def _send(raw, msg_type, sender="evil", stream="s1", arrays=None, **hdr):
    raw.send_multipart(encode_message(msg_type, {"sender": sender, "stream": stream, **hdr}, arrays))


def _replies(raw, timeout_ms=200) -> list[dict]:
    out = []
    while raw.poll(timeout_ms):
        out.append(msgpack.unpackb(raw.recv_multipart()[0]))
    return out


def _poll_until(rx, cond, timeout=10.0) -> list:
    got, deadline = [], time.monotonic() + timeout
    while not cond(got) and time.monotonic() < deadline:
        got += rx.poll(20)
    return got


def test_bad_messages_are_rejected_counted_and_answered(tmp_path, caplog):
    ep = _ipc(tmp_path)
    rx = TransitionReceiver(ep)
    raw = _raw_dealer(ep)
    bad_v = msgpack.packb({"v": 99, "type": "transitions", "arrays": [], "seq": 0, "n": 1, "base": 0})
    raw.send_multipart([b"this is not msgpack \xc1"])
    raw.send_multipart([bad_v])
    # arrays that disagree on length
    _send(
        raw, "transitions", seq=0, n=2, base=0, arrays={"a": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    )
    # a good batch fixes the schema (first sender), then one with a different per-key shape
    _send(raw, "transitions", seq=0, n=1, base=0, arrays={"a": np.zeros((1, 3), np.float32)})
    _send(raw, "transitions", seq=1, n=1, base=0, arrays={"a": np.zeros((1, 4), np.float32)})
    _send(raw, "nonsense")
    _send(raw, "heartbeat", stream="", base=0, next=0, sent=0)  # no stream id
    with caplog.at_level(logging.WARNING):
        got = _poll_until(rx, lambda g: rx.rejected >= 6, timeout=10)
    assert rx.rejected == 6
    assert [len(b) for b in got] == [1] and got[0].sender_id == "evil" and got[0].stream == "s1"
    text = caplog.text
    assert "not valid msgpack" in text
    assert f"your message is protocol v99 but this learner speaks v{PROTOCOL_VERSION}" in text
    assert "n=2" in text and "key 'a' is float32 shape (4,) per transition, expected float32 shape (3,)" in text
    assert "nonsense" in text and "'stream'" in text
    # every rejection got an `error` reply saying why (rate-limited per connection and code)
    errors = [m for m in _replies(raw) if m["type"] == "error"]
    codes = {m["code"] for m in errors}
    assert {"malformed", "version", "schema"} <= codes, errors
    version_err = next(m for m in errors if m["code"] == "version")
    assert version_err["expected_version"] == PROTOCOL_VERSION and "v99" in version_err["message"]
    # the receiver keeps working for a real sender
    tx = TransitionSender(ep, "robot-1", max_batch_delay_s=0).start()
    for i in range(10):
        tx.submit({"a": np.full(3, i, np.float32)})
    seqs = []
    deadline = time.monotonic() + 10
    while len(seqs) < 10 and time.monotonic() < deadline:
        for b in rx.poll(50):
            assert b.sender_id == "robot-1"
            seqs += b.seqs.tolist()
            rx.ack("robot-1", b.stream, int(b.seqs[-1]))
    assert seqs == list(range(10))
    assert tx.close() == 0
    raw.close()
    rx.close()


def test_duplicates_and_gaps_are_never_delivered(tmp_path, caplog):
    ep = _ipc(tmp_path)
    rx = TransitionReceiver(ep)
    raw = _raw_dealer(ep)

    def batch(seq0, n):
        _send(
            raw,
            "transitions",
            sender="r",
            seq=seq0,
            n=n,
            base=0,
            arrays={"x": np.arange(seq0, seq0 + n, dtype=np.int64)},
        )

    batch(0, 4)
    batch(2, 4)  # 2,3 duplicate; 4,5 new
    batch(10, 2)  # gap: dropped, sender told to resend from 6
    batch(0, 2)  # all duplicates
    batch(6, 4)
    out = _poll_until(rx, lambda g: sum(map(len, g)) >= 10)
    seqs = np.concatenate([b.seqs for b in out]).tolist()
    assert seqs == list(range(10))
    assert np.concatenate([b.arrays["x"] for b in out]).tolist() == seqs
    assert rx.duplicates == 4 and rx.gaps == 1
    assert rx.stats()["senders"]["r"]["duplicates"] == 4
    # the gap made the receiver ask for a resend from 6
    msgs = _replies(raw)
    assert any(m.get("resend_from") == 6 and m["stream"] == "s1" for m in msgs)
    with caplog.at_level(logging.WARNING):
        rx.ack("r", "s1", 10)  # never delivered: warned and ignored, never raises
        rx.ack("r", "other", 3)  # unknown stream: same
        rx.ack("nobody", "s1", 3)
    assert "only seqs < 10" in caplog.text and "unknown stream" in caplog.text
    rx.ack("r", "s1", 9)
    assert rx.all_acked
    raw.close()
    rx.close()


def test_seq_beyond_int64_rejected_at_decode(tmp_path, caplog):
    ep = _ipc(tmp_path)
    rx = TransitionReceiver(ep)
    raw = _raw_dealer(ep)
    x = {"x": np.zeros((1, 2), np.float32)}
    _send(raw, "transitions", sender="r", seq=0, n=1, base=0, arrays=x)
    _send(raw, "transitions", sender="r", seq=2**63, n=1, base=0, arrays=x)
    _send(raw, "transitions", sender="r", seq=1, n=1, base=2**64 - 1, arrays=x)
    _send(raw, "heartbeat", sender="r", base=0, next=2**63 + 5, sent=1)
    _send(raw, "transitions", sender="r", seq=2**63 - 1, n=2, base=0, arrays={"x": np.zeros((2, 2), np.float32)})
    with caplog.at_level(logging.WARNING):
        got = _poll_until(rx, lambda g: rx.rejected >= 4)
    assert rx.rejected == 4 and "(seq numbers are int64)" in caplog.text and "int64 range" in caplog.text
    # the stream goes on: later batches of that sender are fine
    _send(raw, "transitions", sender="r", seq=1, n=1, base=0, arrays=x)
    got += _poll_until(rx, lambda g: sum(map(len, g)) >= 1)
    assert [b.seqs.tolist() for b in got] == [[0], [1]]
    raw.close()
    rx.close()


def test_rejections_logged_once_per_problem_then_counted_per_sender(tmp_path, caplog):
    ep = _ipc(tmp_path)
    rx = TransitionReceiver(ep, reject_log_interval_s=0.2)
    raws = [_raw_dealer(ep) for _ in range(3)]
    x = {"x": np.zeros((1, 2), np.float32)}
    with caplog.at_level(logging.WARNING, logger="robot_rl.transport"):
        for j, raw in enumerate(raws):  # register three senders, then 15 bad messages each (past any "first ten")
            _send(raw, "transitions", sender=f"r{j}", seq=0, n=1, base=0, arrays=x)
        _poll_until(rx, lambda g: sum(map(len, g)) >= 3)
        for k in range(15):
            for j, raw in enumerate(raws):
                _send(raw, "transitions", sender=f"r{j}", seq=k, n=2, base=0, arrays=x)  # n disagrees
        _poll_until(rx, lambda g: rx.rejected >= 45)
        deadline = time.monotonic() + 10
        while caplog.text.count("more messages rejected") < 3 and time.monotonic() < deadline:
            rx.poll(50)
    text = caplog.text
    assert rx.rejected == 45 and rx.stats()["rejected_by_peer"] == {"r0": 15, "r1": 15, "r2": 15}
    for j in range(3):  # each sender's problem logged once in full, then counted
        assert text.count(f"from r{j}: array 'x' has shape") == 1, text
        assert f"14 more messages rejected from r{j} since" in text
    for raw in raws:
        raw.close()
    rx.close()


def test_other_protocol_version_gets_an_error_the_sender_exposes(tmp_path):
    # a learner of another version, played by a raw ROUTER: the sender logs and exposes its `error` reply
    ep = _ipc(tmp_path)
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(ep)
    tx = TransitionSender(ep, "robot-0", heartbeat_interval_s=0.02).start()
    assert router.poll(10000)
    rid = router.recv_multipart()[0]
    err = msgpack.packb(
        {
            "v": 7,
            "type": "error",
            "arrays": [],
            "code": "version",
            "expected_version": 7,
            "message": f"your message is protocol v{PROTOCOL_VERSION} but this learner speaks v7",
        }
    )
    router.send_multipart([rid, err])
    deadline = time.monotonic() + 10
    while tx.rejected_reason is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "this learner speaks v7" in tx.rejected_reason and f"v{PROTOCOL_VERSION}" in tx.rejected_reason
    assert tx.stats()["rejected_reason"] == tx.rejected_reason
    tx.close(linger_s=0)
    router.close()


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


# ------------------------------------------------------------------------------ restarts, takeover, timeouts
def _drain_acking(rx, want: int, acked: list | None = None, ack=True, timeout=15.0) -> list:
    """Poll until `want` transitions arrived; ack each batch (by its own stream) unless ack=False."""
    got = []
    deadline = time.monotonic() + timeout
    while sum(map(len, got)) < want and time.monotonic() < deadline:
        for b in rx.poll(20):
            got.append(b)
            if ack:
                rx.ack(b.sender_id, b.stream, int(b.seqs[-1]))
    return got


def _wait(cond, timeout=15.0, rx=None) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        if rx is not None:
            rx.poll(20)
        else:
            time.sleep(0.01)
    return True


def test_control_restart_without_outbox_is_a_new_stream_and_stale_acks_never_raise(tmp_path, caplog):
    """The reviewer's crash: a batch of the old stream acked after the sender restarted from seq 0."""
    ep = _ipc(tmp_path)
    rx = TransitionReceiver(ep, heartbeat_interval_s=0.02, peer_timeout_s=0.5)
    tx1 = TransitionSender(ep, "robot-0", batch_size=10, max_batch_delay_s=0, heartbeat_interval_s=0.02).start()
    for i in range(300):
        tx1.submit(_transition(i))
    got = _drain_acking(rx, 300, ack=False)
    assert sum(map(len, got)) == 300
    for b in got[:-1]:  # "storage" acks all but the last batch before the control process dies
        rx.ack(b.sender_id, b.stream, int(b.seqs[-1]))
    old_stream, last = got[-1].stream, got[-1]
    tx1.close(linger_s=0)  # crashed: its unacked transitions are gone with it (no outbox)
    tx2 = TransitionSender(ep, "robot-0", batch_size=10, max_batch_delay_s=0, heartbeat_interval_s=0.02).start()
    assert tx2.stream != old_stream
    for i in range(50):
        tx2.submit(_transition(i))
    got2 = _drain_acking(rx, 50, ack=False)  # delivered once the old connection is silent for peer_timeout_s
    assert [s for b in got2 for s in b.seqs.tolist()] == list(range(50))
    assert {b.stream for b in got2} == {tx2.stream} and rx.current_stream("robot-0") == tx2.stream
    with caplog.at_level(logging.WARNING):
        rx.ack(last.sender_id, last.stream, int(last.seqs[-1]))  # the storage thread's late ack: no exception
    assert "no longer the sender's current one" in caplog.text
    assert rx.next_expected("robot-0", old_stream) == 300 and rx.next_expected("robot-0") == 50
    for b in got2:
        rx.ack(b.sender_id, b.stream, int(b.seqs[-1]))
    assert _wait(lambda: tx2.unacked_count == 0, rx=rx) and rx.all_acked
    assert tx2.close() == 0
    rx.close()


def test_third_party_cannot_reset_or_take_over_a_live_sender(tmp_path, caplog):
    ep = _ipc(tmp_path)
    rx = TransitionReceiver(ep, heartbeat_interval_s=0.02, peer_timeout_s=30.0)
    tx = TransitionSender(ep, "robot-0", batch_size=10, max_batch_delay_s=0, heartbeat_interval_s=0.02).start()
    for i in range(100):
        tx.submit(_transition(i))
    got = _drain_acking(rx, 100, ack=False)
    # a third party claims robot-0 with its own stream and a heartbeat saying "next seq 0"
    raw = _raw_dealer(ep)
    _send(raw, "heartbeat", sender="robot-0", stream="f00d", base=0, next=0, sent=0)
    assert _wait(lambda: rx.stats()["senders"]["robot-0"]["takeovers_refused"] >= 1, rx=rx)
    err = [m for m in _replies(raw) if m["type"] == "error"]
    assert err and err[0]["code"] == "sender_id_in_use" and "robot-0" in err[0]["message"]
    # even a heartbeat on robot-0's own stream whose `next` is behind resets nothing
    with caplog.at_level(logging.WARNING):
        _send(raw, "heartbeat", sender="robot-0", stream=tx.stream, base=0, next=0, sent=0)
        assert _wait(lambda: "its outbox lost records" in caplog.text, rx=rx)
    assert rx.next_expected("robot-0", tx.stream) == 100
    for b in got:  # the batches waiting to be stored are acked without error
        rx.ack(b.sender_id, b.stream, int(b.seqs[-1]))
    for i in range(100, 120):
        tx.submit(_transition(i))
    more = _drain_acking(rx, 20)
    assert [s for b in more for s in b.seqs.tolist()] == list(range(100, 120))
    assert _wait(lambda: tx.unacked_count == 0, rx=rx)
    assert tx.close() == 0
    raw.close()
    rx.close()


def test_second_live_sender_with_the_same_id_is_refused_with_a_reason(tmp_path):
    ep = _ipc(tmp_path)
    rx = TransitionReceiver(ep, heartbeat_interval_s=0.02, peer_timeout_s=30.0)
    a = TransitionSender(ep, "robot-0", max_batch_delay_s=0, heartbeat_interval_s=0.02).start()
    a.submit(_transition(0))
    _drain_acking(rx, 1)
    b = TransitionSender(ep, "robot-0", max_batch_delay_s=0, heartbeat_interval_s=0.02).start()
    b.submit(_transition(0))
    assert _wait(lambda: b.rejected_reason is not None, rx=rx)
    assert "sender_id_in_use" in b.rejected_reason and "own sender id" in b.rejected_reason
    a.submit(_transition(1))
    got = _drain_acking(rx, 1)
    assert [(x.stream, x.seqs.tolist()) for x in got] == [(a.stream, [1])]  # a keeps its id; nothing from b
    assert rx.current_stream("robot-0") == a.stream and b.acked_upto == -1
    b.close(linger_s=0)
    assert a.close() == 0
    rx.close()


def test_silent_peers_stop_getting_heartbeats_then_are_forgotten_but_streams_resume(tmp_path):
    ep = _ipc(tmp_path)
    rx = TransitionReceiver(ep, heartbeat_interval_s=0.02, peer_timeout_s=0.3, forget_after_s=0.6)
    raw = _raw_dealer(ep)
    x = lambda s0, n: {"x": np.arange(s0, s0 + n, dtype=np.int64)}  # noqa: E731
    _send(raw, "transitions", sender="r", stream="s1", seq=0, n=3, base=0, arrays=x(0, 3))
    got = _drain_acking(rx, 3)
    assert _wait(lambda: any(m["type"] == "heartbeat" for m in _replies(raw, 50)), rx=rx)  # heartbeats while alive
    assert _wait(lambda: not rx.stats()["senders"]["r"]["alive"], rx=rx)
    _replies(raw, 1000)  # drain what was sent before it went silent
    rx.poll(300)
    assert [m for m in _replies(raw, 100) if m["type"] == "heartbeat"] == []  # silent: no more heartbeats
    assert _wait(lambda: "r" not in rx.senders, rx=rx)  # forgotten ...
    assert rx.next_expected("r", "s1") == 3  # ... but its stream state is kept
    _send(raw, "transitions", sender="r", stream="s1", seq=2, n=3, base=0, arrays=x(2, 3))  # resumes: 2 is a dup
    got += _drain_acking(rx, 2)
    assert [s for b in got for s in b.seqs.tolist()] == [0, 1, 2, 3, 4] and rx.duplicates == 1
    assert "r" in rx.senders
    raw.close()
    rx.close()


def test_slow_acks_cause_no_resends(tmp_path):
    """The ack deadline scales with what is in flight: a learner that takes longer than resend_after_s to store
    a backlog gets no duplicate resends (only its explicit resend_from would cause one)."""
    ep = _ipc(tmp_path)
    rx = TransitionReceiver(ep, heartbeat_interval_s=0.02)
    tx = TransitionSender(
        ep, "robot-0", batch_size=10, max_batch_delay_s=0, resend_after_s=1.0, heartbeat_interval_s=0.02
    ).start()
    for i in range(100):
        tx.submit(_transition(i))
    got = _drain_acking(rx, 100, ack=False)
    assert sum(map(len, got)) == 100
    t_stored = time.monotonic() + 2.0  # "storage" takes 2 s for the backlog: twice resend_after_s
    while time.monotonic() < t_stored:
        assert rx.poll(20) == []
    rx.ack("robot-0", tx.stream, 99)
    assert _wait(lambda: tx.unacked_count == 0, rx=rx)
    assert tx.stats()["resent"] == 0 and rx.duplicates == 0
    assert tx.close() == 0
    rx.close()


def test_expected_schema_is_announced_and_enforced(tmp_path):
    ep = _ipc(tmp_path)
    rx = TransitionReceiver(ep, heartbeat_interval_s=0.02)
    rx.expected_schema = {
        "obs": (np.float32, (5,)),
        "action": ("float32", [2]),
        "reward": ("float32", ()),
        "done": (np.bool_, ()),
    }
    good = TransitionSender(ep, "good", max_batch_delay_s=0, heartbeat_interval_s=0.02).start()
    bad = TransitionSender(ep, "bad", max_batch_delay_s=0, heartbeat_interval_s=0.02).start()
    good.submit(_transition(0))
    t = _transition(0)
    bad.submit({"obs": t["obs"].astype(np.float64), "action": t["action"], "extra": np.zeros(1, np.int32)})
    got = _drain_acking(rx, 1)
    assert [b.sender_id for b in got] == ["good"]
    assert _wait(lambda: bad.rejected_reason is not None and good.expected_schema is not None, rx=rx)
    reason = bad.rejected_reason
    assert "missing key 'reward'" in reason and "missing key 'done'" in reason and "unexpected key 'extra'" in reason
    assert "key 'obs' is float64 shape (5,) per transition, expected float32 shape (5,)" in reason
    assert good.expected_schema == {
        "obs": ("float32", (5,)),
        "action": ("float32", (2,)),
        "reward": ("float32", ()),
        "done": ("bool", ()),
    }
    assert good.rejected_reason is None
    rx.poll(300)
    assert rx.stats()["senders"].get("bad", {}).get("received", 0) == 0 and rx.next_expected("bad") in (None, 0)
    bad.close(linger_s=0)
    assert good.close() == 0
    rx.close()


def test_first_sender_fixes_the_schema(tmp_path):
    ep = _ipc(tmp_path)
    rx = TransitionReceiver(ep, heartbeat_interval_s=0.02)
    a = TransitionSender(ep, "a", max_batch_delay_s=0, heartbeat_interval_s=0.02).start()
    a.submit({"x": np.zeros(3, np.float32)})
    assert len(_drain_acking(rx, 1)) == 1
    assert rx.expected_schema == {"x": ("float32", (3,))}
    b = TransitionSender(ep, "b", max_batch_delay_s=0, heartbeat_interval_s=0.02).start()
    b.submit({"x": np.zeros(4, np.float32)})
    assert _wait(lambda: b.rejected_reason is not None, rx=rx)
    assert "[schema]" in b.rejected_reason and "expected float32 shape (3,)" in b.rejected_reason
    b.close(linger_s=0)
    assert a.close() == 0
    rx.close()
