"""One publish: checks, fuse, dashboard, card — built in a hidden temporary folder and renamed
into ``models/published/`` at the end, so a failure or a kill never leaves half a model."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from forgellm.schemas import ErrorCode
from forgellm.services.common.errors import ForgeError, disk_full_error, is_disk_full
from forgellm.services.common.runs import rank_checkpoints, resolve_run
from forgellm.services.common.workspace import Workspace
from forgellm.services.publishing.card import base_license, facts, write_card
from forgellm.services.publishing.dashboard import draw_dashboard
from forgellm.services.publishing.fuse import fuse_checkpoint
from forgellm.services.training.checkpoints import checkpoint_iteration

Progress = Callable[[str, float], None]
RUN_SUFFIX = re.compile(r"_seq\d+_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}(_\d+)?$")
TEMP_PREFIX = ".publishing-"


@dataclass(frozen=True, slots=True)
class Published:
    path: Path
    name: str
    dashboard: Path
    readme: Path


def find_checkpoint(ws: Workspace, checkpoint_path: str, training_dir: str) -> tuple[Path, Path, int]:
    run_dir = resolve_run(ws, training_dir)
    checkpoint = ws.resolve(checkpoint_path, field="checkpoint_path")
    if checkpoint.parent != run_dir:
        raise ForgeError(ErrorCode.INVALID_REQUEST, "The checkpoint is not in the given training_dir",
                         details={"field": "checkpoint_path", "training_dir": training_dir},
                         suggestion="GET /api/checkpoints?training_dir=… lists this run's checkpoints.")
    try:
        iteration = checkpoint_iteration(checkpoint)
    except ValueError as exc:
        raise ForgeError(ErrorCode.INVALID_REQUEST, str(exc), details={"field": "checkpoint_path"}) from None
    if not checkpoint.is_file():
        raise ForgeError(ErrorCode.CHECKPOINT_NOT_FOUND, f"No checkpoint {checkpoint.name} in {training_dir}",
                         details={"field": "checkpoint_path", "checkpoint_path": checkpoint_path},
                         suggestion="GET /api/checkpoints?training_dir=… lists this run's checkpoints.")
    return run_dir, checkpoint, iteration


def clean_partial(ws: Workspace) -> list[str]:
    """Remove temporary folders left by a publish that was killed."""
    removed = []
    for folder in ws.published.glob(TEMP_PREFIX + "*") if ws.published.is_dir() else []:
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder.name)
    return removed


def publish_checkpoint(ws: Workspace, checkpoint_path: str, training_dir: str, *,
                       progress: Progress | None = None, now: datetime | None = None) -> Published:
    say = progress or (lambda stage, fraction: None)
    run_dir, checkpoint, iteration = find_checkpoint(ws, checkpoint_path, training_dir)
    try:
        config = json.loads((run_dir / "training_config.json").read_text())
        adapter_config = json.loads((run_dir / "adapter_config.json").read_text())
        base_path = Path(config["model_path"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        missing = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ForgeError(ErrorCode.INVALID_REQUEST,
                         f"This run's training_config.json / adapter_config.json cannot be used to publish ({missing})",
                         details={"field": "training_dir", "training_dir": training_dir},
                         suggestion="Publish a run made by ForgeLLM's trainer: its training_config.json names the "
                                    "base model (model_path).") from None
    if not (base_path / "config.json").is_file():
        raise ForgeError(ErrorCode.MODEL_NOT_FOUND, f"The base model of this run is gone: {base_path}",
                         details={"model_name": config.get("model_name")},
                         suggestion="Restore the base model folder, then publish again.")
    now = now or datetime.now()
    name = f"{RUN_SUFFIX.sub('', run_dir.name)}_{iteration:07d}_{now:%Y%m%d_%H%M%S}"
    final, n = ws.published / name, 2
    while final.exists():  # the same checkpoint published twice within a second
        final, n = ws.published / f"{name}_{n}", n + 1
    name = final.name
    ws.published.mkdir(parents=True, exist_ok=True)
    staging = ws.published / f"{TEMP_PREFIX}{name}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        say("fusing adapter into base model", 0.05)
        fuse_checkpoint(base_path, adapter_config, checkpoint, staging)
        say("drawing training dashboard", 0.7)
        ranking = rank_checkpoints(ws, run_dir)
        draw_dashboard(run_dir, staging / "training_dashboard.png", title=f"{run_dir.name} — published at "
                       f"iteration {iteration}", best=ranking.best)
        say("writing model card", 0.9)
        mine = next((c for c in ranking.checkpoints if c.iteration == iteration), None)
        card = facts(config, iteration, mine.validation_loss if mine else None, mine.rank if mine else None,
                     len(ranking.checkpoints), base_license(base_path), name)
        card["checkpoint_path"] = ws.relative(checkpoint)
        write_card(staging, card)
        staging.rename(final)  # the only moment the model appears: all or nothing
    except BaseException as exc:
        full = is_disk_full(exc, ws.published)  # asked before the partial files are removed
        shutil.rmtree(staging, ignore_errors=True)
        if full:
            raise disk_full_error(f"publishing {name}", ws.published, exc) from exc
        raise
    say("done", 1.0)
    return Published(final, f"published/{name}", final / "training_dashboard.png", final / "README.md")
