"""Which adapter file a user's ``adapter_path`` means, read from disk only (no MLX here).

* a run folder (``training_config.json``): its best checkpoint, the lowest validation loss
  (``runs.rank_checkpoints``); a run with no validation loss yet falls back to mlx-lm's final
  ``adapters.safetensors``, then to the newest checkpoint;
* an adapter folder (``adapter_config.json`` + ``adapters.safetensors``): that file;
* one checkpoint file (``NNNNNNN_adapters.safetensors``): exactly that file, with its folder's
  ``adapter_config.json``.
Nothing on disk is modified.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from forgellm.schemas import ErrorCode
from forgellm.services.common.errors import ForgeError
from forgellm.services.common.runs import CHECKPOINT_FILE, is_run_dir, rank_checkpoints
from forgellm.services.common.workspace import Workspace

FINAL_ADAPTER = "adapters.safetensors"
# ``GenerateRequest.adapter`` value that asks for the bare base model, even when the model was
# loaded with an adapter (the web chat's side-by-side "base vs fine-tuned" uses it).
NO_ADAPTER = "none"


@dataclass(frozen=True, slots=True)
class AdapterChoice:
    requested: str
    config_dir: Path  # holds adapter_config.json
    weights: Path  # the one safetensors file applied
    note: str  # which file and why, for status and messages
    iteration: int | None = None
    validation_loss: float | None = None


def _not_found(adapter_path: str, why: str, suggestion: str, field: str) -> ForgeError:
    return ForgeError(ErrorCode.CHECKPOINT_NOT_FOUND, why,
                      details={"field": field, field: adapter_path}, suggestion=suggestion)


def resolve_adapter(workspace: Workspace, adapter_path: str, field: str = "adapter_path") -> AdapterChoice:
    """The adapter file ``adapter_path`` names, or a ``ForgeError`` (404 / 403 / 400) naming
    ``field`` (the request field it came from)."""
    path = workspace.resolve(adapter_path, field=field, allow_absolute=True)
    listing = "GET /api/checkpoints lists a run's checkpoints."
    if not path.exists():
        raise _not_found(adapter_path, f"No adapter at '{adapter_path}'", listing, field)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ForgeError(ErrorCode.INVALID_REQUEST, "'adapter_path' must be a run folder or a .safetensors file",
                             details={"field": field, field: adapter_path}, suggestion=listing)
        if not (path.parent / "adapter_config.json").is_file():
            raise _not_found(adapter_path, f"No adapter_config.json beside '{adapter_path}'",
                             "A checkpoint file must sit in its run folder, next to adapter_config.json.", field)
        match = CHECKPOINT_FILE.match(path.name)
        return AdapterChoice(adapter_path, path.parent, path, f"checkpoint file {workspace.relative(path)}",
                             iteration=int(match.group(1)) if match else None)
    if not (path / "adapter_config.json").is_file():
        raise _not_found(adapter_path, f"'{adapter_path}' has no adapter_config.json",
                         "Give a training run folder (models/cpt/<run> or models/ift/<run>) or one checkpoint file.",
                         field)
    if is_run_dir(path):
        ranking = rank_checkpoints(workspace, path)
        best = next((c for c in ranking.checkpoints if c.is_best), None)
        if best is not None:
            weights = workspace.home / best.path
            return AdapterChoice(
                adapter_path, path, weights,
                f"best checkpoint {weights.name} (iteration {best.iteration}, lowest validation loss "
                f"{best.validation_loss:.4f})", iteration=best.iteration, validation_loss=best.validation_loss)
    # Fallbacks read the folder itself: a file in it that links out of the workspace is not used.
    if (path / FINAL_ADAPTER).is_file() and workspace.contains(path / FINAL_ADAPTER):
        return AdapterChoice(adapter_path, path, path / FINAL_ADAPTER, f"final adapters {FINAL_ADAPTER}")
    checkpoints = sorted(p for p in path.iterdir() if CHECKPOINT_FILE.match(p.name) and workspace.contains(p))
    if checkpoints:
        newest = checkpoints[-1]
        return AdapterChoice(adapter_path, path, newest,
                             f"newest checkpoint {newest.name} (no validation loss recorded)",
                             iteration=int(newest.name[:7]))
    raise _not_found(adapter_path, f"'{adapter_path}' holds no adapter weights", listing, field)
