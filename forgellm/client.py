"""``ForgeLLMClient``: the Python SDK of the REST API, with typed results and typed errors.

It has the methods of the API reference's SDK example (``start_training``,
``get_training_status``, ``generate_text``) and one per endpoint. Results are the same
msgspec Structs the platform uses; failures raise a ``ForgeLLMError`` subclass carrying the
reference's error body (``error_code``, ``details``, ``suggestion``). Standard library only.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, TypeVar

import msgspec

from forgellm import schemas as s

T = TypeVar("T")


class ForgeLLMError(Exception):
    """The platform answered with an error (or could not be reached: ``status`` 0)."""

    def __init__(self, status: int, error_code: str, error: str, details: dict[str, Any] | None = None,
                 suggestion: str = "") -> None:
        super().__init__(f"{error_code}: {error}" + (f" ({suggestion})" if suggestion else ""))
        self.status = status
        self.error_code = error_code
        self.error = error
        self.details = details or {}
        self.suggestion = suggestion


class InvalidRequestError(ForgeLLMError):
    """400/413: the request was refused; ``details['field']`` names the culprit."""


class NotFoundError(ForgeLLMError):
    """404: unknown model, dataset, run, checkpoint or endpoint."""


class ConflictError(ForgeLLMError):
    """409: e.g. training already running, no model loaded."""


class ServiceUnavailableError(ForgeLLMError):
    """503 (a service is down) or 504 (it did not answer in time), or no connection at all."""


class ServerError(ForgeLLMError):
    """500 and anything else unexpected."""


def _error_class(status: int) -> type[ForgeLLMError]:
    if status in (400, 413, 403, 401, 405):
        return InvalidRequestError
    if status == 404:
        return NotFoundError
    if status == 409:
        return ConflictError
    if status in (0, 503, 504):
        return ServiceUnavailableError
    return ServerError


class ForgeLLMClient:
    def __init__(self, base_url: str = "http://localhost:5002", *, timeout: float = 60.0,
                 api_token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.api_token = api_token

    # --- transport ------------------------------------------------------------------------

    def _call(self, method: str, path: str, reply_type: type[T], *, body: Any = None,
              query: dict[str, Any] | None = None) -> T:
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = None
        headers = {"Accept": "application/json"}
        if body is not None:
            if isinstance(body, msgspec.Struct):
                body = {k: v for k, v in msgspec.to_builtins(body).items() if k != "type"}
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.api_token:
            headers["Authorization"] = f"Bearer {self.api_token}"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                err = json.loads(raw)
            except ValueError:
                err = {"error": raw.decode(errors="replace")[:500], "error_code": "INTERNAL"}
            raise _error_class(exc.code)(exc.code, err.get("error_code", "INTERNAL"), err.get("error", ""),
                                         err.get("details"), err.get("suggestion", "")) from None
        except OSError as exc:
            hint = "Is the platform running? Start it with 'forgellm start'."
            raise ServiceUnavailableError(0, "SERVICE_UNAVAILABLE", f"Cannot reach {self.base_url}: {exc}",
                                          suggestion=hint) from exc
        if reply_type is dict:
            return json.loads(raw)
        return msgspec.json.decode(raw, type=reply_type)

    # --- the reference's SDK methods ---------------------------------------------------------

    def start_training(self, config: dict[str, Any] | s.TrainingStartRequest) -> s.TrainingStartReply:
        return self._call("POST", "/api/training/start", s.TrainingStartReply, body=config)

    def get_training_status(self) -> s.TrainingStatusReply:
        return self._call("GET", "/api/training/status", s.TrainingStatusReply)

    def generate_text(self, prompt: str, model_name: str | None = None, **kwargs: Any) -> s.GenerateReply:
        """Generate with the loaded model; with ``model_name``, load it first if needed."""
        if model_name is not None:
            status = self.model_status()
            if not (status.loaded and status.model_name == model_name):
                self.load_model(model_name, kwargs.pop("adapter_path", None))
        return self._call("POST", "/api/model/generate", s.GenerateReply, body={"prompt": prompt, **kwargs})

    # --- every other endpoint ---------------------------------------------------------------

    def stop_training(self) -> s.TrainingStopReply:
        return self._call("POST", "/api/training/stop", s.TrainingStopReply, body={})

    def load_model(self, model_name: str, adapter_path: str | None = None) -> s.ModelLoadReply:
        body = {"model_name": model_name, **({"adapter_path": adapter_path} if adapter_path else {})}
        return self._call("POST", "/api/model/load", s.ModelLoadReply, body=body)

    def model_status(self) -> s.ModelStatusReply:
        return self._call("GET", "/api/model/status", s.ModelStatusReply)

    def unload_model(self) -> s.ModelUnloadReply:
        return self._call("POST", "/api/model/unload", s.ModelUnloadReply, body={})

    def list_models(self) -> s.ListModelsReply:
        return self._call("GET", "/api/models", s.ListModelsReply)

    def checkpoints(self, training_dir: str | None = None) -> s.CheckpointsReply:
        return self._call("GET", "/api/checkpoints", s.CheckpointsReply, query={"training_dir": training_dir})

    def dataset_info(self, model: str | None = None) -> s.DatasetInfoReply:
        return self._call("GET", "/api/dataset/info", s.DatasetInfoReply, query={"model": model})

    def dashboard_data(self, training_dir: str) -> s.DashboardDataReply:
        return self._call("GET", "/api/dashboard/data", s.DashboardDataReply,
                          query={"training_dir": training_dir})

    def realtime(self) -> s.RealtimeReply:
        return self._call("GET", "/api/dashboard/realtime", s.RealtimeReply)

    def publish_checkpoint(self, checkpoint_path: str, training_dir: str) -> s.PublishCheckpointReply:
        return self._call("POST", "/api/training/publish_checkpoint", s.PublishCheckpointReply,
                          body={"checkpoint_path": checkpoint_path, "training_dir": training_dir})

    def browse(self, path: str = ".") -> s.BrowseReply:
        return self._call("GET", "/api/filesystem/browse", s.BrowseReply, query={"path": path})

    def health(self) -> s.HealthReply:
        return self._call("GET", "/api/health", s.HealthReply)

    def openapi(self) -> dict[str, Any]:
        return self._call("GET", "/api/openapi.json", dict)
