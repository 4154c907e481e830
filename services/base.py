"""What every service shares: its command socket, heartbeat, ready/stopping events and a
graceful SIGTERM (stop taking requests, finish the ones in hand, close sockets, exit 0).

A subclass names itself and registers handlers with ``@handles(RequestType)``. An ``async def``
handler runs as a task on the event loop; a plain ``def`` handler runs inline on the command
socket's thread (no event-loop hop, see ``bus.rpc.RpcServer``), so it must be quick, never block
and only read the service's state (ping, status).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Union

import structlog

from forgellm.bus import EventPublisher, RpcServer, curve, new_context
from forgellm.bus.broker import prepare_ipc
from forgellm.config import Settings, bus_address
from forgellm.schemas import (
    Envelope,
    ErrorCode,
    ErrorReply,
    Heartbeat,
    Message,
    PingReply,
    PingRequest,
    Request,
    ServiceReady,
    ServiceStatusReply,
    ServiceStatusRequest,
    ServiceStopping,
)
from forgellm.services.common.errors import ForgeError

VERSION = "0.1.0"
log = structlog.get_logger("service")

HandlerMethod = Callable[..., Union[Awaitable[Any], Any]]


def handles(request_type: type[Request]) -> Callable[[HandlerMethod], HandlerMethod]:
    """Mark a method as the handler of ``request_type``."""

    def mark(method: HandlerMethod) -> HandlerMethod:
        method.__handles__ = request_type  # type: ignore[attr-defined]
        return method

    return mark


class Service:
    name: ClassVar[str] = "service"
    # request type -> method name (a name, so a subclass may override a handler)
    _handlers: ClassVar[dict[type[Request], str]] = {}
    # the subset answered on the socket thread (plain ``def`` handlers)
    _inline_handlers: ClassVar[dict[type[Request], str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._handlers = {}
        for klass in reversed(cls.__mro__):
            for name, attr in vars(klass).items():
                request_type = getattr(attr, "__handles__", None)
                if request_type is not None:
                    cls._handlers[request_type] = name
        cls._inline_handlers = {
            request_type: name for request_type, name in cls._handlers.items()
            if not asyncio.iscoroutinefunction(getattr(cls, name))
        }

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pid = os.getpid()
        self.started = time.monotonic()
        self.stop_event = asyncio.Event()
        self.ctx = new_context()
        self.address = bus_address(settings, self.name)
        self.events: EventPublisher | None = None
        self.server: RpcServer | None = None

    # --- what subclasses may override -------------------------------------------------------

    def state(self) -> str:
        """One word for health: idle, running, training, loading…"""
        return "running"

    async def on_start(self) -> None:
        """Called once the sockets are up, before the first request."""

    async def on_stop(self) -> None:
        """Called after the last request was answered, before the sockets close."""

    # --- common handlers ----------------------------------------------------------------------

    @handles(PingRequest)
    def ping(self, request: PingRequest, header: Envelope) -> PingReply:
        return PingReply(service=self.name, pid=self.pid, uptime_s=self.uptime(), version=VERSION)

    @handles(ServiceStatusRequest)
    def service_status(self, request: ServiceStatusRequest, header: Envelope) -> ServiceStatusReply:
        assert self.server is not None
        return ServiceStatusReply(
            service=self.name,
            state=self.state(),
            pid=self.pid,
            uptime_s=self.uptime(),
            requests_served=self.server.served,
            requests_failed=self.server.failed,
        )

    # --- machinery ----------------------------------------------------------------------------

    def uptime(self) -> float:
        return time.monotonic() - self.started

    def publish(self, event: Message, correlation_id: str = "") -> None:
        if self.events is not None:
            self.events.publish(event, correlation_id)

    def _dispatch_inline(self, header: Envelope, request: Request) -> Any:
        """On the socket thread: a plain ``def`` handler's reply, or ``None`` for the loop."""
        name = self._inline_handlers.get(type(request))
        if name is None:
            return None
        try:
            return getattr(self, name)(request, header)
        except ForgeError as exc:
            return exc.to_reply()

    async def _dispatch(self, header: Envelope, request: Request) -> Any:
        name = self._handlers.get(type(request))
        if name is None:
            return ErrorReply(
                code=ErrorCode.NOT_IMPLEMENTED,
                error=f"The {self.name} service does not handle {type(request).__name__} yet",
            )
        try:
            result = getattr(self, name)(request, header)
            return await result if inspect.isawaitable(result) else result
        except ForgeError as exc:
            return exc.to_reply()

    async def _heartbeat(self) -> None:
        interval = self.settings.timeouts.heartbeat_s
        while True:
            self.publish(Heartbeat(service=self.name, state=self.state(), pid=self.pid, uptime_s=self.uptime()))
            await asyncio.sleep(interval)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        hwm = self.settings.bus.hwm
        self.events = EventPublisher(bus_address(self.settings, "events_in"), self.name, ctx=self.ctx, hwm=hwm)
        prepare_ipc(self.address)
        self.server = RpcServer(self.ctx, self.address, self.name)
        await self.on_start()
        heartbeat = asyncio.ensure_future(self._heartbeat())
        self.publish(ServiceReady(service=self.name, pid=self.pid, address=self.address))
        log.info("service_ready", address=self.address)
        try:
            await self.server.serve(self._dispatch, self.stop_event, self._dispatch_inline)
        finally:
            heartbeat.cancel()
            log.info("service_stopping")
            self.publish(ServiceStopping(service=self.name, pid=self.pid, reason="signal"))
            await self.on_stop()
            self.server.close()
            self.events.close()
            curve.stop_authenticators()
            self.ctx.destroy(linger=500)
        return 0
