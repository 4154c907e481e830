"""The workspace on disk (``FORGELLM_HOME``) and the one check that keeps every user-given path
inside it: no ``..`` escape, no absolute path outside, no symlink pointing out, no NUL byte, no
name the file system would refuse (over 1024 characters, or a part over 255 bytes).

A refused name is a ``ForgeError`` naming the request field: 400 ``INVALID_REQUEST`` for a name
that cannot be a path, 403 ``PATH_OUTSIDE_WORKSPACE`` for one that leads out. Whatever follows a
check (``is_dir()``, ``exists()``) can then never fail with ``ENAMETOOLONG``."""

from __future__ import annotations

import os
from pathlib import Path

from forgellm.schemas import ErrorCode
from forgellm.services.common.errors import ForgeError

MAX_PATH_CHARS = 1024
MAX_PART_BYTES = 255  # NAME_MAX of Linux and macOS file systems


def check_name(user_path: str, field: str = "path") -> None:
    """Refuse (400, naming ``field``) a name that cannot be a workspace path at all."""
    if "\x00" in user_path:
        raise ForgeError(ErrorCode.INVALID_REQUEST, f"'{field}' contains a NUL byte",
                         details={"field": field})
    if len(user_path) > MAX_PATH_CHARS:
        raise ForgeError(ErrorCode.INVALID_REQUEST, f"'{field}' is longer than {MAX_PATH_CHARS} characters",
                         details={"field": field})
    if any(len(part.encode("utf-8", "surrogatepass")) > MAX_PART_BYTES for part in user_path.split("/")):
        raise ForgeError(ErrorCode.INVALID_REQUEST,
                         f"'{field}' has a folder or file name longer than {MAX_PART_BYTES} bytes",
                         details={"field": field})


def outside_error(field: str, user_path: str, why: str = "points outside the workspace") -> ForgeError:
    return ForgeError(ErrorCode.PATH_OUTSIDE_WORKSPACE, f"'{field}' {why}",
                      details={"field": field, "path": user_path},
                      suggestion="Only files inside the workspace (FORGELLM_HOME) can be used; "
                                 "copy or move what you need into it (a symlink out is refused).")


class Workspace:
    def __init__(self, home: Path) -> None:
        self.home = home.resolve()

    @property
    def datasets(self) -> Path:
        return self.home / "dataset"

    @property
    def models(self) -> Path:
        return self.home / "models"

    def runs_of(self, kind: str) -> Path:
        return self.models / kind  # cpt | ift

    @property
    def base_models(self) -> Path:
        return self.models / "base"

    @property
    def published(self) -> Path:
        return self.models / "published"

    @property
    def state_dir(self) -> Path:
        return self.home / ".forgellm"

    def relative(self, path: Path) -> str:
        """``path`` as the API shows it: relative to the workspace."""
        try:
            return str(Path(os.path.realpath(path)).relative_to(self.home))
        except (ValueError, OSError):
            return str(path)

    def contains(self, path: Path) -> bool:
        """Whether ``path`` exists and, every symlink followed, lies inside the workspace (a
        symlink loop or a dangling link does not)."""
        try:
            resolved = Path(os.path.realpath(path, strict=True))
        except (OSError, ValueError):
            return False
        return resolved == self.home or self.home in resolved.parents

    def resolve(self, user_path: str, *, field: str = "path", allow_absolute: bool = False) -> Path:
        """The real path of ``user_path`` (relative to the workspace), or a ``ForgeError``."""
        check_name(user_path, field)
        candidate = Path(user_path)
        if candidate.is_absolute() and not allow_absolute:
            raise ForgeError(ErrorCode.PATH_OUTSIDE_WORKSPACE, f"'{field}' must be relative to the workspace",
                             details={"field": field, "path": user_path},
                             suggestion="Give a path such as 'dataset/my_domain'.")
        full = candidate if candidate.is_absolute() else self.home / candidate
        # resolve() follows every symlink, so a link pointing out is caught here too.
        try:
            real = Path(os.path.realpath(full))
        except OSError as exc:  # e.g. a symlink loop
            raise ForgeError(ErrorCode.INVALID_REQUEST, f"'{field}' cannot be resolved: {exc.strerror}",
                             details={"field": field, "path": user_path}) from None
        if not (real == self.home or self.home in real.parents):
            raise outside_error(field, user_path)
        return real
