"""The exception service code raises for an expected failure; the service base turns it into
an ``ErrorReply`` (and the gateway into the reference's HTTP error body)."""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path
from typing import Any

from forgellm.schemas import ErrorCode, ErrorReply


class ForgeError(Exception):
    def __init__(self, code: ErrorCode, message: str, *, details: dict[str, Any] | None = None,
                 suggestion: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.details = details or {}
        self.suggestion = suggestion

    def to_reply(self) -> ErrorReply:
        return ErrorReply(code=self.code, error=str(self), details=self.details, suggestion=self.suggestion)


# --- a full disk --------------------------------------------------------------------------------

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# MLX's own file writer drops errno: "[write] Unable to write 334556 bytes to file."
_MLX_WRITE_FAILED = re.compile(r"Unable to write (\d+) bytes")


def is_disk_full(exc: BaseException, where: Path | None = None) -> bool:
    """True when ``exc`` (or what caused it) says the disk is full: ENOSPC/EDQUOT, or MLX's
    write failure while ``where``'s file system has less room than the write needed. Ask before
    removing the partial files: they are what fills the disk."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(current, ForgeError) and current.code == ErrorCode.DISK_FULL:
            return True
        match = _MLX_WRITE_FAILED.search(str(current)) if isinstance(current, RuntimeError) else None
        if match and where is not None:
            try:
                if shutil.disk_usage(_existing(where)).free < int(match.group(1)):
                    return True
            except OSError:
                pass
        current = current.__cause__ or current.__context__
    return False


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_full_error(doing: str, where: Path, exc: BaseException | None = None) -> ForgeError:
    """The DISK_FULL (507) error for a write that found no room, with what to do about it."""
    try:
        free = shutil.disk_usage(_existing(where)).free
    except OSError:
        free = None
    cause = f" ({exc})" if exc is not None and not isinstance(exc, ForgeError) else ""
    return ForgeError(
        ErrorCode.DISK_FULL, f"Disk full: no space left while {doing}{cause}",
        details={"path": str(where), "free_bytes": free},
        suggestion="Free disk space on the drive that holds the workspace (or move FORGELLM_HOME to a larger "
                   "one), then try again; nothing was left half-written.")
