"""One dedicated thread for all MLX work of the loaded model.

MLX work for one model must come from one thread at a time, and it must never run on the
service's event loop (a long generation would stop heartbeats and every other request). The
worker is a single-thread executor: jobs (load, generate, unload) run one after another in the
order they were submitted, so concurrent generate requests queue in arrival order.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class MlxWorker:
    def __init__(self, name: str = "mlx") -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Jobs submitted and not finished (running included)."""
        return self._pending

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the worker thread and await its result."""
        with self._lock:
            self._pending += 1
        try:
            return await asyncio.wrap_future(self._executor.submit(fn, *args))
        finally:
            with self._lock:
                self._pending -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
