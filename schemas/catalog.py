"""Catalog commands: what is on disk (models, datasets, runs, checkpoints, files)."""

from typing import Any

import msgspec

from forgellm.schemas.base import Reply, Request


class ModelEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    path: str | None = None
    type: str | None = None
    size_gb: float
    cached: bool | None = None
    created_at: str | None = None


class ListModelsRequest(Request, kw_only=True):
    idempotent = True


class ListModelsReply(Reply, kw_only=True):
    success: bool = True
    cached_models: list[ModelEntry] = []
    base_models: list[ModelEntry] = []
    cpt_models: list[ModelEntry] = []
    ift_models: list[ModelEntry] = []
    published_models: list[ModelEntry] = []


class CheckpointInfo(msgspec.Struct, kw_only=True):
    iteration: int
    path: str
    validation_loss: float | None
    rank: int | None
    is_best: bool
    size_mb: float


class CheckpointsRequest(Request, kw_only=True):
    idempotent = True
    training_dir: str | None = None


class CheckpointsReply(Reply, kw_only=True):
    success: bool = True
    checkpoints: list[CheckpointInfo] = []
    best_checkpoints: list[int] = []


class DatasetInfo(msgspec.Struct, kw_only=True):
    name: str
    path: str
    file_count: int
    total_size_mb: float
    estimated_tokens: int
    token_method: str | None = None


class DatasetInfoRequest(Request, kw_only=True):
    idempotent = True
    model: str | None = None


class DatasetInfoReply(Reply, kw_only=True):
    success: bool = True
    datasets: list[DatasetInfo] = []


class DashboardDataRequest(Request, kw_only=True):
    idempotent = True
    training_dir: str


class DashboardDataReply(Reply, kw_only=True):
    success: bool = True
    training_data: list[dict[str, Any]] = []
    best_checkpoints: list[int] = []
    training_config: dict[str, Any] = {}
    performance_metrics: dict[str, Any] = {}


class FsEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    type: str
    file_count: int | None = None
    size_mb: float


class BrowseRequest(Request, kw_only=True):
    idempotent = True
    path: str = "."


class BrowseReply(Reply, kw_only=True):
    success: bool = True
    path: str
    directories: list[FsEntry] = []
    files: list[FsEntry] = []
