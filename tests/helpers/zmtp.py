"""A raw ZMTP 3.0 peer on a plain OS socket, for sending what no ZeroMQ library would send.

libzmq only hands whole, well-framed messages to our code; to reach libzmq itself in our processes
(a bad greeting, a wrong socket type, a frame header announcing 2**63 bytes) the test speaks the
wire protocol (https://rfc.zeromq.org/spec/23/, NULL mechanism) by hand.
"""

from __future__ import annotations

import socket
import struct


def open_stream(address: str, timeout: float = 5.0) -> socket.socket:
    """A connected plain socket to a ZeroMQ ``ipc://`` or ``tcp://`` endpoint."""
    if address.startswith("ipc://"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: object = address[len("ipc://"):]
    elif address.startswith("tcp://"):
        host, port = address[len("tcp://"):].rsplit(":", 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = (host, int(port))
    else:
        raise ValueError(f"unsupported address {address}")
    sock.settimeout(timeout)
    sock.connect(target)
    return sock


GREETING = (b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00"
            + b"\x00" * 31)


def _property(name: bytes, value: bytes) -> bytes:
    return bytes([len(name)]) + name + struct.pack(">I", len(value)) + value


def command(name: bytes, body: bytes) -> bytes:
    data = bytes([len(name)]) + name + body
    if len(data) > 255:
        return b"\x06" + struct.pack(">Q", len(data)) + data
    return b"\x04" + bytes([len(data)]) + data


def ready(socket_type: bytes) -> bytes:
    return command(b"READY", _property(b"Socket-Type", socket_type) + _property(b"Identity", b""))


def frame(body: bytes, *, more: bool = False) -> bytes:
    flags = 0x01 if more else 0x00
    if len(body) > 255:
        return bytes([flags | 0x02]) + struct.pack(">Q", len(body)) + body
    return bytes([flags]) + bytes([len(body)]) + body


def huge_frame_header(size: int) -> bytes:
    """The header of a long frame announcing ``size`` bytes (which never come)."""
    return b"\x02" + struct.pack(">Q", size)


def handshake(address: str, socket_type: bytes) -> socket.socket:
    """Greeting and READY as a ``socket_type`` peer; returns the socket ready for frames.

    The peer's greeting is read; its READY may or may not have arrived and is left unread.
    """
    sock = open_stream(address)
    sock.sendall(GREETING + ready(socket_type))
    got = b""
    while len(got) < 64:
        chunk = sock.recv(64 - len(got))
        if not chunk:
            raise ConnectionError("the peer closed the connection during the greeting")
        got += chunk
    assert got[0] == 0xFF and got[9] == 0x7F, got[:10]
    return sock
