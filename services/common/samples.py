"""The sample datasets ForgeLLM ships, copied into every workspace that lacks them."""

from __future__ import annotations

import shutil
from pathlib import Path

import structlog

from forgellm.services.common.workspace import Workspace

NAMES = ("sample_cpt", "sample_ift")
log = structlog.get_logger(__name__)


def sample_source() -> Path:
    import forgellm

    return Path(forgellm.__file__).parent / "sample_data"


def install_samples(workspace: Workspace) -> list[str]:
    """Copy each missing sample dataset into ``dataset/``; an existing folder is left alone
    (the user may have edited it). Returns the names copied."""
    source = sample_source()
    copied = []
    for name in NAMES:
        target = workspace.datasets / name
        if target.exists() or not (source / name).is_dir():
            continue
        staging = workspace.datasets / f".{name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source / name, staging)
        staging.rename(target)  # all or nothing
        copied.append(name)
    if copied:
        log.info("samples_installed", datasets=copied, into=str(workspace.datasets))
    return copied
