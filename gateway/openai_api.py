"""An OpenAI-compatible API on both ports: ``GET /v1/models``, ``POST /v1/chat/completions``,
``POST /v1/completions`` (plain JSON, or Server-Sent Events with ``"stream": true``).

Each request becomes one ``GenerateRequest`` on the bus, exactly like ``POST /api/model/generate``
(same batching, same cancel-on-disconnect: ``gateway/generation.py``'s guard, and a
``GenerateCancelRequest`` when the client goes away).

Mapping (what an OpenAI client sends -> ``GenerateRequest``):

* ``model``: must name the loaded model (``GET /api/model/status``'s ``model_name``) or its alias,
  the last part of that name (``published/foo`` -> ``foo``, ``org/repo`` -> ``repo``); anything
  else is a 404 ``model_not_found``. While that model is still loading the request waits for it.
* chat ``messages``: every message but the last is ``history`` (``developer`` counts as
  ``system``; content as a string or a list of ``{"type": "text"}`` parts); the last one must be
  the user's and becomes ``prompt``, formatted with the model's chat template.
  ``/v1/completions`` sends ``prompt`` raw (``is_base_model``: no chat template).
* ``max_tokens`` (or ``max_completion_tokens``), default 512; ``temperature`` (default 1.0, as
  OpenAI's), ``top_p`` (default 1.0), ``stop`` (string or list), ``seed`` (a seeded request runs
  alone, outside the batch, to be reproducible).
* ``frequency_penalty`` / ``presence_penalty`` (-2..2) are applied exactly as OpenAI defines them,
  over the tokens generated so far (``engine.OpenAIPenalties``). A non-standard
  ``repetition_penalty`` field (vLLM's name, mlx-lm's multiplicative penalty) is passed as is.
* Refused with a 400 rather than silently ignored: ``n`` > 1, ``tools``/``functions``,
  ``logprobs``, a ``response_format`` other than text, completions' ``suffix``, ``best_of`` > 1,
  token-id prompts and more than one prompt. Other fields (``user``, ``logit_bias``, ...) are
  ignored.

Replies follow OpenAI's objects (``chat.completion``, ``chat.completion.chunk``,
``text_completion``) with ``usage`` (prompt/completion/total tokens) and ``finish_reason``
(``stop``, ``length``; ``cancelled`` if the model was unloaded under the request), plus a
non-standard ``x_forgellm`` object with the server's timing (``time_to_first_token``,
``tokens_per_second``, ``generation_time_seconds``). Streaming: ``Content-Type:
text/event-stream``, one ``data: {chunk}\\n\\n`` per decoded piece (the first chat chunk carries
``{"role": "assistant"}``), a last chunk with the ``finish_reason``, the ``usage`` chunk when
``stream_options.include_usage`` is set, then ``data: [DONE]``. A failure after the stream began
is sent as ``data: {"error": {...}}`` before ``[DONE]``.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with the HTTP
status of ForgeLLM's error code; ``code`` is the ForgeLLM code in lower case (or
``model_not_found`` / ``invalid_api_key``). With an API token configured, these routes need
``Authorization: Bearer <token>`` too (what OpenAI clients send as their ``api_key``).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from aiohttp import web

from forgellm.bus import BusError, new_id
from forgellm.gateway.decode import convert
from forgellm.gateway.errors import REQUEST_ID, ApiError
from forgellm.gateway.generation import FRAME_TIMEOUT_S, SERVICE, ClientGone, _guarded
from forgellm.gateway.security import token_matches
from forgellm.schemas import (
    HTTP_STATUS,
    GenerateCancelRequest,
    GenerateChunk,
    GenerateReply,
    GenerateRequest,
    ListModelsRequest,
    ModelStatusRequest,
)

if TYPE_CHECKING:
    from forgellm.gateway.app import BusLink

log = structlog.get_logger("gateway")

DEFAULT_MAX_TOKENS = 512
CATALOG_TIMEOUT_S = 2.0  # /v1/models lists the catalog's models only if it answers quickly
_AT_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")


# --- request bodies (unknown fields are ignored, as OpenAI clients send many) ------------------


class _Part(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class _Message(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[_Part] | None = None


class _StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class _Common(msgspec.Struct, kw_only=True):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: _StreamOptions | None = None


class ChatBody(_Common, kw_only=True):
    messages: list[_Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionBody(_Common, kw_only=True):
    prompt: str | list[Any]
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None


# --- errors -------------------------------------------------------------------------------------


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 type_: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type_ or _error_type(status)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def _from_forge(exc: ApiError | BusError) -> OpenAIError:
    reply = exc.reply if isinstance(exc, ApiError) else exc.to_reply()
    status = exc.status if isinstance(exc, ApiError) else HTTP_STATUS.get(reply.code, 500)
    message = reply.error + (f" ({reply.suggestion})" if reply.suggestion else "")
    field = reply.details.get("field") if isinstance(reply.details, dict) else None
    return OpenAIError(status, message, str(reply.code).lower(), field if isinstance(field, str) else None)


def _invalid(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request", param)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json")


def _decode(raw: bytes, body_type: type[msgspec.Struct]) -> Any:
    if not raw.strip():
        raise _invalid("The request body is empty: send a JSON object.")
    try:
        data = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise _invalid(f"Malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _invalid(f"The body must be a JSON object, not {type(data).__name__}.")
    try:
        return msgspec.convert(data, body_type)
    except msgspec.ValidationError as exc:
        text = str(exc)
        missing = re.search(r"missing required field `([^`]+)`", text)
        if missing:
            raise _invalid(f"Missing required parameter: '{missing.group(1)}'.", missing.group(1)) from None
        at = _AT_PATH.search(text)
        param = at.group("path") if at else None
        raise _invalid(f"Invalid parameter{f' {param!r}' if param else ''}: {_AT_PATH.sub('', text)}",
                       param) from None


# --- mapping --------------------------------------------------------------------------------------


def _content(message: _Message, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise _invalid(f"Only text content is supported (messages[{index}] has a {part.type!r} part).",
                           f"messages[{index}].content")
        texts.append(part.text)
    return "".join(texts)


def _chat_prompt(messages: list[_Message]) -> tuple[str, list[dict[str, str]]]:
    if not messages:
        raise _invalid("'messages' must hold at least one message.", "messages")
    turns = []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if role not in ("system", "user", "assistant"):
            raise _invalid(f"Unsupported role {message.role!r} in messages[{i}]: system, developer, user and "
                           "assistant are supported (no tools).", f"messages[{i}].role")
        turns.append({"role": role, "content": _content(message, i)})
    if turns[-1]["role"] != "user":
        raise _invalid("The last message must be the user's: it is what the model answers.", "messages")
    return turns[-1]["content"], turns[:-1]


def _sampling(body: _Common, max_tokens: int | None) -> dict[str, Any]:
    if body.n not in (None, 1):
        raise _invalid("Only n=1 is supported: send several requests (they are batched together).", "n")
    fields: dict[str, Any] = {
        "max_tokens": DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
    }
    if body.stop:
        stops = [body.stop] if isinstance(body.stop, str) else body.stop
        fields["stop"] = [s for s in stops if s]
    if body.seed is not None:
        fields["seed"] = body.seed
    if body.frequency_penalty:
        fields["frequency_penalty"] = body.frequency_penalty
    if body.presence_penalty:
        fields["presence_penalty"] = body.presence_penalty
    if body.repetition_penalty is not None:
        fields["repetition_penalty"] = body.repetition_penalty
    return fields


def chat_request(body: ChatBody) -> GenerateRequest:
    if body.tools or body.functions:
        raise _invalid("Tools and function calling are not supported.", "tools")
    if body.logprobs or body.top_logprobs:
        raise _invalid("logprobs are not supported.", "logprobs")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise _invalid("Only response_format {'type': 'text'} is supported.", "response_format")
    prompt, history = _chat_prompt(body.messages)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return _convert({"prompt": prompt, "history": history, **_sampling(body, max_tokens),
                     "streaming": bool(body.stream)})


def completion_request(body: CompletionBody) -> GenerateRequest:
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise _invalid("'prompt' must be one string (or a list holding one string); token ids and "
                           "several prompts are not supported.", "prompt")
        prompt = prompt[0]
    if body.suffix:
        raise _invalid("'suffix' (fill-in-the-middle) is not supported.", "suffix")
    if body.best_of not in (None, 1):
        raise _invalid("Only best_of=1 is supported.", "best_of")
    if body.logprobs:
        raise _invalid("logprobs are not supported.", "logprobs")
    return _convert({"prompt": prompt, **_sampling(body, body.max_tokens), "is_base_model": True,
                     "streaming": bool(body.stream)})


_PARAM_NAMES = {"prompt": "prompt", "history": "messages"}


def _convert(fields: dict[str, Any]) -> GenerateRequest:
    try:
        request = convert(fields, GenerateRequest)
    except ApiError as exc:
        error = _from_forge(exc)
        error.code = "invalid_request"
        if error.param:
            error.param = _PARAM_NAMES.get(error.param, error.param)
        raise error from None
    return msgspec.structs.replace(request, generation_id=new_id())


def _alias(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def _finish_reason(reason: str) -> str:
    return reason or "stop"  # stop | length | cancelled (the model was unloaded or replaced)


def _usage(reply: GenerateReply) -> dict[str, int]:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.tokens_generated,
            "total_tokens": reply.prompt_tokens + reply.tokens_generated}


def _timing(reply: GenerateReply) -> dict[str, Any]:
    return {"time_to_first_token": reply.time_to_first_token, "tokens_per_second": reply.tokens_per_second,
            "generation_time_seconds": reply.generation_time_seconds}


# --- handlers -------------------------------------------------------------------------------------


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class OpenAIRoutes:
    def __init__(self, link: BusLink) -> None:
        self.link = link
        self.client = link.clients[SERVICE]
        self.token = link.settings.security.api_token
        self.pending: set[asyncio.Task[None]] = set()

    # -- plumbing

    def _wrap(self, handler: Handler) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                self._authorize(request)
                return await handler(request)
            except OpenAIError as exc:
                return _json(exc.body(), exc.status)
            except (ApiError, BusError) as exc:
                error = _from_forge(exc)
                return _json(error.body(), error.status)

        return handle

    def _authorize(self, request: web.Request) -> None:
        if not self.token:
            return
        header = request.headers.get("Authorization", "")
        given = header[7:] if header.startswith("Bearer ") else request.headers.get("X-API-Token")
        if not token_matches(given, self.token):
            raise OpenAIError(401, "Missing or wrong API key: send 'Authorization: Bearer <token>' "
                              "(FORGELLM_SECURITY_API_TOKEN).", "invalid_api_key")

    def _cancel(self, generation_id: str, request_id: str) -> None:
        async def send() -> None:
            try:
                await self.client.request(GenerateCancelRequest(generation_id=generation_id),
                                          correlation_id=request_id, timeout=self.link.settings.timeouts.rpc_s)
            except BusError as exc:
                log.warning("generation_cancel_failed", generation_id=generation_id, error=str(exc))

        log.info("generation_client_gone", generation_id=generation_id, api="openai")
        task = asyncio.ensure_future(send())
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _served_model(self, request: web.Request, wanted: str) -> str:
        """The loaded (or loading) model's name when ``wanted`` names it; else a 404."""
        status = await self.link.call(SERVICE, ModelStatusRequest(), request[REQUEST_ID])
        name = status.model_name
        if name is not None and (status.loaded or status.is_loading) and wanted in (name, _alias(name)):
            return name
        if name is not None and (status.loaded or status.is_loading):
            raise OpenAIError(404, f"The model '{wanted}' is not loaded: the server has '{name}' (alias "
                              f"'{_alias(name)}'). Load another one with POST /api/model/load.",
                              "model_not_found", "model")
        raise OpenAIError(404, f"The model '{wanted}' is not loaded, and no model is: load it first with "
                          f"POST /api/model/load {{\"model_name\": \"{wanted}\"}} (GET /v1/models lists them).",
                          "model_not_found", "model")

    # -- GET /v1/models

    async def models(self, request: web.Request) -> web.StreamResponse:
        request_id = request[REQUEST_ID]
        status = await self.link.call(SERVICE, ModelStatusRequest(), request_id)
        now = int(time.time())
        data: list[dict[str, Any]] = []
        if status.model_name is not None and (status.loaded or status.is_loading):
            data.append({"id": status.model_name, "object": "model", "created": now, "owned_by": "forgellm",
                         "loaded": True, "is_loading": status.is_loading, "alias": _alias(status.model_name),
                         "adapter_path": status.adapter_path})
        try:
            catalog = await asyncio.wait_for(
                self.link.call("catalog", ListModelsRequest(), request_id, CATALOG_TIMEOUT_S), CATALOG_TIMEOUT_S)
        except (BusError, ApiError, TimeoutError) as exc:
            log.info("openai_models_without_catalog", error=str(exc))
            catalog = None
        if catalog is not None:
            seen = {entry["id"] for entry in data}
            for group in (catalog.base_models, catalog.published_models, catalog.cached_models):
                for entry in group:
                    if entry.name in seen:
                        continue
                    seen.add(entry.name)
                    data.append({"id": entry.name, "object": "model", "owned_by": "forgellm", "loaded": False,
                                 "created": now, "type": entry.type})
        return _json({"object": "list", "data": data})

    # -- POST /v1/chat/completions and /v1/completions

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body: ChatBody = _decode(await request.read(), ChatBody)
        message = chat_request(body)
        model = await self._served_model(request, body.model)
        return await self._complete(request, message, model, body, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body: CompletionBody = _decode(await request.read(), CompletionBody)
        message = completion_request(body)
        model = await self._served_model(request, body.model)
        return await self._complete(request, message, model, body, chat=False,
                                    echo=message.prompt if body.echo else "")

    async def _complete(self, request: web.Request, message: GenerateRequest, model: str, body: _Common, *,
                        chat: bool, echo: str = "") -> web.StreamResponse:
        self.link.check_up(SERVICE)
        request_id = request[REQUEST_ID]
        completion_id = ("chatcmpl-" if chat else "cmpl-") + message.generation_id
        created = int(time.time())
        if not message.streaming:
            try:
                reply = await _guarded(self.client.request(message, correlation_id=request_id,
                                                           timeout=FRAME_TIMEOUT_S), request, self.link)
            except ClientGone:
                self._cancel(message.generation_id, request_id)
                raise web.HTTPBadRequest(reason="client closed the connection") from None
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": reply.response},
                          "logprobs": None, "finish_reason": _finish_reason(reply.finish_reason)}
            else:
                choice = {"index": 0, "text": echo + reply.response, "logprobs": None,
                          "finish_reason": _finish_reason(reply.finish_reason)}
            return _json({"id": completion_id, "object": "chat.completion" if chat else "text_completion",
                          "created": created, "model": model, "choices": [choice], "usage": _usage(reply),
                          "system_fingerprint": None, "x_forgellm": _timing(reply)})
        stream = _SseWriter(completion_id, created, model, chat=chat)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        frames = self.client.stream(message, correlation_id=request_id, timeout=FRAME_TIMEOUT_S).__aiter__()
        response: web.StreamResponse | None = None
        try:
            frame = await _guarded(frames.__anext__(), request, self.link)  # an error here is a plain reply
            response = web.StreamResponse(headers={
                "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Request-ID": request_id})
            await response.prepare(request)
            await response.write(stream.start(echo))
            while True:
                if isinstance(frame, GenerateChunk):
                    await response.write(stream.piece(frame.text))
                elif isinstance(frame, GenerateReply):
                    await response.write(stream.end(frame, include_usage))
                    break
                frame = await _guarded(frames.__anext__(), request, self.link)
        except (ClientGone, ConnectionError):
            self._cancel(message.generation_id, request_id)
            if response is None:
                raise web.HTTPBadRequest(reason="client closed the connection") from None
            return response
        except asyncio.CancelledError:
            self._cancel(message.generation_id, request_id)
            raise
        except (BusError, ApiError) as exc:
            if response is None:
                raise
            self._cancel(message.generation_id, request_id)
            try:
                await response.write(_event(_from_forge(exc).body()) + b"data: [DONE]\n\n")
            except ConnectionError:
                return response
        finally:
            await frames.aclose()
        await response.write_eof()
        return response


