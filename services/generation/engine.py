"""Load a model (and adapter) with mlx-lm and generate text from it.

Everything here runs MLX: call it from one thread per model (the inference service uses
``worker.MlxWorker``; the CLI its main thread). Sampling uses mlx-lm's ``make_sampler`` and
``make_logits_processors``; tokens come from ``mlx_lm.generate.stream_generate``.
"""

from __future__ import annotations

# OpenBLAS must be loaded before mlx.core is first imported (services/mlx_runtime.py).
from forgellm.services.mlx_runtime import preload_blas

preload_blas()

import gc  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import mlx.core as mx  # noqa: E402
import structlog  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.generate import stream_generate  # noqa: E402
from mlx_lm.sample_utils import make_logits_processors, make_sampler  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: E402
from mlx_lm.utils import load_model as mlx_load_model  # noqa: E402
from mlx_lm.utils import load_tokenizer  # noqa: E402

from forgellm.schemas import ErrorCode  # noqa: E402
from forgellm.services.common.errors import ForgeError  # noqa: E402
from forgellm.services.common.models import model_type as folder_model_type  # noqa: E402
from forgellm.services.generation.adapters import AdapterChoice  # noqa: E402

log = structlog.get_logger(__name__)

GiB = 1024**3


@dataclass(slots=True)
class LoadedModel:
    name: str
    path: Path
    model: Any  # mlx.nn.Module
    tokenizer: Any  # mlx_lm TokenizerWrapper
    model_type: str  # "instruct" when the tokenizer has a chat template, else "base"
    adapter: AdapterChoice | None
    load_seconds: float
    bank: Any = None  # an ``AdapterBank`` once a request names its own adapter


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    presence_penalty: float = 0.0  # OpenAI's additive penalties, over the generated tokens
    frequency_penalty: float = 0.0


class OpenAIPenalties:
    """OpenAI's presence and frequency penalties, exactly: every logit j minus
    ``frequency · count[j] + presence · (count[j] > 0)``, where ``count`` counts the tokens this
    request has *generated* so far (not the prompt; no window). mlx-lm's own processors look at
    the last 20 tokens of prompt + output instead.

    A processor is called once per sampled token with the token history, whose last entry is the
    token sampled at the previous step (the first call ends with the prompt), so it keeps its
    own counts: one instance per request."""

    def __init__(self, presence: float, frequency: float) -> None:
        self.presence, self.frequency = presence, frequency
        self.counts: dict[int, int] = {}
        self.calls = 0

    def __call__(self, tokens: Any, logits: mx.array) -> mx.array:
        if self.calls:
            last = tokens[-1]
            token = int(last.item()) if hasattr(last, "item") else int(last)
            self.counts[token] = self.counts.get(token, 0) + 1
        self.calls += 1
        if not self.counts:
            return logits
        ids = mx.array(list(self.counts))
        amounts = mx.array([self.frequency * n + self.presence for n in self.counts.values()], dtype=logits.dtype)
        return logits.at[:, ids].subtract(amounts)


def logits_processors(params: SamplingParams) -> list[Callable[[Any, mx.array], mx.array]]:
    """The per-request logits processors ``params`` asks for (fresh state each call)."""
    processors: list[Callable[[Any, mx.array], mx.array]] = []
    if params.repetition_penalty != 1.0:
        processors += make_logits_processors(repetition_penalty=params.repetition_penalty)
    if params.presence_penalty or params.frequency_penalty:
        processors.append(OpenAIPenalties(params.presence_penalty, params.frequency_penalty))
    return processors


@dataclass(slots=True)
class GenerationResult:
    text: str
    tokens_generated: int
    prompt_tokens: int
    generation_time_seconds: float  # prompt processing + decoding
    time_to_first_token: float  # from ``started_at`` (the caller's clock) to the first token
    finish_reason: str  # stop | length | cancelled
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_generated / self.generation_time_seconds if self.generation_time_seconds > 0 else 0.0


def active_memory_gb() -> float:
    """Bytes MLX holds right now (weights, KV caches, buffers), from MLX's allocator."""
    return mx.get_active_memory() / GiB


