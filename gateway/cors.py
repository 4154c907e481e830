"""CORS for the REST API: closed by default, open to the origins in ``gateway.cors_origins``.

With no origin configured, no response carries ``Access-Control-Allow-Origin``: a page on another
origin cannot read anything (same-origin pages, curl and the Python client are unaffected). A
configured origin (``cors_origins = ["https://app.example"]``, or ``"*"`` for any) gets its
``Origin`` echoed on every response, errors included, and its preflight (``OPTIONS`` with
``Access-Control-Request-Method``) answered 204 before the API token is checked (browsers send
preflights without credentials). Bearer tokens, not cookies, authenticate: credentials are never
allowed. Socket.IO (``/socket.io/``) does its own origin check with the same list.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

ALLOWED_METHODS = "GET, POST, OPTIONS"
ALLOWED_HEADERS = {"content-type", "authorization", "x-api-token", "x-request-id", "accept"}
EXPOSED_HEADERS = "X-Request-ID"
MAX_AGE_S = "600"


def normalize(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def socketio_origins(origins: list[str]) -> list[str] | str | None:
    """The same list for python-socketio's own check: None = same origin only (closed)."""
    allowed = sorted({normalize(origin) for origin in origins if origin.strip()})
    if "*" in allowed:
        return "*"
    return allowed or None


def install_cors(app: web.Application, origins: list[str]) -> None:
    """Answer allowed preflights (a middleware ahead of every other, the token check included)
    and add the CORS headers to every response to an allowed origin just before its headers are
    sent (``on_response_prepare``: streamed replies and files included)."""
    allowed = {normalize(origin) for origin in origins if origin.strip()}
    any_origin = "*" in allowed

    def allowed_origin(request: web.Request) -> str | None:
        origin = request.headers.get("Origin")
        if not allowed or origin is None or request.path.startswith("/socket.io"):
            return None  # Socket.IO checks origins itself (cors_allowed_origins)
        if origin.lower() == "null" or not (any_origin or normalize(origin) in allowed):
            return None
        return origin

    @web.middleware
    async def preflight(request: web.Request, handler: Any) -> web.StreamResponse:
        origin = allowed_origin(request)
        if origin is None or request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return await handler(request)
        asked = [h.strip() for h in request.headers.get("Access-Control-Request-Headers", "").split(",")]
        granted = [h for h in asked if h.lower() in ALLOWED_HEADERS]
        headers = {"Access-Control-Allow-Methods": ALLOWED_METHODS, "Access-Control-Max-Age": MAX_AGE_S}
        if granted:
            headers["Access-Control-Allow-Headers"] = ", ".join(granted)
        return web.Response(status=204, headers=headers)  # the origin headers come from on_prepare

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        if not allowed or request.path.startswith("/socket.io"):
            return
        response.headers.add("Vary", "Origin")
        origin = allowed_origin(request)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS

    app.middlewares.insert(0, preflight)
    app.on_response_prepare.append(on_prepare)
