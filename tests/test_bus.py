"""The bus on real ZeroMQ sockets: broker, events, RPC (async and blocking), bad frames."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import msgspec
import pytest
import zmq
import zmq.asyncio

from forgellm.bus import (
    AsyncRpcClient,
    AsyncSubscriber,
    EventPublisher,
    RemoteError,
    RpcClient,
    RpcServer,
    ServiceTimeout,
    ServiceUnavailable,
    decode,
    encode,
)
from forgellm.bus.broker import Broker
from forgellm.bus.events import event_frame
from forgellm.schemas import (
    Envelope,
    ErrorCode,
    ErrorReply,
    GenerateChunk,
    GenerateReply,
    GenerateRequest,
    Heartbeat,
    PingReply,
    PingRequest,
    TrainingStopRequest,
    TrainingUpdate,
)
from tests.helpers.procs import free_port


@pytest.fixture
async def bus(short_tmp):
    ctx = zmq.asyncio.Context()
    events_in, events_out = f"ipc://{short_tmp}/in.sock", f"ipc://{short_tmp}/out.sock"
    broker = Broker(events_in, events_out)
    broker.start()
    yield ctx, events_in, events_out
    broker.close()
    ctx.destroy(linger=0)


async def joined(publisher: EventPublisher, subscriber: AsyncSubscriber) -> None:
    """Publish probes until the subscription has reached the publisher (the slow-joiner
    handshake): after this, every event published reaches the subscriber."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        publisher.publish(Heartbeat(service="probe", state="probe", pid=0, uptime_s=0))
        try:
            await asyncio.wait_for(subscriber.recv(), 0.05)
            return
        except TimeoutError:
            continue
    raise AssertionError("subscription never joined")


async def test_event_published_after_subscribe_reaches_subscriber_in_order(bus):
    ctx, events_in, events_out = bus
    subscriber = AsyncSubscriber(ctx, events_out, ("service.", "training."))
    publisher = EventPublisher(events_in, "trainer", ctx=ctx)
    await joined(publisher, subscriber)
    for i in range(1, 1001):
        publisher.publish(TrainingUpdate(training_id="t1", iteration=i, training_loss=1.0 / i))
    got = []
    while len(got) < 1000:
        record = await asyncio.wait_for(subscriber.recv(), 5)
        if record.topic == "training.update":
            got.append(record)
    assert [r.body.iteration for r in got] == list(range(1, 1001))
    assert [r.header.seq for r in got] == list(range(1, 1001))
    assert {r.header.source for r in got} == {"trainer"}
    assert subscriber.missed == 0
    publisher.close()
    subscriber.close()


async def test_topic_prefix_filters_events(bus):
    ctx, events_in, events_out = bus
    models_only = AsyncSubscriber(ctx, events_out, ("service.", "model."))
    publisher = EventPublisher(events_in, "trainer", ctx=ctx)
    await joined(publisher, models_only)
    publisher.publish(TrainingUpdate(training_id="t1", iteration=1))
    publisher.publish(Heartbeat(service="last", state="x", pid=1, uptime_s=0))
    while True:
        record = await asyncio.wait_for(models_only.recv(), 5)
        assert record.topic != "training.update"
        if isinstance(record.body, Heartbeat) and record.body.service == "last":
            break


