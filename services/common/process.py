"""Child processes that must not outlive their parent."""

from __future__ import annotations

import ctypes
import functools
import signal
import sys
from collections.abc import Callable


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """``preexec_fn`` for a child: on Linux it gets ``sig`` when its parent dies (so a worker
    whose service was killed stops gracefully instead of running on as an orphan)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").prctl(1, int(sig))  # PR_SET_PDEATHSIG
        except OSError:
            pass


def signal_when_parent_dies(sig: int) -> Callable[[], None]:
    return functools.partial(die_with_parent, sig)
