"""``forgellm bus tail``: every event on the bus, live, one per line."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import click
import msgspec

from forgellm.bus import AsyncSubscriber, new_context
from forgellm.bus.curve import CurveKeysMissing, create_keys
from forgellm.bus_security import InsecureBus, secure_bus
from forgellm.config import bus_address, load_settings


@click.group()
def bus() -> None:
    """Look at the event bus."""


def _line(record, as_json: bool) -> str:
    body = msgspec.to_builtins(record.body)
    kind = body.pop("type", type(record.body).__name__)
    if as_json:
        return msgspec.json.encode({
            "topic": record.topic, "type": kind, "source": record.header.source,
            "seq": record.header.seq, "ts": record.header.ts, "missed": record.missed,
            "correlation_id": record.header.correlation_id, "data": body,
        }).decode()
    stamp = time.strftime("%H:%M:%S", time.localtime(record.header.ts))
    gap = f" [missed {record.missed}]" if record.missed else ""
    fields = " ".join(f"{k}={v}" for k, v in body.items())
    return f"{stamp} {record.topic:<20} {record.header.source}#{record.header.seq}{gap} {kind} {fields}"


async def _tail(address: str, topics: tuple[str, ...], as_json: bool, count: int | None) -> None:
    ctx = new_context()
    subscriber = AsyncSubscriber(ctx, address, topics or ("",))
    seen = 0
    try:
        while count is None or seen < count:
            record = await subscriber.recv()
            click.echo(_line(record, as_json))
            seen += 1
    finally:
        subscriber.close()
        ctx.term()


@bus.command()
@click.option("--topic", "topics", multiple=True, help="Topic prefix, e.g. training. (repeatable)")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--count", type=int, default=None, help="Stop after this many events.")
def tail(topics: tuple[str, ...], as_json: bool, count: int | None) -> None:
    """Print every event on the bus as it happens (Ctrl-C to stop)."""
    settings = load_settings()
    try:
        secure_bus(settings)
    except (InsecureBus, CurveKeysMissing) as exc:
        raise click.ClickException(str(exc)) from None
    address = bus_address(settings, "events_out")
    try:
        asyncio.run(_tail(address, topics, as_json, count))
    except KeyboardInterrupt:
        pass


@bus.command()
@click.option("--dir", "folder", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write them (default: bus.curve_dir, <workspace>/.forgellm/curve).")
def keys(folder: Path | None) -> None:
    """Make the CURVE certificates for a bus that spans hosts (keeps existing ones)."""
    folder = folder or Path(load_settings().bus.curve_dir)
    made = create_keys(folder)
    click.echo(f"CURVE certificates in {made.folder}:")
    click.echo("  server.key(_secret)  every process that binds bus sockets (broker, services)")
    click.echo("  client.key(_secret)  every process that connects (gateway, CLI, services)")
    click.echo(f"  {made.authorized.name}/          public keys allowed in (client.key is there)")
    click.echo("Copy the folder to each host (keep *_secret private), then set FORGELLM_BUS_CURVE=true "
               "(and FORGELLM_BUS_CURVE_DIR if elsewhere) everywhere.")
