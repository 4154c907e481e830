"""Messages every service answers or publishes."""

from typing import Any

import msgspec

from forgellm.schemas.base import Message, Reply, Request


class PingRequest(Request, kw_only=True):
    idempotent = True


class PingReply(Reply, kw_only=True):
    service: str
    pid: int
    uptime_s: float
    version: str


class ServiceStatusRequest(Request, kw_only=True):
    idempotent = True


class ServiceStatusReply(Reply, kw_only=True):
    service: str
    state: str
    pid: int
    uptime_s: float
    requests_served: int
    requests_failed: int


class Heartbeat(Message, kw_only=True):
    """Published every second; ``state`` is the service's own word (idle, training, …)."""

    service: str
    state: str
    pid: int
    uptime_s: float


class ServiceReady(Message, kw_only=True):
    service: str
    pid: int
    address: str


class ServiceStopping(Message, kw_only=True):
    service: str
    pid: int
    reason: str = ""


class HealthReply(msgspec.Struct, kw_only=True):
    """``GET /api/health`` (answered by the gateway from heartbeats and the machine)."""

    success: bool = True
    status: str
    components: dict[str, str]
    system_info: dict[str, Any]


class ProcessExited(Message, kw_only=True):
    """Published by the supervisor the moment a child process dies (before its restart)."""

    name: str
    pid: int
    exit_code: int
    restart_in_s: float | None = None
