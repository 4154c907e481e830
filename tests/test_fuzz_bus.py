"""Fuzz the bus of a running platform: every service's ROUTER and the broker's XSUB and XPUB get
random bytes, truncated and mutated valid frames, msgpack of the wrong shape, unknown message tags,
length bombs, multi-frame garbage and 10-50 MB frames, through pyzmq and through a raw ZMTP peer
(a bad greeting, a wrong socket type, a frame header announcing 2**63 bytes, a message cut off).

Afterwards every process is the one that started (same pid: nothing crashed and was restarted),
answers ping, publishes heartbeats that reach a new subscriber, and the gateway still serves REST
with every component up (its heartbeat monitor survived what the broker passed on). The corpus
is seeded (``FORGELLM_BUS_FUZZ_SEED``, default 8); ``FORGELLM_BUS_FUZZ_MUTATIONS`` (default 400)
sets the mutated frames per target. The frames sent are printed at the end.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import msgspec
import pytest
import zmq

from forgellm.bus import RpcClient, decode, encode, new_id
from forgellm.config import bus_address, load_settings
from forgellm.config.settings import SERVICE_NAMES
from forgellm.schemas import (
    ErrorCode,
    ErrorReply,
    Heartbeat,
    ListModelsRequest,
    PingReply,
    PingRequest,
    ServiceStatusRequest,
    TrainingStatusRequest,
)
from forgellm.schemas.envelope import Envelope
from tests.helpers import zmtp
from tests.helpers.procs import PROCESS_NAMES, http, poll, running_platform

SEED = int(os.environ.get("FORGELLM_BUS_FUZZ_SEED", "8"))
MUTATIONS = int(os.environ.get("FORGELLM_BUS_FUZZ_MUTATIONS", "400"))
MB = 1024 * 1024
SENT: Counter[str] = Counter()  # frames per target
BYTES: Counter[str] = Counter()


# --- the corpus ----------------------------------------------------------------------------------

def _header(**fields) -> Envelope:
    return Envelope(msg_id=new_id(), source="fuzz", deadline=time.time() + 60, **fields)


def valid_payloads() -> list[bytes]:
    """Read-only requests only: a mutation that stays valid must not start anything."""
    return [encode(_header(), request) for request in
            (PingRequest(), ServiceStatusRequest(), TrainingStatusRequest(), ListModelsRequest())]


def _raw(header: list, body) -> bytes:
    return msgspec.msgpack.encode([header, body])


def crafted() -> list[bytes]:
    """msgpack of the wrong shape or types, unknown tags, odd headers, length bombs."""
    good = ["id1", "", "fuzz", "", 0.0, 0, "", True, time.time() + 60]
    ping = {"type": "PingRequest"}
    wrong_shapes = [None, True, 0, -1, 2**64 - 1, 1.5, math.nan, "text", b"bin", [], {}, [1], [1, 2, 3],
                    {"a": 1}, [None, None], [{}, {}], [[], []], ["header", "body"], [good], [good, ping, "extra"],
                    [ping, good], {"header": good, "body": ping}]
    payloads = [msgspec.msgpack.encode(value) for value in wrong_shapes]
    payloads += [
        _raw(good, {"type": "NoSuchMessage"}),                 # unknown tag, header fine: an error reply
        _raw(good, {"type": "NoSuchMessage", "x": 1}),
        _raw(good, {"type": ""}),
        _raw(good, {"type": 5}),
        _raw(good, {"type": None}),
        _raw(good, {}),
        _raw(good, []),
        _raw(good, "PingRequest"),
        _raw(good, {"type": "PingReply", "service": "x", "pid": 1, "uptime_s": 0, "version": "0"}),  # a reply
        _raw(good, {"type": "Heartbeat", "service": "x", "state": "x", "pid": 1, "uptime_s": 0}),     # an event
        _raw(good, {"type": "TrainingStartRequest"}),          # a command, its required fields missing
        _raw(good, {"type": "ModelLoadRequest", "model_name": 5}),
        _raw(good, {"type": "PingRequest", "unknown": "x" * 10_000}),  # tolerant reader: still a ping
        _raw([1, 2, 3], ping),                                 # header of the wrong types
        _raw(["id"] + [None] * 8, ping),
        _raw(good[:8] + [math.nan], ping),                     # NaN / infinite / negative deadlines
        _raw(good[:8] + [math.inf], ping),
        _raw(good[:8] + [-math.inf], ping),
        _raw(good[:8] + [-1.0], ping),
        _raw(good[:5] + [2**64 - 1] + good[6:], ping),         # seq at the top of uint64
        _raw(good[:5] + [-(2**63)] + good[6:], ping),
        _raw(good + ["appended", 1, [2]], ping),               # a newer sender's extra header fields
        _raw(["x" * MB] + good[1:], ping),                     # a 1 MB message id
        _raw([""] + good[1:], ping),
    ]
    payloads += [  # length bombs: containers and strings announcing 4 GB that are not there
        b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff" + b"x",
        b"\xc6\xff\xff\xff\xff", b"\xc9\xff\xff\xff\xff\x01", b"\x92\xdd\xff\xff\xff\xff",
        b"\x92" + msgspec.msgpack.encode(good) + b"\xdf\xff\xff\xff\xff",
        b"\x91" * 200_000 + b"\xc0",                           # nested 200k deep
        b"\x81\xa1a" * 100_000 + b"\xc0",
        b"\xc1", b"\xd4\x01\x00", b"\xd6\xff\x00\x00\x00\x00", b"\xc7\x00\xff",  # reserved byte, ext types
    ]
    return payloads


def truncations(payloads: list[bytes]) -> list[bytes]:
    return [payload[:cut] for payload in payloads for cut in range(len(payload))]


def mutations(payloads: list[bytes], rng: random.Random, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        data = bytearray(rng.choice(payloads))
        for _ in range(rng.randint(1, 4)):
            where = rng.randrange(len(data))
            action = rng.random()
            if action < 0.6:
                data[where] = rng.randrange(256)
            elif action < 0.8:
                data.insert(where, rng.randrange(256))
            elif len(data) > 1:
                del data[where]
        out.append(bytes(data))
    return out


def random_bytes(rng: random.Random) -> list[bytes]:
    sizes = [0, 1, 2, 3, 7, 16, 64, 100, 255, 256, 1000, 4096, 65536]
    return [rng.randbytes(size) for size in sizes for _ in range(3)]


def single_frames(rng: random.Random) -> list[bytes]:
    valid = valid_payloads()
    return (random_bytes(rng) + crafted() + truncations(valid) + mutations(valid + crafted()[:30], rng, MUTATIONS))


def multi_frames(rng: random.Random) -> list[list[bytes]]:
    valid = valid_payloads()[0]
    return ([[rng.randbytes(rng.randint(0, 64)) for _ in range(n)] for n in range(2, 11)]
            + [[valid, valid], [b"", valid], [valid, b""], [b""] * 100, [valid] * 3])


def huge_frames(rng: random.Random) -> list[bytes]:
    return [rng.randbytes(10 * MB), b"\x00" * (50 * MB),
            encode(_header(), PingRequest())[:-1] + b"\xdb" + (50 * MB).to_bytes(4, "big") + b"y" * (50 * MB)]


# --- sending -------------------------------------------------------------------------------------

def send_all(sock: zmq.Socket, target: str, messages: list[list[bytes]]) -> None:
    for frames in messages:
        sock.send_multipart(frames)  # copied: zero-copy sends would start pyzmq's garbage thread
        SENT[target] += len(frames)
        BYTES[target] += sum(len(frame) for frame in frames)


def raw_attacks(address: str, socket_type: bytes, target: str) -> None:
    """What only a hand-written peer sends: libzmq itself must cope and keep the socket up."""
    def attempt(data: bytes, *, handshake: bool) -> None:
        try:
            sock = zmtp.handshake(address, socket_type) if handshake else zmtp.open_stream(address)
        except (ConnectionError, OSError):
            return  # refused during the greeting: fine, that is coping
        try:
            sock.sendall(data)
            sock.settimeout(0.5)
            try:
                while sock.recv(65536):
                    pass
            except (TimeoutError, OSError):
                pass
        except OSError:
            pass  # the peer dropped us
        finally:
            sock.close()
        SENT[target] += 1
        BYTES[target] += len(data)

    rng = random.Random(SEED)
    attempt(rng.randbytes(200), handshake=False)                               # not ZMTP at all
    attempt(b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x09\x09" + b"\xff" * 52, handshake=False)  # bad version
    attempt(zmtp.GREETING.replace(b"NULL", b"EVIL") + zmtp.ready(socket_type), handshake=False)
    attempt(zmtp.GREETING + zmtp.ready(b"PAIR"), handshake=False)              # wrong socket type
    attempt(zmtp.GREETING + zmtp.command(b"READY", b"\xff" * 40), handshake=False)  # broken properties
    attempt(zmtp.huge_frame_header(2**63 - 1) + b"abc", handshake=True)        # 8 EiB announced
    attempt(zmtp.huge_frame_header(2**40) + b"abc", handshake=True)            # 1 TiB announced
    attempt(zmtp.huge_frame_header(64 * MB) + b"a" * MB, handshake=True)       # cut off mid-message
    attempt(zmtp.frame(b"x", more=True) * 1000, handshake=True)                # a message that never ends
    attempt(zmtp.command(b"PING", b"\x00\x10") + zmtp.command(b"ERROR", b"\x03bad")
            + zmtp.command(b"SUBSCRIBE", b"x" * 300), handshake=True)
    attempt(bytes([0xF8]) + b"\x05hello", handshake=True)                      # reserved flag bits


# --- checks --------------------------------------------------------------------------------------

def pids_now(platform) -> dict[str, int]:
    return {name: platform.pid_of(name) for name in (*PROCESS_NAMES, "gateway")}


def assert_alive(platform, settings, pids: dict[str, int]) -> None:
    assert pids_now(platform) == pids, "a process was restarted"
    for pid in pids.values():
        os.kill(pid, 0)  # raises if gone
    for name in SERVICE_NAMES:
        client = RpcClient(bus_address(settings, name), name, timeout_s=5, read_retries=1)
        try:
            reply = client.request(PingRequest())
        finally:
            client.close()
        assert isinstance(reply, PingReply) and reply.pid == pids[name], reply
    # Every process's heartbeat reaches a new subscriber through the broker...
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"service.heartbeat\0")
    sub.connect(bus_address(settings, "events_out"))
    seen: set[str] = set()
    deadline = time.monotonic() + 10
    try:
        while seen != set(PROCESS_NAMES) and time.monotonic() < deadline:
            if sub.poll(500):
                frame = sub.recv()
                _, body = decode(frame[frame.index(b"\0") + 1:])
                if isinstance(body, Heartbeat):
                    seen.add(body.service)
    finally:
        ctx.destroy(linger=0)
    assert seen == set(PROCESS_NAMES), f"heartbeats heard from {seen} only"
    # ...and the gateway's own monitor still hears them (it would call everything down otherwise).
    time.sleep(3)  # longer than the heartbeat timeout
    health = poll(platform.health, lambda h: h is not None, 10, "health")
    assert health["status"] == "healthy", health
    status, body, _ = http("GET", platform.web + "/api/training/status")
    assert status == 200 and body["success"] is True, body


# --- the tests -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bus_platform():
    with tempfile.TemporaryDirectory(prefix="fl-") as name:
        with running_platform(Path(name)) as platform:
            settings = load_settings(env=platform.env)
            pids = pids_now(platform)
            yield platform, settings, pids
            assert_alive(platform, settings, pids)
            failures = [line for line in platform.log().splitlines() if any(m in line for m in FAILURE_MARKS)]
            assert not failures, "failed on fuzzed input:\n" + "\n".join(line[:2000] for line in failures[:5])


FAILURE_MARKS = ("handler_failed", "request_failed_unexpectedly", "Traceback")


def log_counts(platform) -> dict[str, int]:
    """How the processes logged what they were sent (and whether anything failed)."""
    text = platform.log()
    counts = {mark: text.count(f'"{mark}"') for mark in ("request_dropped", "request_rejected", "event_dropped")}
    counts["failures"] = sum(text.count(mark) for mark in FAILURE_MARKS)
    return counts


@pytest.mark.timeout(300)
@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_garbage_to_a_service_router(bus_platform, service):
    platform, settings, pids = bus_platform
    address = bus_address(settings, service)
    rng = random.Random(f"{SEED}-{service}")
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.SNDHWM, 0)
    raw.setsockopt(zmq.RCVHWM, 0)
    raw.connect(address)
    try:
        send_all(raw, service, [[frame] for frame in single_frames(rng)])
        send_all(raw, service, multi_frames(rng))
        send_all(raw, service, [[frame] for frame in huge_frames(rng)])
        # A message whose header is readable is answered, to the right caller, with INVALID_REQUEST.
        marker = new_id()
        raw.send(msgspec.msgpack.encode([[marker, "", "fuzz", "", 0.0, 0, "", True, time.time() + 60],
                                         {"type": "NoSuchMessage"}]))
        SENT[service] += 1
        got = None
        deadline = time.monotonic() + 20
        while got is None and time.monotonic() < deadline:
            if raw.poll(1000):
                frames = raw.recv_multipart()
                if len(frames) == 1:
                    header, body = decode(frames[0])
                    if header.reply_to == marker:
                        got = body
        assert isinstance(got, ErrorReply) and got.code == ErrorCode.INVALID_REQUEST, got
    finally:
        ctx.destroy(linger=0)
    raw_attacks(address, b"DEALER", service)
    assert_alive(platform, settings, pids)


@pytest.mark.timeout(300)
def test_garbage_into_the_broker_xsub(bus_platform):
    """Publishers' side: frames on topics every subscriber listens to (service.*, training.*), on
    no topic, with a topic that is not UTF-8, and whole valid events of the wrong type."""
    platform, settings, pids = bus_platform
    address = bus_address(settings, "events_in")
    rng = random.Random(f"{SEED}-xsub")
    topics = [b"", b"service.", b"service.heartbeat\0", b"service.exited\0", b"training.update\0",
              b"training.\xff\xfe\0", b"\0", b"x" * 1000 + b"\0"]
    frames = [rng.choice(topics) + frame for frame in single_frames(rng)]
    # Well-formed events whose body is not what the topic says (the monitor and the trainer read these).
    frames += [b"service.heartbeat\0" + payload for payload in valid_payloads()]
    frames += [b"training.update\0" + encode(_header(), Heartbeat(service="trainer", state="x", pid=1, uptime_s=0))]
    frames += [b"service.heartbeat\0" + frame for frame in huge_frames(rng)]
    # Through a raw ZMTP publisher: nothing is filtered on our side, every frame reaches the proxy.
    sock = zmtp.handshake(address, b"PUB")
    try:
        for frame in frames:
            sock.sendall(zmtp.frame(frame))
            SENT["broker xsub"] += 1
            BYTES["broker xsub"] += len(frame)
        for n in range(2, 6):  # multipart events from a foreign sender
            sock.sendall(b"".join(zmtp.frame(b"service.heartbeat\0" + rng.randbytes(20), more=i < n - 1)
                                  for i in range(n)))
            SENT["broker xsub"] += n
    finally:
        sock.close()
    # And through pyzmq, on the subscribed prefixes (a PUB only sends what someone subscribed to).
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.connect(address)
    time.sleep(0.5)  # let the subscriptions reach our PUB
    try:
        send_all(pub, "broker xsub", [[b"service.heartbeat\0" + frame] for frame in single_frames(rng)])
        send_all(pub, "broker xsub", [[b"training.update\0" + frame] for frame in single_frames(rng)])
        send_all(pub, "broker xsub", multi_frames(rng))
    finally:
        ctx.destroy(linger=2000)
    raw_attacks(address, b"PUB", "broker xsub")
    assert_alive(platform, settings, pids)


@pytest.mark.timeout(300)
def test_garbage_into_the_broker_xpub(bus_platform):
    """Subscribers' side: odd and huge subscriptions, unsubscriptions of things never subscribed,
    plain messages where only subscriptions are expected, a subscriber that never reads.

    A long subscription is sent by the raw peer: libzmq removes one recursively, a stack frame per
    byte, so a 1 MB subscription followed by a disconnect crashed the broker (fixed in
    bus/broker.py: MAX_SUBSCRIPTION_BYTES) and would crash any process holding it, this one too."""
    platform, settings, pids = bus_platform
    address = bus_address(settings, "events_out")
    rng = random.Random(f"{SEED}-xpub")
    long = [b"s" * (10 * MB), rng.randbytes(MB), b"service." + b"x" * 200_000]
    for topic in long:
        for form in ("message", "command"):
            data = zmtp.frame(b"\x01" + topic) if form == "message" else zmtp.command(b"SUBSCRIBE", topic)
            try:
                sock = zmtp.handshake(address, b"SUB")
                sock.sendall(data + zmtp.frame(b"\x00" + topic))
                time.sleep(0.2)
                sock.close()
            except OSError:
                pass  # refused: what the broker should do
            SENT["broker xpub"] += 2
            BYTES["broker xpub"] += 2 * len(data)
    # Through pyzmq, short enough for this process's own subscription trie.
    ctx = zmq.Context()
    xsub = ctx.socket(zmq.XSUB)
    xsub.setsockopt(zmq.SNDHWM, 0)
    xsub.setsockopt(zmq.RCVHWM, 10)  # and never read: the broker must drop for us, not block
    xsub.connect(address)
    try:
        messages = [[b"\x01"], [b"\x01service."], [b"\x01" + rng.randbytes(4000)], [b"\x00never-subscribed"],
                    [b"\x00"], [b"\x01\xff\xfe"], [b""], [b"\x02plain message"], [b"\x01a", b"\x01b", b"\x01c"]]
        messages += [[frame[:4000]] for frame in single_frames(rng)]
        messages += [[frame[:4000] for frame in frames] for frames in multi_frames(rng)]
        send_all(xsub, "broker xpub", messages)
        time.sleep(1)
    finally:
        ctx.destroy(linger=2000)
    raw_attacks(address, b"SUB", "broker xpub")
    assert_alive(platform, settings, pids)


def test_bus_fuzz_summary(bus_platform, capsys):
    total = sum(SENT.values())
    platform = bus_platform[0]
    lines = [f"bus fuzz: {total} frames ({sum(BYTES.values()) / MB:.0f} MB) to {len(SENT)} sockets, "
             f"seed {SEED}: " + ", ".join(f"{target} {count}" for target, count in SENT.items()),
             f"  logged by the platform: {log_counts(platform)}"]
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert total > 0


def test_raw_zmtp_helper_speaks_the_protocol(short_tmp):
    """The raw peer above is only a test if libzmq accepts it when it plays by the rules."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    address = f"ipc://{short_tmp}/r.sock"
    router.bind(address)
    try:
        sock = zmtp.handshake(address, b"DEALER")
        sock.sendall(zmtp.frame(b"hello") + zmtp.frame(b"y" * 1000))
        assert router.poll(5000)
        assert router.recv_multipart()[1] == b"hello"
        assert router.recv_multipart()[1] == b"y" * 1000
        sock.close()
    finally:
        ctx.destroy(linger=0)
