"""Who may talk to the gateway.

Loopback only by default. Binding to any other interface requires an API token
(``security.api_token`` / ``FORGELLM_SECURITY_API_TOKEN``); with a token set, every REST call
must carry ``Authorization: Bearer <token>`` (or ``X-API-Token``) and every Socket.IO connection
``auth: {token}``. Compared in constant time.
"""

from __future__ import annotations

import hmac
from typing import Any

from aiohttp import web

from forgellm.config import is_loopback
from forgellm.gateway.errors import ApiError
from forgellm.schemas import ErrorCode


def check_bind(host: str, token: str) -> None:
    """Refuse to serve a non-loopback interface without a token (raises ValueError)."""
    if not is_loopback(host) and not token:
        raise ValueError(
            f"refusing to listen on {host!r} without an API token: anyone who can reach this machine could "
            "train, load and delete models. Set FORGELLM_SECURITY_API_TOKEN (or security.api_token in "
            "forgellm.toml), or bind to 127.0.0.1.")


def token_matches(given: str | None, token: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


def token_middleware(token: str) -> Any:
    @web.middleware
    async def require_token(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/api/") and request.path != "/api/health":
            header = request.headers.get("Authorization", "")
            given = header[7:] if header.startswith("Bearer ") else request.headers.get("X-API-Token")
            if not token_matches(given, token):
                raise ApiError(ErrorCode.UNAUTHORIZED, "Missing or wrong API token",
                               suggestion="Send 'Authorization: Bearer <token>' (FORGELLM_SECURITY_API_TOKEN).")
        return await handler(request)

    return require_token
