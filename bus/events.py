"""Events: services publish to the broker's ``events_in``; anyone subscribes to ``events_out``.

Frames are ``[topic, header, body]``. A publisher numbers its events per topic (``seq`` from 1)
and stamps a per-process ``instance`` id, so a subscriber filtering by topic prefix can tell a
lost event (a gap) from a publisher restart (a new instance).
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import structlog
import zmq
import zmq.asyncio

from forgellm.bus.codec import DecodeError, decode_body, decode_header, encode, new_id
from forgellm.schemas import TOPICS, Envelope, Message

log = structlog.get_logger("bus.events")


def _sync_context(ctx: zmq.Context | None) -> zmq.Context:
    if ctx is None:
        return zmq.Context.instance()
    # An asyncio context's sockets return futures; a shadow shares its I/O threads but sends
    # synchronously, which PUB never blocks on (it drops at the HWM instead).
    return zmq.Context.shadow(ctx.underlying) if isinstance(ctx, zmq.asyncio.Context) else ctx


class EventPublisher:
    """Publishes events on the bus. Safe to call from any thread of the process."""

    def __init__(
        self,
        address: str,
        source: str,
        *,
        ctx: zmq.Context | None = None,
        hwm: int = 100_000,
    ) -> None:
        self.source = source
        self.instance = new_id()
        self.dropped = 0
        self._seq: dict[str, int] = {}
        self._lock = threading.Lock()
        self._socket = _sync_context(ctx).socket(zmq.PUB)
        self._socket.setsockopt(zmq.SNDHWM, hwm)
        self._socket.setsockopt(zmq.LINGER, 500)
        self._socket.connect(address)

    def publish(self, event: Message, correlation_id: str = "") -> int:
        """Send ``event`` on its topic; returns its sequence number."""
        topic = TOPICS[type(event)]
        with self._lock:
            seq = self._seq.get(topic, 0) + 1
            self._seq[topic] = seq
            header = Envelope(
                msg_id=new_id(),
                correlation_id=correlation_id,
                source=self.source,
                instance=self.instance,
                ts=time.time(),
                seq=seq,
            )
            try:
                self._socket.send_multipart([topic.encode(), *encode(header, event)], zmq.NOBLOCK)
            except zmq.Again:
                self.dropped += 1
        return seq

    def close(self) -> None:
        with self._lock:
            self._socket.close()


@dataclass(slots=True)
class EventRecord:
    topic: str
    header: Envelope
    body: Message
    missed: int  # events of this topic from this publisher lost just before this one


class AsyncSubscriber:
    """Receives events whose topic starts with one of ``topics`` ("" = everything)."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        address: str,
        topics: Iterable[str] = ("",),
        *,
        hwm: int = 100_000,
    ) -> None:
        self.missed = 0
        self._last: dict[tuple[str, str, str], int] = {}
        self._socket = ctx.socket(zmq.SUB)
        self._socket.setsockopt(zmq.RCVHWM, hwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        for topic in topics:
            self._socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._socket.connect(address)

    async def recv(self) -> EventRecord:
        """The next well-formed event; malformed frames are logged and skipped."""
        while True:
            frames = await self._socket.recv_multipart()
            if len(frames) != 3:
                log.warning("event_dropped", reason="expected 3 frames", frames=len(frames))
                continue
            try:
                topic = frames[0].decode()
                header = decode_header(frames[1])
                body = decode_body(frames[2])
            except (DecodeError, UnicodeDecodeError) as exc:
                log.warning("event_dropped", reason=str(exc))
                continue
            key = (header.source, header.instance, topic)
            last = self._last.get(key)
            missed = header.seq - last - 1 if last is not None and header.seq > last else 0
            self._last[key] = header.seq
            if missed:
                self.missed += missed
                log.warning("events_missed", topic=topic, source=header.source, count=missed)
            return EventRecord(topic, header, body, missed)

    def __aiter__(self) -> AsyncIterator[EventRecord]:
        return self

    async def __anext__(self) -> EventRecord:
        return await self.recv()

    def close(self) -> None:
        self._socket.close(linger=0)
