"""Wire format shared by every robot_rl ZMQ socket (see docs/protocol.md).

A message is a list of frames: frame 0 is a msgpack map (the header), then one raw frame per array
(little-endian, C order, exactly ``prod(shape) * itemsize`` bytes). Weights travel as ONE frame (so that
subscribers can use ZMQ_CONFLATE): ``u32 header length | msgpack header | safetensors bytes``.
Nothing is ever pickled.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 2  # v2: `sender`/`stream` in every transition-socket header, `error` replies, schema greeting
INT64_MAX = 2**63 - 1  # seq numbers are int64 everywhere (numpy arrays, replay columns)

# Wire dtype name -> numpy dtype (always little-endian on the wire).
DTYPES: dict[str, np.dtype] = {
    "bool": np.dtype("?"),
    "uint8": np.dtype("u1"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}
_RESERVED = ("v", "type", "arrays")
_UPGRADE = "upgrade robot_rl on the older side so both ends run the same protocol version"


class ProtocolError(ValueError):
    """A message that does not follow docs/protocol.md; the text says what was wrong and what to do."""

    code = "malformed"  # the `code` of the `error` reply a receiver sends back for it


class VersionError(ProtocolError):
    """The peer speaks another protocol version (`peer_version`)."""

    code = "version"

    def __init__(self, message: str, peer_version):
        super().__init__(message)
        self.peer_version = peer_version


@dataclass
class Message:
    type: str
    header: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class WeightUpdate:
    version: int
    tensors: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)


def wire_dtype(dtype) -> str:
    """The wire name of a numpy dtype, or ProtocolError if it is not in the whitelist."""
    dt = np.dtype(dtype)
    name = dt.name if dt.kind != "b" else "bool"
    if name not in DTYPES:
        raise ProtocolError(
            f"dtype {dt} cannot be sent: allowed dtypes are {', '.join(DTYPES)}; convert the array first"
        )
    return name


def _as_wire_array(name: str, arr) -> np.ndarray:
    a = np.asarray(arr)
    target = DTYPES[wire_dtype(a.dtype)]
    if a.dtype != target:  # big-endian input
        a = a.astype(target)
    return a if a.flags.c_contiguous else a.copy(order="C")  # (np.ascontiguousarray would make 0-d into 1-d)


def encode_message(msg_type: str, header: dict, arrays: dict[str, np.ndarray] | None = None) -> list:
    """Frames for ``socket.send_multipart(frames, copy=False)``.

    Array frames reference the arrays' memory (no copy); do not modify them until the send has completed.
    """
    if not isinstance(msg_type, str) or not msg_type:
        raise ProtocolError(f"message type must be a non-empty string, got {msg_type!r}")
    bad = [k for k in _RESERVED if k in header]
    if bad:
        raise ProtocolError(f"header keys {bad} are reserved by the protocol; rename them")
    arrays = arrays or {}
    specs, bufs = [], []
    for name, arr in arrays.items():
        if not isinstance(name, str):
            raise ProtocolError(f"array names must be strings, got {name!r}")
        a = _as_wire_array(name, arr)
        specs.append({"name": name, "dtype": wire_dtype(a.dtype), "shape": list(a.shape)})
        bufs.append(a.reshape(-1).view(np.uint8))
    hdr = {"v": PROTOCOL_VERSION, "type": msg_type, "arrays": specs, **header}
    return [msgpack.packb(hdr, use_bin_type=True), *bufs]


def _frame_buffer(frame) -> memoryview:
    buf = getattr(frame, "buffer", None)  # zmq.Frame (recv with copy=False)
    return memoryview(buf if buf is not None else frame)


def _check_version(hdr: dict, what: str) -> None:
    v = hdr.get("v")
    if v is None:
        raise ProtocolError(f"{what} header has no protocol version field 'v': the peer is not a robot_rl peer")
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError(f"{what} header field 'v' must be an integer, got {v!r}")
    if v != PROTOCOL_VERSION:
        raise VersionError(f"peer speaks protocol v{v}, this build speaks v{PROTOCOL_VERSION}: {_UPGRADE}", v)


def peek_header(frames) -> dict | None:
    """Frame 0 as a msgpack map without any validation (None if it is not one): to read an `error` reply from a
    peer of another protocol version, whose layout every version keeps (docs/protocol.md, "error")."""
    try:
        hdr = msgpack.unpackb(_frame_buffer(list(frames)[0]), raw=False, strict_map_key=True)
    except Exception:  # noqa: BLE001 - any garbage: not a header
        return None
    return hdr if isinstance(hdr, dict) else None


def int_field(h: dict, key: str, minimum: int | None = 0, maximum: int = INT64_MAX) -> int:
    """Header field `key` as an int in [minimum, maximum] (default: a non-negative int64), else ProtocolError."""
    v = h.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or (minimum is not None and v < minimum):
        raise ProtocolError(f"header field {key!r} must be an integer >= {minimum}, got {v!r}")
    if v > maximum:
        raise ProtocolError(
            f"header field {key!r} = {v} is beyond {maximum} (seq numbers are int64): a sender must "
            "number transitions from a small start (0 or its outbox's next seq) and never wrap"
        )
    return v


def _unpack_header(raw, what: str) -> dict:
    try:
        hdr = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several exception types
        raise ProtocolError(f"{what} header is not valid msgpack ({type(e).__name__}: {e})") from None
    if not isinstance(hdr, dict):
        raise ProtocolError(f"{what} header must be a msgpack map, got {type(hdr).__name__}")
    return hdr


def decode_message(frames) -> Message:
    """Parse and validate a multipart message. Arrays are read-only views of the frames (zero copy)."""
    frames = list(frames)
    if not frames:
        raise ProtocolError("empty message: expected a msgpack header frame")
    hdr = _unpack_header(_frame_buffer(frames[0]), "message")
    _check_version(hdr, "message")
    msg_type = hdr.get("type")
    if not isinstance(msg_type, str):
        raise ProtocolError(f"message header field 'type' missing or not a string (got {msg_type!r})")
    specs = hdr.get("arrays", [])
    if not isinstance(specs, list):
        raise ProtocolError(f"'{msg_type}' header field 'arrays' must be a list, got {type(specs).__name__}")
    if len(frames) != 1 + len(specs):
        raise ProtocolError(
            f"'{msg_type}' message has {len(frames)} frames but its header describes {len(specs)} arrays "
            f"(expected {1 + len(specs)} frames): send one frame per array, in header order"
        )
    arrays: dict[str, np.ndarray] = {}
    for spec, frame in zip(specs, frames[1:]):
        if not isinstance(spec, dict) or not {"name", "dtype", "shape"} <= spec.keys():
            raise ProtocolError(f"'{msg_type}' array spec {spec!r} must be a map with name, dtype and shape")
        name, dt, shape = spec["name"], spec["dtype"], spec["shape"]
        if not isinstance(name, str) or name in arrays:
            raise ProtocolError(f"'{msg_type}' array name {name!r} is not a string or is repeated")
        if dt not in DTYPES:
            raise ProtocolError(
                f"'{msg_type}' array {name!r} has dtype {dt!r}, which is not allowed (allowed: {', '.join(DTYPES)})"
            )
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ProtocolError(f"'{msg_type}' array {name!r} shape {shape!r} must be a list of ints >= 0")
        buf = _frame_buffer(frame)
        want = math.prod(shape) * DTYPES[dt].itemsize
        if buf.nbytes != want:
            raise ProtocolError(
                f"'{msg_type}' array {name!r} frame has {buf.nbytes} bytes but dtype {dt} shape {shape} "
                f"needs {want}: check byte order, shape and that the buffer is C-contiguous"
            )
        arrays[name] = np.frombuffer(buf, dtype=DTYPES[dt]).reshape(shape)
    header = {k: val for k, val in hdr.items() if k not in _RESERVED}
    return Message(msg_type, header, arrays)


# ----------------------------------------------------------------------------------------------- weights
def _to_numpy(name: str, t) -> np.ndarray:
    if hasattr(t, "detach"):  # torch.Tensor, without importing torch
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()  # numpy has no bfloat16: travels as float32
        t = t.numpy()
    a = np.asarray(t)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a if a.flags.c_contiguous else a.copy(order="C")


def encode_weights(version: int, state_dict: dict[str, Any], meta: dict | None = None) -> bytes:
    """One frame: u32 LE header length, msgpack header, safetensors payload (torch tensors go via CPU numpy)."""
    import safetensors.numpy

    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(f"weights version must be an int >= 0, got {version!r}")
    payload = safetensors.numpy.save({k: _to_numpy(k, v) for k, v in state_dict.items()})
    hdr = msgpack.packb(
        {
            "v": PROTOCOL_VERSION,
            "type": "weights",
            "version": version,
            "sha256": hashlib.sha256(payload).hexdigest(),
            "meta": meta or {},
        },
        use_bin_type=True,
    )
    return struct.pack("<I", len(hdr)) + hdr + payload


def decode_weights(buf) -> WeightUpdate:
    """Validate and parse an ``encode_weights`` frame; ProtocolError on any inconsistency."""
    import safetensors.numpy

    mv = _frame_buffer(buf)
    if mv.nbytes < 4:
        raise ProtocolError(f"weights frame has {mv.nbytes} bytes: too short for the 4-byte header length")
    (hlen,) = struct.unpack_from("<I", mv, 0)
    if 4 + hlen > mv.nbytes:
        raise ProtocolError(
            f"weights frame declares a {hlen}-byte header but holds only {mv.nbytes - 4} bytes after the length"
        )
    hdr = _unpack_header(mv[4 : 4 + hlen], "weights")
    _check_version(hdr, "weights")
    if hdr.get("type") != "weights":
        raise ProtocolError(f"expected a 'weights' message on the weights socket, got type {hdr.get('type')!r}")
    version, digest, meta = hdr.get("version"), hdr.get("sha256"), hdr.get("meta", {})
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProtocolError(f"weights header field 'version' must be an int, got {version!r}")
    if not isinstance(digest, str):
        raise ProtocolError("weights header has no 'sha256' string: cannot verify the payload")
    if not isinstance(meta, dict):
        raise ProtocolError(f"weights header field 'meta' must be a map, got {type(meta).__name__}")
    payload = mv[4 + hlen :]
    actual = hashlib.sha256(payload).hexdigest()
    if actual != digest:
        raise ProtocolError(
            f"weights v{version} failed its checksum (sha256 {actual[:12]}... != {digest[:12]}...): "
            "the payload was corrupted in transit; it is dropped, wait for the next publish"
        )
    try:
        tensors = safetensors.numpy.load(bytes(payload))
    except Exception as e:
        raise ProtocolError(f"weights v{version} payload is not valid safetensors ({e})") from None
    return WeightUpdate(version, tensors, meta)
