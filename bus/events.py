"""Events: services publish to the broker's ``events_in``; anyone subscribes to ``events_out``.

Frames are ``[topic, payload]`` (payload = the codec's ``[header, body]``). A publisher numbers
its events per topic (``seq`` from 1) and stamps a per-process ``instance`` id, so a subscriber
filtering by topic prefix can tell a lost event (a gap) from a publisher restart (a new
instance).

Loss is measured by subscribers, not publishers: a PUB socket at its HWM drops silently (it
never raises ``zmq.Again``), so the exact count of lost events is the sum of the sequence gaps
each subscriber sees (``AsyncSubscriber.missed``, ``EventRecord.missed``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import structlog
import zmq

from forgellm.bus.codec import DecodeError, decode, encode, new_id
from forgellm.bus.sockio import MORE_NOBLOCK, NOBLOCK, Readiness, plain_socket, recv_frames
from forgellm.schemas import TOPICS, Envelope, Message

log = structlog.get_logger("bus.events")

_TOPIC_BYTES: dict[type, bytes] = {}


def _topic_bytes(cls: type) -> bytes:
    topic = _TOPIC_BYTES[cls] = TOPICS[cls].encode()  # KeyError: not an event type
    return topic


class EventPublisher:
    """Publishes events on the bus. Safe to call from any thread of the process.

    Never blocks: at the HWM (no subscriber keeping up) ZeroMQ drops events silently, and
    subscribers see the loss as sequence gaps.
    """

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
        self._seq: dict[bytes, int] = {}
        self._lock = threading.Lock()
        # A plain (synchronous) socket even from an asyncio context: PUB never blocks.
        self._socket = plain_socket(ctx if ctx is not None else zmq.Context.instance(), zmq.PUB)
        self._socket.setsockopt(zmq.SNDHWM, hwm)
        self._socket.setsockopt(zmq.LINGER, 500)
        self._socket.connect(address)

    def publish(self, event: Message, correlation_id: str = "") -> int:
        """Send ``event`` on its topic; returns its sequence number."""
        topic = _TOPIC_BYTES.get(type(event)) or _topic_bytes(type(event))
        with self._lock:
            seq = self._seq.get(topic, 0) + 1
            self._seq[topic] = seq
            payload = encode(
                Envelope(
                    msg_id=new_id(),
                    correlation_id=correlation_id,
                    source=self.source,
                    instance=self.instance,
                    ts=time.time(),
                    seq=seq,
                ),
                event,
            )
            send = self._socket.send
            send(topic, MORE_NOBLOCK)
            send(payload, NOBLOCK)
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
    """Receives events whose topic starts with one of ``topics`` ("" = everything).

    ``recv`` reads without blocking while events are queued and waits on the event loop only
    when the socket is empty, so a subscriber that keeps up costs one ``recv`` pair and one
    decode per event.
    """

    def __init__(
        self,
        ctx: zmq.Context,
        address: str,
        topics: Iterable[str] = ("",),
        *,
        hwm: int = 100_000,
    ) -> None:
        self.missed = 0
        self._last: dict[tuple[str, str, str], int] = {}
        self._socket = plain_socket(ctx, zmq.SUB)
        self._socket.setsockopt(zmq.RCVHWM, hwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        for topic in topics:
            self._socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._socket.connect(address)
        self._ready = Readiness(self._socket)

    async def recv(self) -> EventRecord:
        """The next well-formed event; malformed frames are logged and skipped."""
        sock = self._socket
        while True:
            try:
                frames = recv_frames(sock)
            except zmq.Again:
                await self._ready.readable()
                continue
            if len(frames) != 2:
                log.warning("event_dropped", reason="expected 2 frames", frames=len(frames))
                continue
            try:
                topic = frames[0].decode()
                header, body = decode(frames[1])
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
        self._ready.close()
        self._socket.close(linger=0)
