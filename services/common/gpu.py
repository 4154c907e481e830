"""GPU utilization, measured where the platform can say it, ``None`` everywhere else (never invented).

* Linux + NVIDIA (the ``mlx[cuda]`` path): ``nvidia-smi --query-gpu=utilization.gpu``, the mean
  over the GPUs it lists (NVML's "percent of time a kernel was running" over its last sample).
* macOS (Metal): ``ioreg``'s ``"Device Utilization %"`` of the IOAccelerator (what Activity
  Monitor's GPU history shows); no privileges needed.
* Anything else — Linux CPU, a tool missing or failing — ``None``.

A reading costs a subprocess (~10–50 ms), so it is cached for ``CACHE_S`` and taken off the
event loop by callers (``asyncio.to_thread``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time

CACHE_S = 1.0
_IOREG_UTILIZATION = re.compile(rb'"Device Utilization %"\s*=\s*(\d+(?:\.\d+)?)')

_lock = threading.Lock()
_cached: tuple[float, float | None] | None = None  # (monotonic time, value)


def _run(argv: list[str]) -> bytes | None:
    try:
        done = subprocess.run(argv, capture_output=True, timeout=2, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _nvidia() -> float | None:
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    out = _run([tool, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"])
    if out is None:
        return None
    values = []
    for line in out.decode(errors="replace").splitlines():
        try:
            values.append(float(line.strip()))
        except ValueError:
            continue  # "[N/A]" on some boards
    return round(sum(values) / len(values), 1) if values else None


def _metal() -> float | None:
    tool = shutil.which("ioreg")
    if tool is None:
        return None
    out = _run([tool, "-r", "-d", "1", "-w", "0", "-c", "IOAccelerator"])
    if out is None:
        return None
    values = [float(m) for m in _IOREG_UTILIZATION.findall(out)]
    return round(max(values), 1) if values else None


def measure() -> float | None:
    """Percent busy of the GPU (0–100), or ``None`` where it cannot be measured."""
    if sys.platform == "darwin":
        return _metal()
    if sys.platform.startswith("linux"):
        return _nvidia()
    return None


def utilization() -> float | None:
    """``measure()``, at most once per ``CACHE_S``."""
    global _cached
    with _lock:
        now = time.monotonic()
        if _cached is not None and now - _cached[0] < CACHE_S:
            return _cached[1]
        value = measure()
        _cached = (now, value)
        return value
