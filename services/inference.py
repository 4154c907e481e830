"""The inference service: the loaded model (+ adapter), its generation queue, load/unload.

* ``ModelLoadRequest`` answers at once; the model loads on the MLX worker thread while status
  shows ``is_loading``; ``model.loading`` / ``model.loaded`` / ``model.error`` events tell the
  rest (an error carries a suggestion and stays in status until the next load).
* ``GenerateRequest`` runs on the same worker thread with continuous batching
  (``generation.batching``): requests join the running batch as they arrive and leave it when
  done, so concurrent requests share each forward pass (a burst that finds the batch idle is
  gathered for up to 60 ms first, so its prompts are prefilled together). A request with a
  ``seed`` runs alone (one MLX random state), after the batch in hand. The event loop stays free: heartbeats,
  status and cancels are answered while a model generates. A streaming request answers
  ``GenerateChunk`` frames then the final ``GenerateReply``. ``GenerateCancelRequest`` stops a
  queued or running generation between two tokens (the gateway sends it when its HTTP client
  goes away); it ends with ``finish_reason="cancelled"`` and the log line
  ``generation_cancelled``.
* Memory guard: a load is refused at once with ``INSUFFICIENT_MEMORY`` (507) when the model
  would not fit (``MemoryCheck``): its ``*.safetensors`` (and adapter) bytes x 1.2, plus the memory
  a running training run reports (TrainingStatusRequest), must fit in the available memory:
  ``MemAvailable`` from /proc/meminfo on Linux (plus what the model being replaced holds, freed
  first), the total on macOS (unified memory), or ``FORGELLM_INFERENCE_MEMORY_LIMIT_GB`` when set
  (tests; a large value turns the guard off). On Linux the trainer's current memory is already
  out of ``MemAvailable``: counting it again keeps that much headroom for its peaks within a
  step (it reports MLX's active memory between steps), so a load never pushes it into swap.
* ``ModelUnloadRequest`` cancels what is queued, drops every reference to the model, collects
  and empties MLX's buffer cache; status then shows the memory MLX still holds.

All MLX calls happen on ``MlxWorker``'s thread; this module itself never imports MLX at import
time, so the service process starts fast and loads MLX (after OpenBLAS) on the first load.
"""

from __future__ import annotations

import asyncio
import collections
import os
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from forgellm.bus import AsyncRpcClient, BusError
from forgellm.config import bus_address
from forgellm.schemas import (
    Envelope,
    ErrorCode,
    GenerateCancelReply,
    GenerateCancelRequest,
    GenerateChunk,
    GenerateReply,
    GenerateRequest,
    Heartbeat,
    ModelError,
    ModelLoaded,
    ModelLoading,
    ModelLoadReply,
    ModelLoadRequest,
    ModelStatusReply,
    ModelStatusRequest,
    ModelUnloaded,
    ModelUnloadReply,
    ModelUnloadRequest,
    Reply,
    TrainingStatusReply,
    TrainingStatusRequest,
)
from forgellm.services.base import Service, handles
from forgellm.services.common.errors import ForgeError
from forgellm.services.common.models import ModelRef, resolve_model
from forgellm.services.common.workspace import Workspace
from forgellm.services.generation.adapters import NO_ADAPTER, AdapterChoice, resolve_adapter
from forgellm.services.generation.worker import MlxWorker

if TYPE_CHECKING:
    from forgellm.services.generation.engine import GenerationResult, LoadedModel

log = structlog.get_logger("inference")


# A burst of concurrent requests is gathered before its prefill (``_gather_burst``).
GATHER_QUIET_S = 0.01
GATHER_MAX_S = 0.06
MAX_GATHER = 16  # the batch's size (generation.batching.MAX_BATCH)

GiB = 1024**3
MEMORY_LIMIT_ENV = "FORGELLM_INFERENCE_MEMORY_LIMIT_GB"
WEIGHTS_OVERHEAD = 1.2  # weights as loaded + KV caches and buffers of a generation


