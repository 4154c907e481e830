# ruff: noqa  -- scratch measurement script, kept verbatim as run for bench/RESULTS.md
"""Scratch A/B: the p50 floor of a ROUTER server (sync loop, asyncio reader callback inline, with a task
per request) answering our blocking and asyncio clients with our codec (ipc). Run: .venv/bin/python bench/rpc_floor.py"""
import asyncio
import statistics
import subprocess
import sys
import time

import zmq

from forgellm.bus import AsyncRpcClient, RpcClient, RpcServer
from forgellm.bus.codec import decode, encode, new_id
from forgellm.bus.sockio import FD, MORE_NOBLOCK, NOBLOCK, recv_frames
from forgellm.schemas import Envelope, PingReply, PingRequest

ADDR = "ipc:///tmp/fbench-floor.sock"

def reply_payload(header):
    return encode(Envelope(msg_id=new_id(), reply_to=header.msg_id, source="s"), PingReply(service="s", pid=1, uptime_s=0.0, version="x"))

def sync_router_loop(ctx):
    s = ctx.socket(zmq.ROUTER); s.bind(ADDR)
    print("ready", flush=True)
    while True:
        ident, payload = s.recv_multipart()
        h, b = decode(payload)
        s.send(ident, MORE_NOBLOCK); s.send(reply_payload(h), NOBLOCK)

def server(kind):
    ctx = zmq.Context()
    if kind == "sync":
        sync_router_loop(ctx)
    if kind == "thread":  # a sync ROUTER loop in a thread beside an idle asyncio loop (a service's shape)
        import threading
        threading.Thread(target=sync_router_loop, args=(ctx,), daemon=True).start()
        async def idle():
            while True: await asyncio.sleep(1)
        asyncio.run(idle())
    async def main():
        if kind == "rpcserver":
            rpc = RpcServer(ctx, ADDR, "s")
            async def handler(h, b): return PingReply(service="s", pid=1, uptime_s=0.0, version="x")
            print("ready", flush=True)
            await rpc.serve(handler, asyncio.Event())
        s = ctx.socket(zmq.ROUTER); s.bind(ADDR)
        loop = asyncio.get_running_loop()
        async def run(ident, h):
            s.send(ident, MORE_NOBLOCK); s.send(reply_payload(h), NOBLOCK)
        def drain():
            while True:
                try: ident, payload = recv_frames(s)
                except zmq.Again: return
                h, b = decode(payload)
                if kind == "aio_inline":
                    s.send(ident, MORE_NOBLOCK); s.send(reply_payload(h), NOBLOCK)
                else:
                    loop.create_task(run(ident, h))
        loop.add_reader(s.get(FD), drain)
        print("ready", flush=True)
        await asyncio.Event().wait()
    asyncio.run(main())

def client(kind, n=10000):
    if kind == "block":
        c = RpcClient(ADDR, "s")
        for _ in range(500): c.request(PingRequest())
        xs=[]
        for _ in range(n):
            t0=time.perf_counter_ns(); c.request(PingRequest()); xs.append(time.perf_counter_ns()-t0)
        return statistics.median(xs)/1000
    async def main():
        ctx = zmq.Context()
        c = AsyncRpcClient(ctx, ADDR, "s")
        for _ in range(500): await c.request(PingRequest())
        xs=[]
        for _ in range(n):
            t0=time.perf_counter_ns(); await c.request(PingRequest()); xs.append(time.perf_counter_ns()-t0)
        return statistics.median(xs)/1000
    return asyncio.run(main())

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "server": server(sys.argv[2]); sys.exit()
    for sk in sys.argv[1:] or ("sync", "thread", "aio_inline", "aio_task"):
        p = subprocess.Popen([sys.executable, __file__, "server", sk], stdout=subprocess.PIPE, text=True)
        p.stdout.readline()
        r = {ck: round(client(ck), 1) for ck in ("block", "async")}
        print(sk, r, flush=True)
        p.kill(); p.wait()
