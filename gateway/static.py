"""The web UI's files and a published model's dashboard PNG / model card, served safely.

- ``/`` is ``web/index.html``; ``/static/<path>`` a file under ``web/`` (known types only).
- ``/api/published/<model>/<file>`` a ``.png`` or ``.md`` file of a published model, under the
  workspace's ``models/published/`` (behind the API token like every ``/api`` route).

Every path is checked segment by segment (no empty, ``.``/``..``, hidden or back-slashed part)
and again after resolving symlinks: a file outside its root is refused (403), never read.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from forgellm.gateway.errors import ApiError
from forgellm.schemas import ErrorCode

WEB_ROOT = Path(__file__).resolve().parent / "web"
STATIC_TYPES = {".js", ".css", ".html", ".svg", ".png", ".ico", ".txt", ".md"}
PUBLISHED_TYPES = {".png", ".md"}
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
# Everything the page loads comes from this origin; uPlot sets element styles.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' blob: data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def _outside(what: str) -> ApiError:
    return ApiError(ErrorCode.PATH_OUTSIDE_WORKSPACE, f"Refused path: {what}", details={"path": what},
                    suggestion="Ask for a file by its plain relative name.")


def _not_found(what: str) -> ApiError:
    return ApiError(ErrorCode.NOT_FOUND, f"No such file: {what}", details={"path": what})


def safe_file(root: Path, relative: str, allowed: set[str]) -> Path:
    """The file ``relative`` inside ``root``, or an ApiError (403 outside/refused, 404 missing)."""
    parts = relative.split("/")
    if (not relative or len(relative) > 1024 or "\\" in relative or "\0" in relative
            or any(part in ("", ".", "..") or part.startswith(".") for part in parts)):
        raise _outside(relative)
    if Path(parts[-1]).suffix.lower() not in allowed:
        raise ApiError(ErrorCode.PATH_OUTSIDE_WORKSPACE, f"Refused file type: {relative}",
                       details={"path": relative, "allowed": sorted(allowed)},
                       suggestion=f"Only {', '.join(sorted(allowed))} files are served here.")
    base = root.resolve()
    try:
        target = (base / relative).resolve(strict=True)
    except (OSError, RuntimeError):
        raise _not_found(relative) from None
    if not target.is_relative_to(base):
        raise _outside(relative)
    if not target.is_file():
        raise _not_found(relative)
    return target


def _file(path: Path, cache: str) -> web.FileResponse:
    # FileResponse answers If-None-Match / If-Modified-Since with 304 (ETag from mtime and size).
    return web.FileResponse(path, headers={"Cache-Control": cache, **SECURITY_HEADERS})


def add_web_routes(app: web.Application, home: Path) -> None:
    """Register the UI (``/``, ``/static/...``) and ``/api/published/...`` on the :5002 app."""
    published_root = home / "models" / "published"

    async def index(request: web.Request) -> web.StreamResponse:
        response = _file(WEB_ROOT / "index.html", "no-cache")
        response.headers["Content-Security-Policy"] = CSP
        return response

    async def static(request: web.Request) -> web.StreamResponse:
        path = safe_file(WEB_ROOT, request.match_info["path"], STATIC_TYPES)
        # Third-party files change only with a new ForgeLLM version; our own are revalidated.
        cache = "public, max-age=86400" if path.parent.name == "vendor" else "no-cache"
        return _file(path, cache)

    async def published(request: web.Request) -> web.StreamResponse:
        path = safe_file(published_root, request.match_info["path"], PUBLISHED_TYPES)
        response = _file(path, "no-cache")
        if path.suffix.lower() == ".md":
            response.content_type = "text/markdown"
            response.charset = "utf-8"
        return response

    app.router.add_get("/", index)
    app.router.add_get("/static/{path:.*}", static)
    app.router.add_get("/api/published/{path:.*}", published)
