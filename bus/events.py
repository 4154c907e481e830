"""Events: services publish to the broker's ``events_in``; anyone subscribes to ``events_out``.

An event is ONE frame: ``topic + b"\\0" + payload`` (payload = the codec's ``[header, body]``).
ZeroMQ filters subscriptions on the leading bytes of the first frame, so topic prefixes work as
with a separate topic frame, but a subscriber reads one frame per event: reading a second frame
and asking ``RCVMORE`` twice cost more than the whole decode (bench/RESULTS.md: a bare 2-frame
PUB/SUB pair tops out near 300k/s here, one frame near 900k/s). A frame without the separator,
with an unknown topic or a bad payload is logged and dropped; so is each frame of a multipart
message from a foreign sender (each must stand on its own as an event on a subscribed topic).

A publisher numbers its events per topic (``seq`` from 1) and stamps a per-process
``instance`` id, so a subscriber filtering by topic prefix can tell a lost event (a gap) from a
publisher restart (a new instance).

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

from forgellm.bus import curve
from forgellm.bus.codec import DecodeError, decode, encode, new_id
from forgellm.bus.sockio import NOBLOCK, Readiness, plain_socket
from forgellm.schemas import TOPICS, Envelope, Message

# (source, instance, topic) streams whose sequence numbers a subscriber remembers
MAX_STREAMS = 4096

log = structlog.get_logger("bus.events")

SEPARATOR = b"\0"  # between the topic and the payload; never in a topic
_TOPIC_PREFIX: dict[type, bytes] = {}  # event type -> topic + SEPARATOR


def _topic_prefix(cls: type) -> bytes:
    topic = TOPICS[cls]  # KeyError: not an event type
    if SEPARATOR.decode() in topic:
        raise ValueError(f"topic {topic!r} contains the separator")
    prefix = _TOPIC_PREFIX[cls] = topic.encode() + SEPARATOR
    return prefix


def event_frame(topic: str, payload: bytes) -> bytes:
    """The wire frame of an event (for tools and tests that publish without ``EventPublisher``)."""
    return topic.encode() + SEPARATOR + payload


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
        self._seq: dict[type, int] = {}
        self._lock = threading.Lock()
        # A plain (synchronous) socket even from an asyncio context: PUB never blocks.
        self._socket = plain_socket(ctx if ctx is not None else zmq.Context.instance(), zmq.PUB)
        self._socket.setsockopt(zmq.SNDHWM, hwm)
        self._socket.setsockopt(zmq.LINGER, 500)
        curve.connect(self._socket, address)

    def publish(self, event: Message, correlation_id: str = "") -> int:
        """Send ``event`` on its topic; returns its sequence number."""
        cls = type(event)
        prefix = _TOPIC_PREFIX.get(cls) or _topic_prefix(cls)
        with self._lock:
            seq = self._seq.get(cls, 0) + 1  # one type = one topic
            self._seq[cls] = seq
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
            self._socket.send(prefix + payload, NOBLOCK)
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
    when the socket is empty, so a subscriber that keeps up costs one ``recv`` and one decode
    per event.
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
        self._topics = tuple(topics)
        self._names: dict[bytes, str] = {}  # topic bytes -> str, for the topics seen
        self._last: dict[tuple[str, str, str], int] = {}
        self._socket = plain_socket(ctx, zmq.SUB)
        self._socket.setsockopt(zmq.RCVHWM, hwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        for topic in self._topics:
            self._socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        curve.connect(self._socket, address)
        self._ready = Readiness(self._socket)

    async def recv(self) -> EventRecord:
        """The next well-formed event; malformed frames are logged and skipped."""
        recv, names = self._socket.recv, self._names
        while True:
            try:
                frame = recv(NOBLOCK)
            except zmq.Again:
                await self._ready.readable()
                continue
            cut = frame.find(SEPARATOR)
            topic = names.get(frame[:cut]) if cut > 0 else None
            try:
                if topic is None:
                    topic = self._topic_name(frame, cut)
                header, body = decode(memoryview(frame)[cut + 1:])
            except (DecodeError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
                log.warning("event_dropped", reason=str(exc), size=len(frame))
                continue
            key = (header.source, header.instance, topic)
            last = self._last.get(key)
            missed = header.seq - last - 1 if last is not None and header.seq > last else 0
            if last is None and len(self._last) >= MAX_STREAMS:
                # A flood of made-up sources must not grow this without bound: forget the
                # stream seen longest ago (a real one just restarts its gap count).
                del self._last[next(iter(self._last))]
            self._last[key] = header.seq
            if missed:
                self.missed += missed
                log.warning("events_missed", topic=topic, source=header.source, count=missed)
            return EventRecord(topic, header, body, missed)

    def _topic_name(self, frame: bytes, cut: int) -> str:
        if cut <= 0:
            raise ValueError("no topic separator")
        topic = frame[:cut].decode()
        if not topic.startswith(self._topics):
            raise ValueError(f"topic {topic[:64]!r} not subscribed")
        if len(self._names) < 1024:
            self._names[frame[:cut]] = topic
        return topic

    def __aiter__(self) -> AsyncIterator[EventRecord]:
        return self

    async def __anext__(self) -> EventRecord:
        return await self.recv()

    def close(self) -> None:
        self._ready.close()
        self._socket.close(linger=0)
