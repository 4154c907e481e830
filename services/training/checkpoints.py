"""Checkpoint files, written so a crash never leaves half of one.

A checkpoint at iteration N is ``NNNNNNN_adapters.safetensors`` (mlx-lm naming) plus
``optimizer/NNNNNNN_optimizer.safetensors`` and ``optimizer/NNNNNNN_state.json`` (what resume
needs: iteration, best validation loss, early-stopping counter). Each file is written under a
temporary name and renamed; the adapter file is renamed last, so its presence means the whole
checkpoint is on disk.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

CHECKPOINT = re.compile(r"^(\d{7})_adapters\.safetensors$")


def adapter_file(run_dir: Path, iteration: int) -> Path:
    return run_dir / f"{iteration:07d}_adapters.safetensors"


def optimizer_file(run_dir: Path, iteration: int) -> Path:
    return run_dir / "optimizer" / f"{iteration:07d}_optimizer.safetensors"


def state_file(run_dir: Path, iteration: int) -> Path:
    return run_dir / "optimizer" / f"{iteration:07d}_state.json"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not keep the part that did fit
        raise


def atomic_save_safetensors(path: Path, arrays: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Write ``path`` whole or not at all. MLX writes through a Python file object here: its own
    writer reports a full disk as a bare RuntimeError, the file object raises OSError(ENOSPC)."""
    import mlx.core as mx

    tmp = path.with_name(f".{path.name}.tmp.safetensors")
    try:
        with open(tmp, "wb") as handle:
            mx.save_safetensors(handle, arrays, metadata=metadata or {})
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def latest_checkpoint(run_dir: Path) -> int | None:
    iterations = [int(m.group(1)) for p in run_dir.glob("*_adapters.safetensors") if (m := CHECKPOINT.match(p.name))]
    return max(iterations) if iterations else None


def checkpoint_iteration(path: Path) -> int:
    match = CHECKPOINT.match(path.name)
    if not match:
        raise ValueError(f"{path.name} is not a checkpoint file (NNNNNNN_adapters.safetensors)")
    return int(match.group(1))


def read_state(run_dir: Path, iteration: int) -> dict[str, Any] | None:
    try:
        return json.loads(state_file(run_dir, iteration).read_text())
    except (OSError, ValueError):
        return None
