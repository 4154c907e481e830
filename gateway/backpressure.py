"""Socket.IO clients that do not read what they are sent are dropped, never buffered without end.

python-engineio gives each client an unbounded queue drained by that client's own writer task,
so one slow client never delays the others; but a client that stops reading stalls its writer
(TCP back-pressure) and its queue grows. A client that also stops answering pings is dropped by
engine.io itself after ``socketio_ping_interval_s`` + ``socketio_ping_timeout_s``; one that keeps
sending pongs without reading (or sits behind a wedged proxy) would never be. This guard looks at
every client's queue each second and drops a client whose backlog passes
``gateway.socketio_max_backlog`` packets: its session is closed (it leaves every room, so nothing
more is queued for it), what was queued is discarded, and its TCP connection is aborted so its
stuck writer ends too.
"""

from __future__ import annotations

import asyncio
from typing import Any

import socketio
import structlog

log = structlog.get_logger("gateway.backpressure")


class BacklogGuard:
    def __init__(self, sio: socketio.AsyncServer, max_backlog: int, interval_s: float = 1.0) -> None:
        self.sio = sio
        self.max_backlog = max_backlog
        self.interval_s = interval_s
        self.dropped = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._watch())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            for eio_sid, sock in list(self.sio.eio.sockets.items()):
                if not sock.closed and sock.queue.qsize() > self.max_backlog:
                    try:
                        await self.drop(eio_sid, sock)
                    except Exception:  # one client's teardown must never stop the guard
                        log.exception("socketio_drop_failed", sid=eio_sid)

    async def drop(self, eio_sid: str, sock: Any) -> None:
        backlog = sock.queue.qsize()
        environ = self.sio.environ.get(eio_sid) or {}  # read before close() forgets it
        request = environ.get("aiohttp.request")
        while True:
            try:
                sock.queue.get_nowait()
                sock.queue.task_done()
            except asyncio.QueueEmpty:
                break
        await sock.close(wait=False, abort=True, reason=self.sio.eio.reason.SERVER_DISCONNECT)
        sock.queue.put_nowait(None)  # the writer ends after the write it is stuck in
        transport = getattr(request, "transport", None)
        if transport is not None:
            transport.abort()  # ... which this ends at once
        self.dropped += 1
        log.warning("socketio_client_dropped", sid=eio_sid, backlog=backlog, max_backlog=self.max_backlog)