def _event(data: Any) -> bytes:
    return b"data: " + msgspec.json.encode(data) + b"\n\n"


class _SseWriter:
    """OpenAI's chunk objects for one streamed completion, as SSE events."""

    def __init__(self, completion_id: str, created: int, model: str, *, chat: bool) -> None:
        self.chat = chat
        self.head = {"id": completion_id, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": created, "model": model, "system_fingerprint": None}

    def _chunk(self, choice: dict[str, Any], **extra: Any) -> bytes:
        return _event({**self.head, "choices": [choice], **extra})

    def start(self, echo: str) -> bytes:
        if self.chat:
            return self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None})
        return self.piece(echo) if echo else b""

    def piece(self, text: str) -> bytes:
        if self.chat:
            return self._chunk({"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None})
        return self._chunk({"index": 0, "text": text, "logprobs": None, "finish_reason": None})

    def end(self, reply: GenerateReply, include_usage: bool) -> bytes:
        reason = _finish_reason(reply.finish_reason)
        if self.chat:
            out = self._chunk({"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason},
                              x_forgellm=_timing(reply))
        else:
            out = self._chunk({"index": 0, "text": "", "logprobs": None, "finish_reason": reason},
                              x_forgellm=_timing(reply))
        if include_usage:
            out += _event({**self.head, "choices": [], "usage": _usage(reply)})
        return out + b"data: [DONE]\n\n"


def add_openai_routes(app: web.Application, link: BusLink) -> None:
    """Register ``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions`` on ``app``."""
    routes = OpenAIRoutes(link)
    app.router.add_get("/v1/models", routes._wrap(routes.models))
    app.router.add_post("/v1/chat/completions", routes._wrap(routes.chat))
    app.router.add_post("/v1/completions", routes._wrap(routes.completions))
