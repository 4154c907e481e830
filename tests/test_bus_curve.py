"""A bus that spans hosts: ZeroMQ CURVE on every tcp socket, refused without it off loopback."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
import zmq
import zmq.asyncio

from forgellm.bus import AsyncRpcClient, AsyncSubscriber, EventPublisher, RpcServer, curve, encode
from forgellm.bus.broker import Broker
from forgellm.config import bus_address, load_settings
from forgellm.schemas import Envelope, Heartbeat, PingReply, PingRequest
from tests.helpers.procs import free_port, http, isolated_env, running_platform


@pytest.fixture
def keys(tmp_path):
    made = curve.create_keys(tmp_path / "curve")
    curve.configure(made)
    yield made
    curve.stop_authenticators()
    curve.configure(None)


def raw_dealer(ctx: zmq.Context, address: str, client_keys: tuple[bytes, bytes] | None,
               server_public: bytes | None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER, socket_class=zmq.Socket)
    sock.linger = 0
    if client_keys is not None:
        sock.curve_publickey, sock.curve_secretkey = client_keys
        sock.curve_serverkey = server_public
    sock.connect(address)
    return sock


async def test_rpc_and_events_over_curve_and_strangers_get_nothing(keys):
    ctx = zmq.asyncio.Context()
    rpc_address = f"tcp://127.0.0.1:{free_port()}"
    events_in, events_out = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    server = RpcServer(ctx, rpc_address, "svc")

    async def handler(header, request):
        return PingReply(service="svc", pid=1, uptime_s=0.0, version="curve")

    stop = asyncio.Event()
    serving = asyncio.ensure_future(server.serve(handler, stop))
    broker = Broker(events_in, events_out)
    broker.start()
    try:
        client = AsyncRpcClient(ctx, rpc_address, "svc", timeout_s=5)
        assert (await client.request(PingRequest())).version == "curve"  # with the platform's keys

        # A stranger without keys, and one with the server's public key but a key of its own
        # that is not authorized: neither handshake succeeds, so nothing is answered.
        payload = encode(Envelope(msg_id="x1"), PingRequest())
        stranger_keys = zmq.curve_keypair()
        for client_keys in (None, stranger_keys):
            sock = raw_dealer(ctx, rpc_address, client_keys, keys.server_public if client_keys else None)
            try:
                sock.send(payload, zmq.NOBLOCK)
            except zmq.Again:
                pass  # not even queued: the connection never completes
            assert not sock.poll(1500), "a peer without authorized keys was answered"
            sock.close()

        # Events through a CURVE broker reach a CURVE subscriber; a plain SUB sees none.
        subscriber = AsyncSubscriber(ctx, events_out, ("service.",))
        plain = ctx.socket(zmq.SUB, socket_class=zmq.Socket)
        plain.linger = 0
        plain.setsockopt(zmq.SUBSCRIBE, b"")
        plain.connect(events_out)
        publisher = EventPublisher(events_in, "svc", ctx=ctx)
        got = None
        deadline = time.monotonic() + 10
        while got is None:  # until the subscription has propagated through the broker
            publisher.publish(Heartbeat(service="svc", state="running", pid=1, uptime_s=0.0))
            try:
                got = await asyncio.wait_for(subscriber.recv(), 0.2)
            except TimeoutError:
                assert time.monotonic() < deadline, "no event through the CURVE broker"
        assert got.body.service == "svc"
        assert not plain.poll(500), "a plain subscriber read an event off a CURVE bus"
        plain.close()
        publisher.close()
        subscriber.close()
        client.close()
    finally:
        stop.set()
        await asyncio.wait_for(serving, 5)
        server.close()
        broker.close()
        curve.stop_authenticators()
        ctx.destroy(linger=0)


def test_a_platform_on_a_curve_tcp_bus_works_and_its_ports_refuse_strangers(tmp_path):
    home = tmp_path / "ws"
    home.mkdir()
    settings = {"FORGELLM_BUS_TRANSPORT": "tcp", "FORGELLM_BUS_TCP_BASE_PORT": str(free_port() + 20),
                "FORGELLM_BUS_CURVE": "true"}
    env = isolated_env(home, **settings)
    made = subprocess.run([sys.executable, "-m", "forgellm", "bus", "keys"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert made.returncode == 0 and "client.key" in made.stdout, made.stderr
    with running_platform(home, **settings) as p:
        code, body, _ = http("GET", p.web + "/api/training/status")
        assert code == 200 and body["is_training"] is False  # gateway -> trainer over CURVE
        resolved = load_settings(env=env)
        trainer = bus_address(resolved, "trainer")
        assert trainer.startswith("tcp://127.0.0.1:")
        ctx = zmq.Context()
        sock = raw_dealer(ctx, trainer, None, None)
        try:
            sock.send(encode(Envelope(msg_id="x2"), PingRequest()), zmq.NOBLOCK)
        except zmq.Again:
            pass
        assert not sock.poll(1500), "the trainer answered a peer without keys"
        sock.close()
        ctx.term()
        tail = subprocess.run([sys.executable, "-m", "forgellm", "bus", "tail", "--count", "1", "--topic",
                               "service.heartbeat"], env=env, capture_output=True, text=True, timeout=30)
        assert tail.returncode == 0 and "Heartbeat" in tail.stdout, tail.stderr


def test_a_public_bus_without_curve_is_refused(tmp_path):
    env = isolated_env(tmp_path, FORGELLM_BUS_TRANSPORT="tcp", FORGELLM_BUS_TCP_HOST="0.0.0.0")
    result = subprocess.run([sys.executable, "-m", "forgellm", "service", "trainer"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "CURVE" in result.stderr and "0.0.0.0" in result.stderr
    missing = isolated_env(tmp_path, FORGELLM_BUS_TRANSPORT="tcp", FORGELLM_BUS_CURVE="true",
                           FORGELLM_BUS_CURVE_DIR=str(tmp_path / "no-keys"))
    result = subprocess.run([sys.executable, "-m", "forgellm", "service", "trainer"], env=missing,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "forgellm bus keys" in result.stderr
