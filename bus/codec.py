"""msgpack codec: a header frame (``Envelope``) and a body frame (any message type).

Two frames rather than one nested struct: a router or proxy can read the header without
decoding the body, and a body of an unknown type does not hide who sent it.
"""

from __future__ import annotations

import os
import time
from typing import Union

import msgspec

from forgellm.schemas import MESSAGE_TYPES, Envelope, Message

_encoder = msgspec.msgpack.Encoder()
_header_decoder = msgspec.msgpack.Decoder(Envelope)
_body_decoder = msgspec.msgpack.Decoder(Union[MESSAGE_TYPES])  # type: ignore[valid-type]


class DecodeError(ValueError):
    """A frame is not a valid header or not a known message type."""


def new_id() -> str:
    """A short unique id (request ids, message ids): 16 hex chars from the OS RNG."""
    return os.urandom(8).hex()


def encode(header: Envelope, body: Message) -> list[bytes]:
    if not header.ts:
        header.ts = time.time()
    return [_encoder.encode(header), _encoder.encode(body)]


def decode_header(frame: bytes) -> Envelope:
    try:
        return _header_decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DecodeError(f"bad header: {exc}") from exc


def decode_body(frame: bytes) -> Message:
    try:
        return _body_decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DecodeError(f"bad body: {exc}") from exc
