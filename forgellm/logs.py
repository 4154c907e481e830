"""structlog, configured once per process: console on a TTY, JSON lines otherwise.

Every line carries ``service`` and ``pid``; the ``correlation_id`` of the request being
served is bound with ``structlog.contextvars`` by the gateway and by each service's RPC loop.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

_configured = False


def _add_process_fields(service: str) -> structlog.types.Processor:
    # A processor rather than contextvars: threads and executors start with an empty context.
    pid = os.getpid()

    def add(_logger: object, _method: str, event: dict) -> dict:
        event.setdefault("service", service)
        event.setdefault("pid", pid)
        return event

    return add


def configure_logging(service: str, level: str = "info", fmt: str = "auto") -> None:
    """Set up structlog for this process (idempotent)."""
    global _configured
    fmt = os.environ.get("FORGELLM_LOGGING_FORMAT", fmt)
    level = os.environ.get("FORGELLM_LOGGING_LEVEL", level)
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if use_console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_process_fields(service),
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    _configured = True


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
