"""Low-level socket helpers shared by events and RPC: plain-int flags and asyncio readiness.

Why not ``zmq.asyncio`` sockets: per message they create a Future, register and unregister the
socket's FD with the loop and do ``IntFlag`` arithmetic on every send and receive
(bench/RESULTS.md measured it at most of our per-message cost). Our sockets are plain
synchronous pyzmq sockets created from the caller's context (so ``ctx.destroy()`` still closes
them); we send and receive with ``NOBLOCK`` and only touch the event loop when a socket has
nothing queued, through ONE persistent ``add_reader`` on its ``ZMQ_FD``.

``ZMQ_FD`` is edge-like: it signals that ``ZMQ_EVENTS`` may have changed, and any operation on
the socket (send, recv, reading ``EVENTS``) may consume the signal. So: drain until ``Again``
before waiting, check ``EVENTS`` before sleeping, and after a send check ``EVENTS`` again.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
import time
from collections.abc import Callable

import zmq

# pyzmq's flags are IntFlag/IntEnum members; combining them costs ~0.5 µs per operation.
NOBLOCK = int(zmq.NOBLOCK)
SNDMORE = int(zmq.SNDMORE)
MORE_NOBLOCK = SNDMORE | NOBLOCK
RCVMORE = int(zmq.RCVMORE)
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)
POLLOUT = int(zmq.POLLOUT)
FD = int(zmq.FD)

# A drain callback hands the loop back after this many messages (then reschedules itself).
DRAIN_BATCH = 512


_HANDSHAKE_SUCCEEDED = int(zmq.EVENT_HANDSHAKE_SUCCEEDED)
_DISCONNECTED = int(zmq.EVENT_DISCONNECTED)
_monitor_ids = itertools.count()


class PeerWatch:
    """Whether a connecting socket has a live peer (its handshake done), from a socket monitor.

    Why not ``ZMQ_IMMEDIATE``, which makes a send fail at once when no peer is connected: with it,
    libzmq drops the messages still queued *in* from a peer the moment that peer disconnects, so a
    service that answers and then exits (graceful SIGTERM) could lose the reply to its last
    request (measured: 5 of 20 runs). The monitor gives the same "nobody is there" answer, and
    replies already received are kept.
    """

    def __init__(self, sock: zmq.Socket) -> None:
        address = f"inproc://peer-watch-{next(_monitor_ids)}-{id(sock)}"
        sock.monitor(address, _HANDSHAKE_SUCCEEDED | _DISCONNECTED)
        self._sock = sock
        self._events = plain_socket(sock.context, zmq.PAIR)
        self._events.linger = 0
        self._events.connect(address)
        self.connected = False

    def update(self) -> bool:
        """Apply the events that arrived; return whether a peer is connected now."""
        events = self._events
        while events.get(EVENTS) & POLLIN:
            first = events.recv(NOBLOCK)
            while events.get(RCVMORE):
                events.recv(NOBLOCK)
            if len(first) >= 2:
                (event,) = struct.unpack_from("=H", first)
                if event == _HANDSHAKE_SUCCEEDED:
                    self.connected = True
                elif event == _DISCONNECTED:
                    self.connected = False
        return self.connected

    def wait(self, timeout_s: float) -> bool:
        """Block until a peer is connected or ``timeout_s`` passed (blocking callers)."""
        if self.update():
            return True
        deadline_ms = int(timeout_s * 1000)
        while deadline_ms > 0:
            started = time.monotonic()
            if not self._events.poll(deadline_ms):
                return self.update()
            if self.update():
                return True
            deadline_ms -= int((time.monotonic() - started) * 1000) + 1
        return self.update()

    def close(self) -> None:
        if not self._sock.closed:
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
        self._events.close(linger=0)


def plain_socket(ctx: zmq.Context, socket_type: int) -> zmq.Socket:
    """A synchronous socket from ``ctx`` (asyncio or not), tracked by ``ctx`` for ``destroy``."""
    return ctx.socket(socket_type, socket_class=zmq.Socket)


def recv_frames(sock: zmq.Socket) -> list[bytes]:
    """Every frame of the next message, without blocking; raises ``zmq.Again`` if none."""
    frame = sock.recv(NOBLOCK)
    if not sock.get(RCVMORE):
        return [frame]
    frames = [frame]
    while True:  # the rest of a multipart message is already here (atomic delivery)
        frames.append(sock.recv(NOBLOCK))
        if not sock.get(RCVMORE):
            return frames


def has_input(sock: zmq.Socket) -> bool:
    return bool(sock.get(EVENTS) & POLLIN)


class Readiness:
    """``await readable()`` until the socket has input: one persistent reader on ``ZMQ_FD``."""

    def __init__(self, sock: zmq.Socket) -> None:
        self._sock = sock
        self._fd = sock.get(FD)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None

    async def readable(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            attach_reader(self, loop, self._on_fd)
        sock = self._sock
        while not sock.get(EVENTS) & POLLIN:
            waiter = self._waiter = loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def _on_fd(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)  # the waiting task re-reads EVENTS itself
        elif not self._sock.closed:
            self._sock.get(EVENTS)  # consume the signal, or a level-triggered loop spins on it

    def close(self) -> None:
        detach_reader(self)


def attach_reader(owner: object, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """Watch ``owner._fd`` on ``loop`` (moving it from a previous loop) and remember the loop."""
    detach_reader(owner)
    loop.add_reader(owner._fd, callback)  # type: ignore[attr-defined]
    owner._loop = loop  # type: ignore[attr-defined]


def detach_reader(owner: object) -> None:
    loop = owner._loop  # type: ignore[attr-defined]
    if loop is not None:
        owner._loop = None  # type: ignore[attr-defined]
        if not loop.is_closed():
            loop.remove_reader(owner._fd)  # type: ignore[attr-defined]
