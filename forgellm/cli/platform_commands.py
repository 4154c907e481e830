"""Commands that run the platform: the supervisor and each process on its own."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from pathlib import Path

import click

from forgellm.bus import EventPublisher
from forgellm.bus.curve import CurveKeysMissing
from forgellm.bus_security import InsecureBus, secure_bus
from forgellm.config import bus_address, load_settings
from forgellm.config.settings import ConfigError
from forgellm.logs import configure_logging
from forgellm.schemas import ProcessExited
from forgellm.supervisor import Supervisor, default_procfile, parse_procfile

PROCESSES = ("broker", "trainer", "inference", "catalog", "publisher", "gateway")


def _settings(**gateway: object):
    try:
        settings = load_settings({"gateway": gateway})
    except ConfigError as exc:
        raise click.ClickException(f"configuration: {exc}") from exc
    try:  # before any bus socket of this process exists
        secure_bus(settings)
    except (InsecureBus, CurveKeysMissing) as exc:
        raise click.ClickException(str(exc)) from None
    return settings


def _child_env(settings) -> dict[str, str]:
    """Hand the resolved settings to every child, so flags given here reach them too."""
    env = dict(os.environ)
    env["FORGELLM_HOME"] = str(settings.home)
    env["FORGELLM_GATEWAY_HOST"] = settings.gateway.host
    env["FORGELLM_GATEWAY_WEB_PORT"] = str(settings.gateway.web_port)
    env["FORGELLM_GATEWAY_SERVER_PORT"] = str(settings.gateway.server_port)
    if settings.security.api_token:
        env["FORGELLM_SECURITY_API_TOKEN"] = settings.security.api_token
    env["FORGELLM_BUS_RUN_DIR"] = str(settings.run_dir)
    env["FORGELLM_BUS_CURVE_DIR"] = settings.bus.curve_dir
    env.setdefault("FORGELLM_LOGGING_FORMAT", "console" if sys.stdout.isatty() else "json")
    return env


@click.command()
@click.option("--server-port", type=int, default=None, help="Model-server API port (default 5001).")
@click.option("--web-port", type=int, default=None, help="Web UI + full API port (default 5002).")
@click.option("--host", default=None, help="Interface to bind (default 127.0.0.1).")
@click.option("--procfile", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Run the processes of this Procfile instead of ForgeLLM's own.")
def start(server_port: int | None, web_port: int | None, host: str | None, procfile: Path | None) -> None:
    """Start every ForgeLLM process (broker, services, gateway) and keep them running."""
    settings = _settings(server_port=server_port, web_port=web_port, host=host)
    from forgellm.gateway.security import check_bind

    try:
        check_bind(settings.gateway.host, settings.security.api_token)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    entries = parse_procfile((procfile or default_procfile()).read_text())
    # The supervisor knows first when a process dies: it says so on the bus, so health shows
    # the process down at once rather than after missed heartbeats.
    events = EventPublisher(bus_address(settings, "events_in"), "supervisor")

    def announce(name: str, pid: int, code: int, restart_in_s: float | None) -> None:
        events.publish(ProcessExited(name=name, pid=pid, exit_code=code, restart_in_s=restart_in_s))

    supervisor = Supervisor(entries, env=_child_env(settings), grace_s=settings.timeouts.stop_grace_s,
                            on_exit=announce)
    shown = "localhost" if settings.gateway.host in ("127.0.0.1", "::1") else settings.gateway.host
    supervisor.say("forgellm", f"web UI and API  http://{shown}:{settings.gateway.web_port}/")
    supervisor.say("forgellm", f"model server    http://{shown}:{settings.gateway.server_port}/api")
    supervisor.say("forgellm", f"workspace       {settings.home}")
    code = asyncio.run(supervisor.run())
    events.close()
    sys.exit(code)


def _run_gateway(settings, web_port: int, server_port: int) -> None:
    from forgellm.gateway.app import run_gateway

    sys.exit(asyncio.run(run_gateway(settings, web_port=web_port, server_port=server_port)))


def _preload(settings, model: str, adapter: str | None, wait_s: float = 60.0) -> None:
    """Ask the inference service to load ``model`` once it answers (it may still be starting)."""
    import structlog

    from forgellm.bus import RpcClient
    from forgellm.bus.errors import RemoteError, ServiceTimeout, ServiceUnavailable
    from forgellm.schemas import ModelLoadRequest

    log = structlog.get_logger("gateway")
    client = RpcClient(bus_address(settings, "inference"), "inference", source="server",
                       timeout_s=settings.timeouts.rpc_s)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                reply = client.request(ModelLoadRequest(model_name=model, adapter_path=adapter))
                log.info("preload_started", model_name=model, adapter_path=adapter, message=reply.message)
                return
            except ServiceUnavailable:
                if time.monotonic() > deadline:
                    log.error("preload_failed", model_name=model, error="the inference service is not running")
                    return
                time.sleep(0.5)
            except (RemoteError, ServiceTimeout) as exc:  # a load is never retried: it is not idempotent
                log.error("preload_failed", model_name=model, error=str(exc),
                          suggestion=getattr(exc, "suggestion", "") or exc.to_reply().suggestion)
                return
    finally:
        client.close()


@click.command()
@click.option("--host", default=None, help="Interface to bind (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default 5001).")
@click.option("--model", default=None, help="Model to load at start (sent to the inference service).")
@click.option("--adapter", default=None, help="Adapter to apply to --model.")
def server(host: str | None, port: int | None, model: str | None, adapter: str | None) -> None:
    """Serve the model-server API (expects the services started by 'forgellm start' or
    'forgellm service …'); with --model, have the inference service load it."""
    settings = _settings(host=host, server_port=port)
    configure_logging("gateway", settings.logging.level, settings.logging.format)
    if model:
        threading.Thread(target=_preload, args=(settings, model, adapter), name="preload", daemon=True).start()
    elif adapter:
        raise click.ClickException("--adapter needs --model")
    _run_gateway(settings, web_port=0, server_port=settings.gateway.server_port)


@click.command()
@click.option("--host", default=None, help="Interface to bind (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default 5002).")
@click.option("--debug", is_flag=True, help="Log at debug level.")
def web(host: str | None, port: int | None, debug: bool) -> None:
    """Serve the web UI and the full API (expects the services to be running)."""
    settings = _settings(host=host, web_port=port)
    configure_logging("gateway", "debug" if debug else settings.logging.level, settings.logging.format)
    _run_gateway(settings, web_port=settings.gateway.web_port, server_port=0)


@click.command()
@click.argument("name", type=click.Choice(PROCESSES))
def service(name: str) -> None:
    """Run one ForgeLLM process in the foreground (what the Procfile runs)."""
    settings = _settings()
    configure_logging(name, settings.logging.level, settings.logging.format)
    if name == "broker":
        from forgellm.bus.broker import run_broker
        from forgellm.config import bus_address

        sys.exit(run_broker(bus_address(settings, "events_in"), bus_address(settings, "events_out"),
                            hwm=settings.bus.hwm, heartbeat_s=settings.timeouts.heartbeat_s))
    if name == "gateway":
        _run_gateway(settings, settings.gateway.web_port, settings.gateway.server_port)
    from forgellm.services import registry

    sys.exit(asyncio.run(registry.create(name, settings).run()))
