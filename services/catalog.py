"""The catalog service: a read-only view of the workspace, answered from disk on every
request (so a model or run added while it runs is seen at once)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from forgellm.schemas import (
    BrowseReply,
    BrowseRequest,
    CheckpointsReply,
    CheckpointsRequest,
    DashboardDataReply,
    DashboardDataRequest,
    DatasetInfoReply,
    DatasetInfoRequest,
    Envelope,
    ErrorCode,
    FsEntry,
    ListModelsReply,
    ListModelsRequest,
    ModelEntry,
)
from forgellm.services.base import Service, handles
from forgellm.services.common import runs
from forgellm.services.common.datasets import TokenCounter, describe_datasets
from forgellm.services.common.errors import ForgeError
from forgellm.services.common.models import (
    hf_cache_dir,
    is_model_dir,
    iso_time,
    model_type,
    resolve_model,
    tree_size,
    tree_stats,
)
from forgellm.services.common.samples import install_samples
from forgellm.services.common.workspace import Workspace

GIB = 1024**3
MIB = 1024**2


def _entry(workspace: Workspace, path: Path, name: str, *, relative_to: Path, cached: bool | None = None,
           stamp_file: str = "config.json") -> ModelEntry:
    stamp = path / stamp_file
    created = (stamp if stamp.exists() else path).stat().st_mtime
    return ModelEntry(name=name, path=str(path.relative_to(relative_to)), type=model_type(path),
                      size_gb=round(tree_size(path) / GIB, 6), cached=cached, created_at=iso_time(created))


class CatalogService(Service):
    name = "catalog"

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.workspace = Workspace(settings.home)
        self.tokens = TokenCounter()

    async def on_start(self) -> None:
        await asyncio.to_thread(install_samples, self.workspace)

    # --- models ---------------------------------------------------------------------------

    def _cached_models(self) -> list[ModelEntry]:
        root = hf_cache_dir()
        entries = []
        for repo in sorted(root.glob("models--*")) if root.is_dir() else []:
            snapshots = [p for p in (repo / "snapshots").glob("*") if is_model_dir(p)]
            if not snapshots:
                continue  # not (yet) an MLX-loadable download
            snapshot = max(snapshots, key=lambda p: p.stat().st_mtime)
            name = repo.name[len("models--"):].replace("--", "/")
            entry = _entry(self.workspace, snapshot, name, relative_to=root, cached=True)
            entry.size_gb = round(tree_size(repo / "blobs") / GIB, 6) or entry.size_gb
            entries.append(entry)
        return entries

    def _list_models(self) -> ListModelsReply:
        ws = self.workspace
        # A link leading out of the workspace is neither listed nor read (resolve_model refuses it).
        base = [_entry(ws, p, p.name, relative_to=ws.models)
                for p in sorted(ws.base_models.glob("*")) if is_model_dir(p) and ws.contains(p)]
        trained = {
            kind: [_entry(ws, p, p.name, relative_to=ws.models, stamp_file="training_config.json")
                   for p in runs.list_runs(ws, kind)]
            for kind in runs.RUN_KINDS
        }
        published = [_entry(ws, p, f"published/{p.name}", relative_to=ws.models)
                      for p in sorted(ws.published.glob("*"))
                      if is_model_dir(p) and not p.name.startswith(".") and ws.contains(p)]
        return ListModelsReply(cached_models=self._cached_models(), base_models=base, cpt_models=trained["cpt"],
                               ift_models=trained["ift"], published_models=published)

    @handles(ListModelsRequest)
    async def list_models(self, request: ListModelsRequest, header: Envelope) -> ListModelsReply:
        return await asyncio.to_thread(self._list_models)

    # --- runs -------------------------------------------------------------------------------

    def _run_dir(self, training_dir: str | None) -> Path | None:
        if training_dir:
            return runs.resolve_run(self.workspace, training_dir)
        return runs.current_run(self.workspace)

    def _checkpoints(self, training_dir: str | None) -> CheckpointsReply:
        run_dir = self._run_dir(training_dir)
        if run_dir is None:
            return CheckpointsReply()
        ranking = runs.rank_checkpoints(self.workspace, run_dir)
        return CheckpointsReply(checkpoints=ranking.checkpoints, best_checkpoints=ranking.best)

    @handles(CheckpointsRequest)
    async def checkpoints(self, request: CheckpointsRequest, header: Envelope) -> CheckpointsReply:
        return await asyncio.to_thread(self._checkpoints, request.training_dir)

    @handles(DashboardDataRequest)
    async def dashboard_data(self, request: DashboardDataRequest, header: Envelope) -> DashboardDataReply:
        run_dir = runs.resolve_run(self.workspace, request.training_dir)
        data = await asyncio.to_thread(runs.dashboard, self.workspace, run_dir)
        return DashboardDataReply(**data)

    # --- datasets and files -----------------------------------------------------------------

    def _datasets(self, model: str | None) -> DatasetInfoReply:
        tokenizer = None
        if model:
            ref = resolve_model(model, self.workspace, field="model")
            tokenizer_file = ref.path / "tokenizer.json"
            if not tokenizer_file.is_file():
                raise ForgeError(ErrorCode.INVALID_REQUEST, f"{model} has no tokenizer.json to count with",
                                 details={"field": "model"})
            tokenizer = (model, tokenizer_file)
        return DatasetInfoReply(datasets=describe_datasets(self.workspace, self.tokens, tokenizer))

    @handles(DatasetInfoRequest)
    async def dataset_info(self, request: DatasetInfoRequest, header: Envelope) -> DatasetInfoReply:
        return await asyncio.to_thread(self._datasets, request.model)

    def _browse(self, user_path: str) -> BrowseReply:
        ws = self.workspace
        folder = ws.resolve(user_path or ".", field="path")
        if not folder.exists():
            raise ForgeError(ErrorCode.NOT_FOUND, f"No such folder: {user_path}",
                             details={"field": "path", "path": user_path})
        if not folder.is_dir():
            raise ForgeError(ErrorCode.INVALID_REQUEST, f"Not a folder: {user_path}",
                             details={"field": "path", "path": user_path})
        directories, files = [], []
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_symlink() and not ws.contains(path):
                continue  # never show (or size) what lies outside the workspace
            if entry.is_dir():
                size, count = tree_stats(path)
                directories.append(FsEntry(name=entry.name, type="directory", file_count=count,
                                           size_mb=round(size / MIB, 6)))
            elif entry.is_file():
                files.append(FsEntry(name=entry.name, type="file", size_mb=round(entry.stat().st_size / MIB, 6)))
        shown = ws.relative(folder)
        return BrowseReply(path="." if shown in ("", ".") else shown, directories=directories, files=files)

    @handles(BrowseRequest)
    async def browse(self, request: BrowseRequest, header: Envelope) -> BrowseReply:
        return await asyncio.to_thread(self._browse, request.path)
