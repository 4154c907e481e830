"""The Python SDK: our typed ForgeLLMClient, and the API reference's own example class."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from forgellm import schemas as s
from forgellm.client import (
    ConflictError,
    ForgeLLMClient,
    InvalidRequestError,
    ServiceUnavailableError,
)
from tests.helpers.procs import free_port

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "api-reference.md"


def test_typed_results(platform):
    client = ForgeLLMClient(platform.web)
    health = client.health()
    assert isinstance(health, s.HealthReply) and health.status == "healthy"
    status = client.get_training_status()
    assert isinstance(status, s.TrainingStatusReply) and status.is_training is False
    realtime = client.realtime()
    assert isinstance(realtime, s.RealtimeReply) and realtime.current_metrics is None
    assert "/api/training/start" in client.openapi()["paths"]


def test_typed_errors(platform):
    client = ForgeLLMClient(platform.web)
    with pytest.raises(InvalidRequestError) as info:
        client.start_training({"model_name": "m", "dataset": "d", "batch_size": -3})
    assert info.value.status == 400 and info.value.details["field"] == "batch_size"
    with pytest.raises(ConflictError) as info:
        client.stop_training()
    assert info.value.error_code == "NO_TRAINING_RUNNING" and info.value.suggestion
    with pytest.raises(ServiceUnavailableError) as info:
        ForgeLLMClient(f"http://127.0.0.1:{free_port()}", timeout=2).health()
    assert info.value.status == 0 and "forgellm start" in info.value.suggestion


@pytest.mark.skipif(not REFERENCE.exists(), reason="the API reference is not beside the checkout")
def test_the_reference_sdk_class_runs_unchanged(platform):
    text = REFERENCE.read_text()
    code = re.search(r"### Python SDK Example\s+```python\n(.*?)```", text, re.S).group(1)
    class_code = code.split("# Usage")[0]  # the usage part starts training on a 4B model
    namespace: dict = {}
    exec(compile(class_code, "api-reference.md", "exec"), namespace)
    client = namespace["ForgeLLMClient"](base_url=platform.web)
    status = client.get_training_status()
    assert status["success"] is True and status["is_training"] is False
    result = client.start_training({"model_name": "m", "dataset": "d", "max_iterations": "x"})
    assert result["success"] is False and result["error_code"] == "INVALID_REQUEST"
