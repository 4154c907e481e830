"""Checks run before a training run starts, so bad input is a 400/404 at once, not a failed run."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from forgellm.schemas import ErrorCode, TrainingStartRequest
from forgellm.services.common.errors import ForgeError
from forgellm.services.common.workspace import Workspace, check_name
from forgellm.services.training.data import iter_chat_examples, iter_documents, no_documents, too_few_examples


def resolve_dataset(workspace: Workspace, name: str, field: str = "dataset") -> Path:
    """A folder under ``dataset/`` by name, or a folder path inside the workspace (400 for a name
    that cannot be a path, 403 for one leading out, 404 for one that is not there)."""
    check_name(name, field)
    if Path(name).is_absolute():
        workspace.resolve(name, field=field)  # refused: an absolute path is never a dataset name
    candidates = [workspace.datasets / name] if "/" not in name and name not in (".", "..") else []
    candidates.append(workspace.home / name)
    for candidate in candidates:
        if candidate.is_dir():
            return workspace.resolve(str(candidate.relative_to(workspace.home)), field=field)
    workspace.resolve(name, field=field)  # refuses escapes with their own error first
    raise ForgeError(ErrorCode.DATASET_NOT_FOUND, f"Dataset not found: {name}",
                     details={"field": field, "dataset": name,
                              "searched_paths": [workspace.relative(workspace.datasets) + "/", "workspace paths"]},
                     suggestion="GET /api/dataset/info lists the datasets; put text under dataset/<name>/.")


def check_dataset(folder: Path, training_type: str, warnings: list[str] | None = None) -> int:
    """Parse every file as the trainer will (without tokenizing, and without keeping the text:
    the trainer service never holds a dataset in memory); returns the item count. Skipped files
    (binary, not UTF-8, empty, a link leading out) are appended to ``warnings``."""
    if training_type == "ift":
        count = sum(1 for _ in iter_chat_examples(folder, warnings))
        if count < 2:
            raise too_few_examples(warnings)
        return count
    count = sum(1 for _ in iter_documents(folder, warnings, texts=False))
    if not count:
        raise no_documents(folder, warnings)
    return count


def _short(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def run_name(request: TrainingStartRequest, model_path: Path, when: datetime) -> str:
    """``Qwen3_4B_bf16_lr5e_05_bs2_iter500_seq3072_2025-01-15_10-30`` as in the reference."""
    model = _short(request.model_name.rstrip("/").split("/")[-1]) or _short(model_path.name)
    lr = f"{request.learning_rate:g}".replace("-", "_").replace(".", "_")
    return (f"{model}_lr{lr}_bs{request.batch_size}_iter{request.max_iterations}_seq{request.max_seq_length}_"
            f"{when:%Y-%m-%d_%H-%M}")


def training_id(request: TrainingStartRequest, when: datetime) -> str:
    return f"{request.training_type}_{when:%Y%m%d_%H%M%S}"
