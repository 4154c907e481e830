"""The REST contract as one table: it drives both the aiohttp router and the OpenAPI document.

Each row names the bus service that answers, the Struct the input decodes into (JSON body for
POST, query string for GET) and the Struct of the reply. Rows with ``service=None`` are answered
by the gateway itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from forgellm import schemas as s


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    summary: str
    service: str | None
    request: type[msgspec.Struct] | None
    reply: type[msgspec.Struct] | None
    apis: tuple[str, ...] = ("web",)  # "web" = :5002, "server" = :5001 (model-server API)
    timeout_s: float | None = None  # for long commands; None = the configured rpc timeout


BOTH = ("web", "server")

ROUTES: tuple[Route, ...] = (
    Route("POST", "/api/training/start", "Start a training session (CPT or IFT)", "trainer",
          s.TrainingStartRequest, s.TrainingStartReply, timeout_s=120.0),  # it checks the whole dataset first
    Route("GET", "/api/training/status", "Current training status", "trainer",
          s.TrainingStatusRequest, s.TrainingStatusReply),
    Route("POST", "/api/training/stop", "Stop the current training session", "trainer",
          s.TrainingStopRequest, s.TrainingStopReply),
    Route("POST", "/api/model/load", "Load a model (and adapter) in the model server", "inference",
          s.ModelLoadRequest, s.ModelLoadReply, BOTH),
    Route("GET", "/api/model/status", "Status of the loaded model", "inference",
          s.ModelStatusRequest, s.ModelStatusReply, BOTH),
    Route("POST", "/api/model/generate", "Generate text with the loaded model (streaming: NDJSON lines, "
          "{\"token\"} then the statistics with \"done\": true)", "inference",
          s.GenerateRequest, s.GenerateReply, BOTH),
    Route("POST", "/api/model/unload", "Unload the model and free its memory", "inference",
          s.ModelUnloadRequest, s.ModelUnloadReply, BOTH),
    Route("GET", "/api/models", "Available models (cached, base, CPT, IFT, published)", "catalog",
          s.ListModelsRequest, s.ListModelsReply),
    Route("GET", "/api/checkpoints", "Checkpoints of the current (or given) run", "catalog",
          s.CheckpointsRequest, s.CheckpointsReply),
    Route("GET", "/api/dataset/info", "Available datasets", "catalog",
          s.DatasetInfoRequest, s.DatasetInfoReply),
    Route("GET", "/api/dashboard/data", "Dashboard data of a run", "catalog",
          s.DashboardDataRequest, s.DashboardDataReply),
    Route("GET", "/api/dashboard/realtime", "Real-time training metrics", "trainer",
          s.RealtimeRequest, s.RealtimeReply),
    Route("POST", "/api/training/publish_checkpoint", "Publish a checkpoint as a full model",
          "publisher", s.PublishCheckpointRequest, s.PublishCheckpointReply, timeout_s=1800.0),
    Route("POST", "/api/models/fetch_demo", "Install the offline demo model (SmolLM2-135M-Instruct)",
          "publisher", s.FetchDemoRequest, s.ModelAddedReply, timeout_s=1800.0),
    Route("POST", "/api/models/import_gguf", "Import a llama-family GGUF file from the workspace",
          "publisher", s.ImportGgufRequest, s.ModelAddedReply, timeout_s=1800.0),
    Route("POST", "/api/models/pull", "Download a model from the Hugging Face Hub", "publisher",
          s.PullModelRequest, s.ModelAddedReply, timeout_s=3600.0),
    Route("POST", "/api/models/quantize", "Quantize a published model (4/8 bit) into a new published model",
          "publisher", s.QuantizeRequest, s.QuantizeReply, timeout_s=1800.0),
    Route("POST", "/api/models/export_gguf", "Export a llama-family published model to an f16 GGUF file",
          "publisher", s.ExportGgufRequest, s.ExportGgufReply, timeout_s=1800.0),
    Route("GET", "/api/filesystem/browse", "Browse workspace folders", "catalog",
          s.BrowseRequest, s.BrowseReply),
    Route("GET", "/api/health", "System health and component status", None, None, None, BOTH),
    Route("GET", "/api/openapi.json", "This API as an OpenAPI 3.1 document", None, None, None, BOTH),
)