async def test_subscriber_reports_a_gap_but_not_a_restart(bus):
    ctx, events_in, events_out = bus
    subscriber = AsyncSubscriber(ctx, events_out, ("training.",))
    raw = ctx.socket(zmq.PUB)
    raw.connect(events_in)

    def send(seq: int, instance: str) -> None:
        header = Envelope(msg_id=f"m{seq}", source="trainer", instance=instance, seq=seq)
        raw.send(event_frame("training.update", encode(header, TrainingUpdate(training_id="t", iteration=seq))))

    deadline = time.monotonic() + 10
    while True:  # join: resend seq 1 until it arrives
        send(1, "a")
        try:
            await asyncio.wait_for(subscriber.recv(), 0.05)
            break
        except TimeoutError:
            assert time.monotonic() < deadline
    while True:  # drain the duplicates of seq 1 still in flight
        send(2, "a")
        record = await asyncio.wait_for(subscriber.recv(), 5)
        if record.header.seq == 2:
            break
    send(5, "a")  # 3 and 4 lost
    record = await asyncio.wait_for(subscriber.recv(), 5)
    assert (record.header.seq, record.missed) == (5, 2)
    send(1, "b")  # the publisher restarted: a new instance starts again at 1
    record = await asyncio.wait_for(subscriber.recv(), 5)
    assert (record.header.seq, record.missed) == (1, 0)
    assert subscriber.missed == 2
    raw.close(linger=0)


async def test_malformed_events_are_dropped_and_the_subscriber_keeps_reading(bus):
    ctx, events_in, events_out = bus
    subscriber = AsyncSubscriber(ctx, events_out, ("training.",))
    raw = ctx.socket(zmq.PUB)
    raw.connect(events_in)
    payload = encode(Envelope(msg_id="g", source="t", instance="i", seq=1),
                     TrainingUpdate(training_id="t", iteration=1))
    good = [event_frame("training.update", payload)]
    deadline = time.monotonic() + 10
    while True:  # join
        raw.send_multipart(good)
        try:
            await asyncio.wait_for(subscriber.recv(), 0.05)
            break
        except TimeoutError:
            assert time.monotonic() < deadline
    await asyncio.sleep(0.1)
    while True:  # drain the join probes still in flight
        try:
            await asyncio.wait_for(subscriber.recv(), 0.1)
        except TimeoutError:
            break
    bad = [
        [b"training.update"],                                             # no separator
        [b"training.update\0"],                                          # no payload
        [b"training.update", payload],                                    # old 2-frame layout
        [b"training.update\0\xc1 not msgpack"],                           # invalid msgpack
        [event_frame("training.update", msgspec.msgpack.encode({"a": 1}))],  # not [header, body]
        [event_frame("training.update", msgspec.msgpack.encode(           # unknown event type
            (Envelope(msg_id="u", source="t", instance="i", seq=2), {"type": "NoSuchEvent"})))],
        [b"training.\xff\0" + payload],                                   # topic not UTF-8
        [b"training.x", event_frame("service.heartbeat", payload)],      # tail frame, unsubscribed topic
    ]
    for frames in bad:
        raw.send_multipart(frames)
    last = [event_frame("training.update", encode(Envelope(msg_id="l", source="t", instance="i", seq=3),
                                                  TrainingUpdate(training_id="t", iteration=3)))]
    raw.send_multipart(last)
    record = await asyncio.wait_for(subscriber.recv(), 5)
    assert (record.header.msg_id, record.body.iteration) == ("l", 3)
    subscriber.close()
    raw.close(linger=0)


@pytest.fixture
async def server(short_tmp):
    """An RpcServer on a real socket whose behaviour each test sets through ``calls``."""
    ctx = zmq.asyncio.Context()
    address = f"ipc://{short_tmp}/svc.sock"
    rpc = RpcServer(ctx, address, "svc")
    calls: list[tuple[Envelope, object]] = []
    behaviour: dict[str, object] = {}

    async def handler(header, request):
        calls.append((header, request))
        if "stall_first" in behaviour and len(calls) == 1:
            await asyncio.sleep(behaviour["stall_first"])
        if "delay" in behaviour:
            await asyncio.sleep(behaviour["delay"])
        if isinstance(request, GenerateRequest):
            async def chunks():
                for i in range(request.max_tokens):
                    yield GenerateChunk(text=f"t{i} ", index=i)
                yield GenerateReply(response="done", tokens_generated=request.max_tokens,
                                    generation_time_seconds=0.0, tokens_per_second=0.0)
            return chunks()
        if isinstance(request, TrainingStopRequest):
            raise RuntimeError("boom")
        return PingReply(service="svc", pid=1, uptime_s=0.0, version="t")

    stop = asyncio.Event()
    task = asyncio.ensure_future(rpc.serve(handler, stop))
    yield ctx, address, calls, behaviour
    stop.set()
    await asyncio.wait_for(task, 5)
    rpc.close()
    ctx.destroy(linger=0)


