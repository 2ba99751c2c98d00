import pathlib

import msgpack
import numpy as np
import pytest

from robot_rl.transport import (
    PROTOCOL_VERSION,
    ProtocolError,
    decode_message,
    decode_weights,
    encode_message,
    encode_weights,
)


def _bytes_frames(frames):
    return [bytes(memoryview(f)) for f in frames]


def test_round_trip_dtypes_and_shapes():
    arrays = {
        "b": np.array([True, False, True]),
        "u8": np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        "i32": np.array([-1, 2**31 - 1], dtype=np.int32),
        "i64": np.array(-(2**40), dtype=np.int64),  # 0-d
        "f16": np.linspace(0, 1, 5, dtype=np.float16),
        "f32": np.random.default_rng(0).standard_normal((4, 7)).astype(np.float32),
        "f64": np.array([[np.pi]]),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "big_endian": np.arange(3, dtype=">i4"),
        "strided": np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2],
    }
    frames = encode_message("test", {"k": 1, "nested": {"a": [1, 2]}}, arrays)
    assert len(frames) == 1 + len(arrays)
    msg = decode_message(_bytes_frames(frames))
    assert msg.type == "test" and msg.header == {"k": 1, "nested": {"a": [1, 2]}}
    assert list(msg.arrays) == list(arrays)
    for k, a in arrays.items():
        got = msg.arrays[k]
        np.testing.assert_array_equal(got, a)
        assert got.shape == a.shape
        assert got.dtype == a.dtype.newbyteorder("<") or got.dtype == a.dtype
    # header is plain msgpack with the documented fields
    hdr = msgpack.unpackb(frames[0])
    assert hdr["v"] == PROTOCOL_VERSION and hdr["type"] == "test"
    assert hdr["arrays"][1] == {"name": "u8", "dtype": "uint8", "shape": [2, 3, 4]}


def test_no_arrays_message():
    msg = decode_message(encode_message("heartbeat", {"upto": 5}))
    assert msg.type == "heartbeat" and msg.header == {"upto": 5} and msg.arrays == {}


def _hdr(**kw):
    h = {"v": PROTOCOL_VERSION, "type": "transitions", "arrays": [{"name": "x", "dtype": "float32", "shape": [2]}]}
    h.update(kw)
    return msgpack.packb(h)


@pytest.mark.parametrize(
    "frames, needle",
    [
        ([], "empty message"),
        ([b"\xc1garbage"], "not valid msgpack"),
        ([msgpack.packb([1, 2])], "must be a msgpack map"),
        ([msgpack.packb({"type": "x"})], "no protocol version"),
        ([_hdr(v=99), b"\0" * 8], f"peer speaks protocol v99, this build speaks v{PROTOCOL_VERSION}: upgrade"),
        ([msgpack.packb({"v": PROTOCOL_VERSION})], "'type' missing"),
        ([_hdr()], "has 1 frames but its header describes 1 arrays"),
        ([_hdr(), b"\0" * 8, b"extra"], "has 3 frames"),
        ([_hdr(), b"\0" * 7], "has 7 bytes but dtype float32 shape [2] needs 8"),
        ([_hdr(arrays=[{"name": "x", "dtype": "object", "shape": [1]}]), b"\0" * 8], "not allowed"),
        ([_hdr(arrays=[{"name": "x", "dtype": "<f4", "shape": [1]}]), b"\0" * 4], "not allowed"),
        ([_hdr(arrays=[{"name": "x", "dtype": "float32", "shape": [-1]}]), b""], "shape"),
        ([_hdr(arrays=[{"name": "x"}]), b""], "must be a map with name, dtype and shape"),
    ],
)
def test_malformed_messages_raise_protocol_error(frames, needle):
    with pytest.raises(ProtocolError) as e:
        decode_message(frames)
    assert needle in str(e.value)
    assert isinstance(e.value, ValueError)


def test_encode_rejects_bad_input():
    with pytest.raises(ProtocolError, match="allowed dtypes"):
        encode_message("t", {}, {"o": np.array([object()])})
    with pytest.raises(ProtocolError, match="allowed dtypes"):
        encode_message("t", {}, {"c": np.zeros(2, np.complex64)})
    with pytest.raises(ProtocolError, match="reserved"):
        encode_message("t", {"v": 3})


def test_weights_round_trip_and_errors():
    sd = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.array(7, dtype=np.int64)}
    buf = encode_weights(3, sd, {"algo": "sac"})
    upd = decode_weights(buf)
    assert upd.version == 3 and upd.meta == {"algo": "sac"}
    for k in sd:
        np.testing.assert_array_equal(upd.tensors[k], sd[k])
    corrupt = bytearray(buf)
    corrupt[-1] ^= 0xFF
    with pytest.raises(ProtocolError, match="checksum"):
        decode_weights(bytes(corrupt))
    with pytest.raises(ProtocolError, match="too short"):
        decode_weights(b"\1")
    with pytest.raises(ProtocolError, match="declares"):
        decode_weights(b"\xff\xff\0\0abc")
    hdr = msgpack.packb({"v": 9, "type": "weights", "version": 1, "sha256": "", "meta": {}})
    with pytest.raises(ProtocolError, match="peer speaks protocol v9"):
        decode_weights(len(hdr).to_bytes(4, "little") + hdr)


def test_no_pickle_in_transport():
    src = pathlib.Path(__file__).resolve().parents[1] / "robot_rl" / "transport"
    for f in src.glob("*.py"):
        text = f.read_text()
        assert "import pickle" not in text and "pickle." not in text, f
