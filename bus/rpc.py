"""Request/reply over ROUTER (service) and DEALER (caller).

Frames: caller → ``[payload]`` (the codec's ``[header, body]``); the ROUTER adds the caller's
identity. Each reply payload's header carries ``reply_to`` = the request's ``msg_id``; a
streamed reply is several messages, all with ``final=False`` except the last. Callers never
hang: no connection → ``ServiceUnavailable`` (the DEALER uses ``IMMEDIATE`` so nothing queues
for an absent peer), no answer in time → ``ServiceTimeout``; read-only requests are retried a
bounded number of times first. A request carries its deadline, and a server drops one whose
caller has already given up.

The asyncio sides use plain sockets read from a loop reader callback (see ``sockio``): the
callback drains every queued message with ``NOBLOCK``; a server starts one task per request, a
client resolves the waiting request's future directly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Union

import structlog
import zmq

from forgellm.bus.codec import DecodeError, decode, encode, new_id
from forgellm.bus.errors import RemoteError, ServiceTimeout, ServiceUnavailable
from forgellm.bus.sockio import (
    DRAIN_BATCH,
    EVENTS,
    FD,
    MORE_NOBLOCK,
    NOBLOCK,
    POLLIN,
    POLLOUT,
    attach_reader,
    detach_reader,
    plain_socket,
    recv_frames,
)
from forgellm.schemas import Envelope, ErrorCode, ErrorReply, Reply, Request

log = structlog.get_logger("bus.rpc")

HandlerResult = Union[Reply, AsyncIterator[Reply]]
Handler = Callable[[Envelope, Request], Awaitable[HandlerResult]]


def _configure(socket: zmq.Socket, hwm: int) -> None:
    socket.setsockopt(zmq.SNDHWM, hwm)
    socket.setsockopt(zmq.RCVHWM, hwm)
    socket.setsockopt(zmq.LINGER, 500)


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class RpcServer:
    """A service's command socket. ``serve`` runs each request as its own task."""

    def __init__(
        self, ctx: zmq.Context, address: str, source: str, *, hwm: int = 10_000
    ) -> None:
        self.source = source
        self.address = address
        self.served = 0
        self.failed = 0
        self._socket = plain_socket(ctx, zmq.ROUTER)
        _configure(self._socket, hwm)
        # A caller that went away must not make send block or raise.
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self._socket.bind(address)
        self._fd = self._socket.get(FD)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handler: Handler | None = None
        self._draining = False
        self._inflight: set[asyncio.Task[None]] = set()

    async def serve(self, handler: Handler, stop: asyncio.Event) -> None:
        """Answer requests until ``stop`` is set, then finish the ones in hand."""
        self._handler = handler
        attach_reader(self, asyncio.get_running_loop(), self._drain)
        try:
            self._drain()  # whatever arrived before we started watching
            await stop.wait()
        finally:
            detach_reader(self)
            self._handler = None
            if self._inflight:
                await asyncio.wait(self._inflight)

    def _drain(self) -> None:
        """Reader callback: accept every queued request (a batch at a time)."""
        handler, sock = self._handler, self._socket
        if handler is None or sock.closed or self._draining:
            return
        self._draining = True
        try:
            for _ in range(DRAIN_BATCH):
                try:
                    frames = recv_frames(sock)
                except zmq.Again:
                    return
                self._accept(frames, handler)
            if self._loop is not None:
                self._loop.call_soon(self._drain)  # more may be queued; let the loop breathe
        except zmq.ZMQError as exc:  # the socket was closed or the context terminated
            log.warning("rpc_server_recv_failed", error=str(exc))
        finally:
            self._draining = False

    def _accept(self, frames: list[bytes], handler: Handler) -> None:
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
                self._send(identity, header, ErrorReply(
                    code=ErrorCode.INVALID_REQUEST, error=f"Unknown or malformed message: {exc}"))
            return
        if self._expired(header):
            return
        if not isinstance(body, Request):
            self._send(identity, header, ErrorReply(
                code=ErrorCode.INVALID_REQUEST, error=f"{type(body).__name__} is not a request"))
            return
        task = asyncio.ensure_future(self._run(identity, header, body, handler))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    @staticmethod
    def _expired(header: Envelope) -> bool:
        if header.deadline and time.time() > header.deadline:
            log.info("request_expired", msg_id=header.msg_id, correlation_id=header.correlation_id)
            return True
        return False

    async def _run(self, identity: bytes, header: Envelope, body: Request, handler: Handler) -> None:
        structlog.contextvars.bind_contextvars(correlation_id=header.correlation_id)
        started = time.perf_counter()
        try:
            result = await handler(header, body)
            if isinstance(result, Reply):
                self._send(identity, header, result)
            else:
                await self._stream(identity, header, result)
            self.served += 1
            if isinstance(result, ErrorReply):
                self.failed += 1
            log.debug("request_handled", request=type(body).__name__, source=header.source,
                      ms=round((time.perf_counter() - started) * 1000, 3))
        except Exception as exc:  # a bug in a handler must not take the service down
            self.failed += 1
            log.exception("handler_failed", request=type(body).__name__)
            self._send(identity, header, ErrorReply(
                code=ErrorCode.INTERNAL, error=f"{type(exc).__name__}: {exc}",
                suggestion="This is a bug; the service log has the traceback."))

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
        header = Envelope(
            msg_id=new_id(),
            correlation_id=request.correlation_id,
            source=self.source,
            reply_to=request.msg_id,
            final=final,
        )
        sock = self._socket
        try:
            # A ROUTER never blocks: it drops a message for a gone (or saturated) caller.
            sock.send(identity, MORE_NOBLOCK)
            sock.send(encode(header, reply), NOBLOCK)
            # A send may have taken in the signal for newly arrived requests: look now.
            if not self._draining and sock.get(EVENTS) & POLLIN:
                self._drain()
        except zmq.ZMQError as exc:
            log.warning("reply_dropped", reason=str(exc), reply_to=request.msg_id)

    def close(self) -> None:
        detach_reader(self)
        self._socket.close()


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
        self._socket.setsockopt(zmq.IMMEDIATE, 1)
        self._socket.connect(address)
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
        try:
            sock.send(payload, NOBLOCK)
        except zmq.Again:
            # No connected peer yet: a fresh client may still be connecting, so wait a moment.
            await self._send_when_connected(payload, loop.time() + min(timeout, 1.0))
        # The send may have taken in the signal for replies that arrived meanwhile: look now.
        if not self._draining and sock.get(EVENTS) & POLLIN:
            self._drain()

    async def _send_when_connected(self, payload: bytes, until: float) -> None:
        loop = asyncio.get_running_loop()
        pause = 0.001
        while True:
            if self._socket.get(EVENTS) & POLLOUT:
                try:
                    self._socket.send(payload, NOBLOCK)
                    return
                except zmq.Again:
                    pass
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
        self._socket.setsockopt(zmq.IMMEDIATE, 1)
        self._socket.connect(address)

    def _send(self, msg_id: str, request: Request, correlation_id: str, timeout: float) -> None:
        header = Envelope(msg_id=msg_id, correlation_id=correlation_id, source=self.source,
                          deadline=time.time() + timeout)
        payload = encode(header, request)
        try:
            self._socket.send(payload, NOBLOCK)
            return
        except zmq.Again:
            pass
        # No connected peer yet: a fresh client may still be connecting, so wait a moment.
        if not self._socket.poll(int(min(timeout, 1.0) * 1000), zmq.POLLOUT):
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
        self._socket.close(linger=0)