def release_memory() -> None:
    """Free what no Python object references any more: collect, then empty MLX's buffer cache."""
    gc.collect()
    mx.clear_cache()


# --- loading ---------------------------------------------------------------------------------


def apply_adapter(model: Any, choice: AdapterChoice) -> None:
    """Apply exactly ``choice.weights`` with its folder's ``adapter_config.json`` (read-only)."""
    try:
        config = json.loads((choice.config_dir / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ForgeError(ErrorCode.CHECKPOINT_NOT_FOUND, f"Unreadable adapter_config.json: {exc}",
                         details={"adapter_path": choice.requested}) from None
    fine_tune_type = str(config.get("fine_tune_type", "lora")).lower()
    if fine_tune_type != "full":
        params = dict(config.get("lora_parameters") or {})
        if "scale" not in params and params.get("alpha") is not None and params.get("rank"):
            params["scale"] = params["alpha"] / params["rank"]
        params.setdefault("dropout", 0.0)
        if "rank" not in params or "scale" not in params:
            raise ForgeError(ErrorCode.INVALID_REQUEST, "adapter_config.json lacks lora_parameters rank/scale",
                             details={"field": "adapter_path", "adapter_path": choice.requested})
        linear_to_lora_layers(model, int(config.get("num_layers", len(model.layers))), params,
                              use_dora=fine_tune_type == "dora")
    weights = mx.load(str(choice.weights))
    params_now = dict(tree_flatten(model.parameters()))
    if fine_tune_type == "full":
        allowed = params_now
    else:
        allowed = {k: v for k, v in params_now.items() if k.rsplit(".", 1)[-1] in {"lora_a", "lora_b", "m"}}
    misfits = [name for name, w in weights.items() if name not in allowed or w.shape != allowed[name].shape]
    if misfits or not weights:
        raise ForgeError(
            ErrorCode.INVALID_REQUEST,
            f"The adapter does not fit this model ({len(misfits)} of {len(weights)} tensors): "
            + ", ".join(misfits[:3]),
            details={"field": "adapter_path", "adapter_path": choice.requested, "misfits": misfits[:20]},
            suggestion="Load the adapter with the base model it was trained on (training_config.json model_name).")
    model.load_weights(list(weights.items()), strict=False)


def load(path: Path, *, name: str, adapter: AdapterChoice | None = None) -> LoadedModel:
    """Load the MLX model folder ``path`` (and apply ``adapter``), weights evaluated in memory."""
    started = time.perf_counter()
    try:
        model, config = mlx_load_model(path, lazy=False)
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except ForgeError:
        raise
    except (ValueError, KeyError, FileNotFoundError, OSError) as exc:
        raise ForgeError(
            ErrorCode.INVALID_REQUEST, f"Cannot load {name}: {type(exc).__name__}: {exc}",
            details={"model_name": name, "path": str(path)},
            suggestion="Check the folder holds an MLX model mlx-lm supports (config.json, *.safetensors, "
                       "tokenizer files); 'forgellm cli info --model NAME' shows what it is.") from None
    if adapter is not None:
        apply_adapter(model, adapter)
    model.eval()
    mx.eval(model.parameters())
    return LoadedModel(name=name, path=path, model=model, tokenizer=tokenizer,
                       model_type=folder_model_type(path), adapter=adapter,
                       load_seconds=time.perf_counter() - started)


def prepare_adapter(loaded: LoadedModel, choice: AdapterChoice | None) -> str:
    """The ``AdapterBank`` key of a per-request adapter (``None``: no adapter at all), its
    weights read on first use; raises ``ForgeError`` when it does not fit the model."""
    if loaded.bank is None:
        from forgellm.services.generation.adapter_bank import AdapterBank

        loaded.bank = AdapterBank(loaded.model)
    return loaded.bank.ensure(choice, loaded.adapter)


# --- prompts ---------------------------------------------------------------------------------


def prompt_tokens(loaded: LoadedModel, prompt: str, history: Sequence[dict[str, str]] = (),
                  *, is_base_model: bool = False) -> list[int]:
    """Token ids to generate from: the chat template over history + prompt, unless
    ``is_base_model`` (or the tokenizer has no chat template): then the raw text."""
    tokenizer = loaded.tokenizer
    if not is_base_model and getattr(tokenizer, "chat_template", None):
        messages = [*history, {"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        text = "\n\n".join([m["content"] for m in history] + [prompt])
        ids = tokenizer.encode(text, add_special_tokens=True)
    if not ids:
        raise ForgeError(ErrorCode.INVALID_REQUEST, "Invalid field 'prompt': nothing to generate from",
                         details={"field": "prompt", "reason": "the prompt is empty"})
    return list(ids)


# --- generation ------------------------------------------------------------------------------


class StopFilter:
    """Holds back text that may be the start of a stop string; cuts at the first stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add ``piece``; return the text now safe to show."""
        search_from = max(0, len(self.text) - self.hold)
        self.text += piece
        if self.stops:
            hits = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self.flush()
        safe_end = len(self.text) - self.hold if self.stops else len(self.text)
        if safe_end <= self.emitted:
            return ""
        out = self.text[self.emitted: safe_end]
        self.emitted = safe_end
        return out

    def flush(self) -> str:
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out


def generate(
    loaded: LoadedModel,
    tokens: list[int],
    params: SamplingParams,
    *,
    on_text: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    started_at: float | None = None,
    adapter: str | None = None,
) -> GenerationResult:
    """Generate from ``tokens``; ``on_text`` gets each piece of text as it is decoded (stop
    strings never reach it); ``should_stop`` is polled between tokens (cancellation);
    ``adapter`` is a key from ``prepare_adapter`` (None: the model as loaded)."""
    if loaded.bank is not None:
        with loaded.bank.using(adapter):
            return _generate(loaded, tokens, params, on_text, should_stop, started_at)
    return _generate(loaded, tokens, params, on_text, should_stop, started_at)


def _generate(
    loaded: LoadedModel,
    tokens: list[int],
    params: SamplingParams,
    on_text: Callable[[str], None] | None,
    should_stop: Callable[[], bool] | None,
    started_at: float | None,
) -> GenerationResult:
    begin = time.perf_counter()
    started_at = begin if started_at is None else started_at
    if params.seed is not None:
        mx.random.seed(params.seed)
    sampler = make_sampler(temp=params.temperature, top_p=params.top_p)
    processors = logits_processors(params) or None
    stop_filter = StopFilter(params.stop)
    count, first_token_at, finish = 0, None, "length"
    eos = set(loaded.tokenizer.eos_token_ids)
    last: Any = None
    responses = stream_generate(loaded.model, loaded.tokenizer, mx.array(tokens), max_tokens=params.max_tokens,
                                sampler=sampler, logits_processors=processors)
    try:
        for response in responses:
            last = response
            if first_token_at is None:
                first_token_at = time.perf_counter()
            if response.finish_reason is None or response.token not in eos:
                count += 1  # the final response repeats the EOS token when it stopped on one
            out = stop_filter.feed(response.text)
            if out and on_text is not None:
                on_text(out)
            if stop_filter.stopped:
                finish = "stop"
                break
            if response.finish_reason is not None:
                finish = response.finish_reason
                break
            if should_stop is not None and should_stop():
                finish = "cancelled"
                break
    finally:
        responses.close()
    if not stop_filter.stopped:
        rest = stop_filter.flush()
        if rest and on_text is not None:
            on_text(rest)
    end = time.perf_counter()
    stats = {}
    if last is not None:
        stats = {"prompt_tps": float(last.prompt_tps), "generation_tps": float(last.generation_tps),
                 "peak_memory_gb": float(last.peak_memory)}
    return GenerationResult(
        text=stop_filter.text,
        tokens_generated=count,
        prompt_tokens=len(tokens),
        generation_time_seconds=end - begin,
        time_to_first_token=(first_token_at or end) - started_at,
        finish_reason=finish,
        stats=stats,
    )
