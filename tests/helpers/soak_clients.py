"""Load for the soak test, run as its own process (several of them share the clients):

    python -m tests.helpers.soak_clients WEB_URL --http N --sio M --out REPORT.json [--poll-s 1.0]

N HTTP clients poll ``GET /api/training/status``; M Socket.IO clients (python-socketio
``AsyncClient``, websocket transport) subscribe with ``subscribe_training`` and record every
``training_update``; one bus subscriber (``training.`` on the platform's broker, found from the
environment like any process of the platform) records when each update left the bus, so each
Socket.IO event's latency is "received here" minus "seen on the bus here", on one clock.

Prints ``ready`` once every client is connected and subscribed; stops when every Socket.IO client
has had ``training_complete`` (or at ``--deadline-s``), then writes REPORT.json with per-client
summaries: updates received, sequence gaps, the iterations received (as a digest beside the bus's
own list), HTTP status counts and errors, latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import socketio

UPDATE_TOPIC = "training.update"


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)

    return {"n": len(ordered), "p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": round(ordered[-1], 4)}


def digest(iterations: list[int]) -> str:
    return hashlib.sha256(json.dumps(iterations).encode()).hexdigest()[:16]


@dataclass
class SioClient:
    index: int
    updates: list[tuple[int, int, str, float]] = field(default_factory=list)  # seq, iteration, phase, t
    snapshots: int = 0
    complete: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)  # complete, or disconnected before it
    errors: list[str] = field(default_factory=list)
    disconnects: int = 0  # by the server or the network, not our own at the end
    ending: bool = False
    client: Any = None

    def summary(self, bus_seen: dict[int, float]) -> dict[str, Any]:
        seqs = [u[0] for u in self.updates]
        gaps = sum(b - a - 1 for a, b in zip(seqs, seqs[1:], strict=False) if b > a + 1)
        out_of_order = sum(1 for a, b in zip(seqs, seqs[1:], strict=False) if b <= a)
        iterations = [u[1] for u in self.updates if u[2] == "training"]
        latencies = [(bus_seen[s], t - bus_seen[s]) for s, _, _, t in self.updates if s in bus_seen]
        return {"index": self.index, "updates": len(self.updates), "first_seq": seqs[0] if seqs else None,
                "last_seq": seqs[-1] if seqs else None, "seq_gaps": gaps, "out_of_order": out_of_order,
                "iterations": len(iterations), "iterations_digest": digest(iterations),
                "snapshots": self.snapshots, "complete": self.complete.is_set(), "errors": self.errors,
                "disconnects": self.disconnects, "latency_s": percentiles([x for _, x in latencies]),
                "latencies": latencies}


async def run_sio(web: str, sio: SioClient) -> None:
    client = socketio.AsyncClient(reconnection=False)
    sio.client = client

    def on_update(data: dict[str, Any]) -> None:
        now = time.time()
        if data.get("snapshot"):
            sio.snapshots += 1
            return
        sio.updates.append((int(data.get("seq", -1)), int(data.get("iteration", -1)), data.get("phase", ""), now))

    def on_disconnect(*_: Any) -> None:
        if not sio.ending:
            sio.disconnects += 1
            sio.done.set()

    def on_complete(_: Any) -> None:
        sio.complete.set()
        sio.done.set()

    client.on("training_update", on_update)
    client.on("training_complete", on_complete)
    client.on("disconnect", on_disconnect)
    await client.connect(web, transports=["websocket"], wait_timeout=30)
    answer = await client.call("subscribe_training", {}, timeout=30)
    if not answer.get("success"):
        sio.errors.append(f"subscribe failed: {answer}")


@dataclass
class Poller:
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)


async def run_poller(session: aiohttp.ClientSession, url: str, interval: float, stop: asyncio.Event,
                     stats: Poller, offset: float) -> None:
    await asyncio.sleep(offset)  # spread the polls over the interval
    while not stop.is_set():
        started = time.monotonic()
        stats.requests += 1
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as response:
                body = await response.json()
                stats.statuses[response.status] += 1
                if response.status != 200 or "is_training" not in body:
                    stats.errors[f"HTTP {response.status}: {str(body)[:200]}"] += 1
        except Exception as exc:  # every failure is counted, none ends the poller
            stats.errors[f"{type(exc).__name__}: {exc}"[:200]] += 1
        stats.latencies.append(time.monotonic() - started)
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, interval - (time.monotonic() - started)))
        except TimeoutError:
            pass


async def follow_bus(seen: dict[int, float], iterations: list[int], live: asyncio.Event) -> None:
    import zmq.asyncio

    from forgellm.bus import AsyncSubscriber
    from forgellm.config import bus_address, load_settings

    ctx = zmq.asyncio.Context()
    subscriber = AsyncSubscriber(ctx, bus_address(load_settings(), "events_out"), ("training.", "service.heartbeat"))
    try:
        while True:
            record = await subscriber.recv()
            if record.topic == "service.heartbeat":
                live.set()
                continue
            if record.topic == UPDATE_TOPIC and record.header.source == "trainer-worker":
                seen[record.header.seq] = time.time()
                if record.body.phase == "training":
                    iterations.append(record.body.iteration)
    finally:
        subscriber.close()
        ctx.destroy(linger=0)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    bus_seen: dict[int, float] = {}
    bus_iterations: list[int] = []
    bus_live = asyncio.Event()
    bus_task = asyncio.ensure_future(follow_bus(bus_seen, bus_iterations, bus_live))
    await asyncio.wait_for(bus_live.wait(), 30)

    clients = [SioClient(i) for i in range(args.sio)]
    for start in range(0, len(clients), 20):  # connect in batches, not 200 handshakes at once
        await asyncio.gather(*(run_sio(args.web, c) for c in clients[start:start + 20]))

    stop = asyncio.Event()
    poll = Poller()
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    url = args.web + "/api/training/status"
    spread = args.poll_s / max(args.http, 1)
    pollers = [asyncio.ensure_future(run_poller(session, url, args.poll_s, stop, poll, spread * i))
               for i in range(args.http)]
    started = time.monotonic()
    print("ready", flush=True)

    try:
        await asyncio.wait_for(asyncio.gather(*(c.done.wait() for c in clients)), args.deadline_s)
        timed_out = False
    except TimeoutError:
        timed_out = True
    await asyncio.sleep(0.5)  # a last poll or two after the end
    stop.set()
    await asyncio.gather(*pollers)
    await session.close()
    for c in clients:
        c.ending = True
        await c.client.disconnect()
    bus_task.cancel()

    summaries = [c.summary(bus_seen) for c in clients]
    all_latencies = [pair for s in summaries for pair in s.pop("latencies")]
    by_second: dict[int, list[float]] = {}
    for published, latency in all_latencies:
        by_second.setdefault(int(published), []).append(latency)
    report = {
        "seconds": round(time.monotonic() - started, 1), "timed_out": timed_out,
        "bus": {"updates": len(bus_seen), "iterations": bus_iterations, "iterations_digest": digest(bus_iterations),
                "first_seq": min(bus_seen, default=None), "last_seq": max(bus_seen, default=None)},
        "sio": summaries, "sio_latency_s": percentiles([x for _, x in all_latencies]),
        # per wall-clock second the events left the bus: [n, p99, max] over every client here
        "sio_latency_by_second": {str(sec): [len(v), percentiles(v)["p99"], round(max(v), 4)]
                                  for sec, v in sorted(by_second.items())},
        "http": {"clients": args.http, "requests": poll.requests,
                 "statuses": {str(k): v for k, v in poll.statuses.items()}, "errors": dict(poll.errors),
                 "latency_s": percentiles(poll.latencies)},
    }
    return report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("web")
    parser.add_argument("--http", type=int, default=0)
    parser.add_argument("--sio", type=int, default=0)
    parser.add_argument("--poll-s", type=float, default=1.0)
    parser.add_argument("--deadline-s", type=float, default=600.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    Path(args.out).write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
