"""Request/reply over ROUTER (service) and DEALER (caller).

Frames: caller → ``[header, body]``; the ROUTER adds the caller's identity. Each reply frame
carries ``reply_to`` = the request's ``msg_id``; a streamed reply is several frames, all with
``final=False`` except the last. Callers never hang: no connection → ``ServiceUnavailable``
(the DEALER uses ``IMMEDIATE`` so nothing queues for an absent peer), no answer in time →
``ServiceTimeout``; read-only requests are retried a bounded number of times first. A request
carries its deadline, and a server drops one whose caller has already given up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Union

import structlog
import zmq
import zmq.asyncio

from forgellm.bus.codec import DecodeError, decode_body, decode_header, encode, new_id
from forgellm.bus.errors import RemoteError, ServiceTimeout, ServiceUnavailable
from forgellm.schemas import Envelope, ErrorCode, ErrorReply, Reply, Request

log = structlog.get_logger("bus.rpc")

HandlerResult = Union[Reply, AsyncIterator[Reply]]
Handler = Callable[[Envelope, Request], Awaitable[HandlerResult]]


def _configure(socket: zmq.Socket, hwm: int) -> None:
    socket.setsockopt(zmq.SNDHWM, hwm)
    socket.setsockopt(zmq.RCVHWM, hwm)
    socket.setsockopt(zmq.LINGER, 500)


class RpcServer:
    """A service's command socket. ``serve`` runs each request as its own task."""

    def __init__(
        self, ctx: zmq.asyncio.Context, address: str, source: str, *, hwm: int = 10_000
    ) -> None:
        self.source = source
        self.address = address
        self.served = 0
        self.failed = 0
        self._socket = ctx.socket(zmq.ROUTER)
        _configure(self._socket, hwm)
        # A caller that went away must not make send block or raise.
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self._socket.bind(address)
        self._inflight: set[asyncio.Task[None]] = set()

    async def serve(self, handler: Handler, stop: asyncio.Event) -> None:
        """Answer requests until ``stop`` is set, then finish the ones in hand."""
        stop_waiter = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                recv = asyncio.ensure_future(self._socket.recv_multipart())
                done, _ = await asyncio.wait({recv, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
                if recv not in done:
                    recv.cancel()
                    break
                self._accept(recv.result(), handler)
        finally:
            stop_waiter.cancel()
            if self._inflight:
                await asyncio.wait(self._inflight)

    def _accept(self, frames: list[bytes], handler: Handler) -> None:
        if len(frames) != 3:
            log.warning("request_dropped", reason="expected 3 frames", frames=len(frames))
            return
        identity, header_frame, body_frame = frames
        try:
            header = decode_header(header_frame)
        except DecodeError as exc:
            log.warning("request_dropped", reason=str(exc))
            return
        if header.deadline and time.time() > header.deadline:
            log.info("request_expired", msg_id=header.msg_id, correlation_id=header.correlation_id)
            return
        try:
            body = decode_body(body_frame)
        except DecodeError as exc:
            log.warning("request_rejected", reason=str(exc), msg_id=header.msg_id)
            self._spawn(self._send(identity, header, ErrorReply(
                code=ErrorCode.INVALID_REQUEST, error=f"Unknown or malformed message: {exc}")))
            return
        if not isinstance(body, Request):
            self._spawn(self._send(identity, header, ErrorReply(
                code=ErrorCode.INVALID_REQUEST, error=f"{type(body).__name__} is not a request")))
            return
        self._spawn(self._run(identity, header, body, handler))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _run(self, identity: bytes, header: Envelope, body: Request, handler: Handler) -> None:
        structlog.contextvars.bind_contextvars(correlation_id=header.correlation_id)
        started = time.perf_counter()
        try:
            result = await handler(header, body)
            if isinstance(result, Reply):
                await self._send(identity, header, result)
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
            await self._send(identity, header, ErrorReply(
                code=ErrorCode.INTERNAL, error=f"{type(exc).__name__}: {exc}",
                suggestion="This is a bug; the service log has the traceback."))

    async def _stream(self, identity: bytes, header: Envelope, replies: AsyncIterator[Reply]) -> None:
        previous: Reply | None = None
        async for reply in replies:
            if previous is not None:
                await self._send(identity, header, previous, final=False)
            previous = reply
        if previous is None:
            previous = ErrorReply(code=ErrorCode.INTERNAL, error="handler streamed nothing")
        await self._send(identity, header, previous)

    async def _send(self, identity: bytes, request: Envelope, reply: Reply, *, final: bool = True) -> None:
        header = Envelope(
            msg_id=new_id(),
            correlation_id=request.correlation_id,
            source=self.source,
            reply_to=request.msg_id,
            final=final,
        )
        await self._socket.send_multipart([identity, *encode(header, reply)])

    def close(self) -> None:
        self._socket.close()


class AsyncRpcClient:
    """Calls one service from asyncio code. Many requests may be in flight at once."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
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
        self._socket = ctx.socket(zmq.DEALER)
        _configure(self._socket, hwm)
        self._socket.setsockopt(zmq.IMMEDIATE, 1)
        self._socket.connect(address)
        self._pending: dict[str, asyncio.Queue[tuple[Envelope, Reply]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def _read_replies(self) -> None:
        while True:
            frames = await self._socket.recv_multipart()
            if len(frames) != 2:
                continue
            try:
                header = decode_header(frames[0])
                body = decode_body(frames[1])
            except DecodeError as exc:
                log.warning("reply_dropped", reason=str(exc))
                continue
            queue = self._pending.get(header.reply_to)
            if queue is not None:  # else: a late answer to a request we gave up on
                queue.put_nowait((header, body))

    async def _send(self, msg_id: str, request: Request, correlation_id: str, timeout: float) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.ensure_future(self._read_replies())
        header = Envelope(
            msg_id=msg_id,
            correlation_id=correlation_id,
            source=self.source,
            deadline=time.time() + timeout,
        )
        frames = encode(header, request)
        try:
            await self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
            return
        except zmq.Again:
            pass
        # No connected peer yet: a fresh client may still be connecting, so wait a moment.
        if await self._socket.poll(int(min(timeout, 1.0) * 1000), zmq.POLLOUT):
            try:
                await self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                pass
        raise ServiceUnavailable(self.service)

    async def request(
        self, request: Request, *, correlation_id: str = "", timeout: float | None = None
    ) -> Reply:
        """Send one request and return its reply; raises ``RemoteError`` for an ``ErrorReply``."""
        timeout = self.timeout_s if timeout is None else timeout
        tries = 1 + (self.read_retries if request.idempotent else 0)
        for _ in range(tries):
            msg_id = new_id()
            queue: asyncio.Queue[tuple[Envelope, Reply]] = asyncio.Queue()
            self._pending[msg_id] = queue
            try:
                await self._send(msg_id, request, correlation_id, timeout)
                _, reply = await asyncio.wait_for(queue.get(), timeout)
            except TimeoutError:
                continue
            finally:
                self._pending.pop(msg_id, None)
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
        if self._reader is not None:
            self._reader.cancel()
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
        self._socket = (ctx or zmq.Context.instance()).socket(zmq.DEALER)
        _configure(self._socket, 1000)
        self._socket.setsockopt(zmq.IMMEDIATE, 1)
        self._socket.connect(address)

    def _send(self, msg_id: str, request: Request, correlation_id: str, timeout: float) -> None:
        header = Envelope(msg_id=msg_id, correlation_id=correlation_id, source=self.source,
                          deadline=time.time() + timeout)
        frames = encode(header, request)
        if not self._socket.poll(int(min(timeout, 1.0) * 1000), zmq.POLLOUT):
            raise ServiceUnavailable(self.service)
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            raise ServiceUnavailable(self.service) from None

    def _receive(self, msg_id: str, deadline: float) -> tuple[Envelope, Reply] | None:
        while (left := deadline - time.monotonic()) > 0:
            if not self._socket.poll(int(left * 1000) + 1, zmq.POLLIN):
                return None
            frames = self._socket.recv_multipart()
            if len(frames) != 2:
                continue
            try:
                header = decode_header(frames[0])
            except DecodeError:
                continue
            if header.reply_to != msg_id:
                continue  # a late answer to an earlier request
            try:
                return header, decode_body(frames[1])
            except DecodeError as exc:
                log.warning("reply_dropped", reason=str(exc))
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
