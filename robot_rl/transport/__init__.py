"""ZMQ transport between the control process and the learner (wire format: docs/protocol.md)."""

from .protocol import (
    DTYPES,
    PROTOCOL_VERSION,
    Message,
    ProtocolError,
    VersionError,
    WeightUpdate,
    decode_message,
    decode_weights,
    encode_message,
    encode_weights,
)
from .security import (
    CurveClientKeys,
    CurveServerKeys,
    check_bind,
    generate_keys,
    is_loopback,
    load_client_keys,
    load_server_keys,
)
from .outbox import Outbox
from .receiver import TransitionBatch, TransitionReceiver
from .sender import TransitionSender
from .weights import WeightPublisher, WeightSubscriber

__all__ = [
    "DTYPES",
    "PROTOCOL_VERSION",
    "Message",
    "ProtocolError",
    "VersionError",
    "Outbox",
    "WeightUpdate",
    "decode_message",
    "decode_weights",
    "encode_message",
    "encode_weights",
    "CurveClientKeys",
    "CurveServerKeys",
    "check_bind",
    "generate_keys",
    "is_loopback",
    "load_client_keys",
    "load_server_keys",
    "TransitionBatch",
    "TransitionReceiver",
    "TransitionSender",
    "WeightPublisher",
    "WeightSubscriber",
]