@dataclass(frozen=True, slots=True)
class MemoryCheck:
    """Would ``model_gb`` of weights fit next to a training run holding ``trainer_gb``?"""

    model_gb: float  # safetensors bytes of the model (+ adapter)
    trainer_gb: float  # what a running training run reports (0 when none)
    available_gb: float | None  # None: unknown, the guard stands aside
    source: str  # MemAvailable | total | FORGELLM_INFERENCE_MEMORY_LIMIT_GB | unknown
    freed_gb: float = 0.0  # held by the model being replaced (freed before the load)

    @property
    def needed_gb(self) -> float:
        return self.model_gb * WEIGHTS_OVERHEAD + self.trainer_gb

    @property
    def budget_gb(self) -> float | None:
        return None if self.available_gb is None else self.available_gb + self.freed_gb

    @property
    def fits(self) -> bool:
        budget = self.budget_gb
        return budget is None or self.needed_gb <= budget


def model_weight_bytes(path: Path, adapter: AdapterChoice | None = None) -> int:
    """Bytes of the weights a load reads: the folder's ``*.safetensors`` and the adapter file."""
    files = list(path.glob("*.safetensors")) + ([adapter.weights] if adapter is not None else [])
    total = 0
    for file in files:
        try:
            total += file.stat().st_size
        except OSError:
            continue
    return total


def available_memory_gb(env: Mapping[str, str] | None = None, *, meminfo: Path = Path("/proc/meminfo"),
                        platform: str = sys.platform) -> tuple[float | None, str]:
    """(GiB the model may use, where the figure comes from)."""
    env = os.environ if env is None else env
    override = env.get(MEMORY_LIMIT_ENV, "").strip()
    if override:
        try:
            return float(override), MEMORY_LIMIT_ENV
        except ValueError:
            log.warning("memory_limit_ignored", variable=MEMORY_LIMIT_ENV, value=override)
    if platform == "darwin":  # unified memory, no MemAvailable: the whole machine
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, "total"
        except (ValueError, OSError):
            return None, "unknown"
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GiB, "MemAvailable"
    except (OSError, ValueError, IndexError):
        pass
    return None, "unknown"


def memory_refusal(check: MemoryCheck, model_name: str, training: TrainingStatusReply | None) -> ForgeError:
    running = training is not None and check.trainer_gb > 0
    where = (f" next to the running training run {training.training_id} ({check.trainer_gb:.2f} GiB)"
             if running else "")
    message = (f"Not enough memory to load {model_name}{where}: it needs about {check.needed_gb:.2f} GiB "
               f"(weights {check.model_gb:.2f} GiB x {WEIGHTS_OVERHEAD}"
               f"{' + the training run' if running else ''}), {check.budget_gb:.2f} GiB available "
               f"({check.source}{' + the model it replaces' if check.freed_gb else ''})")
    steps = []
    if running:
        steps.append("wait for the training run to finish (or stop it: POST /api/training/stop)")
    steps.append("load a smaller or quantized model (POST /api/models/quantize: 4-bit is about 1/4 to 1/8 "
                 "of the size)")
    steps.append("free memory held by other programs")
    suggestion = "; ".join(steps)
    suggestion = suggestion[0].upper() + suggestion[1:] + (
        f". {MEMORY_LIMIT_ENV} overrides the available-memory figure (a large value turns the guard off).")
    return ForgeError(ErrorCode.INSUFFICIENT_MEMORY, message, suggestion=suggestion, details={
        "model_name": model_name, "needed_gb": round(check.needed_gb, 3), "model_gb": round(check.model_gb, 3),
        "trainer_gb": round(check.trainer_gb, 3), "available_gb": round(check.budget_gb or 0.0, 3),
        "memory_source": check.source, "training_id": training.training_id if running else None})


def _engine() -> Any:
    from forgellm.services.generation import engine  # imports MLX (after preload_blas)

    return engine


