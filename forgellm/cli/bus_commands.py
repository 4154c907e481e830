"""``forgellm bus tail``: every event on the bus, live, one per line."""

from __future__ import annotations

import asyncio
import time

import click
import msgspec

from forgellm.bus import AsyncSubscriber, new_context
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
    address = bus_address(load_settings(), "events_out")
    try:
        asyncio.run(_tail(address, topics, as_json, count))
    except KeyboardInterrupt:
        pass
