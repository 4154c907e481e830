"""Child processes that must not outlive their parent."""

from __future__ import annotations

import ctypes
import signal
import sys


def die_with_parent() -> None:
    """``preexec_fn`` for a child: on Linux it gets SIGTERM when its parent dies (so a worker
    whose service was killed stops gracefully instead of running on as an orphan)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass
