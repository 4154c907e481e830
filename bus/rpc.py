"""Request/reply over ROUTER (service) and DEALER (caller).

Frames: caller → ``[payload]`` (the codec's ``[header, body]``); the ROUTER adds the caller's
identity. Each reply payload's header carries ``reply_to`` = the request's ``msg_id``; a
streamed reply is several messages, all with ``final=False`` except the last. Callers never
hang: no connection → ``ServiceUnavailable`` (a socket monitor says whether a peer is there:
``sockio.PeerWatch``), no answer in time → ``ServiceTimeout``; read-only requests are retried a
bounded number of times first. A request carries its deadline, and a server drops one whose
caller has already given up.

A server reads its ROUTER on a thread of its own (see ``RpcServer``). The asyncio client uses a
plain socket read from a loop reader callback (see ``sockio``) that drains every queued reply
with ``NOBLOCK`` and resolves the waiting request's future directly.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Union

import structlog
import zmq

from forgellm.bus import curve
from forgellm.bus.codec import DecodeError, decode, encode, new_id
from forgellm.bus.errors import RemoteError, ServiceTimeout, ServiceUnavailable
from forgellm.bus.sockio import (
    DRAIN_BATCH,
    EVENTS,
    FD,
    MORE_NOBLOCK,
    NOBLOCK,
    POLLIN,
    RCVMORE,
    PeerWatch,
    attach_reader,
    detach_reader,
    plain_socket,
    recv_frames,
)
from forgellm.schemas import Envelope, ErrorCode, ErrorReply, Reply, Request

log = structlog.get_logger("bus.rpc")

HandlerResult = Union[Reply, AsyncIterator[Reply]]
Handler = Callable[[Envelope, Request], Awaitable[HandlerResult]]
InlineHandler = Callable[[Envelope, Request], Union[Reply, None]]


MAX_REQUEST_BYTES = 64 * 1024 * 1024


def _configure(socket: zmq.Socket, hwm: int) -> None:
    socket.setsockopt(zmq.SNDHWM, hwm)
    socket.setsockopt(zmq.RCVHWM, hwm)
    socket.setsockopt(zmq.LINGER, 500)


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class RpcServer:
    """A service's command socket, served by its own thread.

    Why a thread: each asyncio wake-up costs 20–40 µs on the machines we measure on, and the
    request path used to pay two (reader callback, then the handler's task). The thread blocks
    in ``recv`` on the ROUTER; a request whose handler is *inline* (quick, synchronous,
    thread-safe: ping, status) is answered right there, with no event-loop hop. Any other
    request is handed to the event loop (``call_soon_threadsafe``) and runs as a task there;
    its replies come back to the thread over an in-process DEALER connected to the same ROUTER
    (a ZeroMQ socket belongs to one thread), and the thread forwards them to the caller.

    Graceful stop: once ``stop`` is set, new requests are answered SERVICE_UNAVAILABLE at once
    (the caller retries elsewhere or reports 503), the requests in hand finish, their replies
    are forwarded, then the thread ends.
    """

    def __init__(
        self, ctx: zmq.Context, address: str, source: str, *, hwm: int = 10_000
    ) -> None:
        self.source = source
        self.address = address
        self._counts = [0, 0, 0, 0]  # served/failed by the thread, served/failed on the loop
        self._socket = plain_socket(ctx, zmq.ROUTER)
        _configure(self._socket, hwm)
        # A caller that went away must not make send block or raise.
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        # No request is near this (REST bodies are capped at 1 MB): a peer announcing a bigger
        # frame is disconnected instead of making the service buffer it (found by the bus fuzz).
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        curve.bind(self._socket, address)
        # The loop's way back into the thread: replies of handlers that ran on the loop.
        self._loop_id = b"loop-" + new_id().encode()
        inproc = f"inproc://rpc-{self._loop_id.decode()}"
        self._socket.bind(inproc)
        self._back = plain_socket(ctx, zmq.DEALER)
        _configure(self._back, hwm)
        self._back.setsockopt(zmq.ROUTING_ID, self._loop_id)
        self._back.connect(inproc)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handler: Handler | None = None
        self._inline: InlineHandler | None = None
        self._draining = False
        self._thread: threading.Thread | None = None
        self._inflight: set[asyncio.Task[None]] = set()

    @property
    def served(self) -> int:
        return self._counts[0] + self._counts[2]

    @property
    def failed(self) -> int:
        return self._counts[1] + self._counts[3]

    @property
    def stopping(self) -> bool:
        """Set once ``stop`` was seen: new requests are turned away from then on."""
        return self._draining

    async def serve(self, handler: Handler, stop: asyncio.Event, inline: InlineHandler | None = None) -> None:
        """Answer requests until ``stop`` is set, then finish the ones in hand.

        ``inline(header, request)`` runs on the socket thread and returns a reply, or ``None``
        to pass the request to ``handler`` on the event loop.
        """
        self._handler, self._inline = handler, inline
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._receive_loop, name=f"rpc-{self.source}", daemon=True)
        self._thread.start()
        try:
            await stop.wait()
            self._draining = True
            while self._inflight:
                await asyncio.wait(set(self._inflight))
        finally:
            self._draining = True
            self._stop_thread()

    def _stop_thread(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None or not thread.is_alive():
            return
        try:  # queued behind every reply already handed back, so those are forwarded first
            self._back.send(b"stop")
        except zmq.ZMQError:
            return
        thread.join(5)
        if thread.is_alive():
            log.error("rpc_thread_did_not_stop")

    # --- the socket thread ----------------------------------------------------------------------

    def _receive_loop(self) -> None:
        sock, loop_id = self._socket, self._loop_id
        while True:
            try:
                frames = [sock.recv()]
                while sock.get(RCVMORE):
                    frames.append(sock.recv())
            except zmq.ZMQError as exc:  # the context was terminated under us
                log.warning("rpc_server_recv_failed", error=str(exc))
                return
            if frames[0] == loop_id:
                if len(frames) == 3:  # a reply from the loop: [caller identity, payload]
                    self._forward(frames[1], frames[2])
                elif len(frames) == 2 and frames[1] == b"stop":
                    return
                continue
            try:
                self._accept(frames)
            except Exception:  # nothing a caller sends may end this thread
                log.exception("request_failed_unexpectedly")

    def _forward(self, identity: bytes, payload: bytes) -> None:
        try:
            # A ROUTER never blocks: it drops a message for a gone (or saturated) caller.
            self._socket.send(identity, MORE_NOBLOCK)
            self._socket.send(payload, NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("reply_dropped", reason=str(exc))

    def _accept(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            log.warning("request_dropped", reason="expected 2 frames", frames=len(frames))
            return
        identity, payload = frames
        try:
            header, body = decode(payload)
        except DecodeError as exc:
            if exc.header is None:
                log.warning("request_dropped", reason=str(exc))
                return
            header = exc.header
            if not self._expired(header):
                log.warning("request_rejected", reason=str(exc), msg_id=header.msg_id)
                self._forward(identity, self._reply_payload(header, ErrorReply(
                    code=ErrorCode.INVALID_REQUEST, error=f"Unknown or malformed message: {exc}")))
            return
        if self._expired(header):
            return
        if not isinstance(body, Request):
            self._forward(identity, self._reply_payload(header, ErrorReply(
                code=ErrorCode.INVALID_REQUEST, error=f"{type(body).__name__} is not a request")))
            return
        if self._draining:
            self._forward(identity, self._reply_payload(header, ErrorReply(
                code=ErrorCode.SERVICE_UNAVAILABLE, error=f"The {self.source} service is stopping",
                suggestion="Retry in a moment: the supervisor restarts it.")))
            return
        inline, loop = self._inline, self._loop
        if inline is not None:
            structlog.contextvars.bind_contextvars(correlation_id=header.correlation_id)
            started = time.perf_counter()
            try:
                reply = inline(header, body)
            except Exception as exc:  # a bug in a handler must not take the service down
                log.exception("handler_failed", request=type(body).__name__)
                reply = _internal_error(exc)
            if reply is not None:
                self._counts[0] += 1
                if isinstance(reply, ErrorReply):
                    self._counts[1] += 1
                self._forward(identity, self._reply_payload(header, reply))
                log.debug("request_handled", request=type(body).__name__, source=header.source, inline=True,
                          ms=round((time.perf_counter() - started) * 1000, 3))
                return
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._start_task, identity, header, body)

    @staticmethod
    def _expired(header: Envelope) -> bool:
        if header.deadline and time.time() > header.deadline:
            log.info("request_expired", msg_id=header.msg_id, correlation_id=header.correlation_id)
            return True
        return False

    def _reply_payload(self, request: Envelope, reply: Reply, final: bool = True) -> bytes:
        return encode(Envelope(
            msg_id=new_id(),
            correlation_id=request.correlation_id,
            source=self.source,
            reply_to=request.msg_id,
            final=final,
        ), reply)

    # --- the event loop -------------------------------------------------------------------------

    def _start_task(self, identity: bytes, header: Envelope, body: Request) -> None:
        handler = self._handler
        if handler is None:
            return
        task = asyncio.ensure_future(self._run(identity, header, body, handler))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _run(self, identity: bytes, header: Envelope, body: Request, handler: Handler) -> None:
        structlog.contextvars.bind_contextvars(correlation_id=header.correlation_id)
        started = time.perf_counter()
        try:
            result = await handler(header, body)
            if isinstance(result, Reply):
                self._send(identity, header, result)
            else:
                await self._stream(identity, header, result)
            self._counts[2] += 1
            if isinstance(result, ErrorReply):
                self._counts[3] += 1
            log.debug("request_handled", request=type(body).__name__, source=header.source,
                      ms=round((time.perf_counter() - started) * 1000, 3))
        except Exception as exc:  # a bug in a handler must not take the service down
            self._counts[2] += 1
            self._counts[3] += 1
            log.exception("handler_failed", request=type(body).__name__)
            self._send(identity, header, _internal_error(exc))

    async def _stream(self, identity: bytes, header: Envelope, replies: AsyncIterator[Reply]) -> None:
        previous: Reply | None = None
        async for reply in replies:
            if previous is not None:
                self._send(identity, header, previous, final=False)
            previous = reply
        if previous is None:
            previous = ErrorReply(code=ErrorCode.INTERNAL, error="handler streamed nothing")
        self._send(identity, header, previous)

    def _send(self, identity: bytes, request: Envelope, reply: Reply, *, final: bool = True) -> None:
        """Hand a reply to the socket thread (called on the event loop)."""
        try:
            self._back.send(identity, MORE_NOBLOCK)
            self._back.send(self._reply_payload(request, reply, final), NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("reply_dropped", reason=str(exc), reply_to=request.msg_id)

    def close(self) -> None:
        self._stop_thread()
        self._back.close(linger=0)
        self._socket.close()


def _internal_error(exc: Exception) -> ErrorReply:
    return ErrorReply(code=ErrorCode.INTERNAL, error=f"{type(exc).__name__}: {exc}",
                      suggestion="This is a bug; the service log has the traceback.")


class AsyncRpcClient:
    """Calls one service from asyncio code. Many requests may be in flight at once."""

    def __init__(
        self,
        ctx: zmq.Context,
        address: str,
        service: str,
        *,
        source: str = "client",
        timeout_s: float = 5.0,
        read_retries: int = 2,
        hwm: int = 10_000,
    ) -> None:
        self.service = service
        self.source = source
        self.timeout_s = timeout_s
        self.read_retries = read_retries
        self._socket = plain_socket(ctx, zmq.DEALER)
        _configure(self._socket, hwm)
        self._peer = PeerWatch(self._socket)  # no peer: ServiceUnavailable at once
        curve.connect(self._socket, address)
        self._fd = self._socket.get(FD)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        # msg_id -> the future of a request, or the queue of a stream
        self._pending: dict[str, asyncio.Future[Reply] | asyncio.Queue[tuple[Envelope, Reply]]] = {}

    def _drain(self) -> None:
        """Reader callback: hand every queued reply to whoever waits for it."""
        sock = self._socket
        if sock.closed or self._draining:
            return
        self._draining = True
        try:
            for _ in range(DRAIN_BATCH):
                try:
                    frames = recv_frames(sock)
                except zmq.Again:
                    return
                if len(frames) != 1:
                    log.warning("reply_dropped", reason="expected 1 frame", frames=len(frames))
                    continue
                try:
                    header, body = decode(frames[0])
                except DecodeError as exc:
                    log.warning("reply_dropped", reason=str(exc))
                    continue
                waiter = self._pending.get(header.reply_to)
                if waiter is None:
                    continue  # a late answer to a request we gave up on
                if isinstance(waiter, asyncio.Queue):
                    waiter.put_nowait((header, body))
                elif not waiter.done():
                    waiter.set_result(body)
            if self._loop is not None:
                self._loop.call_soon(self._drain)
        except zmq.ZMQError as exc:
            log.warning("rpc_client_recv_failed", error=str(exc))
        finally:
            self._draining = False

    async def _send(self, msg_id: str, request: Request, correlation_id: str, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            attach_reader(self, loop, self._drain)
        payload = encode(Envelope(
            msg_id=msg_id,
            correlation_id=correlation_id,
            source=self.source,
            deadline=time.time() + timeout,
        ), request)
        sock = self._socket
        if not self._peer.update():
            # No connected peer yet: a fresh client may still be connecting, so wait a moment.
            await self._wait_for_peer(loop.time() + min(timeout, 1.0))
        try:
            sock.send(payload, NOBLOCK)
        except zmq.Again:  # the queue to the service is full: it is not keeping up
            raise ServiceUnavailable(self.service) from None
        # The send may have taken in the signal for replies that arrived meanwhile: look now.
        if not self._draining and sock.get(EVENTS) & POLLIN:
            self._drain()

    async def _wait_for_peer(self, until: float) -> None:
        loop = asyncio.get_running_loop()
        pause = 0.001
        while not self._peer.update():
            left = until - loop.time()
            if left <= 0:
                raise ServiceUnavailable(self.service)
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, 0.02)

    async def request(
        self, request: Request, *, correlation_id: str = "", timeout: float | None = None
    ) -> Reply:
        """Send one request and return its reply; raises ``RemoteError`` for an ``ErrorReply``."""
        timeout = self.timeout_s if timeout is None else timeout
        tries = 1 + (self.read_retries if request.idempotent else 0)
        loop = asyncio.get_running_loop()
        for _ in range(tries):
            msg_id = new_id()
            waiter: asyncio.Future[Reply] = loop.create_future()
            self._pending[msg_id] = waiter
            timer = None
            try:
                await self._send(msg_id, request, correlation_id, timeout)
                if not waiter.done():
                    timer = loop.call_later(timeout, _expire, waiter)
                reply = await waiter
            except TimeoutError:
                continue
            finally:
                self._pending.pop(msg_id, None)
                if timer is not None:
                    timer.cancel()
            if isinstance(reply, ErrorReply):
                raise RemoteError(reply)
            return reply
        raise ServiceTimeout(self.service, timeout, tries)

    async def stream(
        self, request: Request, *, correlation_id: str = "", timeout: float | None = None
    ) -> AsyncIterator[Reply]:
        """Yield every reply frame in order; ``timeout`` bounds the wait for each frame."""
        timeout = self.timeout_s if timeout is None else timeout
        msg_id = new_id()
        queue: asyncio.Queue[tuple[Envelope, Reply]] = asyncio.Queue()
        self._pending[msg_id] = queue
        try:
            await self._send(msg_id, request, correlation_id, timeout)
            while True:
                try:
                    header, reply = await asyncio.wait_for(queue.get(), timeout)
                except TimeoutError:
                    raise ServiceTimeout(self.service, timeout, 1) from None
                if isinstance(reply, ErrorReply):
                    raise RemoteError(reply)
                yield reply
                if header.final:
                    return
        finally:
            self._pending.pop(msg_id, None)

    def close(self) -> None:
        detach_reader(self)
        self._peer.close()
        self._socket.close(linger=0)


class RpcClient:
    """Blocking flavour for scripts and the CLI: one request at a time."""

    def __init__(
        self,
        address: str,
        service: str,
        *,
        ctx: zmq.Context | None = None,
        source: str = "client",
        timeout_s: float = 5.0,
        read_retries: int = 2,
    ) -> None:
        self.service = service
        self.source = source
        self.timeout_s = timeout_s
        self.read_retries = read_retries
        self._socket = plain_socket(ctx or zmq.Context.instance(), zmq.DEALER)
        _configure(self._socket, 1000)
        self._peer = PeerWatch(self._socket)
        curve.connect(self._socket, address)

    def _send(self, msg_id: str, request: Request, correlation_id: str, timeout: float) -> None:
        header = Envelope(msg_id=msg_id, correlation_id=correlation_id, source=self.source,
                          deadline=time.time() + timeout)
        payload = encode(header, request)
        # No connected peer yet: a fresh client may still be connecting, so wait a moment.
        if not self._peer.wait(min(timeout, 1.0)):
            raise ServiceUnavailable(self.service)
        try:
            self._socket.send(payload, NOBLOCK)
        except zmq.Again:
            raise ServiceUnavailable(self.service) from None

    def _receive(self, msg_id: str, deadline: float) -> tuple[Envelope, Reply] | None:
        sock = self._socket
        while (left := deadline - time.monotonic()) > 0:
            sock.setsockopt(zmq.RCVTIMEO, int(left * 1000) + 1)
            try:
                frames = [sock.recv()]
                while sock.get(zmq.RCVMORE):
                    frames.append(sock.recv())
            except zmq.Again:
                return None
            if len(frames) != 1:
                continue
            try:
                header, body = decode(frames[0])
            except DecodeError as exc:
                if exc.header is not None and exc.header.reply_to == msg_id:
                    log.warning("reply_dropped", reason=str(exc))
                continue
            if header.reply_to != msg_id:
                continue  # a late answer to an earlier request
            return header, body
        return None

    def request(self, request: Request, *, correlation_id: str = "", timeout: float | None = None) -> Reply:
        timeout = self.timeout_s if timeout is None else timeout
        tries = 1 + (self.read_retries if request.idempotent else 0)
        for _ in range(tries):
            msg_id = new_id()
            self._send(msg_id, request, correlation_id, timeout)
            got = self._receive(msg_id, time.monotonic() + timeout)
            if got is None:
                continue
            if isinstance(got[1], ErrorReply):
                raise RemoteError(got[1])
            return got[1]
        raise ServiceTimeout(self.service, timeout, tries)

    def stream(self, request: Request, *, correlation_id: str = "", timeout: float | None = None):
        """Yield every reply frame in order (a generator)."""
        timeout = self.timeout_s if timeout is None else timeout
        msg_id = new_id()
        self._send(msg_id, request, correlation_id, timeout)
        while True:
            got = self._receive(msg_id, time.monotonic() + timeout)
            if got is None:
                raise ServiceTimeout(self.service, timeout, 1)
            header, reply = got
            if isinstance(reply, ErrorReply):
                raise RemoteError(reply)
            yield reply
            if header.final:
                return

    def close(self) -> None:
        self._peer.close()
        self._socket.close(linger=0)
