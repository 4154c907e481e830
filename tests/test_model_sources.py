"""Adding base models over REST: import a GGUF from the workspace, pull (offline here: a clear
503 with a suggestion, never a hang or a traceback), and their bad inputs."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from tests.helpers.procs import http, running_platform
from tests.helpers.tiny_lm import write_tiny_model


@pytest.fixture(scope="module")
def platform():
    with tempfile.TemporaryDirectory(prefix="fl-") as name:
        home = Path(name)
        source = write_tiny_model(home / "scratch" / "tiny-src")
        from forgellm.services.publishing.derive import export_gguf

        export_gguf(source, home / "incoming" / "tiny.gguf")
        with running_platform(home, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(home / "hf-cache")) as running:
            yield running


def test_import_gguf_over_rest(platform):
    got, body, _ = http("POST", platform.web + "/api/models/import_gguf",
                        {"path": "incoming/tiny.gguf", "name": "tiny-imported"}, timeout=120)
    assert got == 200, body
    assert body["model_name"] == "tiny-imported" and body["path"] == "models/base/tiny-imported"
    _, models, _ = http("GET", platform.web + "/api/models")
    assert {"name": "tiny-imported", "type": "instruct"}.items() <= next(
        m for m in models["base_models"] if m["name"] == "tiny-imported").items()
    got, body, _ = http("POST", platform.web + "/api/models/import_gguf",
                        {"path": "incoming/tiny.gguf", "name": "tiny-imported"})
    assert got == 400 and body["details"]["field"] == "name"  # exists: no silent overwrite
    for payload, status, code in [
        ({"path": "../../etc/passwd"}, 403, "PATH_OUTSIDE_WORKSPACE"),
        ({"path": "incoming/none.gguf"}, 404, "NOT_FOUND"),
        ({"path": "incoming/tiny.gguf", "name": "../evil"}, 400, "INVALID_REQUEST"),
    ]:
        got, body, _ = http("POST", platform.web + "/api/models/import_gguf", payload)
        assert (got, body["error_code"]) == (status, code), body


def test_pull_offline_is_a_clear_error(platform):
    got, body, _ = http("POST", platform.web + "/api/models/pull", {"repo_id": "mlx-community/SmolLM2-135M"},
                        timeout=120)
    assert got == 503 and body["error_code"] == "OFFLINE", body
    assert "fetch-demo" in body["suggestion"]
    got, body, _ = http("POST", platform.web + "/api/models/pull", {"repo_id": "not a repo"})
    assert got == 400 and body["details"]["field"] == "repo_id"
    for refused_by_the_hub in ("a--b/c", "x/y.git"):  # ids huggingface_hub rejects: 400, not OFFLINE
        got, body, _ = http("POST", platform.web + "/api/models/pull", {"repo_id": refused_by_the_hub})
        assert got == 400 and body["details"]["field"] == "repo_id", body
    assert not list((platform.home / "hf-cache").glob("models--*/snapshots/*/config.json"))  # nothing fake
