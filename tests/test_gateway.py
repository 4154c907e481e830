"""The REST + Socket.IO contract of a running platform: health, errors, validation, OpenAPI."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
import socketio

from forgellm.gateway.routes import ROUTES
from tests.helpers.procs import http

ERROR_KEYS = {"success", "error", "error_code", "details", "suggestion"}


def assert_error(status: int, body: dict, expected_status: int, code: str) -> None:
    assert status == expected_status, body
    assert set(body) == ERROR_KEYS and body["success"] is False
    assert body["error_code"] == code, body


def test_health_reports_every_component_and_real_system_info(platform):
    status, body, _ = http("GET", platform.web + "/api/health")
    assert status == 200 and body["success"] is True and body["status"] == "healthy"
    components = body["components"]
    assert components["web_server"] == "running"
    assert components["model_server"] == "running"
    assert components["training_pipeline"] == "idle"
    for name in ("broker", "trainer", "inference", "catalog", "publisher", "gateway"):
        assert components[name] != "down"
    info = body["system_info"]
    meminfo = Path("/proc/meminfo").read_text()
    total_kb = int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1))
    assert info["memory_total_gb"] == pytest.approx(total_kb / 1024**2, abs=0.01)
    assert 0 < info["memory_available_gb"] <= info["memory_total_gb"]
    assert info["disk_free_gb"] > 0
    assert re.match(r"^3\.\d+\.\d+$", info["python_version"])
    assert re.match(r"^\d+\.\d+", info["mlx_version"])


def test_model_server_port_serves_the_model_api_only(platform):
    status, body, _ = http("GET", platform.server + "/api/health")
    assert status == 200 and body["components"]["model_server"] == "running"
    status, body, _ = http("GET", platform.server + "/api/training/status")
    assert_error(status, body, 404, "NOT_FOUND")
    status, body, _ = http("GET", platform.server + "/api/model/status")
    assert status == 200 and body["loaded"] is False and body["is_loading"] is False


def test_request_id_is_echoed_generated_and_reaches_the_service(platform):
    _, _, headers = http("GET", platform.web + "/api/training/status", headers={"X-Request-ID": "test-abc-123"})
    assert headers["X-Request-ID"] == "test-abc-123"
    _, _, headers = http("GET", platform.web + "/api/training/status")
    assert re.match(r"^[0-9a-f]{16}$", headers["X-Request-ID"])
    _, _, headers = http("GET", platform.web + "/api/training/status", headers={"X-Request-ID": "bad id\twith space"})
    assert headers["X-Request-ID"] != "bad id\twith space"

    def handled_by_trainer(_health) -> bool:  # the supervisor writes the trainer's log line a moment later
        lines = [json.loads(line.split("| ", 1)[1]) for line in platform.log().splitlines()
                 if line.split(" ", 2)[1:2] == ["trainer"] and "| {" in line]
        return any(line.get("correlation_id") == "test-abc-123" and line["event"] == "request_handled"
                   for line in lines)

    platform.wait_until(handled_by_trainer, 10, "the trainer's log line with the request id")


def test_training_status_when_idle(platform):
    status, body, _ = http("GET", platform.web + "/api/training/status")
    assert status == 200
    assert body["success"] is True and body["is_training"] is False and "type" not in body
    status, body, _ = http("POST", platform.web + "/api/training/stop")
    assert_error(status, body, 409, "NO_TRAINING_RUNNING")


@pytest.mark.parametrize(
    ("raw", "field", "fragment"),
    [
        (b'{"model_name": "m", "dataset": ', None, "malformed JSON"),
        (b"[1, 2, 3]", None, "JSON object"),
        (b'"just a string"', None, "JSON object"),
        (b'{"dataset": "d"}', "model_name", "required"),
        (b'{"model_name": "m", "dataset": "d", "max_iterations": "many"}', "max_iterations", "Expected `int`"),
        (b'{"model_name": "m", "dataset": "d", "batch_size": 0}', "batch_size", ">= 1"),
        (b'{"model_name": "m", "dataset": "d", "learning_rate": -1}', "learning_rate", "> 0.0"),
        (b'{"model_name": "m", "dataset": "d", "lr_schedule": "zigzag"}', "lr_schedule", "Invalid enum value"),
        (b'{"model_name": "m", "dataset": "d", "typo_field": 1}', "typo_field", "unknown field"),
        (b'{"model_name": "", "dataset": "d"}', "model_name", "length >= 1"),
        (b'{"model_name": "m", "dataset": "d", "grad_checkpoint": "yes"}', "grad_checkpoint", "Expected `bool`"),
        (b"\xff\xfe\x00garbage", None, "malformed JSON"),
    ],
)
def test_bad_bodies_are_400_naming_the_field(platform, raw, field, fragment):
    status, body, _ = http("POST", platform.web + "/api/training/start", raw=raw)
    assert_error(status, body, 400, "INVALID_REQUEST")
    assert body["details"].get("field") == field
    assert fragment in body["error"], body


def test_oversize_body_is_413_in_the_error_format(platform):
    raw = b'{"model_name": "' + b"m" * (2 * 1024 * 1024) + b'", "dataset": "d"}'
    status, body, _ = http("POST", platform.web + "/api/training/start", raw=raw)
    assert_error(status, body, 413, "PAYLOAD_TOO_LARGE")


def test_bad_query_strings_are_400(platform):
    status, body, _ = http("GET", platform.web + "/api/checkpoints?training_dir=a&training_dir=b")
    assert_error(status, body, 400, "INVALID_REQUEST")
    assert body["details"]["field"] == "training_dir"
    status, body, _ = http("GET", platform.web + "/api/checkpoints?bogus=1")
    assert_error(status, body, 400, "INVALID_REQUEST")
    assert body["details"]["field"] == "bogus"
    status, body, _ = http("GET", platform.web + "/api/dashboard/data")
    assert_error(status, body, 400, "INVALID_REQUEST")
    assert body["details"]["field"] == "training_dir"


def test_unknown_route_and_wrong_method_use_the_error_format(platform):
    status, body, _ = http("GET", platform.web + "/api/no/such/thing")
    assert_error(status, body, 404, "NOT_FOUND")
    status, body, _ = http("GET", platform.web + "/api/training/start")
    assert_error(status, body, 405, "METHOD_NOT_ALLOWED")


def test_openapi_is_generated_from_the_schemas(platform):
    status, doc, _ = http("GET", platform.web + "/api/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.1")
    web_routes = {(r.method.lower(), r.path) for r in ROUTES if "web" in r.apis}
    assert {(m, p) for p, ops in doc["paths"].items() for m in ops} == web_routes
    start = doc["components"]["schemas"]["TrainingStartRequest"]
    assert "type" not in start["properties"]
    assert set(start["required"]) == {"model_name", "dataset"}
    assert start["properties"]["batch_size"]["minimum"] == 1
    assert {"early_stopping_patience", "lora_rank", "resume_from"} <= set(start["properties"])
    params = doc["paths"]["/api/checkpoints"]["get"]["parameters"]
    assert [p["name"] for p in params] == ["training_dir"]
    status, server_doc, _ = http("GET", platform.server + "/api/openapi.json")
    assert set(server_doc["paths"]) == {p for p in (r.path for r in ROUTES if "server" in r.apis)}


async def test_socketio_subscribe_training(platform):
    client = socketio.AsyncClient(reconnection=False)
    await client.connect(platform.web, transports=["websocket"], wait_timeout=10)
    try:
        ack = await client.call("subscribe_training", {"training_id": "cpt_20250115_103045"}, timeout=10)
        assert ack == {"success": True, "training_id": "cpt_20250115_103045", "snapshot": True}
        ack = await client.call("subscribe_training", {"training_id": 42}, timeout=10)
        assert ack["success"] is False and ack["error_code"] == "INVALID_REQUEST"
        ack = await client.call("subscribe_training", timeout=10)
        assert ack["success"] is True and ack["training_id"] is None
    finally:
        await client.disconnect()
    await asyncio.sleep(0)
