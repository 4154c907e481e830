"""Bus benchmarks: ours side by side with bare pyzmq, in the same run.

1. RPC round trip (p50/p99), ipc and tcp over loopback, every side in its own process:
   bare   pyzmq REQ -> REP, one msgspec-msgpack frame each way
   ours   ``AsyncRpcClient`` / blocking ``RpcClient`` -> a real service process
          (``forgellm service trainer``; ``--server minimal`` uses a bare ``Service`` subclass)
2. Events/s, ~150-byte events (Heartbeat: topic frame + [header, body] payload frame), publisher ->
   subscriber process:
   bare PUB -> SUB direct, bare PUB -> Broker -> SUB, ours ``EventPublisher`` -> ``Broker`` ->
   ``AsyncSubscriber``, and ours -> ``Broker`` -> a sync SUB running the same decode as
   ``AsyncSubscriber.recv`` (to isolate the asyncio cost). Delivered vs sent is counted.
3. Codec only (in-process): our header+body msgpack vs stdlib json vs msgspec json.

    .venv/bin/python bench/bus.py               # 20k RPCs per case, 1M events per case
    .venv/bin/python bench/bus.py --quick       # 2k RPCs, 100k events
    .venv/bin/python bench/bus.py --only rpc --rpcs 50000 --transports ipc

Child processes are this same file run with ``--role``; they talk to the parent by one JSON
line on stdout. ``time.perf_counter_ns`` is CLOCK_MONOTONIC on Linux, so stamps taken in
different processes are comparable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
NS = 1_000_000_000
MEASURED_TOPIC = "service.heartbeat"  # TOPICS[Heartbeat]


# --------------------------------------------------------------------------------------------
# helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_block(n: int) -> int:
    """A base port with ``n`` free consecutive ports (our tcp bus needs base..base+5)."""
    for _ in range(200):
        base = free_port()
        if base + n > 65000:
            continue
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                s.bind(("127.0.0.1", base + i))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    s = sorted(samples_ns)
    n = len(s)

    def pct(p: float) -> float:
        return s[min(n - 1, int(p * n))] / 1000.0

    return {"n": n, "p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "p999": pct(0.999),
            "mean": statistics.fmean(s) / 1000.0, "max": s[-1] / 1000.0}


def spawn_role(role: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HERE), "--role", role, *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env or os.environ.copy(),
    )


def read_json_line(proc: subprocess.Popen, timeout: float = 120.0) -> dict:
    """The first stdout line of ``proc`` that is JSON (blocking read; the roles print promptly)."""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"child {proc.args[3:]} exited ({proc.wait()}) without a result")
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise TimeoutError(proc.args)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def wait_line(expected: str) -> None:
    """Block until the parent writes ``expected`` on our stdin."""
    for line in sys.stdin:
        if line.strip() == expected:
            return


# --------------------------------------------------------------------------------------------
# bare payloads: the same message content as PingRequest / PingReply, one frame, no envelope


class BarePing(msgspec.Struct, tag=True, kw_only=True):
    msg_id: str


class BarePong(msgspec.Struct, tag=True, kw_only=True):
    reply_to: str
    service: str
    pid: int
    uptime_s: float
    version: str


# --------------------------------------------------------------------------------------------
# roles (child processes)


def role_bare_rep(address: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.bind(address)
    enc = msgspec.msgpack.Encoder()
    dec = msgspec.msgpack.Decoder(BarePing)
    pid = os.getpid()
    started = time.monotonic()
    emit({"ready": True})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            ping = dec.decode(sock.recv())
            sock.send(enc.encode(BarePong(reply_to=ping.msg_id, service="bare", pid=pid,
                                          uptime_s=time.monotonic() - started, version="0")))
    finally:
        sock.close(0)
        ctx.term()


def role_minimal_service(name: str) -> None:
    """A Service subclass with nothing but the common handlers (ping, status)."""
    from forgellm.config import load_settings
    from forgellm.logs import configure_logging
    from forgellm.services.base import Service

    settings = load_settings()
    configure_logging(name, settings.logging.level, settings.logging.format)

    class Minimal(Service):
        pass

    Minimal.name = name
    sys.exit(asyncio.run(Minimal(settings).run()))


def role_broker(events_in: str, events_out: str, hwm: str) -> None:
    from forgellm.bus.broker import Broker

    broker = Broker(events_in, events_out, hwm=int(hwm))
    broker.start()
    emit({"ready": True})
    done = {"stop": False}
    signal.signal(signal.SIGTERM, lambda *_: done.update(stop=True))
    while not done["stop"]:
        time.sleep(0.05)
    broker.close()


def _sample_event():
    from forgellm.schemas import Heartbeat

    # ~150 bytes on the wire with topic and header (the codec table prints the exact size)
    return Heartbeat(service="trainer", state="idle", pid=12345, uptime_s=12.5)


def role_publisher(kind: str, address: str, count: str, hwm: str) -> None:
    """Warm up (an event every 10 ms) until told 'go', then publish ``count`` as fast as we can."""
    count_n, hwm_n = int(count), int(hwm)
    if kind == "ours":
        from forgellm.bus import EventPublisher
        from forgellm.schemas import ServiceReady

        pub = EventPublisher(address, "bench", hwm=hwm_n)
        warm = ServiceReady(service="bench", pid=os.getpid(), address="warmup")
        event = _sample_event()

        def send_warm() -> None:
            pub.publish(warm)

        def send_n(n: int) -> None:
            publish = pub.publish
            for _ in range(n):
                publish(event)
    else:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.SNDHWM, hwm_n)
        sock.connect(address)
        from forgellm.bus.codec import encode, new_id
        from forgellm.bus.events import event_frame
        from forgellm.schemas import Envelope

        header = Envelope(msg_id=new_id(), source="bench", instance=new_id(), seq=1)
        payload = encode(header, _sample_event())
        frames = [MEASURED_TOPIC.encode(), payload]  # 2 frames: topic, payload
        warm_frames = [b"service.ready", b""]
        if kind == "bare1":  # our layout: the same bytes in one frame, topic \0 payload
            frames = [event_frame(MEASURED_TOPIC, payload)]
            warm_frames = [b"service.ready\0"]

        def send_warm() -> None:
            sock.send_multipart(warm_frames)

        noblock, more_noblock = int(zmq.NOBLOCK), int(zmq.SNDMORE | zmq.NOBLOCK)
        if kind == "bare1":
            def send_n(n: int) -> None:
                send, frame = sock.send, frames[0]
                for _ in range(n):
                    send(frame, noblock)
        else:  # the fastest pyzmq way to send 2 frames: two send() calls with int flags
            def send_n(n: int) -> None:
                send, topic, payload = sock.send, frames[0], frames[1]
                for _ in range(n):
                    send(topic, more_noblock)
                    send(payload, noblock)

    import threading

    go = threading.Event()
    threading.Thread(target=lambda: (wait_line("go"), go.set()), daemon=True).start()
    while not go.is_set():
        send_warm()
        time.sleep(0.01)
    t0 = time.perf_counter_ns()
    send_n(count_n)
    t1 = time.perf_counter_ns()
    emit({"sent": count_n, "t_start": t0, "t_end": t1})
    wait_line("exit")
    if kind == "ours":
        pub.close()
    else:
        sock.close(linger=0)
        ctx.term()


def role_subscriber(kind: str, address: str, idle_s: str, expected: str, hwm: str) -> None:
    """Count measured events until ``expected`` arrived or nothing came for ``idle_s``.

    ``bare1``/``bare``: sync SUB, 1 or 2 frames per event, no decode. ``ours``: AsyncSubscriber.
    ``oursync``: sync SUB with the same per-event work as AsyncSubscriber.recv (split the topic,
    decode [header, body], gap tracking).
    """
    idle_ns = int(float(idle_s) * NS)
    expected_n, hwm_n = int(expected), int(hwm)
    topic_b = MEASURED_TOPIC.encode()
    result: dict = {}
    if kind in ("bare1", "oursync"):
        from forgellm.bus.codec import decode as decode_payload

        decode = kind == "oursync"
        last_seq: dict = {}
        missed = 0
        ctx = zmq.Context()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, hwm_n)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        if os.environ.get("FBENCH_SUB_BIND"):
            sock.bind(address)
        else:
            sock.connect(address)
        emit({"ready": True})
        sock.recv()
        emit({"warm": True})
        received = first = last = 0
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        recv, idle_ms = sock.recv, int(idle_ns / 1e6)
        while received < expected_n:
            try:
                frame = recv(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                if not poller.poll(idle_ms):
                    break
                continue
            if not frame.startswith(topic_b):
                continue
            if decode:
                cut = frame.find(b"\0")
                topic = frame[:cut].decode()
                header, _ = decode_payload(memoryview(frame)[cut + 1:])
                key = (header.source, header.instance, topic)
                prev = last_seq.get(key)
                gap = header.seq - prev - 1 if prev is not None and header.seq > prev else 0
                last_seq[key] = header.seq
                missed += gap
            received += 1
            last = time.perf_counter_ns()
            if received == 1:
                first = last
        result = {"received": received, "t_first": first, "t_last": last, "missed_by_seq": missed}
        sock.close(0)
        ctx.term()
    elif kind == "bare":
        ctx = zmq.Context()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, hwm_n)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        if os.environ.get("FBENCH_SUB_BIND"):
            sock.bind(address)  # the direct case: the publisher connects to us
        else:
            sock.connect(address)
        emit({"ready": True})
        # warm-up: wait for the first warm event, tell the parent
        sock.recv_multipart()
        emit({"warm": True})
        received = 0
        first = last = 0
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        recv, get = sock.recv, sock.get
        noblock, rcvmore = int(zmq.NOBLOCK), int(zmq.RCVMORE)
        idle_ms = int(idle_ns / 1e6)
        while received < expected_n:
            try:  # the fastest pyzmq way to read a multipart message: recv() + RCVMORE, int flags
                frames = [recv(noblock)]
                while get(rcvmore):
                    frames.append(recv(noblock))
            except zmq.Again:
                if not poller.poll(idle_ms):
                    break
                continue
            if frames[0] != topic_b:
                continue
            received += 1
            last = time.perf_counter_ns()
            if received == 1:
                first = last
        result = {"received": received, "t_first": first, "t_last": last, "missed_by_seq": 0}
        sock.close(0)
        ctx.term()
    else:

        from forgellm.bus import AsyncSubscriber

        async def main() -> dict:
            ctx = zmq.asyncio.Context()
            sub = AsyncSubscriber(ctx, address, ("",), hwm=hwm_n)
            emit({"ready": True})
            await sub.recv()
            emit({"warm": True})
            state = {"received": 0, "first": 0, "last": time.perf_counter_ns()}

            async def consume() -> None:
                recv = sub.recv
                while state["received"] < expected_n:
                    record = await recv()
                    if record.topic != MEASURED_TOPIC:
                        continue
                    state["received"] += 1
                    now = time.perf_counter_ns()
                    state["last"] = now
                    if state["received"] == 1:
                        state["first"] = now

            task = asyncio.ensure_future(consume())
            while not task.done():
                await asyncio.sleep(0.1)
                started = state["received"] > 0
                if started and time.perf_counter_ns() - state["last"] > idle_ns:
                    task.cancel()
                    break
            try:
                await task
            except asyncio.CancelledError:
                pass
            out = {"received": state["received"], "t_first": state["first"], "t_last": state["last"],
                   "missed_by_seq": sub.missed}
            sub.close()
            ctx.destroy(linger=0)
            return out

        result = asyncio.run(main())
    emit(result)


# --------------------------------------------------------------------------------------------
# RPC benchmark (parent side)


def rpc_env(home: Path, transport: str, base_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGELLM_")}
    env.update({
        "FORGELLM_HOME": str(home),
        "FORGELLM_BUS_TRANSPORT": transport,
        "FORGELLM_BUS_TCP_BASE_PORT": str(base_port),
        "FORGELLM_LOGGING_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def bench_bare_rpc(address: str, n: int, warmup: int) -> dict:
    server = spawn_role("bare-rep", address)
    try:
        read_json_line(server)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.REQ)
        sock.connect(address)
        enc = msgspec.msgpack.Encoder()
        dec = msgspec.msgpack.Decoder(BarePong)
        from forgellm.bus.codec import new_id

        samples = []
        clock = time.perf_counter_ns
        for i in range(warmup + n):
            t0 = clock()
            msg_id = new_id()
            sock.send(enc.encode(BarePing(msg_id=msg_id)))
            reply = dec.decode(sock.recv())
            t1 = clock()
            assert reply.reply_to == msg_id
            if i >= warmup:
                samples.append(t1 - t0)
        sock.close(0)
        ctx.term()
        return percentiles(samples)
    finally:
        stop(server)


def start_service(server_kind: str, env: dict[str, str], address: str) -> subprocess.Popen:
    if server_kind == "trainer":
        proc = subprocess.Popen([sys.executable, "-m", "forgellm", "service", "trainer"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        proc = subprocess.Popen([sys.executable, str(HERE), "--role", "minimal-service", "trainer"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Ready = answers a ping.
    from forgellm.bus import RpcClient
    from forgellm.bus.errors import BusError
    from forgellm.schemas import PingRequest

    deadline = time.monotonic() + 60
    client = RpcClient(address, "trainer", timeout_s=0.5, read_retries=0)
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"service exited with {proc.returncode}")
            try:
                client.request(PingRequest())
                return proc
            except BusError:
                time.sleep(0.1)
    finally:
        client.close()
    stop(proc)
    raise TimeoutError("service did not answer a ping in 60 s")


def bench_ours_async(address: str, n: int, warmup: int) -> dict:

    from forgellm.bus import AsyncRpcClient
    from forgellm.schemas import PingReply, PingRequest

    async def main() -> list[int]:
        ctx = zmq.asyncio.Context()
        client = AsyncRpcClient(ctx, address, "trainer", source="bench")
        request = PingRequest()
        samples = []
        clock = time.perf_counter_ns
        for i in range(warmup + n):
            t0 = clock()
            reply = await client.request(request)
            t1 = clock()
            assert isinstance(reply, PingReply)
            if i >= warmup:
                samples.append(t1 - t0)
        client.close()
        ctx.destroy(linger=0)
        return samples

    return percentiles(asyncio.run(main()))


def bench_ours_async_concurrent(address: str, n: int, inflight: int) -> dict:
    """Throughput with ``inflight`` requests outstanding (the gateway's pattern under load)."""

    from forgellm.bus import AsyncRpcClient
    from forgellm.schemas import PingRequest

    async def main() -> dict:
        ctx = zmq.asyncio.Context()
        client = AsyncRpcClient(ctx, address, "trainer", source="bench")
        request = PingRequest()
        samples: list[int] = []
        per = n // inflight

        async def worker() -> None:
            clock = time.perf_counter_ns
            for _ in range(per):
                t0 = clock()
                await client.request(request)
                samples.append(clock() - t0)

        await asyncio.gather(*(client.request(request) for _ in range(inflight)))  # warm
        t0 = time.perf_counter_ns()
        await asyncio.gather(*(worker() for _ in range(inflight)))
        elapsed = time.perf_counter_ns() - t0
        client.close()
        ctx.destroy(linger=0)
        out = percentiles(samples)
        out["per_s"] = len(samples) * NS / elapsed
        return out

    return asyncio.run(main())


def bench_bare_dealer_concurrent(address: str, n: int, inflight: int) -> dict:
    """Bare counterpart of the concurrent case: asyncio DEALER -> a bare ROUTER process is not
    available with REQ/REP, so this pipelines ``inflight`` REQ sockets from one asyncio loop."""


    server = spawn_role("bare-rep", address)
    try:
        read_json_line(server)
        enc = msgspec.msgpack.Encoder()
        dec = msgspec.msgpack.Decoder(BarePong)
        from forgellm.bus.codec import new_id

        async def main() -> dict:
            ctx = zmq.asyncio.Context()
            samples: list[int] = []
            per = n // inflight

            async def worker() -> None:
                sock = ctx.socket(zmq.REQ)
                sock.connect(address)
                clock = time.perf_counter_ns
                await sock.send(enc.encode(BarePing(msg_id="warm")))
                await sock.recv()
                await barrier.wait()
                for _ in range(per):
                    t0 = clock()
                    await sock.send(enc.encode(BarePing(msg_id=new_id())))
                    dec.decode(await sock.recv())
                    samples.append(clock() - t0)
                sock.close(0)

            barrier = asyncio.Barrier(inflight + 1)
            tasks = [asyncio.ensure_future(worker()) for _ in range(inflight)]
            await barrier.wait()
            t0 = time.perf_counter_ns()
            await asyncio.gather(*tasks)
            elapsed = time.perf_counter_ns() - t0
            ctx.destroy(linger=0)
            out = percentiles(samples)
            out["per_s"] = len(samples) * NS / elapsed
            return out

        return asyncio.run(main())
    finally:
        stop(server)


def bench_ours_blocking(address: str, n: int, warmup: int) -> dict:
    from forgellm.bus import RpcClient
    from forgellm.schemas import PingReply, PingRequest

    client = RpcClient(address, "trainer", source="bench")
    request = PingRequest()
    samples = []
    clock = time.perf_counter_ns
    for i in range(warmup + n):
        t0 = clock()
        reply = client.request(request)
        t1 = clock()
        assert isinstance(reply, PingReply)
        if i >= warmup:
            samples.append(t1 - t0)
    client.close()
    return percentiles(samples)


def run_rpc(args: argparse.Namespace) -> list[dict]:
    from forgellm.config import bus_address, load_settings

    rows = []
    for transport in args.transports:
        home = Path(tempfile.mkdtemp(prefix="fbench-rpc-"))
        try:
            base = free_port_block(6)
            env = rpc_env(home, transport, base)
            settings = load_settings(env=env)
            ours_addr = bus_address(settings, "trainer")
            bare_addr = (f"ipc://{settings.run_dir}/bare-rep.sock" if transport == "ipc"
                         else f"tcp://127.0.0.1:{free_port()}")
            settings.run_dir.mkdir(parents=True, exist_ok=True)
            say(f"[rpc/{transport}] bare REQ/REP {args.rpcs} round trips ...")
            bare = bench_bare_rpc(bare_addr, args.rpcs, args.warmup)
            say(f"[rpc/{transport}] ours: starting {args.server} service process ...")
            proc = start_service(args.server, env, ours_addr)
            try:
                say(f"[rpc/{transport}] ours AsyncRpcClient {args.rpcs} round trips ...")
                ours_async = bench_ours_async(ours_addr, args.rpcs, args.warmup)
                say(f"[rpc/{transport}] ours RpcClient (blocking) {args.rpcs} round trips ...")
                ours_block = bench_ours_blocking(ours_addr, args.rpcs, args.warmup)
                conc = None
                if args.inflight:
                    say(f"[rpc/{transport}] ours AsyncRpcClient, {args.inflight} in flight ...")
                    conc = bench_ours_async_concurrent(ours_addr, args.rpcs, args.inflight)
            finally:
                code = stop(proc)
                if code != 0:
                    say(f"  (service exited with {code})")
            bare_conc = None
            if args.inflight:
                say(f"[rpc/{transport}] bare: {args.inflight} REQ sockets in flight ...")
                bare_conc = bench_bare_dealer_concurrent(bare_addr, args.rpcs, args.inflight)
            rows.append({"transport": transport, "bare": bare, "ours_async": ours_async,
                         "ours_blocking": ours_block, "ours_concurrent": conc, "bare_concurrent": bare_conc})
        finally:
            shutil.rmtree(home, ignore_errors=True)
    return rows


def print_rpc(rows: list[dict], inflight: int) -> None:
    print("\n## RPC round trip (PingRequest -> PingReply), µs; ratio = ours / bare")
    print(f"{'transport':<9} {'client':<34} {'p50':>8} {'p90':>8} {'p99':>8} {'p99.9':>8} "
          f"{'p50 x':>6} {'p99 x':>6}")
    for row in rows:
        bare = row["bare"]
        for label, key in (("bare REQ/REP (msgspec msgpack)", "bare"),
                           ("ours AsyncRpcClient -> service", "ours_async"),
                           ("ours RpcClient (blocking)", "ours_blocking")):
            r = row[key]
            print(f"{row['transport']:<9} {label:<34} {r['p50']:>8.1f} {r['p90']:>8.1f} {r['p99']:>8.1f} "
                  f"{r['p999']:>8.1f} {r['p50'] / bare['p50']:>6.2f} {r['p99'] / bare['p99']:>6.2f}")
    if inflight:
        print(f"\n## RPC throughput, {inflight} requests in flight from one asyncio loop")
        print(f"{'transport':<9} {'client':<34} {'req/s':>9} {'p50 µs':>8} {'p99 µs':>8} {'ratio':>6}")
        for row in rows:
            b, o = row["bare_concurrent"], row["ours_concurrent"]
            print(f"{row['transport']:<9} {'bare: N asyncio REQ sockets':<34} {b['per_s']:>9.0f} "
                  f"{b['p50']:>8.1f} {b['p99']:>8.1f} {1.0:>6.2f}")
            print(f"{row['transport']:<9} {'ours: one AsyncRpcClient':<34} {o['per_s']:>9.0f} "
                  f"{o['p50']:>8.1f} {o['p99']:>8.1f} {o['per_s'] / b['per_s']:>6.2f}")


# --------------------------------------------------------------------------------------------
# events benchmark (parent side)


def run_events_case(name: str, pub_kind: str, sub_kind: str, via_broker: bool, args, run_dir: Path) -> dict:
    procs: list[subprocess.Popen] = []
    try:
        if args.event_transport == "ipc":
            ev_in = f"ipc://{run_dir}/ev_in.sock"
            ev_out = f"ipc://{run_dir}/ev_out.sock"
        else:
            ev_in = f"tcp://127.0.0.1:{free_port()}"
            ev_out = f"tcp://127.0.0.1:{free_port()}"
        hwm = str(args.hwm)
        if via_broker:
            broker = spawn_role("broker", ev_in, ev_out, hwm)
            procs.append(broker)
            read_json_line(broker)
            pub_addr, sub_addr = ev_in, ev_out
        else:
            # direct: the subscriber binds, the publisher connects (like the broker's XSUB side)
            pub_addr = sub_addr = ev_in
        sub = spawn_role("subscriber", sub_kind, sub_addr if via_broker else "bind:" + sub_addr,
                         str(args.idle_s), str(args.events), hwm)
        procs.append(sub)
        read_json_line(sub)  # ready
        pub = spawn_role("publisher", pub_kind, pub_addr, str(args.events), hwm)
        procs.append(pub)
        read_json_line(sub)  # got a warm-up event: the subscription reached the publisher
        assert pub.stdin is not None
        pub.stdin.write("go\n")
        pub.stdin.flush()
        sent = read_json_line(pub)
        got = read_json_line(sub, timeout=600)
        pub.stdin.write("exit\n")
        pub.stdin.flush()
        pub.wait(10)
        elapsed_sub = (got["t_last"] - got["t_first"]) / NS if got["received"] > 1 else float("nan")
        elapsed_e2e = (got["t_last"] - sent["t_start"]) / NS if got["received"] else float("nan")
        elapsed_pub = (sent["t_end"] - sent["t_start"]) / NS
        return {
            "name": name, "sent": sent["sent"], "received": got["received"],
            "lost": sent["sent"] - got["received"], "missed_by_seq": got["missed_by_seq"],
            "pub_per_s": sent["sent"] / elapsed_pub,
            "recv_per_s": got["received"] / elapsed_sub if elapsed_sub == elapsed_sub else 0.0,
            "e2e_per_s": got["received"] / elapsed_e2e if elapsed_e2e == elapsed_e2e else 0.0,
        }
    finally:
        for proc in reversed(procs):
            stop(proc)


def run_events(args: argparse.Namespace) -> list[dict]:
    run_dir = Path(tempfile.mkdtemp(prefix="fbench-ev-"))
    cases = [
        ("bare PUB -> SUB (direct, 1 frame = our layout)", "bare1", "bare1", False),
        ("bare PUB -> Broker -> SUB (1 frame = our layout)", "bare1", "bare1", True),
        ("bare PUB -> SUB (direct, 2 frames: topic, payload)", "bare", "bare", False),
        ("bare PUB -> Broker -> SUB (2 frames: topic, payload)", "bare", "bare", True),
        ("ours EventPublisher -> Broker -> AsyncSubscriber", "ours", "ours", True),
        ("ours EventPublisher -> Broker -> sync SUB + our decode", "ours", "oursync", True),
    ]
    rows = []
    try:
        for name, pk, sk, via in cases:
            say(f"[events] {name}: {args.events} events ...")
            rows.append(run_events_case(name, pk, sk, via, args, run_dir))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return rows


def print_events(rows: list[dict], args) -> None:
    base = rows[0]["recv_per_s"]
    print(f"\n## Events/s, {args.events} events of ~150 B, {args.event_transport}, HWM {args.hwm}; "
          "ratio = recv/s / bare direct")
    print(f"{'case':<55} {'pub/s':>9} {'recv/s':>9} {'e2e/s':>9} {'sent':>8} {'recvd':>8} "
          f"{'lost':>7} {'gaps':>7} {'ratio':>6}")
    for r in rows:
        print(f"{r['name']:<55} {r['pub_per_s']:>9.0f} {r['recv_per_s']:>9.0f} {r['e2e_per_s']:>9.0f} "
              f"{r['sent']:>8} {r['received']:>8} {r['lost']:>7} {r['missed_by_seq']:>7} "
              f"{r['recv_per_s'] / base:>6.2f}")
    print("pub/s: publisher's send loop; recv/s: subscriber, first to last event; e2e/s: publisher's first "
          "send to subscriber's last receive. lost = sent - received (HWM drops); gaps = losses the "
          "subscriber detected from seq numbers (ours; exact: the only loss counter there is).")


# --------------------------------------------------------------------------------------------
# codec benchmark (in process)


def run_codec(args: argparse.Namespace) -> list[dict]:
    from forgellm.bus import EventPublisher
    from forgellm.bus.codec import decode, encode, new_id
    from forgellm.schemas import Envelope

    event = _sample_event()
    n = args.codec_n
    clock = time.perf_counter_ns
    rows = []

    def timeit(label: str, fn, size: int) -> None:
        for _ in range(min(n, 10_000)):
            fn()
        t0 = clock()
        for _ in range(n):
            fn()
        dt = clock() - t0
        rows.append({"name": label, "per_s": n * NS / dt, "ns": dt / n, "bytes": size})

    header = Envelope(msg_id=new_id(), source="trainer", instance=new_id(), ts=time.time(), seq=12345)
    payload = encode(header, event)
    size = len(payload) + len(MEASURED_TOPIC) + 1  # topic \0 payload

    def ours_roundtrip() -> None:
        decode(encode(header, event))

    def ours_decode_only() -> None:
        decode(payload)

    def ours_full_publish_side() -> None:  # what EventPublisher.publish builds per event
        h = Envelope(msg_id=new_id(), correlation_id="", source="trainer", instance="x" * 16,
                     ts=time.time(), seq=1)
        encode(h, event)

    as_dict = {"header": msgspec.to_builtins(header), "body": msgspec.to_builtins(event)}
    js = json.dumps(as_dict).encode()

    def stdlib_json_roundtrip() -> None:
        d = {"header": msgspec.structs.asdict(header), "body": msgspec.to_builtins(event)}
        json.loads(json.dumps(d).encode())

    def stdlib_json_plain() -> None:  # fairest to json: a prepared dict, no struct conversion
        json.loads(json.dumps(as_dict))

    jenc = msgspec.json.Encoder()
    jdec_h = msgspec.json.Decoder(Envelope)
    jdec_b = msgspec.json.Decoder(type(event))

    def msgspec_json_roundtrip() -> None:
        jdec_h.decode(jenc.encode(header))
        jdec_b.decode(jenc.encode(event))

    timeit("ours msgpack encode+decode ([header, body], 1 frame)", ours_roundtrip, size)
    timeit("ours msgpack decode only (subscriber side)", ours_decode_only, size)
    timeit("ours publisher side: new Envelope + new_id + encode", ours_full_publish_side, size)
    timeit("msgspec json encode+decode (typed)", msgspec_json_roundtrip,
           len(jenc.encode(header)) + len(jenc.encode(event)))
    timeit("stdlib json dumps+loads (prepared dict)", stdlib_json_plain, len(js))
    timeit("stdlib json dumps+loads (struct -> dict each time)", stdlib_json_roundtrip, len(js))
    # EventPublisher.publish with no subscriber: Python cost of one publish() call
    ctx = zmq.Context()
    pub = EventPublisher(f"tcp://127.0.0.1:{free_port()}", "trainer", ctx=ctx)
    timeit("EventPublisher.publish() (no peer: all Python + zmq send)", lambda: pub.publish(event), size)
    pub.close()
    # pyzmq's send_multipart vs two send() calls with a plain int flag (no peer, so no I/O)
    sock = ctx.socket(zmq.PUB)
    sock.bind(f"tcp://127.0.0.1:{free_port()}")
    wire = [MEASURED_TOPIC.encode(), payload]
    more = int(zmq.SNDMORE)

    def two_sends() -> None:
        send = sock.send
        send(wire[0], more)
        send(wire[1])

    timeit("pyzmq send_multipart(2 frames), no peer", lambda: sock.send_multipart(wire), size)
    timeit("2 x send() with int(zmq.SNDMORE), no peer", two_sends, size)
    one = MEASURED_TOPIC.encode() + b"\0" + payload
    noblock = int(zmq.NOBLOCK)
    timeit("1 x send() of topic\\0payload (our layout), no peer", lambda: sock.send(one, noblock), size)
    sock.close(0)
    ctx.term()
    return rows


def print_codec(rows: list[dict]) -> None:
    base = rows[0]["per_s"]
    print("\n## Codec, the same Heartbeat event + header, in process (one core); ratio = vs ours")
    print(f"{'operation':<58} {'ops/s':>10} {'ns/op':>8} {'bytes':>6} {'ratio':>6}")
    for r in rows:
        print(f"{r['name']:<58} {r['per_s']:>10.0f} {r['ns']:>8.0f} {r['bytes']:>6} {r['per_s'] / base:>6.2f}")


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("role_args", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="short run: 2k RPCs, 100k events")
    parser.add_argument("--only", choices=("rpc", "events", "codec"), action="append",
                        help="run only these parts (repeatable)")
    parser.add_argument("--rpcs", type=int, default=20_000, help="round trips per RPC case")
    parser.add_argument("--warmup", type=int, default=1_000, help="warm-up round trips per case")
    parser.add_argument("--inflight", type=int, default=16, help="concurrent RPC case (0 = skip)")
    parser.add_argument("--transports", nargs="+", default=["ipc", "tcp"], choices=("ipc", "tcp"))
    parser.add_argument("--server", choices=("trainer", "minimal"), default="trainer",
                        help="our RPC server: 'forgellm service trainer' or a bare Service subclass")
    parser.add_argument("--events", type=int, default=1_000_000, help="events per events case")
    parser.add_argument("--event-transport", choices=("ipc", "tcp"), default="ipc")
    parser.add_argument("--hwm", type=int, default=100_000, help="HWM of every event socket (ours default)")
    parser.add_argument("--idle-s", type=float, default=2.0, help="subscriber gives up after this silence")
    parser.add_argument("--codec-n", type=int, default=200_000)
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()

    if args.role:
        roles = {"bare-rep": role_bare_rep, "minimal-service": role_minimal_service, "broker": role_broker,
                 "publisher": role_publisher, "subscriber": role_subscriber}
        role_args = list(args.role_args)
        if args.role == "subscriber" and role_args[1].startswith("bind:"):
            role_args[1] = role_args[1][5:]
            os.environ["FBENCH_SUB_BIND"] = "1"
        roles[args.role](*role_args)
        return

    if args.quick:
        args.rpcs, args.warmup, args.events, args.codec_n = 2_000, 200, 100_000, 50_000
    parts = args.only or ["rpc", "events", "codec"]
    print(f"# bench/bus.py  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  {platform.platform()}  "
          f"cpus={os.cpu_count()}  python {platform.python_version()}  pyzmq {zmq.__version__}  "
          f"libzmq {zmq.zmq_version()}  msgspec {msgspec.__version__}")
    out: dict = {}
    if "rpc" in parts:
        out["rpc"] = run_rpc(args)
        print_rpc(out["rpc"], args.inflight)
    if "events" in parts:
        out["events"] = run_events(args)
        print_events(out["events"], args)
    if "codec" in parts:
        out["codec"] = run_codec(args)
        print_codec(out["codec"])
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