async def test_rpc_round_trip_carries_the_correlation_id(server):
    ctx, address, calls, _ = server
    client = AsyncRpcClient(ctx, address, "svc")
    reply = await client.request(PingRequest(), correlation_id="req-42")
    assert isinstance(reply, PingReply) and reply.service == "svc"
    assert calls[0][0].correlation_id == "req-42"
    assert calls[0][0].deadline > time.time()
    client.close()


async def test_many_concurrent_requests_each_get_their_own_reply(server):
    ctx, address, calls, behaviour = server
    behaviour["delay"] = 0.01
    client = AsyncRpcClient(ctx, address, "svc")
    replies = await asyncio.gather(*(client.stream(GenerateRequest(prompt="p", max_tokens=n)).__anext__()
                                     for n in range(1, 30)))
    assert [r.index for r in replies] == [0] * 29
    results = await asyncio.gather(*(client.request(PingRequest(), correlation_id=str(i)) for i in range(50)))
    assert all(isinstance(r, PingReply) for r in results)
    client.close()


async def test_streaming_replies_arrive_in_order(server):
    ctx, address, _, _ = server
    client = AsyncRpcClient(ctx, address, "svc")
    frames = [frame async for frame in client.stream(GenerateRequest(prompt="hi", max_tokens=200))]
    assert [f.index for f in frames[:-1]] == list(range(200))
    assert isinstance(frames[-1], GenerateReply) and frames[-1].tokens_generated == 200
    client.close()


async def test_timeout_is_a_clear_error_and_writes_are_not_retried(server):
    ctx, address, calls, behaviour = server
    behaviour["delay"] = 0.5
    client = AsyncRpcClient(ctx, address, "svc", timeout_s=0.1, read_retries=3)
    started = time.monotonic()
    with pytest.raises(ServiceTimeout, match="did not answer within 0.1 s"):
        await client.request(TrainingStopRequest())  # not idempotent: exactly one try
    assert time.monotonic() - started < 0.4
    # A retry would have been sent right after the timeout, so before this ping on the same
    # socket (ZeroMQ keeps one peer's messages in order): the server sees stop, then ping.
    assert isinstance(await client.request(PingRequest(), timeout=5), PingReply)
    assert [type(request).__name__ for _, request in calls] == ["TrainingStopRequest", "PingRequest"]
    client.close()


async def test_reads_are_retried_after_a_timeout(server):
    ctx, address, calls, behaviour = server
    behaviour["stall_first"] = 0.5
    client = AsyncRpcClient(ctx, address, "svc", timeout_s=0.2, read_retries=2)
    reply = await client.request(PingRequest())
    assert isinstance(reply, PingReply)
    assert len(calls) == 2  # the first try timed out, the retry was answered
    client.close()


async def test_handler_bug_is_an_internal_error_and_the_server_keeps_answering(server):
    ctx, address, _, _ = server
    client = AsyncRpcClient(ctx, address, "svc")
    with pytest.raises(RemoteError) as info:
        await client.request(TrainingStopRequest())
    assert info.value.code == ErrorCode.INTERNAL and "boom" in str(info.value)
    assert isinstance(await client.request(PingRequest()), PingReply)
    client.close()


async def test_no_service_is_unavailable_quickly(short_tmp):
    ctx = zmq.asyncio.Context()
    client = AsyncRpcClient(ctx, f"ipc://{short_tmp}/nobody.sock", "trainer", timeout_s=5)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="trainer service is not running"):
        await client.request(PingRequest())
    assert time.monotonic() - started < 2.0
    client.close()
    ctx.destroy(linger=0)


