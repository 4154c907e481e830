"""Who is alive, from heartbeats on the bus, and what the machine has left."""

from __future__ import annotations

import asyncio
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

PROCESSES = ("broker", "trainer", "inference", "catalog", "publisher")


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


def _meminfo() -> dict[str, float]:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    values = {}
    for line in lines:
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0]) * 1024  # kB
    return values


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def system_info(workspace: Path) -> dict[str, Any]:
    """Memory, disk and versions, measured now. ``None`` where the platform does not say."""
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
        "python_version": platform.python_version(),
        "mlx_version": _version("mlx"),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu_count": os.cpu_count(),
    }
