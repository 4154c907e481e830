"""The reference's error body for every failure, and the middleware that guarantees it."""

from __future__ import annotations

import re
from typing import Any

import msgspec
import structlog
from aiohttp import web

from forgellm.bus import BusError, new_id
from forgellm.schemas import HTTP_STATUS, ErrorBody, ErrorCode, ErrorReply

log = structlog.get_logger("gateway")

# Where each request's id is kept (a typed key: aiohttp warns about plain string keys).
REQUEST_ID = web.RequestKey("request_id", str)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class ApiError(Exception):
    """Raised by handlers; rendered as ``{success: false, error, error_code, details, suggestion}``."""

    def __init__(
        self,
        code: ErrorCode,
        error: str,
        *,
        details: dict[str, Any] | None = None,
        suggestion: str = "",
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(error)
        self.reply = ErrorReply(code=code, error=error, details=details or {}, suggestion=suggestion)
        self.status = status or HTTP_STATUS.get(code, 500)
        self.headers = headers or {}


def error_response(reply: ErrorReply, status: int | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body = ErrorBody(error=reply.error, error_code=reply.code, details=reply.details,
                     suggestion=reply.suggestion)
    return web.Response(
        body=msgspec.json.encode(body),
        status=status or HTTP_STATUS.get(reply.code, 500),
        content_type="application/json",
        headers=headers,
    )


def _from_http_exception(exc: web.HTTPException) -> ApiError:
    if exc.status == 404:
        return ApiError(ErrorCode.NOT_FOUND, "No such endpoint", suggestion="See GET /api/openapi.json")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        # RFC 9110: a 405 names the methods the resource does support.
        allowed = sorted(exc.allowed_methods)
        return ApiError(ErrorCode.METHOD_NOT_ALLOWED, f"Method {exc.method} not allowed here",
                        details={"method": exc.method, "allowed": allowed},
                        suggestion=f"Use {' or '.join(allowed)}; see GET /api/openapi.json.",
                        status=405, headers={"Allow": ", ".join(allowed)})
    if exc.status == 405:
        return ApiError(ErrorCode.METHOD_NOT_ALLOWED, "Method not allowed", status=405)
    if exc.status == 413:
        return ApiError(ErrorCode.PAYLOAD_TOO_LARGE, "Request body too large",
                        details={"reason": exc.text}, suggestion="Send a smaller body.")
    return ApiError(ErrorCode.INVALID_REQUEST, exc.reason or "Bad request", status=exc.status)


@web.middleware
async def request_context(request: web.Request, handler: Any) -> web.StreamResponse:
    """Bind the request id (``X-Request-ID`` in or a new one) and turn every failure into
    the reference's error body; a bug becomes a 500 with that body, never a bare traceback."""
    incoming = request.headers.get("X-Request-ID", "")
    request_id = incoming if _REQUEST_ID.match(incoming) else new_id()
    request[REQUEST_ID] = request_id
    structlog.contextvars.bind_contextvars(correlation_id=request_id)
    try:
        response = await handler(request)
    except ApiError as exc:
        response = error_response(exc.reply, exc.status, exc.headers)
    except BusError as exc:
        response = error_response(exc.to_reply())
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        api = _from_http_exception(exc)
        response = error_response(api.reply, api.status, api.headers)
    except Exception as exc:
        log.exception("request_failed", path=request.path)
        response = error_response(ErrorReply(
            code=ErrorCode.INTERNAL, error=f"Internal error: {type(exc).__name__}",
            suggestion="This is a bug; the gateway log has the traceback."))
    finally:
        structlog.contextvars.unbind_contextvars("correlation_id")
    response.headers["X-Request-ID"] = request_id
    return response
