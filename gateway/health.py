"""Who is alive, from heartbeats on the bus, and what the machine has left."""

from __future__ import annotations

import asyncio
import functools
import os
import platform
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import structlog

from forgellm.bus import AsyncSubscriber
from forgellm.schemas import Heartbeat, ProcessExited, ServiceReady, ServiceStopping

log = structlog.get_logger("gateway.health")
MAX_PROCESSES = 256  # processes health keeps track of (a Procfile has a handful)

PROCESSES = ("broker", "trainer", "inference", "catalog", "publisher")
INFO_MAX_AGE_S = 1.0


@dataclass(slots=True)
class Seen:
    state: str
    at: float
    pid: int


class ServiceMonitor:
    """Tracks the last heartbeat of every process. Silent past ``timeout_s`` = down."""

    def __init__(self, subscriber: AsyncSubscriber, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.started = time.monotonic()
        self._seen: dict[str, Seen] = {}
        self._subscriber = subscriber
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        async for record in self._subscriber:
            event = record.body
            now = time.monotonic()
            name = getattr(event, "service", None) or getattr(event, "name", None)
            if name is not None and name not in self._seen and len(self._seen) >= MAX_PROCESSES:
                # Made-up names flooding the bus: forget the one heard from longest ago.
                del self._seen[min(self._seen, key=lambda n: self._seen[n].at)]
            if isinstance(event, Heartbeat):
                previous = self._seen.get(event.service)
                if previous and previous.state == "down" and previous.pid == event.pid:
                    continue  # a heartbeat sent just before the process died
                self._seen[event.service] = Seen(event.state, now, event.pid)
            elif isinstance(event, ServiceReady):
                self._seen[event.service] = Seen("running", now, event.pid)
            elif isinstance(event, ServiceStopping):
                self._seen[event.service] = Seen("down", now, event.pid)
            elif isinstance(event, ProcessExited):
                self._seen[event.name] = Seen("down", now, event.pid)

    def state(self, service: str) -> str:
        seen = self._seen.get(service)
        if seen is None or time.monotonic() - seen.at > self.timeout_s:
            return "down"
        return seen.state

    def is_down(self, service: str) -> bool:
        """Down for sure: silent for longer than the timeout since we began listening."""
        seen = self._seen.get(service)
        if seen is not None and seen.state == "down":
            return True  # it said so, or the supervisor saw it die
        if time.monotonic() - self.started < self.timeout_s:
            return False  # we may simply not have heard from it yet
        return self.state(service) == "down"

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._subscriber.close()


def _meminfo() -> dict[str, int]:
    """MemTotal and MemAvailable in bytes (only the two lines we use are parsed)."""
    values: dict[str, int] = {}
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith((b"MemTotal:", b"MemAvailable:")):
                    key, _, rest = line.partition(b":")
                    values[key.decode()] = int(rest.split()[0]) * 1024  # kB
                    if len(values) == 2:
                        break
    except (OSError, ValueError, IndexError):
        return {}
    return values


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def _static_info() -> dict[str, Any]:
    """What cannot change while the process runs (``importlib.metadata`` scans sys.path: ~ms)."""
    return {
        "python_version": platform.python_version(),
        "mlx_version": _version("mlx"),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu_count": os.cpu_count(),
    }


def _measure(workspace: Path) -> dict[str, Any]:
    gib = 1024**3
    mem = _meminfo()
    total = mem.get("MemTotal")
    if total is None and hasattr(os, "sysconf"):
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            total = None
    available = mem.get("MemAvailable")
    disk = shutil.disk_usage(workspace if workspace.exists() else Path.cwd())
    return {
        "memory_total_gb": round(total / gib, 2) if total else None,
        "memory_available_gb": round(available / gib, 2) if available else None,
        "disk_free_gb": round(disk.free / gib, 2),
        **_static_info(),
    }


# workspace -> (monotonic time measured, info)
_cache: dict[Path, tuple[float, dict[str, Any]]] = {}


def system_info(
    workspace: Path, max_age_s: float = INFO_MAX_AGE_S, *, cached_only: bool = False
) -> dict[str, Any] | None:
    """Memory, disk and versions. ``None`` where the platform does not say.

    Memory and disk are measured at most every ``max_age_s`` (a health probe, not a meter:
    a poller hitting it thousands of times a second must not pay a /proc read and a statfs
    each time); versions, platform and CPU count are read once per process. With
    ``cached_only`` it never measures (cheap enough for the event loop) and returns ``None``
    when the cached figures are older than ``max_age_s``.
    """
    cached = _cache.get(workspace)
    if cached is not None and time.monotonic() - cached[0] < max_age_s:
        return dict(cached[1])
    if cached_only:
        return None
    info = _measure(workspace)
    _cache[workspace] = (time.monotonic(), info)
    return dict(info)
