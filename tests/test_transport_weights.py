import time

import numpy as np
import pytest
import torch
import zmq

from robot_rl.transport import WeightPublisher, WeightSubscriber, decode_weights, encode_weights


def _wait(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _connected(pub, sub, version=0):
    """PUB/SUB slow joiner: publish `version` until the subscriber has it."""
    deadline = time.monotonic() + 5
    while sub.version != version and time.monotonic() < deadline:
        pub.publish(version, {"w": np.zeros(1, np.float32)})
        time.sleep(0.02)
    assert sub.version == version
    assert sub.latest().version == version


def test_newest_wins(tmp_path):
    ep = f"ipc://{tmp_path}/w.ipc"
    pub = WeightPublisher(ep)
    sub = WeightSubscriber(ep).start()
    _connected(pub, sub)
    big = np.random.default_rng(0).standard_normal(250_000).astype(np.float32)  # 1 MB
    for v in range(1, 6):
        pub.publish(v, {"w": big + v}, {"step": v * 100})
    assert _wait(lambda: sub.version == 5)
    upd = sub.latest()
    assert upd.version == 5 and upd.meta == {"step": 500}
    np.testing.assert_array_equal(upd.tensors["w"], big + 5)
    assert sub.latest() is None  # each update is returned once
    assert sub.last_received is not None
    with pytest.raises(ValueError, match="older"):
        pub.publish(4, {"w": big})
    # an older version (e.g. from a stale learner) is ignored
    raw = zmq.Context.instance().socket(zmq.PUB)
    raw.setsockopt(zmq.LINGER, 0)
    raw_ep = f"ipc://{tmp_path}/raw.ipc"
    raw.bind(raw_ep)
    sub2 = WeightSubscriber(raw_ep).start()
    assert _wait(lambda: (raw.send(encode_weights(9, {"w": big})), sub2.version == 9)[1])
    sub2.latest()
    raw.send(encode_weights(3, {"w": big}))
    assert _wait(lambda: sub2.ignored >= 1)
    assert sub2.latest() is None and sub2.version == 9
    for s in (sub, sub2):
        s.close()
    pub.close()
    raw.close()


def test_corrupted_weights_rejected(tmp_path):
    ep = f"ipc://{tmp_path}/raw.ipc"
    raw = zmq.Context.instance().socket(zmq.PUB)
    raw.setsockopt(zmq.LINGER, 0)
    raw.bind(ep)
    sub = WeightSubscriber(ep).start()
    good = encode_weights(1, {"w": np.ones(100, np.float32)})
    assert _wait(lambda: (raw.send(good), sub.version == 1)[1])
    assert sub.latest().version == 1
    bad = bytearray(encode_weights(2, {"w": np.ones(100, np.float32)}))
    bad[-5] ^= 0x01
    raw.send(bytes(bad))
    assert _wait(lambda: sub.rejected == 1)
    raw.send(b"garbage")
    assert _wait(lambda: sub.rejected == 2)
    assert sub.latest() is None and sub.version == 1
    raw.send(encode_weights(3, {"w": np.ones(100, np.float32)}))  # still working
    assert _wait(lambda: sub.version == 3)
    sub.close()
    raw.close()


def test_torch_and_numpy_state_dicts_round_trip_exactly():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(7, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))
    sd = {
        **net.state_dict(),
        "half": torch.randn(4, 4).half(),
        "count": torch.tensor(5, dtype=torch.int64),
        "mask": torch.tensor([True, False]),
        "img": torch.randint(0, 255, (2, 3), dtype=torch.uint8),
    }
    upd = decode_weights(encode_weights(7, sd, {"arch": "mlp"}))
    assert upd.version == 7 and set(upd.tensors) == set(sd)
    for k, t in sd.items():
        back = torch.from_numpy(upd.tensors[k])
        assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t), k
    net2 = torch.nn.Sequential(torch.nn.Linear(7, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))
    net2.load_state_dict({k: torch.from_numpy(upd.tensors[k]) for k in net.state_dict()})
    x = torch.randn(2, 7)
    assert torch.equal(net(x), net2(x))

    nsd = {
        "a": np.arange(12, dtype=np.float64).reshape(3, 4),
        "b": np.array([1, 2], np.int32),
        "s": np.float32(1.5),
        "e": np.zeros((0, 2), np.float16),
    }
    upd = decode_weights(encode_weights(8, nsd))
    for k, a in nsd.items():
        assert upd.tensors[k].dtype == np.asarray(a).dtype and upd.tensors[k].shape == np.shape(a)
        np.testing.assert_array_equal(upd.tensors[k], a)
