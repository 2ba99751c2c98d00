import shutil
import socket
import time

import numpy as np
import pytest

from robot_rl.transport import (
    TransitionReceiver,
    TransitionSender,
    WeightPublisher,
    WeightSubscriber,
    check_bind,
    generate_keys,
    is_loopback,
    load_client_keys,
    load_server_keys,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "ep, ok",
    [
        ("ipc:///tmp/x.ipc", True),
        ("inproc://a", True),
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.3.2.1:1", True),
        ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://192.168.1.10:5555", False),
        ("tcp://eth0:5555", False),
        ("tcp://[::]:5555", False),
        ("pgm://eth0;239.192.1.1:5555", False),
    ],
)
def test_is_loopback(ep, ok):
    assert is_loopback(ep) is ok


def test_refuses_network_bind_without_curve():
    with pytest.raises(
        ValueError, match=r"refusing to bind tcp://0.0.0.0:5555 without CURVE.*robot-rl keys.*127.0.0.1"
    ):
        check_bind("tcp://0.0.0.0:5555", None)
    port = free_port()
    with pytest.raises(ValueError, match="refusing to bind"):
        TransitionReceiver(f"tcp://0.0.0.0:{port}")
    with pytest.raises(ValueError, match="refusing to bind"):
        WeightPublisher(f"tcp://*:{port}")
    check_bind("tcp://127.0.0.1:5555", None)


@pytest.fixture
def keys(tmp_path):
    server_dir, robot_dir, intruder_dir = tmp_path / "learner", tmp_path / "robot", tmp_path / "intruder"
    server_pub, _ = generate_keys(str(server_dir), "server")
    client_pub, client_secret = generate_keys(str(robot_dir), "client")
    generate_keys(str(intruder_dir), "client")
    (server_dir / "authorized_clients").mkdir()
    shutil.copy(client_pub, server_dir / "authorized_clients" / "robot.key")
    assert (robot_dir / "client.key_secret").stat().st_mode & 0o077 == 0
    return (
        load_server_keys(str(server_dir)),
        load_client_keys(str(robot_dir), server_pub),
        load_client_keys(str(intruder_dir), server_pub),
    )


def test_curve_weights_and_transitions_authorized_only(keys):
    server, client, intruder = keys
    assert server.authorized_clients_dir is not None
    w_ep, t_ep = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    # receiver and publisher share one process (and one zmq context / authenticator)
    pub = WeightPublisher(w_ep, curve=server)
    rx = TransitionReceiver(t_ep, curve=server)
    good = WeightSubscriber(w_ep, curve=client).start()
    bad = WeightSubscriber(w_ep, curve=intruder).start()
    deadline = time.monotonic() + 10
    v = 0
    while good.version is None and time.monotonic() < deadline:
        pub.publish(v, {"w": np.arange(3, dtype=np.float32)})
        v += 1
        time.sleep(0.05)
    assert good.version is not None
    for _ in range(10):  # give the intruder every chance
        pub.publish(v, {"w": np.arange(3, dtype=np.float32)})
        v += 1
        time.sleep(0.05)
    assert bad.version is None and bad.last_received is None

    tx_good = TransitionSender(t_ep, "robot", max_batch_delay_s=0, curve=client).start()
    tx_bad = TransitionSender(t_ep, "intruder", max_batch_delay_s=0, curve=intruder).start()
    for i in range(20):
        tx_good.submit({"x": np.full(2, i, np.float32)})
        tx_bad.submit({"x": np.full(2, -1, np.float32)})
    got, t_end = [], time.monotonic() + 5
    while len(got) < 20 and time.monotonic() < t_end:
        for b in rx.poll(50):
            assert b.sender_id == "robot"
            got += b.seqs.tolist()
            rx.ack(b.sender_id, b.stream, int(b.seqs[-1]))
    for b in rx.poll(300):
        assert b.sender_id == "robot"
    assert got == list(range(20))
    assert set(rx.senders) == {"robot"}
    assert tx_bad.last_contact is None and tx_bad.acked_upto == -1
    # the failed handshakes are counted and explained on both sides (socket monitors)
    deadline = time.monotonic() + 10
    while (
        rx.stats()["handshake_failures"] == 0 or tx_bad.stats()["handshake_failures"] == 0
    ) and time.monotonic() < deadline:
        rx.poll(50)
    assert rx.stats()["handshake_failures"] >= 1 and tx_bad.stats()["handshake_failures"] >= 1
    assert "authentication refused" in tx_bad.rejected_reason
    assert tx_good.stats()["handshake_failures"] == 0
    assert tx_good.close() == 0
    tx_bad.close(linger_s=0)
    for s in (good, bad):
        s.close()
    rx.close()
    pub.close()


def test_failed_handshakes_logged_once_per_peer_and_reason_and_counted(keys, caplog):
    import logging

    server, client, intruder = keys
    t_ep = f"tcp://127.0.0.1:{free_port()}"
    rx = TransitionReceiver(t_ep, curve=server)
    plain = TransitionSender(t_ep, "plain").start()  # no CURVE at all: mechanism mismatch
    wrong = TransitionSender(t_ep, "wrong", curve=type(client)(client.public, client.secret, client.public)).start()
    stranger = TransitionSender(t_ep, "stranger", curve=intruder).start()  # key not authorized
    with caplog.at_level(logging.WARNING, logger="robot_rl.transport"):
        deadline = time.monotonic() + 20
        while (
            rx.stats()["handshake_failures"] < 7 or stranger.stats()["handshake_failures"] < 1
        ) and time.monotonic() < deadline:
            rx.poll(50)  # the senders reconnect (and fail) again and again
        for tx in (plain, wrong, stranger):
            tx.close(linger_s=0)
        rx.poll(100)
    assert rx.stats()["handshake_failures"] >= 7
    lines = [r.getMessage() for r in caplog.records if "handshake with" in r.getMessage()]
    server_lines = [ln for ln in lines if ln.startswith("transition receiver")]
    assert sum("mechanism mismatch" in ln for ln in server_lines) == 1, lines  # once per peer and reason
    assert sum("cryptographic" in ln for ln in server_lines) == 1, lines
    key = intruder.public.decode()
    assert sum(f"client 127.0.0.1 (public key {key})" in ln for ln in server_lines) == 1, lines
    assert plain.stats()["handshake_failures"] >= 1 and "mechanism mismatch" in plain.rejected_reason
    assert "authentication refused" in stranger.rejected_reason
    assert sum(ln.startswith("transition sender stranger") for ln in lines) == 1, lines
    rx.close()


def test_a_curve_receiver_opened_right_after_another_closed_starts(keys):
    """The ZAP handler of a just-closed receiver releases its inproc endpoint only when zmq's reaper gets to it
    (late on a busy machine): the next receiver on the same context waits for it instead of failing."""
    server, _, _ = keys
    for _ in range(50):
        rx = TransitionReceiver(f"tcp://127.0.0.1:{free_port()}", curve=server)
        rx.close()
