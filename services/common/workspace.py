"""The workspace on disk (``FORGELLM_HOME``) and the one check that keeps every user-given path
inside it: no ``..`` escape, no absolute path outside, no symlink pointing out, no NUL byte."""

from __future__ import annotations

import os
from pathlib import Path

from forgellm.schemas import ErrorCode
from forgellm.services.common.errors import ForgeError

MAX_PATH_CHARS = 1024


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
            return str(path.resolve().relative_to(self.home))
        except ValueError:
            return str(path)

    def contains(self, path: Path) -> bool:
        resolved = path.resolve()
        return resolved == self.home or self.home in resolved.parents

    def resolve(self, user_path: str, *, field: str = "path", allow_absolute: bool = False) -> Path:
        """The real path of ``user_path`` (relative to the workspace), or a ``ForgeError``."""
        if "\x00" in user_path:
            raise ForgeError(ErrorCode.INVALID_REQUEST, f"'{field}' contains a NUL byte",
                             details={"field": field})
        if len(user_path) > MAX_PATH_CHARS:
            raise ForgeError(ErrorCode.INVALID_REQUEST, f"'{field}' is longer than {MAX_PATH_CHARS} characters",
                             details={"field": field})
        candidate = Path(user_path)
        if candidate.is_absolute() and not allow_absolute:
            raise ForgeError(ErrorCode.PATH_OUTSIDE_WORKSPACE, f"'{field}' must be relative to the workspace",
                             details={"field": field, "path": user_path},
                             suggestion="Give a path such as 'dataset/my_domain'.")
        full = candidate if candidate.is_absolute() else self.home / candidate
        # resolve() follows every symlink, so a link pointing out is caught here too.
        real = Path(os.path.realpath(full))
        if not (real == self.home or self.home in real.parents):
            raise ForgeError(ErrorCode.PATH_OUTSIDE_WORKSPACE, f"'{field}' points outside the workspace",
                             details={"field": field, "path": user_path},
                             suggestion="Only files inside the workspace (FORGELLM_HOME) can be used.")
        return real
