"""Service processes on the real bus: ping/status, heartbeats, bad bytes, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import functools
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from forgellm.bus import AsyncRpcClient, AsyncSubscriber, RpcClient, ServiceUnavailable
from forgellm.config import bus_address, load_settings
from forgellm.schemas import (
    Heartbeat,
    PingReply,
    PingRequest,
    ServiceStatusReply,
    ServiceStatusRequest,
    ServiceStopping,
    TrainingStatusReply,
    TrainingStatusRequest,
)
from tests.helpers.procs import isolated_env, start_process


def wait_for_ping(address: str, service: str, timeout: float = 20, answer_within: float = 1.0) -> PingReply:
    client = RpcClient(address, service, timeout_s=answer_within, read_retries=0)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                return client.request(PingRequest())
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        client.close()


@pytest.fixture
def bus_home(short_tmp):
    """A broker and a trainer, each a real process, in a private workspace."""
    procs = [start_process("broker", short_tmp), start_process("trainer", short_tmp)]
    settings = load_settings(env=isolated_env(short_tmp))
    wait_for_ping(bus_address(settings, "trainer"), "trainer")
    yield short_tmp, settings, procs
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.wait(10)


def test_ping_and_status_of_a_real_service(bus_home):
    _, settings, procs = bus_home
    client = RpcClient(bus_address(settings, "trainer"), "trainer")
    ping = client.request(PingRequest())
    assert ping.service == "trainer" and ping.pid == procs[1].pid and ping.uptime_s > 0
    status = client.request(ServiceStatusRequest())
    assert isinstance(status, ServiceStatusReply)
    assert status.state == "idle" and status.requests_served >= 1
    training = client.request(TrainingStatusRequest())
    assert isinstance(training, TrainingStatusReply) and training.is_training is False
    client.close()


async def test_heartbeats_every_second_and_stopping_on_sigterm(bus_home):
    _, settings, procs = bus_home
    ctx = zmq.asyncio.Context()
    subscriber = AsyncSubscriber(ctx, bus_address(settings, "events_out"), ("service.",))
    beats: list[float] = []
    while len(beats) < 3:
        record = await asyncio.wait_for(subscriber.recv(), 5)
        if isinstance(record.body, Heartbeat) and record.body.service == "trainer":
            assert record.body.pid == procs[1].pid and record.body.state == "idle"
            beats.append(record.header.ts)
    assert 0.5 < (beats[-1] - beats[0]) / 2 < 1.5
    procs[1].send_signal(signal.SIGTERM)
    while True:
        record = await asyncio.wait_for(subscriber.recv(), 5)
        if isinstance(record.body, ServiceStopping) and record.body.service == "trainer":
            break
    assert await asyncio.to_thread(procs[1].wait, 10) == 0
    subscriber.close()
    ctx.destroy(linger=0)


def test_garbage_to_a_real_service_is_dropped_and_it_keeps_answering(bus_home):
    home, settings, procs = bus_home
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.connect(bus_address(settings, "trainer"))
    for frames in ([b"x"], [b"\x93\x01", b"\xff" * 100], [b""] * 5, [b"\x00" * 1_000_000, b"y"],
                   [b"\x00" * (65 << 20)]):  # over the 64 MB cap: the peer is dropped, not buffered
        raw.send_multipart(frames)
    raw.close(linger=1000)
    client = RpcClient(bus_address(settings, "trainer"), "trainer")
    assert client.request(PingRequest()).pid == procs[1].pid
    client.close()
    assert procs[1].poll() is None
    assert "request_dropped" in (home / "trainer.log").read_text()


@pytest.mark.parametrize("flavour", ["blocking", "asyncio"])
async def test_sigterm_finishes_the_request_in_hand(short_tmp, flavour):
    settings = load_settings(env=isolated_env(short_tmp))
    helper = Path(__file__).parent / "helpers" / "slow_service.py"
    proc = await asyncio.to_thread(subprocess.Popen, [sys.executable, str(helper)], env=isolated_env(short_tmp))
    cleanup: list = []
    try:
        address = bus_address(settings, "publisher")
        if flavour == "blocking":
            client = RpcClient(address, "publisher", timeout_s=5, read_retries=0)
            call = functools.partial(asyncio.to_thread, client.request)
        else:
            ctx = zmq.asyncio.Context()
            cleanup.append(functools.partial(ctx.destroy, linger=0))
            client = AsyncRpcClient(ctx, address, "publisher", timeout_s=5, read_retries=0)
            call = client.request
        cleanup.insert(0, client.close)
        deadline = time.monotonic() + 30
        while True:  # until this very client is connected and answered (the ping takes 1 s)
            try:
                await call(PingRequest())
                break
            except ServiceUnavailable:
                assert time.monotonic() < deadline, "the slow service never answered"
        (short_tmp / "in_handler").unlink()
        pending = asyncio.ensure_future(call(PingRequest()))
        marker = short_tmp / "in_handler"
        deadline = time.monotonic() + 10
        while not marker.exists():  # the handler has started (and takes 1 s)
            assert time.monotonic() < deadline and not pending.done()
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        reply = await pending
        assert reply.version == "slow"
        assert await asyncio.to_thread(proc.wait, 10) == 0
    finally:
        for close in cleanup:
            close()
        if proc.poll() is None:
            proc.kill()
