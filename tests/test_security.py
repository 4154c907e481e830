"""Loopback by default; a non-loopback bind needs a token, and a token is checked everywhere."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import socketio

from forgellm.client import ForgeLLMClient, InvalidRequestError
from tests.helpers.procs import http, isolated_env, processes_of, running_platform

TOKEN = "s3cret-token-for-tests"


def test_a_public_bind_without_token_is_refused(tmp_path):
    out = subprocess.run([sys.executable, "-m", "forgellm", "start", "--host", "0.0.0.0", "--web-port", "5999"],
                         env=isolated_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "without an API token" in out.stderr and "FORGELLM_SECURITY_API_TOKEN" in out.stderr
    assert processes_of(tmp_path) == []


@pytest.fixture(scope="module")
def guarded():
    with tempfile.TemporaryDirectory(prefix="fl-") as name:
        with running_platform(Path(name), FORGELLM_SECURITY_API_TOKEN=TOKEN) as platform:
            yield platform


def test_rest_needs_the_token(guarded):
    status, body, _ = http("GET", guarded.web + "/api/training/status")
    assert status == 401 and body["error_code"] == "UNAUTHORIZED"
    status, body, _ = http("GET", guarded.web + "/api/training/status", headers={"Authorization": "Bearer wrong"})
    assert status == 401
    status, body, _ = http("GET", guarded.web + "/api/training/status", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and body["success"] is True
    status, _, _ = http("GET", guarded.server + "/api/model/status", headers={"X-API-Token": TOKEN})
    assert status == 200
    assert http("GET", guarded.web + "/api/health")[0] == 200  # liveness stays open
    assert ForgeLLMClient(guarded.web, api_token=TOKEN).get_training_status().success
    with pytest.raises(InvalidRequestError):
        ForgeLLMClient(guarded.web).get_training_status()


async def test_socketio_needs_the_token(guarded):
    refused = socketio.AsyncClient(reconnection=False)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await refused.connect(guarded.web, transports=["websocket"], wait_timeout=5)
    allowed = socketio.AsyncClient(reconnection=False)
    await allowed.connect(guarded.web, transports=["websocket"], auth={"token": TOKEN}, wait_timeout=5)
    ack = await allowed.call("subscribe_training", {}, timeout=5)
    assert ack["success"] is True
    await allowed.disconnect()
