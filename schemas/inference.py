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
    # Measured: bytes held by MLX (weights, caches) per mx.get_active_memory(), in GiB.
    memory_usage_gb: float | None = None
    error: str | None = None
    # Beyond the reference: the adapter file actually applied (a run folder's best checkpoint),
    # and the generation queue.
    adapter_file: str | None = None
    adapter_note: str | None = None
    active_generations: int = 0
    queued_generations: int = 0
    generations_completed: int = 0
    generations_cancelled: int = 0


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
    # OpenAI's additive penalties over the tokens generated so far (beyond the reference)
    presence_penalty: Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)] = 0.0
    # MLX seeds its generator with an unsigned integer: a negative seed was a 500 (found by fuzzing).
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)] | None = None
    stop: list[str] = []
    streaming: bool = False
    is_base_model: bool = False
    # This request's own LoRA adapter (a run folder, adapter folder or checkpoint file, as
    # adapter_path on load), applied on the loaded base without reloading it; "none": the bare
    # base model even when it was loaded with an adapter.
    adapter: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)] | None = None
    # Names the generation so GenerateCancelRequest can stop it. The gateway always sets a
    # fresh one (a value given in a REST body is replaced).
    generation_id: Annotated[str, msgspec.Meta(max_length=128)] | None = None


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
    finish_reason: str = "stop"  # stop (EOS or a stop string) | length | cancelled
    prompt_tokens: int = 0
    adapter_file: str | None = None  # the adapter file applied (the request's own or the loaded one)


class GenerateCancelRequest(Request, kw_only=True):
    """Stop a generation (queued or running); the gateway sends it when a client disconnects."""

    generation_id: str


class GenerateCancelReply(Reply, kw_only=True):
    success: bool = True
    cancelled: bool


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
    adapter_file: str | None = None
    load_time_seconds: float | None = None
    model_type: str | None = None
    memory_usage_gb: float | None = None


class ModelUnloaded(Message, kw_only=True):
    model_name: str | None = None


class ModelError(Message, kw_only=True):
    model_name: str
    error: str
    suggestion: str = ""
