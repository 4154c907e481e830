"""A training run on disk: ``training_config.json``, ``metrics.jsonl``, checkpoints.

``metrics.jsonl`` is append-only, one JSON object per line, each with an ``event``:
  train       iteration, train_loss, learning_rate, tokens_per_second, trained_tokens,
              memory_usage_gb, peak_memory_gb, timestamp
  eval        iteration, val_loss, timestamp
  checkpoint  iteration, file, val_loss, timestamp
(other events — start, resume, stop, complete, error — are kept for the record). A line cut
short by a crash is skipped, so a reader never fails on a run that died mid-write.

``training_stability`` (dashboard) = max(0, 1 − std(Δloss) / mean(loss)) over the training-loss
reports, where Δloss are the differences between consecutive reports: 1 is a perfectly smooth
curve, 0 a curve whose step-to-step jumps are as large as the loss itself. ``None`` with fewer
than three reports.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgellm.schemas import CheckpointInfo, ErrorCode
from forgellm.services.common.errors import ForgeError
from forgellm.services.common.models import read_json
from forgellm.services.common.workspace import Workspace

CHECKPOINT_FILE = re.compile(r"^(\d{7})_adapters\.safetensors$")
RUN_KINDS = ("cpt", "ift")
TOP_N = 3


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text(errors="replace").splitlines()
    except OSError:
        return []
    events = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("iteration", 0), int):
            events.append(event)
    return events


def is_run_dir(path: Path) -> bool:
    return (path / "training_config.json").is_file()


def list_runs(workspace: Workspace, kind: str) -> list[Path]:
    root = workspace.runs_of(kind)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and is_run_dir(p) and workspace.contains(p)),
                  key=lambda p: p.name)


def current_run(workspace: Workspace) -> Path | None:
    """The run the trainer last worked on (it writes ``.forgellm/current_run``), else the
    newest run on disk."""
    marker = workspace.state_dir / "current_run"
    if marker.is_file():
        candidate = workspace.home / marker.read_text().strip()
        if workspace.contains(candidate) and is_run_dir(candidate):
            return candidate
    runs = [run for kind in RUN_KINDS for run in list_runs(workspace, kind)]
    if not runs:
        return None
    return max(runs, key=lambda p: (p / "training_config.json").stat().st_mtime)


def resolve_run(workspace: Workspace, training_dir: str, field: str = "training_dir") -> Path:
    path = workspace.resolve(training_dir, field=field)
    if not is_run_dir(path):
        raise ForgeError(ErrorCode.RUN_NOT_FOUND, f"No training run at '{training_dir}'",
                         details={"field": field, "training_dir": training_dir},
                         suggestion="GET /api/models lists the runs (cpt_models, ift_models).")
    return path


def validation_by_iteration(events: list[dict[str, Any]]) -> dict[int, float]:
    losses: dict[int, float] = {}
    for event in events:
        if event.get("event") in ("eval", "checkpoint") and isinstance(event.get("val_loss"), (int, float)):
            losses[event["iteration"]] = float(event["val_loss"])
    return losses


@dataclass(slots=True)
class Ranking:
    checkpoints: list[CheckpointInfo]
    best: list[int]


def rank_checkpoints(workspace: Workspace, run_dir: Path, events: list[dict[str, Any]] | None = None) -> Ranking:
    """Every checkpoint file of the run, ranked by validation loss (1 = lowest). A checkpoint that
    is a link leading out of the workspace is left out: nothing may load it through the ranking."""
    events = read_metrics(run_dir) if events is None else events
    val = validation_by_iteration(events)
    found = []
    for file in run_dir.iterdir():
        match = CHECKPOINT_FILE.match(file.name)
        if match and workspace.contains(file):
            found.append((int(match.group(1)), file))
    scored = sorted((it for it, _ in found if it in val), key=lambda it: (val[it], -it))
    rank = {iteration: position + 1 for position, iteration in enumerate(scored)}
    infos = [
        CheckpointInfo(
            iteration=iteration,
            path=workspace.relative(file),
            validation_loss=val.get(iteration),
            rank=rank.get(iteration),
            is_best=rank.get(iteration) == 1,
            size_mb=round(file.stat().st_size / 1024**2, 6),
        )
        for iteration, file in found
    ]
    infos.sort(key=lambda c: (c.rank is None, c.rank or 0, -c.iteration))
    return Ranking(infos, scored[:TOP_N])


def training_stability(losses: list[float]) -> float | None:
    if len(losses) < 3:
        return None
    deltas = [b - a for a, b in zip(losses, losses[1:], strict=False)]
    mean_delta = sum(deltas) / len(deltas)
    std = math.sqrt(sum((d - mean_delta) ** 2 for d in deltas) / len(deltas))
    mean_loss = sum(losses) / len(losses)
    if mean_loss <= 0:
        return None
    return round(max(0.0, 1.0 - std / mean_loss), 4)


def dashboard(workspace: Workspace, run_dir: Path) -> dict[str, Any]:
    events = read_metrics(run_dir)
    rows: dict[int, dict[str, Any]] = {}
    for event in events:
        kind = event.get("event")
        if kind not in ("train", "eval"):
            continue
        row = rows.setdefault(event["iteration"], {"iteration": event["iteration"]})
        if kind == "train":
            row.update(training_loss=event.get("train_loss"), learning_rate=event.get("learning_rate"),
                       tokens_per_second=event.get("tokens_per_second"),
                       memory_usage_gb=event.get("memory_usage_gb"), timestamp=event.get("timestamp"))
        else:
            row["validation_loss"] = event.get("val_loss")
            row.setdefault("timestamp", event.get("timestamp"))
    keys = ("training_loss", "validation_loss", "learning_rate", "tokens_per_second", "memory_usage_gb", "timestamp")
    series = [{"iteration": it, **{k: rows[it].get(k) for k in keys}} for it in sorted(rows)]
    train = [e for e in events if e.get("event") == "train"]
    speeds = [e["tokens_per_second"] for e in train if isinstance(e.get("tokens_per_second"), (int, float))]
    peaks = [e.get("peak_memory_gb") or e.get("memory_usage_gb") for e in train]
    peaks = [p for p in peaks if isinstance(p, (int, float))]
    losses = [e["train_loss"] for e in train if isinstance(e.get("train_loss"), (int, float))]
    return {
        "training_data": series,
        "best_checkpoints": rank_checkpoints(workspace, run_dir, events).best,
        "training_config": read_json(run_dir / "training_config.json"),
        "performance_metrics": {
            "avg_tokens_per_second": round(sum(speeds) / len(speeds), 2) if speeds else None,
            "peak_memory_gb": round(max(peaks), 3) if peaks else None,
            "training_stability": training_stability(losses),
        },
    }


@dataclass(slots=True)
class AdapterFacts:
    path: Path
    type: str
    rank: int | None
    alpha: float | None
    scale: float | None
    dropout: float | None
    layers: int | None
    targets: list[str]


def adapter_facts(path: Path) -> AdapterFacts:
    """Read ``adapter_config.json`` of an adapter folder (or of a checkpoint file's folder)."""
    folder = path.parent if path.is_file() else path
    config = read_json(folder / "adapter_config.json")
    if not config:
        raise ForgeError(ErrorCode.CHECKPOINT_NOT_FOUND, f"No adapter_config.json in {folder}",
                         details={"adapter_path": str(path)})
    params = config.get("lora_parameters", {}) or {}
    kind = str(config.get("fine_tune_type", "lora")).lower()
    rank = params.get("rank")
    scale = params.get("scale")
    alpha = params.get("alpha", scale * rank if (scale is not None and rank) else None)
    targets = params.get("keys") or config.get("lora_targets") or []
    return AdapterFacts(folder, {"lora": "LoRA", "dora": "DoRA", "full": "Full fine-tune"}.get(kind, kind), rank,
                        alpha, scale, params.get("dropout"), config.get("num_layers"), list(targets))
