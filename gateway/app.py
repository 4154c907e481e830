"""Build and run the gateway: :5002 (full API, Socket.IO, web UI) and :5001 (model server)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import socketio
import structlog
from aiohttp import web

from forgellm.bus import AsyncRpcClient, AsyncSubscriber, new_context
from forgellm.config import Settings, bus_address
from forgellm.config.settings import SERVICE_NAMES
from forgellm.gateway.backpressure import BacklogGuard
from forgellm.gateway.cors import install_cors, socketio_origins
from forgellm.gateway.decode import decode_body, decode_query
from forgellm.gateway.errors import REQUEST_ID, ApiError, request_context
from forgellm.gateway.generation import generate_handler
from forgellm.gateway.health import PROCESSES, ServiceMonitor, system_info
from forgellm.gateway.openai_api import add_openai_routes
from forgellm.gateway.openapi import openapi_document
from forgellm.gateway.realtime import TrainingEvents
from forgellm.gateway.routes import ROUTES, Route
from forgellm.gateway.security import check_bind, token_matches, token_middleware
from forgellm.gateway.static import add_web_routes
from forgellm.schemas import ErrorCode, HealthReply

log = structlog.get_logger("gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(data: Any, status: int = 200) -> web.Response:
    if isinstance(data, msgspec.Struct):
        data = msgspec.to_builtins(data)
        data.pop("type", None)
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json")


class BusLink:
    """The gateway's sockets: one RPC client per service, a heartbeat monitor, an event feed."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ctx = new_context()
        timeouts = settings.timeouts
        self.clients = {
            name: AsyncRpcClient(self.ctx, bus_address(settings, name), name, source="gateway",
                                 timeout_s=timeouts.rpc_s, read_retries=timeouts.read_retries)
            for name in SERVICE_NAMES
        }
        events_out = bus_address(settings, "events_out")
        self.monitor = ServiceMonitor(
            AsyncSubscriber(self.ctx, events_out, ("service.",)), timeouts.heartbeat_timeout_s)

    def training_feed(self) -> AsyncSubscriber:
        return AsyncSubscriber(self.ctx, bus_address(self.settings, "events_out"), ("training.", "publish."))

    def check_up(self, service: str) -> None:
        if self.monitor.is_down(service):
            raise ApiError(
                ErrorCode.SERVICE_UNAVAILABLE,
                f"The {service} service is not running",
                details={"service": service},
                suggestion="Start the platform with 'forgellm start'; 'GET /api/health' shows each process.",
            )

    async def call(self, service: str, request: Any, request_id: str, timeout: float | None = None) -> Any:
        self.check_up(service)
        answer = self.clients[service].request(request, correlation_id=request_id, timeout=timeout)
        if timeout is None:
            return await answer
        # A long command (publish, start) must not wait out its long timeout when the service
        # dies under it: watch the service's health beside the answer.
        reply = asyncio.ensure_future(answer)
        died = asyncio.ensure_future(self._until_down(service))
        try:
            await asyncio.wait({reply, died}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            died.cancel()
        if reply.done():
            return reply.result()
        reply.cancel()
        raise ApiError(ErrorCode.SERVICE_UNAVAILABLE, f"The {service} service stopped while answering",
                       details={"service": service},
                       suggestion="It is restarted automatically; try again in a moment.")

    async def _until_down(self, service: str) -> None:
        # Polled: "down" can also mean "silent for too long", which no event announces.
        while not self.monitor.is_down(service):  # noqa: ASYNC110
            await asyncio.sleep(0.2)

    def close(self) -> None:
        self.monitor.close()
        for client in self.clients.values():
            client.close()
        self.ctx.destroy(linger=0)


def _service_handler(link: BusLink, route: Route) -> Handler:
    assert route.service is not None and route.request is not None
    service, request_type = route.service, route.request

    async def handle(request: web.Request) -> web.StreamResponse:
        if route.method == "GET":
            message = decode_query(request, request_type)
        else:
            message = await decode_body(request, request_type)
        reply = await link.call(service, message, request[REQUEST_ID], route.timeout_s)
        return json_response(reply)

    return handle


def _health_handler(link: BusLink) -> Handler:
    async def health(request: web.Request) -> web.Response:
        monitor = link.monitor
        states = {name: monitor.state(name) for name in PROCESSES}
        components = {
            "web_server": "running",
            "model_server": states["inference"],
            "training_pipeline": states["trainer"],
            **states,
            "gateway": "running",
        }
        status = "healthy" if all(state != "down" for state in states.values()) else "degraded"
        info = system_info(link.settings.home, cached_only=True)  # re-measured at most once a second
        if info is None:
            info = await asyncio.to_thread(system_info, link.settings.home)
        return json_response(HealthReply(status=status, components=components, system_info=info))

    return health


def build_app(link: BusLink, api: str) -> tuple[web.Application, TrainingEvents | None]:
    """One aiohttp application for ``api`` = "web" (:5002) or "server" (:5001)."""
    token = link.settings.security.api_token
    middlewares = [request_context, *([token_middleware(token)] if token else [])]
    app = web.Application(middlewares=middlewares, client_max_size=link.settings.gateway.max_body_bytes)
    install_cors(app, link.settings.gateway.cors_origins)  # closed unless origins are configured
    for route in ROUTES:
        if api not in route.apis:
            continue
        if route.path == "/api/health":
            handler = _health_handler(link)
        elif route.path == "/api/model/generate":
            handler = generate_handler(link)  # streams NDJSON when asked (gateway/generation.py)
        elif route.path == "/api/openapi.json":
            async def handler(request: web.Request, _api: str = api) -> web.Response:
                return json_response(openapi_document(_api, f"{request.scheme}://{request.host}"))
        else:
            handler = _service_handler(link, route)
        app.router.add_route(route.method, route.path, handler)
    add_openai_routes(app, link)  # /v1/models, /v1/chat/completions, /v1/completions (gateway/openai_api.py)
    events = None
    if api == "web":
        sio = socketio.AsyncServer(
            async_mode="aiohttp",
            cors_allowed_origins=socketio_origins(link.settings.gateway.cors_origins),
            logger=False,
            engineio_logger=False,
            ping_interval=link.settings.gateway.socketio_ping_interval_s,
            ping_timeout=link.settings.gateway.socketio_ping_timeout_s,
        )
        sio.attach(app)
        guard = BacklogGuard(sio, link.settings.gateway.socketio_max_backlog)  # gateway/backpressure.py

        async def start_guard(_: web.Application) -> None:
            guard.start()

        async def stop_guard(_: web.Application) -> None:
            guard.close()

        app.on_startup.append(start_guard)
        app.on_cleanup.append(stop_guard)
        add_web_routes(app, link.settings.home)  # the web UI (gateway/static.py)
        if token:
            async def authenticate(sid: str, environ: dict, auth: Any = None) -> bool:
                return token_matches((auth or {}).get("token") if isinstance(auth, dict) else None, token)

            sio.on("connect", authenticate)
        events = TrainingEvents(sio, link.training_feed(), link.clients["trainer"])
    return app, events


async def run_gateway(settings: Settings, *, web_port: int, server_port: int) -> int:
    """Serve until SIGTERM/SIGINT; a port of 0 leaves that API off."""
    check_bind(settings.gateway.host, settings.security.api_token)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    link = BusLink(settings)
    link.monitor.start()
    runners: list[web.AppRunner] = []
    feeds: list[TrainingEvents] = []
    host = settings.gateway.host
    for api, port in (("web", web_port), ("server", server_port)):
        if not port:
            continue
        app, events = build_app(link, api)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, host, port, reuse_address=True).start()
        runners.append(runner)
        if events is not None:
            events.start()
            feeds.append(events)
        log.info("gateway_listening", api=api, url=f"http://{host}:{port}")
    await stop.wait()
    log.info("gateway_stopping")
    for events in feeds:
        events.close()
    for runner in runners:
        await runner.cleanup()
    link.close()
    return 0
