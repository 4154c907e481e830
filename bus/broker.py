"""The event broker: an XSUB/XPUB proxy (ZeroMQ Guide ch. 2) that every event goes through.

Publishers connect to ``events_in`` and subscribers to ``events_out``, so neither side needs to
know the other and any process can come and go. The proxy loop runs in C (``zmq.proxy``) on a
thread; the main thread publishes the broker's own heartbeat and waits for SIGTERM.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import structlog
import zmq

from forgellm.bus import curve
from forgellm.bus.events import EventPublisher
from forgellm.schemas import Heartbeat, ServiceReady, ServiceStopping

log = structlog.get_logger("bus.broker")

# What the broker reads from a peer, at most, per frame (libzmq drops the connection of a peer
# that sends more). Subscribers only send subscriptions, and ours are short topic prefixes: a long
# one is an attack, because libzmq 4.3 walks its subscription trie recursively, one stack frame per
# byte, when it removes one (an unsubscribe, or the subscriber going away). A 1 MB subscription
# followed by a disconnect crashed the broker with SIGSEGV (tests/test_fuzz_bus.py).
MAX_SUBSCRIPTION_BYTES = 4096
# Publishers send events; ours are small (tens of kB at most), so a frame this big is not one and
# must not be copied to every subscriber.
MAX_EVENT_BYTES = 64 * 1024 * 1024


def prepare_ipc(address: str) -> None:
    """Make the folder of an ``ipc://`` address (owner-only) and remove a stale socket file."""
    if address.startswith("ipc://"):
        path = Path(address[len("ipc://"):])
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.unlink(missing_ok=True)


class Broker:
    def __init__(self, events_in: str, events_out: str, *, hwm: int = 100_000) -> None:
        self.events_in = events_in
        self.events_out = events_out
        self._ctx = zmq.Context()
        self._xsub = self._ctx.socket(zmq.XSUB)
        self._xpub = self._ctx.socket(zmq.XPUB)
        for sock in (self._xsub, self._xpub):
            sock.setsockopt(zmq.SNDHWM, hwm)
            sock.setsockopt(zmq.RCVHWM, hwm)
            sock.setsockopt(zmq.LINGER, 0)
        self._xsub.setsockopt(zmq.MAXMSGSIZE, MAX_EVENT_BYTES)
        self._xpub.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION_BYTES)
        prepare_ipc(events_in)
        prepare_ipc(events_out)
        curve.bind(self._xsub, events_in)
        curve.bind(self._xpub, events_out)
        self._thread = threading.Thread(target=self._proxy, name="broker-proxy", daemon=True)

    def _proxy(self) -> None:
        try:
            zmq.proxy(self._xsub, self._xpub)
        except zmq.ContextTerminated:
            pass
        finally:
            self._xsub.close(linger=0)
            self._xpub.close(linger=0)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        # term() makes the proxy thread's blocking call fail with ETERM; it then closes its
        # sockets (sockets are not thread-safe, so only their own thread may close them).
        curve.stop_authenticators()
        self._ctx.term()
        self._thread.join(timeout=5)


def run_broker(events_in: str, events_out: str, *, hwm: int, heartbeat_s: float) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    broker = Broker(events_in, events_out, hwm=hwm)
    broker.start()
    publisher = EventPublisher(events_in, "broker", hwm=hwm)
    started = time.monotonic()
    pid = os.getpid()
    log.info("broker_ready", events_in=events_in, events_out=events_out)
    publisher.publish(ServiceReady(service="broker", pid=pid, address=events_in))
    while not stop.wait(heartbeat_s):
        publisher.publish(
            Heartbeat(service="broker", state="running", pid=pid, uptime_s=time.monotonic() - started)
        )
    publisher.publish(ServiceStopping(service="broker", pid=pid, reason="signal"))
    publisher.close()
    broker.close()
    log.info("broker_stopped")
    return 0
