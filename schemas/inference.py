"""Model server commands and events (the reference's "Model Management")."""

from typing import Annotated, Literal

import msgspec

from forgellm.schemas.base import Message, Reply, Request


class ModelLoadRequest(Request, kw_only=True):
    model_name: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    adapter_path: str | None = None


class ModelLoadReply(Reply, kw_only=True):
    success: bool = True
    message: str = "Model loading started"
    model_name: str
    adapter_path: str | None = None


class ModelStatusRequest(Request, kw_only=True):
    idempotent = True


class ModelStatusReply(Reply, kw_only=True):
    success: bool = True
    loaded: bool = False
    is_loading: bool = False
    model_name: str | None = None
    adapter_path: str | None = None
    model_type: str | None = None
    memory_usage_gb: float | None = None
    error: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(Request, kw_only=True):
    prompt: str
    history: list[ChatMessage] = []
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=32768)] = 256
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=10.0)] = 0.7
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.9
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0, le=10.0)] = 1.0
    seed: int | None = None
    stop: list[str] = []
    streaming: bool = False
    is_base_model: bool = False
    adapter: str | None = None


class GenerateChunk(Reply, kw_only=True):
    """One piece of a streamed generation (every frame but the last)."""

    text: str
    index: int


class GenerateReply(Reply, kw_only=True):
    success: bool = True
    response: str
    tokens_generated: int
    generation_time_seconds: float
    tokens_per_second: float
    time_to_first_token: float | None = None
    finish_reason: str = "stop"


class ModelUnloadRequest(Request, kw_only=True):
    pass


class ModelUnloadReply(Reply, kw_only=True):
    success: bool = True
    message: str = "Model unloaded successfully"


class ModelLoading(Message, kw_only=True):
    model_name: str
    adapter_path: str | None = None


class ModelLoaded(Message, kw_only=True):
    model_name: str
    adapter_path: str | None = None
    model_type: str | None = None
    memory_usage_gb: float | None = None


class ModelUnloaded(Message, kw_only=True):
    model_name: str | None = None


class ModelError(Message, kw_only=True):
    model_name: str
    error: str
    suggestion: str = ""