async def test_malformed_frames_are_dropped_and_the_server_keeps_answering(server):
    ctx, address, calls, _ = server
    raw = ctx.socket(zmq.DEALER)
    raw.connect(address)
    header = msgspec.msgpack.encode(Envelope(msg_id="x0"))
    ping = msgspec.msgpack.encode(PingRequest())
    await raw.send_multipart([b"\x00\xffgarbage"])                       # not msgpack
    await raw.send_multipart([header, ping])                              # old 2-frame layout
    await raw.send_multipart([b"a", b"b", b"c", b"d"])                    # too many frames
    await raw.send_multipart([b"\xc1" * 10_000])                          # invalid msgpack bytes
    await raw.send_multipart([msgspec.msgpack.encode({"not": "a header"})])  # not [header, body]
    await raw.send_multipart([msgspec.msgpack.encode(([1, 2], {"type": "PingRequest"}))])  # bad header
    await raw.send_multipart([msgspec.msgpack.encode(                     # unknown type, header ok
        (Envelope(msg_id="x1"), {"type": "NoSuchRequest", "a": 1}))])
    reply_frames = await asyncio.wait_for(raw.recv_multipart(), 5)
    assert len(reply_frames) == 1
    reply_header, reply = decode(reply_frames[0])
    assert reply_header.reply_to == "x1"
    assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.INVALID_REQUEST
    assert "NoSuchRequest" in reply.error
    # an event is not a request either
    await raw.send_multipart([encode(Envelope(msg_id="x2"), Heartbeat(service="s", state="s", pid=1, uptime_s=0))])
    reply_header, reply = decode((await asyncio.wait_for(raw.recv_multipart(), 5))[0])
    assert reply_header.reply_to == "x2"
    assert isinstance(reply, ErrorReply) and "not a request" in reply.error
    client = AsyncRpcClient(ctx, address, "svc")
    assert isinstance(await client.request(PingRequest()), PingReply)
    assert len(calls) == 1
    client.close()
    raw.close(linger=0)


async def test_tolerant_reader_ignores_unknown_fields(server):
    ctx, address, calls, _ = server
    raw = ctx.socket(zmq.DEALER)
    raw.connect(address)
    # The header is array-like (compact): a newer sender appends fields at its end; the
    # payload [header, body] may grow appended elements too.
    newer_header = list(msgspec.to_builtins(Envelope(msg_id="n1"))) + ["future header field"]
    body = {"type": "PingRequest", "added_in_v2": [1, 2]}
    await raw.send_multipart([msgspec.msgpack.encode([newer_header, body, "future payload field"])])
    reply_header, reply = decode((await asyncio.wait_for(raw.recv_multipart(), 5))[0])
    assert isinstance(reply, PingReply) and reply_header.reply_to == "n1"
    raw.close(linger=0)


async def test_a_request_whose_caller_gave_up_is_not_run(server):
    ctx, address, calls, _ = server
    raw = ctx.socket(zmq.DEALER)
    raw.connect(address)
    await raw.send_multipart([encode(Envelope(msg_id="old", deadline=time.time() - 1), TrainingStopRequest())])
    client = AsyncRpcClient(ctx, address, "svc")
    assert isinstance(await client.request(PingRequest()), PingReply)
    assert [type(request).__name__ for _, request in calls] == ["PingRequest"]
    client.close()
    raw.close(linger=0)


async def test_blocking_client_round_trip_and_stream(server):
    _, address, _, _ = server
    client = RpcClient(address, "svc", timeout_s=5)
    reply = await asyncio.to_thread(client.request, PingRequest())
    assert isinstance(reply, PingReply)
    frames = await asyncio.to_thread(lambda: list(client.stream(GenerateRequest(prompt="x", max_tokens=20))))
    assert [f.index for f in frames[:-1]] == list(range(20)) and isinstance(frames[-1], GenerateReply)
    client.close()


