"""``POST /api/model/generate``: plain JSON, or a token stream as newline-delimited JSON.

Framing of ``"streaming": true`` (``Content-Type: application/x-ndjson``), one JSON object per
line, flushed as each token is decoded::

    {"token": "Machine"}
    {"token": " learning"}
    ...
    {"success": true, "response": "Machine learning ...", "tokens_generated": 156,
     "generation_time_seconds": 2.3, "tokens_per_second": 67.8, "time_to_first_token": 0.12,
     "finish_reason": "stop", "prompt_tokens": 31, "done": true}

The last line always has ``"done": true``: the statistics of the non-streaming reply, or, when
the generation failed after the stream had begun, the reference's error body
(``{"success": false, "error", "error_code", ...}``). A failure before the first token (no model
loaded, bad input) is an ordinary JSON error response with its HTTP status.

A client that goes away stops its generation: the gateway watches the connection while it
waits for the service (and sees a failed write while streaming), drops the bus stream and sends
``GenerateCancelRequest`` with the generation's id, which the gateway chose itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import structlog
from aiohttp import web

from forgellm.bus import BusError, new_id
from forgellm.gateway.decode import decode_body
from forgellm.gateway.errors import REQUEST_ID, ApiError
from forgellm.schemas import (
    ErrorBody,
    ErrorCode,
    GenerateCancelRequest,
    GenerateChunk,
    GenerateReply,
    GenerateRequest,
)

if TYPE_CHECKING:
    from forgellm.gateway.app import BusLink

log = structlog.get_logger("gateway")

T = TypeVar("T")

# A generate request may wait behind others in the service's queue, so the wait for a frame is
# long; a dead or stuck service is still noticed within the heartbeat timeout (503).
FRAME_TIMEOUT_S = 900.0
WATCH_INTERVAL_S = 0.1
SERVICE = "inference"


class ClientGone(Exception):
    """The HTTP client closed its connection."""


def _disconnected(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _guarded(awaitable: Awaitable[T], request: web.Request, link: BusLink) -> T:
    """Await ``awaitable`` unless the client disconnects (``ClientGone``) or the inference
    service goes down (503) first."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=WATCH_INTERVAL_S)
            if done:
                return task.result()
            if _disconnected(request):
                raise ClientGone
            if link.monitor.is_down(SERVICE):
                raise ApiError(ErrorCode.SERVICE_UNAVAILABLE, "The inference service stopped during generation",
                               details={"service": SERVICE},
                               suggestion="'GET /api/health' shows each process; the supervisor restarts it.")
    finally:
        if not task.done():
            task.cancel()


def _line(data: Any) -> bytes:
    return msgspec.json.encode(data) + b"\n"


def _final_line(reply: GenerateReply) -> bytes:
    data = msgspec.to_builtins(reply)
    data.pop("type", None)
    data["done"] = True
    return _line(data)


def _error_line(exc: BusError | ApiError) -> bytes:
    reply = exc.reply if isinstance(exc, ApiError) else exc.to_reply()
    body = msgspec.to_builtins(ErrorBody(error=reply.error, error_code=reply.code, details=reply.details,
                                         suggestion=reply.suggestion))
    body["done"] = True
    return _line(body)


def generate_handler(link: BusLink) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    client = link.clients[SERVICE]

    def cancel(generation_id: str, request_id: str) -> None:
        async def send() -> None:
            try:
                await client.request(GenerateCancelRequest(generation_id=generation_id),
                                     correlation_id=request_id, timeout=link.settings.timeouts.rpc_s)
            except BusError as exc:
                log.warning("generation_cancel_failed", generation_id=generation_id, error=str(exc))

        log.info("generation_client_gone", generation_id=generation_id)
        task = asyncio.ensure_future(send())
        pending.add(task)
        task.add_done_callback(pending.discard)

    pending: set[asyncio.Task[None]] = set()

    async def handle(request: web.Request) -> web.StreamResponse:
        message = await decode_body(request, GenerateRequest)
        message = msgspec.structs.replace(message, generation_id=new_id())
        request_id = request[REQUEST_ID]
        link.check_up(SERVICE)
        if not message.streaming:
            try:
                reply = await _guarded(client.request(message, correlation_id=request_id, timeout=FRAME_TIMEOUT_S),
                                       request, link)
            except ClientGone:
                cancel(message.generation_id, request_id)
                raise web.HTTPBadRequest(reason="client closed the connection") from None
            data = msgspec.to_builtins(reply)
            data.pop("type", None)
            return web.Response(body=msgspec.json.encode(data), content_type="application/json")

        frames = client.stream(message, correlation_id=request_id, timeout=FRAME_TIMEOUT_S).__aiter__()
        response: web.StreamResponse | None = None
        try:
            # The first frame decides between an error response and a stream.
            frame = await _guarded(frames.__anext__(), request, link)
            response = web.StreamResponse(headers={
                "Content-Type": "application/x-ndjson", "Cache-Control": "no-cache",
                "X-Request-ID": request_id})
            await response.prepare(request)
            while True:
                if isinstance(frame, GenerateChunk):
                    await response.write(_line({"token": frame.text}))
                elif isinstance(frame, GenerateReply):
                    await response.write(_final_line(frame))
                    break
                frame = await _guarded(frames.__anext__(), request, link)
        except (ClientGone, ConnectionError):
            cancel(message.generation_id, request_id)
            if response is None:
                raise web.HTTPBadRequest(reason="client closed the connection") from None
            return response
        except asyncio.CancelledError:
            cancel(message.generation_id, request_id)
            raise
        except (BusError, ApiError) as exc:
            if response is None:
                raise
            cancel(message.generation_id, request_id)
            try:
                await response.write(_error_line(exc))
            except ConnectionError:
                return response
        finally:
            await frames.aclose()
        await response.write_eof()
        return response

    return handle