@dataclass(slots=True)
class Job:
    """One generate request, from arrival to its final frame."""

    id: str
    request: GenerateRequest
    accepted_at: float
    loop: asyncio.AbstractEventLoop
    cancel: threading.Event = field(default_factory=threading.Event)
    started: bool = False
    adapter_requested: bool = False  # the request named an adapter (``adapter``: None = "none")
    adapter: AdapterChoice | None = None
    adapter_file: str | None = None  # what is applied, for the reply
    frames: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)

    def emit(self, kind: str, value: Any) -> None:
        """Hand a frame from the worker thread to the event loop."""
        try:
            self.loop.call_soon_threadsafe(self.frames.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: the service is gone
            self.cancel.set()


class InferenceService(Service):
    name = "inference"

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.workspace = Workspace(settings.home)
        self.worker = MlxWorker("mlx-inference")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loaded: LoadedModel | None = None
        self.loading: tuple[str, AdapterChoice | None] | None = None
        self.load_error: str | None = None
        self.jobs: dict[str, Job] = {}
        self.completed = 0
        self.cancelled = 0
        self._next_id = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._mlx_ready = False
        # Requests waiting to join the batch; the batch loop runs while this is non-empty or
        # sequences are active (the lock makes "queue and start the loop if idle" atomic).
        self._inbox: collections.deque[tuple[Job, LoadedModel]] = collections.deque()
        self._inbox_lock = threading.Lock()
        self._batch_running = False
        self._trainer: AsyncRpcClient | None = None  # asks the trainer for its memory (memory guard)

    async def on_start(self) -> None:
        self.loop = asyncio.get_running_loop()

    def state(self) -> str:
        if self.loading is not None:
            return "loading"
        if any(job.started for job in self.jobs.values()):
            return "generating"
        return "running"

    def _state_changed(self) -> None:
        """Heartbeat at once, so health shows loading/running without waiting for the next beat."""
        self.publish(Heartbeat(service=self.name, state=self.state(), pid=self.pid, uptime_s=self.uptime()))

    async def on_stop(self) -> None:
        for job in self.jobs.values():
            job.cancel.set()
        await asyncio.to_thread(self.worker.shutdown)
        if self._trainer is not None:
            self._trainer.close()

    # --- load / unload --------------------------------------------------------------------------

    def _refuse_while_loading(self) -> None:
        if self.loading is not None:
            raise ForgeError(ErrorCode.MODEL_LOADING, f"{self.loading[0]} is loading",
                             details={"model_name": self.loading[0]},
                             suggestion="Wait until GET /api/model/status shows loaded, then load again.")

    @handles(ModelLoadRequest)
    async def load(self, request: ModelLoadRequest, header: Envelope) -> ModelLoadReply:
        self._refuse_while_loading()
        ref = resolve_model(request.model_name, self.workspace)
        adapter = resolve_adapter(self.workspace, request.adapter_path) if request.adapter_path else None
        await self._check_memory(ref, adapter, request.model_name, header.correlation_id)
        self._refuse_while_loading()  # another load may have started while the trainer answered
        self._cancel_all("model replaced")
        self.loaded = None  # the worker frees it before loading the new one
        self.loading = (request.model_name, adapter)
        self.load_error = None
        self.publish(ModelLoading(model_name=request.model_name, adapter_path=request.adapter_path),
                     header.correlation_id)
        self._state_changed()
        self._spawn(self._load(ref, request, adapter, header.correlation_id))
        message = "Model loading started"
        if adapter is not None:
            message += f" (adapter: {adapter.note})"
        log.info("model_loading", model_name=request.model_name, path=str(ref.path),
                 adapter=adapter.note if adapter else None)
        return ModelLoadReply(message=message, model_name=request.model_name, adapter_path=request.adapter_path)

    async def _training_status(self, correlation_id: str) -> TrainingStatusReply | None:
        """The trainer's status, or None when it does not answer within a second."""
        if self._trainer is None:
            self._trainer = AsyncRpcClient(self.ctx, bus_address(self.settings, "trainer"), "trainer",
                                           source=self.name, timeout_s=1.0, read_retries=0)
        try:
            reply = await self._trainer.request(TrainingStatusRequest(), correlation_id=correlation_id, timeout=1.0)
        except BusError as exc:
            log.info("memory_guard_without_trainer", error=str(exc))
            return None
        return reply if isinstance(reply, TrainingStatusReply) else None

    async def _check_memory(self, ref: ModelRef, adapter: AdapterChoice | None, name: str,
                            correlation_id: str) -> None:
        """Refuse (INSUFFICIENT_MEMORY) a load that would not fit next to a running training run."""
        available, source = available_memory_gb()
        if available is None:
            return
        training = await self._training_status(correlation_id)
        trainer_gb = (training.memory_usage_gb or 0.0) if training is not None and training.is_training else 0.0
        freed = (await self._memory_gb() or 0.0) if self.loaded is not None and source == "MemAvailable" else 0.0
        check = MemoryCheck(model_gb=model_weight_bytes(ref.path, adapter) / GiB, trainer_gb=trainer_gb,
                            available_gb=available, source=source, freed_gb=freed)
        log.info("memory_check", model_name=name, needed_gb=round(check.needed_gb, 3),
                 budget_gb=round(check.budget_gb or 0.0, 3), source=source, fits=check.fits)
        if not check.fits:
            raise memory_refusal(check, name, training)

    def _load_in_worker(self, ref: ModelRef, name: str, adapter: AdapterChoice | None) -> LoadedModel:
        engine = _engine()
        engine.release_memory()  # whatever an earlier model left behind
        return engine.load(ref.path, name=name, adapter=adapter)

    async def _load(self, ref: ModelRef, request: ModelLoadRequest, adapter: AdapterChoice | None,
                    correlation_id: str) -> None:
        structlog.contextvars.bind_contextvars(correlation_id=correlation_id)
        try:
            loaded = await self.worker.run(self._load_in_worker, ref, request.model_name, adapter)
        except Exception as exc:  # any failure must reach status and the bus, never kill the service
            suggestion = exc.suggestion if isinstance(exc, ForgeError) else (
                "Check the model folder (config.json, *.safetensors, tokenizer files); "
                "'forgellm cli info --model NAME' shows what it is.")
            self.loading = None
            self.load_error = f"{request.model_name}: {exc}"
            log.error("model_load_failed", model_name=request.model_name, error=str(exc),
                      exc_info=not isinstance(exc, ForgeError))
            self.publish(ModelError(model_name=request.model_name, error=str(exc), suggestion=suggestion),
                         correlation_id)
            self._state_changed()
            return
        self.loaded = loaded
        self.loading = None
        self._state_changed()
        memory = await self._memory_gb()
        log.info("model_loaded", model_name=loaded.name, model_type=loaded.model_type,
                 seconds=round(loaded.load_seconds, 3), memory_gb=memory,
                 adapter=adapter.note if adapter else None)
        self.publish(ModelLoaded(
            model_name=loaded.name, adapter_path=request.adapter_path,
            adapter_file=self.workspace.relative(adapter.weights) if adapter else None,
            model_type=loaded.model_type, memory_usage_gb=memory,
            load_time_seconds=round(loaded.load_seconds, 3)), correlation_id)

    @handles(ModelUnloadRequest)
    async def unload(self, request: ModelUnloadRequest, header: Envelope) -> ModelUnloadReply:
        if self.loading is not None:
            raise ForgeError(ErrorCode.MODEL_LOADING, f"{self.loading[0]} is loading",
                             suggestion="Wait until the load finishes (GET /api/model/status), then unload.")
        if self.loaded is None:
            return ModelUnloadReply(message="No model was loaded")
        name = self.loaded.name
        self._cancel_all("model unloaded")
        self.loaded = None  # queued jobs hold the model until they end; they end before the release job
        before, after = await self.worker.run(self._release_in_worker)
        log.info("model_unloaded", model_name=name, memory_before_gb=round(before, 4), memory_after_gb=round(after, 4))
        self.publish(ModelUnloaded(model_name=name), header.correlation_id)
        return ModelUnloadReply(
            message=f"Model unloaded successfully (MLX memory {before * 1024:.1f} MB -> {after * 1024:.1f} MB)")

    def _release_in_worker(self) -> tuple[float, float]:
        engine = _engine()
        before = engine.active_memory_gb()
        engine.release_memory()
        return before, engine.active_memory_gb()

    # --- status ---------------------------------------------------------------------------------

    async def _memory_gb(self) -> float | None:
        if not self._mlx_ready and self.loaded is None:
            return 0.0  # MLX not even imported: it holds nothing
        self._mlx_ready = True
        # MLX's allocator counter (weights + KV caches + buffers), not process RSS: it is what a
        # model really holds, and it drops when the model is unloaded. A counter read, no MLX work.
        return round(_engine().active_memory_gb(), 6)

    @handles(ModelStatusRequest)
    async def status(self, request: ModelStatusRequest, header: Envelope) -> ModelStatusReply:
        loaded, loading = self.loaded, self.loading
        adapter = loaded.adapter if loaded else (loading[1] if loading else None)
        return ModelStatusReply(
            loaded=loaded is not None,
            is_loading=loading is not None,
            model_name=loaded.name if loaded else (loading[0] if loading else None),
            adapter_path=adapter.requested if adapter else None,
            adapter_file=self.workspace.relative(adapter.weights) if adapter else None,
            adapter_note=adapter.note if adapter else None,
            model_type=loaded.model_type if loaded else None,
            memory_usage_gb=await self._memory_gb(),
            error=self.load_error,
            active_generations=sum(1 for job in self.jobs.values() if job.started),
            queued_generations=sum(1 for job in self.jobs.values() if not job.started),
            generations_completed=self.completed,
            generations_cancelled=self.cancelled,
        )

    # --- generation -----------------------------------------------------------------------------

    def _require_model(self) -> LoadedModel:
        if self.loading is not None:
            raise ForgeError(ErrorCode.MODEL_LOADING, f"{self.loading[0]} is still loading",
                             details={"model_name": self.loading[0]},
                             suggestion="Wait until GET /api/model/status shows loaded: true.")
        if self.loaded is None:
            raise ForgeError(ErrorCode.MODEL_NOT_LOADED, "No model is loaded",
                             details={"last_error": self.load_error} if self.load_error else {},
                             suggestion='Load one first: POST /api/model/load {"model_name": "..."} '
                                        "(GET /api/models lists them).")
        return self.loaded

    def _cancel_all(self, reason: str) -> None:
        for job in self.jobs.values():
            if not job.cancel.is_set():
                log.info("generation_cancel_requested", generation_id=job.id, reason=reason)
                job.cancel.set()

    @handles(GenerateCancelRequest)
    async def cancel(self, request: GenerateCancelRequest, header: Envelope) -> GenerateCancelReply:
        job = self.jobs.get(request.generation_id)
        if job is not None and not job.cancel.is_set():
            log.info("generation_cancel_requested", generation_id=job.id, reason="client")
            job.cancel.set()
            return GenerateCancelReply(cancelled=True)
        return GenerateCancelReply(cancelled=False)

    async def _wait_for_load(self, limit_s: float = 600.0) -> None:
        """A generate that arrives while a model loads waits for it (as the reference's SDK example
        expects: it loads, then generates at once) instead of failing."""
        deadline = asyncio.get_running_loop().time() + limit_s
        # polled: the load ends on the MLX worker thread
        while self.loading is not None and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    @handles(GenerateRequest)
    async def generate(self, request: GenerateRequest, header: Envelope) -> Reply | Any:
        await self._wait_for_load()
        loaded = self._require_model()
        adapter_requested, adapter = False, None
        if request.adapter is not None:  # this request's own adapter (or "none": the bare base)
            adapter_requested = True
            if request.adapter.strip().lower() != NO_ADAPTER:
                adapter = await asyncio.to_thread(resolve_adapter, self.workspace, request.adapter, "adapter")
        self._next_id += 1
        job_id = request.generation_id or f"{header.msg_id}-{self._next_id}"
        if job_id in self.jobs:
            raise ForgeError(ErrorCode.INVALID_REQUEST, "generation_id already in use",
                             details={"field": "generation_id"})
        applied = adapter if adapter_requested else loaded.adapter
        job = Job(job_id, request, time.perf_counter(), asyncio.get_running_loop(),
                  adapter_requested=adapter_requested, adapter=adapter,
                  adapter_file=self.workspace.relative(applied.weights) if applied else None)
        self.jobs[job_id] = job
        if request.seed is not None:  # reproducible sampling needs the random state to itself
            self._spawn(self.worker.run(self._generate_in_worker, job, loaded))
        else:
            with self._inbox_lock:
                self._inbox.append((job, loaded))
                start = not self._batch_running
                self._batch_running = True
            if start:
                self._spawn(self.worker.run(self._batch_in_worker, loaded))
        del loaded  # only the job holds the model from here
        if request.streaming:
            return self._stream(job)
        try:
            while True:
                kind, value = await job.frames.get()
                if kind != "text":
                    return self._final(job, kind, value)
        finally:
            self._finish(job)

    def _spawn(self, awaitable: Any) -> None:
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stream(self, job: Job):  # -> AsyncIterator[Reply]
        index = 0
        try:
            while True:
                kind, value = await job.frames.get()
                if kind == "text":
                    yield GenerateChunk(text=value, index=index)
                    index += 1
                else:
                    yield self._final(job, kind, value)
                    return
        finally:
            self._finish(job)

    def _finish(self, job: Job) -> None:
        job.cancel.set()  # a consumer that went away stops the generation
        self.jobs.pop(job.id, None)

    def _final(self, job: Job, kind: str, value: Any) -> Reply:
        if kind == "error":
            return value.to_reply()
        result: GenerationResult = value
        if result.finish_reason == "cancelled":
            self.cancelled += 1
            log.info("generation_cancelled", generation_id=job.id, tokens_generated=result.tokens_generated,
                     max_tokens=job.request.max_tokens)
        else:
            self.completed += 1
            log.info("generation_done", generation_id=job.id, tokens=result.tokens_generated,
                     tokens_per_second=round(result.tokens_per_second, 2),
                     ttft_s=round(result.time_to_first_token, 4), finish_reason=result.finish_reason)
        return GenerateReply(
            response=result.text,
            tokens_generated=result.tokens_generated,
            generation_time_seconds=round(result.generation_time_seconds, 4),
            tokens_per_second=round(result.tokens_per_second, 3),
            time_to_first_token=round(result.time_to_first_token, 4),
            finish_reason=result.finish_reason,
            prompt_tokens=result.prompt_tokens,
            adapter_file=job.adapter_file,
        )

    def _take_batch_items(self, loaded: LoadedModel, idle: bool) -> list[Any]:
        """MLX thread: the requests that arrived for ``loaded`` (prompt built here); when
        ``idle`` and none arrived, mark the batch loop stopped, atomically."""
        while True:
            items = self._take_arrived_items(loaded, idle)
            # Everything that arrived was answered already (an error, a cancel): look again, so
            # that an empty answer while idle always comes with the loop marked stopped.
            if items is not None:
                return items

    def _take_arrived_items(self, loaded: LoadedModel, idle: bool) -> list[Any] | None:
        engine = _engine()
        from forgellm.services.generation.batching import BatchItem

        if idle:
            self._gather_burst()
        with self._inbox_lock:
            arrived = []
            while self._inbox and self._inbox[0][1] is loaded:
                arrived.append(self._inbox.popleft()[0])
            if not arrived and idle:
                self._batch_running = False
                if self._inbox:  # requests for a newer model: the next loop serves them
                    self._batch_running = True
                    self.loop.call_soon_threadsafe(self._restart_batch)
                return []
        items = []
        for job in arrived:
            request = job.request
            if job.cancel.is_set():
                job.emit("done", engine.GenerationResult(
                    text="", tokens_generated=0, prompt_tokens=0, generation_time_seconds=0.0,
                    time_to_first_token=0.0, finish_reason="cancelled"))
                continue
            try:
                tokens = engine.prompt_tokens(
                    loaded, request.prompt, [{"role": m.role, "content": m.content} for m in request.history],
                    is_base_model=request.is_base_model)
                key = engine.prepare_adapter(loaded, job.adapter) if job.adapter_requested else None
            except ForgeError as exc:
                job.emit("error", exc)
                continue
            job.started = True
            params = engine.SamplingParams(
                max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
                repetition_penalty=request.repetition_penalty, stop=tuple(request.stop),
                presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty)
            items.append(BatchItem(
                tokens=tokens, params=params, started_at=job.accepted_at,
                on_text=(lambda text, job=job: job.emit("text", text)) if request.streaming else None,
                on_done=lambda result, job=job: job.emit("done", result), should_stop=job.cancel.is_set,
                adapter=key))
        return None if idle and not items else items

    def _gather_burst(self) -> None:
        """MLX thread, batch idle: let a burst of concurrent requests arrive before the prefill, so
        they are prefilled together. Each prompt that joins a running batch stalls every sequence
        for its own prefill: measured on SmolLM2-135M, 8 requests arriving one per step gave about
        half the tokens/s of the same 8 arriving at once. Waits until no request arrived for
        ``GATHER_QUIET_S`` (a lone request pays just that), at most ``GATHER_MAX_S``."""
        began = last = time.perf_counter()
        seen = len(self._inbox)
        while seen and seen < MAX_GATHER:
            time.sleep(0.002)
            now = time.perf_counter()
            count = len(self._inbox)
            if count != seen:
                seen, last = count, now
            elif now - last >= GATHER_QUIET_S or now - began >= GATHER_MAX_S:
                return

    def _restart_batch(self) -> None:
        with self._inbox_lock:
            loaded = self._inbox[0][1] if self._inbox else None
            if loaded is None:
                self._batch_running = False
                return
        self._spawn(self.worker.run(self._batch_in_worker, loaded))

    def _batch_in_worker(self, loaded: LoadedModel) -> None:
        """MLX thread: serve every request for ``loaded`` with continuous batching."""
        from forgellm.services.generation.batching import serve_batch

        try:
            served = serve_batch(loaded, lambda idle: self._take_batch_items(loaded, idle))
            log.debug("batch_done", sequences=served)
        except Exception:  # a bug: fail the requests in hand, keep the service alive
            log.exception("batch_failed")
            with self._inbox_lock:
                self._batch_running = False

    def _generate_in_worker(self, job: Job, loaded: LoadedModel) -> None:
        """Runs on the MLX thread; every outcome reaches the job as a frame."""
        engine = _engine()
        request = job.request
        try:
            if job.cancel.is_set():
                job.emit("done", engine.GenerationResult(
                    text="", tokens_generated=0, prompt_tokens=0, generation_time_seconds=0.0,
                    time_to_first_token=0.0, finish_reason="cancelled"))
                return
            job.started = True
            tokens = engine.prompt_tokens(
                loaded, request.prompt, [{"role": m.role, "content": m.content} for m in request.history],
                is_base_model=request.is_base_model)
            params = engine.SamplingParams(
                max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
                repetition_penalty=request.repetition_penalty, seed=request.seed, stop=tuple(request.stop),
                presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty)
            on_text = (lambda text: job.emit("text", text)) if request.streaming else None
            key = engine.prepare_adapter(loaded, job.adapter) if job.adapter_requested else None
            result = engine.generate(loaded, tokens, params, on_text=on_text, should_stop=job.cancel.is_set,
                                     started_at=job.accepted_at, adapter=key)
            job.emit("done", result)
        except ForgeError as exc:
            job.emit("error", exc)
        except Exception as exc:  # a bug: report it on this request, keep the service alive
            log.exception("generation_failed", generation_id=job.id)
            job.emit("error", ForgeError(ErrorCode.INTERNAL, f"Generation failed: {type(exc).__name__}: {exc}",
                                         suggestion="This is a bug; the inference log has the traceback."))
        finally:
            del loaded