def test_blocking_client_without_service_is_unavailable(short_tmp):
    client = RpcClient(f"ipc://{short_tmp}/none.sock", "catalog", timeout_s=5)
    with pytest.raises(ServiceUnavailable):
        client.request(PingRequest())
    client.close()


@contextlib.asynccontextmanager
async def rpc_served(address: str, handler, inline=None, name: str = "svc"):
    """An ``RpcServer`` answering on ``address`` for the block, with a client of its own;
    yields ``(rpc, client, stop, serving)`` and stops, closes and destroys everything after."""
    ctx = zmq.asyncio.Context()
    rpc = RpcServer(ctx, address, name)
    stop = asyncio.Event()
    serving = asyncio.ensure_future(rpc.serve(handler, stop, inline))
    client = AsyncRpcClient(ctx, address, name, timeout_s=5, read_retries=0)
    try:
        yield rpc, client, stop, serving
    finally:
        stop.set()
        await asyncio.wait_for(serving, 5)
        client.close()
        rpc.close()
        ctx.destroy(linger=0)


async def test_rpc_over_tcp():
    async def handler(header, request):
        return PingReply(service="tcpsvc", pid=2, uptime_s=0.0, version="t")

    async with rpc_served(f"tcp://127.0.0.1:{free_port()}", handler, name="tcpsvc") as (_, client, _, _):
        assert (await client.request(PingRequest())).service == "tcpsvc"


async def test_inline_handlers_answer_on_the_socket_thread_and_the_rest_on_the_loop(short_tmp):
    loop_thread = threading.get_ident()
    seen: dict[str, int] = {}

    def inline(header, request):
        seen["inline"] = threading.get_ident()
        if isinstance(request, TrainingStopRequest):
            raise RuntimeError("inline boom")
        if isinstance(request, PingRequest):
            return PingReply(service="svc", pid=1, uptime_s=0.0, version="inline")
        return None  # everything else: the event loop

    async def handler(header, request):
        seen["loop"] = threading.get_ident()
        return PingReply(service="svc", pid=1, uptime_s=0.0, version="loop")

    async with rpc_served(f"ipc://{short_tmp}/inline.sock", handler, inline) as (rpc, client, _, _):
        assert (await client.request(PingRequest())).version == "inline"
        assert seen["inline"] != loop_thread
        assert (await client.request(GenerateRequest(prompt="x", max_tokens=1))).version == "loop"
        assert seen["loop"] == loop_thread
        with pytest.raises(RemoteError) as failure:  # a bug in an inline handler: an error, not a dead thread
            await client.request(TrainingStopRequest())
        assert failure.value.code == ErrorCode.INTERNAL and "inline boom" in str(failure.value)
        assert (await client.request(PingRequest())).version == "inline"
        assert (rpc.served, rpc.failed) == (4, 1)  # every answer counts; the error once more


async def test_a_stopping_server_finishes_the_request_in_hand_and_turns_new_ones_away(short_tmp):
    started, release = asyncio.Event(), asyncio.Event()

    async def handler(header, request):
        started.set()
        await release.wait()
        return PingReply(service="svc", pid=1, uptime_s=0.0, version="in hand")

    async with rpc_served(f"ipc://{short_tmp}/drain.sock", handler) as (rpc, client, stop, serving):
        in_hand = asyncio.ensure_future(client.request(PingRequest()))
        await asyncio.wait_for(started.wait(), 5)
        stop.set()
        deadline = time.monotonic() + 5
        while not rpc.stopping:  # serve() has seen the stop
            assert time.monotonic() < deadline
            await asyncio.sleep(0.001)
        began = time.monotonic()
        with pytest.raises(RemoteError) as refused:
            await client.request(PingRequest())
        assert refused.value.code == ErrorCode.SERVICE_UNAVAILABLE and time.monotonic() - began < 1
        assert not serving.done()  # still waiting for the request in hand
        release.set()
        assert (await asyncio.wait_for(in_hand, 5)).version == "in hand"
        await asyncio.wait_for(serving, 5)
