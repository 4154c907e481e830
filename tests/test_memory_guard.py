"""The inference service's memory guard: a load that would not fit (next to a running training
run) is refused with INSUFFICIENT_MEMORY instead of swapping the machine."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from forgellm.config import load_settings
from forgellm.schemas import TrainingStatusReply
from forgellm.services.common.errors import ForgeError
from forgellm.services.common.models import resolve_model
from forgellm.services.common.workspace import Workspace
from forgellm.services.generation.adapters import resolve_adapter
from forgellm.services.inference import (
    MEMORY_LIMIT_ENV,
    WEIGHTS_OVERHEAD,
    InferenceService,
    MemoryCheck,
    available_memory_gb,
    model_weight_bytes,
)
from tests.helpers.procs import http, running_platform
from tests.helpers.tiny_model import build_tiny_model, write_lora_run

GiB = 1024**3


@pytest.fixture(scope="module")
def workspace():
    with tempfile.TemporaryDirectory(prefix="fl-") as name:
        home = Path(name)
        tiny = build_tiny_model(home / "models" / "base" / "tiny")
        write_lora_run(home / "models" / "ift" / "run1", tiny, {10: 1.0})
        yield home


def test_available_memory_sources(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   12582912 kB\n")
    assert available_memory_gb({}, meminfo=meminfo, platform="linux") == (12.0, "MemAvailable")
    assert available_memory_gb({MEMORY_LIMIT_ENV: "1.5"}, meminfo=meminfo) == (1.5, MEMORY_LIMIT_ENV)
    assert available_memory_gb({MEMORY_LIMIT_ENV: "lots"}, meminfo=meminfo) == (12.0, "MemAvailable")
    total, source = available_memory_gb({}, platform="darwin")
    assert source == "total" and total > 1
    assert available_memory_gb({}, meminfo=tmp_path / "missing", platform="linux") == (None, "unknown")
    real, source = available_memory_gb({})
    assert source == "MemAvailable" and 0 < real < 10_000


def test_memory_check_arithmetic():
    check = MemoryCheck(model_gb=10.0, trainer_gb=6.0, available_gb=17.0, source="MemAvailable")
    assert check.needed_gb == pytest.approx(10 * WEIGHTS_OVERHEAD + 6) and not check.fits
    assert MemoryCheck(model_gb=10.0, trainer_gb=6.0, available_gb=17.0, source="MemAvailable", freed_gb=1.0).fits
    assert MemoryCheck(model_gb=10.0, trainer_gb=0.0, available_gb=None, source="unknown").fits


def test_weights_are_the_safetensors_and_the_adapter(workspace):
    ws = Workspace(workspace)
    ref = resolve_model("tiny", ws)
    adapter = resolve_adapter(ws, "models/ift/run1")
    model = model_weight_bytes(ref.path)
    assert model == (ref.path / "model.safetensors").stat().st_size
    assert model_weight_bytes(ref.path, adapter) == model + adapter.weights.stat().st_size


async def test_a_load_next_to_a_training_run_is_refused(workspace, monkeypatch):
    """The service's own check, with the trainer's answer stood in for (no real run needed)."""
    service = InferenceService(load_settings(env={"FORGELLM_HOME": str(workspace)}))
    ws = Workspace(workspace)
    ref = resolve_model("tiny", ws)
    model_gb = model_weight_bytes(ref.path) / GiB
    training = TrainingStatusReply(is_training=True, training_id="cpt_run_1", phase="training",
                                   memory_usage_gb=2.0)

    async def trainer_status(correlation_id: str) -> TrainingStatusReply:
        return training

    service._training_status = trainer_status
    try:
        monkeypatch.setenv(MEMORY_LIMIT_ENV, str(model_gb * WEIGHTS_OVERHEAD + 1.9))
        with pytest.raises(ForgeError) as caught:
            await service._check_memory(ref, None, "tiny", "c1")
        error = caught.value
        assert error.code == "INSUFFICIENT_MEMORY"
        assert "cpt_run_1" in str(error) and "2.00 GiB" in str(error)
        assert "POST /api/training/stop" in error.suggestion and MEMORY_LIMIT_ENV in error.suggestion
        assert error.details["trainer_gb"] == 2.0 and error.details["memory_source"] == MEMORY_LIMIT_ENV
        monkeypatch.setenv(MEMORY_LIMIT_ENV, str(model_gb * WEIGHTS_OVERHEAD + 2.1))
        await service._check_memory(ref, None, "tiny", "c2")  # fits
        training.is_training = False  # a finished run holds nothing
        monkeypatch.setenv(MEMORY_LIMIT_ENV, str(model_gb * WEIGHTS_OVERHEAD * 1.01))
        await service._check_memory(ref, None, "tiny", "c3")
    finally:
        service.ctx.destroy(linger=0)


def test_over_rest_the_refusal_is_507_and_nothing_loads(workspace):
    """A limit between the model alone and the model + its adapter: one loads, the other is refused."""
    ws = Workspace(workspace)
    ref = resolve_model("tiny", ws)
    adapter = resolve_adapter(ws, "models/ift/run1")
    alone = model_weight_bytes(ref.path) * WEIGHTS_OVERHEAD / GiB
    with_adapter = model_weight_bytes(ref.path, adapter) * WEIGHTS_OVERHEAD / GiB
    limit = (alone + with_adapter) / 2
    with running_platform(workspace, **{MEMORY_LIMIT_ENV: repr(limit)}) as platform:
        code, body, _ = http("POST", platform.server + "/api/model/load",
                             {"model_name": "tiny", "adapter_path": "models/ift/run1"})
        assert code == 507 and body["error_code"] == "INSUFFICIENT_MEMORY", body
        assert "Not enough memory to load tiny" in body["error"] and body["suggestion"]
        assert body["details"]["available_gb"] == round(limit, 3)
        status = http("GET", platform.server + "/api/model/status")[1]
        assert status["loaded"] is False and status["is_loading"] is False
        code, body, _ = http("POST", platform.server + "/api/model/load", {"model_name": "tiny"})
        assert code == 200, body
