"""Creating a run on disk: validate the request, name the run, write ``training_config.json``.

Shared by the trainer service and ``forgellm train`` when it runs standalone.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

from forgellm.schemas import ErrorCode, TrainingStartRequest
from forgellm.services.common.errors import ForgeError
from forgellm.services.common.models import resolve_model
from forgellm.services.common.workspace import Workspace
from forgellm.services.training import checkpoints as ckpt
from forgellm.services.training.cluster import Layout, preflight, resolve_layout
from forgellm.services.training.validate import check_dataset, resolve_dataset, run_name, training_id


@dataclass(frozen=True, slots=True)
class PreparedRun:
    training_id: str
    run_dir: Path
    output_dir: str
    warnings: list[str]  # dataset files skipped (binary, not UTF-8, empty, a link leading out)
    layout: Layout | None = None  # a distributed run's ranks and hosts


def prepare_run(ws: Workspace, request: TrainingStartRequest, now: datetime | None = None,
                settings: Any = None) -> PreparedRun:
    """Check everything a run needs (model, datasets, resume point, the hosts of a distributed
    run) and lay out its folder.

    A new run gets a new folder under models/<cpt|ift>/; ``resume_from`` continues in the folder
    of the run it names (same training id, metrics appended; a new ``distributed`` may change
    its world size)."""
    if settings is None:
        from forgellm.config import load_settings

        settings = load_settings()
    layout = resolve_layout(ws, request, settings)
    model = resolve_model(request.model_name, ws)
    dataset = resolve_dataset(ws, request.dataset)
    warnings: list[str] = []
    check_dataset(dataset, request.training_type, warnings)
    general = None
    if request.general_dataset:
        general = resolve_dataset(ws, request.general_dataset, field="general_dataset")
        check_dataset(general, "cpt", warnings)
    if layout is not None:
        preflight(layout, ws.home, settings.training.preflight_timeout_s)
    now = now or datetime.now()
    if request.resume_from:
        source = ws.resolve(request.resume_from, field="resume_from")
        run_dir = source if source.is_dir() else source.parent
        if not (run_dir / "training_config.json").is_file():
            raise ForgeError(ErrorCode.RUN_NOT_FOUND, f"No run at {request.resume_from}",
                             details={"field": "resume_from"})
        if source.is_file():
            try:
                ckpt.checkpoint_iteration(source)
            except ValueError as exc:
                raise ForgeError(ErrorCode.CHECKPOINT_NOT_FOUND, str(exc), details={"field": "resume_from"}) from None
        elif ckpt.latest_checkpoint(run_dir) is None:
            raise ForgeError(ErrorCode.CHECKPOINT_NOT_FOUND, f"No checkpoint in {request.resume_from}",
                             details={"field": "resume_from"})
        # A folder means its latest checkpoint: named here, so every rank of a distributed run
        # resumes from the same file whatever its own view of the folder.
        request.resume_from = str(source if source.is_file()
                                  else ckpt.adapter_file(run_dir, ckpt.latest_checkpoint(run_dir)))
        previous = json.loads((run_dir / "training_config.json").read_text())
        tid = previous.get("training_id") or training_id(request, now)
    else:
        kind_dir = ws.runs_of(request.training_type)
        kind_dir.mkdir(parents=True, exist_ok=True)
        name = run_name(request, model.path, now)
        run_dir, n = kind_dir / name, 2
        while run_dir.exists():
            run_dir, n = kind_dir / f"{name}_{n}", n + 1
        run_dir.mkdir()
        tid = training_id(request, now)
    output_dir = ws.relative(run_dir)
    config = {**msgspec.to_builtins(request), "training_id": tid, "model_path": str(model.path),
              "dataset_path": str(dataset), "general_dataset_path": str(general) if general else None,
              "output_dir": output_dir, "workspace": str(ws.home), "created_at": now.isoformat(timespec="seconds"),
              "layout": layout.to_dict() if layout else None}
    config.pop("type", None)
    try:
        ckpt.atomic_write_text(run_dir / "training_config.json", json.dumps(config, indent=2))
        ws.state_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(ws.state_dir / "current_run", output_dir)
    except BaseException:
        if not request.resume_from:  # no empty run folder left behind (a full disk)
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return PreparedRun(tid, run_dir, output_dir, warnings, layout)
