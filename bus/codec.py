"""msgpack codec: one payload frame per message, ``[header, body]`` as a 2-element msgpack array.

The header (``Envelope``, array-like) and the body (any message type, a tagged map) travel in
ONE frame and are decoded in one pass by one decoder: every extra ZeroMQ frame costs a
``send``/``recv`` call (and a broker hop) per message, which measured far more than the codec
itself (bench/RESULTS.md). Who sent a message still survives a body of an unknown type: when
the full decode fails, the header alone is decoded (``DecodeError.header``), so a server can
answer ``INVALID_REQUEST`` to the right caller.

Tolerant reader: unknown fields of a body are ignored, an array-like header (or the outer
array) may carry appended fields from a newer sender.
"""

from __future__ import annotations

import random
import time
from typing import Union

import msgspec

from forgellm.schemas import MESSAGE_TYPES, Envelope, Message


class _Wire(msgspec.Struct, array_like=True):
    header: Envelope
    body: Union[MESSAGE_TYPES]  # type: ignore[valid-type]


class _HeaderOnly(msgspec.Struct, array_like=True):
    header: Envelope  # the body (and anything after it) is skipped, not validated


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Wire)
_header_decoder = msgspec.msgpack.Decoder(_HeaderOnly)
_randbits = random.getrandbits  # the random module reseeds itself from the OS after fork()


class DecodeError(ValueError):
    """A payload is not a valid ``[header, body]``. ``header`` is set when only the body was bad."""

    def __init__(self, message: str, header: Envelope | None = None) -> None:
        super().__init__(message)
        self.header = header


def new_id() -> str:
    """A short unique id (request ids, message ids): 16 hex chars, 64 random bits."""
    return f"{_randbits(64):016x}"


def encode(header: Envelope, body: Message) -> bytes:
    """One payload frame: msgpack ``[header, body]``; stamps ``header.ts`` if unset."""
    if not header.ts:
        header.ts = time.time()
    return _encoder.encode((header, body))


# What msgspec raises for bad input: a msgpack str that is not UTF-8 is a UnicodeDecodeError, not
# a msgspec.DecodeError (found by fuzzing the services' sockets: it escaped ``decode``).
_BAD_INPUT = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError)


def decode(payload: bytes) -> tuple[Envelope, Message]:
    """``(header, body)``; raises ``DecodeError`` (with ``.header`` if the header parsed)."""
    try:
        wire = _decoder.decode(payload)
    except _BAD_INPUT as exc:
        try:
            header = _header_decoder.decode(payload).header
        except _BAD_INPUT:
            raise DecodeError(f"bad header: {exc}") from exc
        raise DecodeError(f"bad body: {exc}", header) from exc
    return wire.header, wire.body


def decode_header(payload: bytes) -> Envelope:
    """The header alone (the body is skipped): for routing and tests."""
    try:
        return _header_decoder.decode(payload).header
    except _BAD_INPUT as exc:
        raise DecodeError(f"bad header: {exc}") from exc
