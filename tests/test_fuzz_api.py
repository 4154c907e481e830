"""Fuzz every REST endpoint of a running platform from its own OpenAPI document (schemathesis).

The document fuzzed is the one the gateway serves (checked equal to ``openapi_document()``), so a
route, a field or a limit added to the schemas is fuzzed with no change here. Each operation gets
schemathesis' three phases: its examples, the coverage phase (every boundary, every missing or
wrong-typed field, undeclared methods, wrong content types) and random generation, valid and
invalid data alike. Every response must then:

- never be a 5xx, except the documented ``503 OFFLINE`` of a Hub download (this machine has no Hub);
- be a 4xx in the API reference's error body, ``{success: false, error, error_code, details,
  suggestion}``, with the status ``HTTP_STATUS`` gives its ``error_code``;
- conform to the document: status, content type, the reply's schema, and invalid data rejected.

Nothing long runs: the workspace holds a tiny llama (``models/base/tiny``, loaded before fuzzing), a
copy of it standing for the demo model (so ``fetch_demo`` finds it installed instead of downloading
92 MB), a published copy (quantize/export), a tiny dataset and a finished LoRA run (publish). Valid
generations are capped at 16 tokens. A few valid cases are steered onto those real names so that
deep paths run too: ``training/start`` (max_iterations capped; the run is stopped at once),
``model/load``, ``quantize``, ``export_gguf``, ``publish_checkpoint``.

Fast form (CI, ~1 minute): ``FORGELLM_FUZZ_EXAMPLES`` (default 20) generated cases per operation
plus the coverage phase, derandomized. Larger form: ``FORGELLM_FUZZ_SLOW=1`` (300 per operation, a
random seed each run) or any ``FORGELLM_FUZZ_EXAMPLES=N``. The cases run are printed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import msgspec
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from forgellm.gateway.openapi import openapi_document
from forgellm.schemas import HTTP_STATUS, ErrorCode, TrainingStartRequest
from tests.helpers.procs import PROCESS_NAMES, http, poll, running_platform

SLOW = os.environ.get("FORGELLM_FUZZ_SLOW") == "1"
EXAMPLES = int(os.environ.get("FORGELLM_FUZZ_EXAMPLES", "300" if SLOW else "20"))
DERANDOMIZE = "FORGELLM_FUZZ_EXAMPLES" not in os.environ and not SLOW  # CI: the same cases every run
MAX_TOKENS = 16  # valid generations stay short on the tiny model (~500 tokens/s here)
STEERED = {"fast": 3, "slow": 12}["slow" if SLOW or EXAMPLES > 100 else "fast"]  # real names, per operation
ERROR_KEYS = {"success", "error", "error_code", "details", "suggestion"}
# 5xx answers that are the documented behaviour here: the Hub cannot be reached from this machine.
ALLOWED_5XX = {("/api/models/pull", 503, "OFFLINE")}
# Known bugs outside the gateway (in services/, which this suite does not own), reported and waiting
# for their fix; counted and printed when hit. Each entry: (path prefix, status, error_code, text in
# the error). Remove an entry once its fix lands: the suite then fails if it comes back.
# (Found and fixed so far: ENAMETOOLONG for a model name part over 255 bytes, 89c313c.)
KNOWN_5XX: list[tuple[str, int, str, str]] = []

CASES: Counter[str] = Counter()
STATUSES: Counter[str] = Counter()
KNOWN_HITS: Counter[str] = Counter()
STEER: Counter[str] = Counter()
PROBES: Counter[str] = Counter()  # requests with a method the operation does not declare
RUNS: list[dict] = []

web_schema = schemathesis.openapi.from_dict(openapi_document("web"))
server_schema = schemathesis.openapi.from_dict(openapi_document("server"))
ONLY = os.environ.get("FORGELLM_FUZZ_ONLY")  # a regex on the path, to fuzz some operations alone
if ONLY:
    web_schema = web_schema.include(path_regex=ONLY)
    server_schema = server_schema.include(path_regex=ONLY)


# --- the platform under test --------------------------------------------------------------------

def _workspace(home: Path) -> None:
    from tests.helpers.tiny_lm import write_corpus
    from tests.helpers.tiny_model import build_tiny_model, write_lora_run

    base = home / "models" / "base"
    tiny = build_tiny_model(base / "tiny")
    shutil.copytree(tiny, base / "SmolLM2-135M-Instruct")  # fetch_demo: "already present"
    shutil.copytree(tiny, home / "models" / "published" / "tiny-pub")
    write_corpus(home / "dataset" / "mini", documents=12, sentences=10)
    run = write_lora_run(home / "models" / "ift" / "run1", tiny, {5: 2.0, 10: 1.5})
    # training_config.json as the trainer writes it (services/training/runs.py)
    request = msgspec.to_builtins(TrainingStartRequest(model_name="tiny", dataset="mini", training_type="ift"))
    request.pop("type", None)
    (run / "training_config.json").write_text(json.dumps({
        **request, "training_id": "run1", "model_path": str(tiny), "dataset_path": str(home / "dataset" / "mini"),
        "general_dataset_path": None, "output_dir": "models/ift/run1", "workspace": str(home),
        "created_at": "2026-01-01T00:00:00"}))


@pytest.fixture(scope="module")
def fuzz_platform():
    with tempfile.TemporaryDirectory(prefix="fl-") as name:
        home = Path(name)
        _workspace(home)
        offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(home / ".hf"), "PIP_NO_INDEX": "1",
                   "FORGELLM_CACHE": str(home / ".cache")}
        with running_platform(home, **offline) as platform:
            pids = {name: platform.pid_of(name) for name in (*PROCESS_NAMES, "gateway")}
            _ensure_loaded(platform.web)
            yield platform
            # Nothing crashed or restarted while being fuzzed.
            assert {name: platform.pid_of(name) for name in pids} == pids
            health = platform.health()
            assert health and health["status"] == "healthy", health


def _ensure_loaded(base: str) -> None:
    status = http("GET", base + "/api/model/status")[1]
    if status.get("loaded") and status.get("model_name") == "tiny" and not status.get("adapter_path"):
        return
    http("POST", base + "/api/model/load", {"model_name": "tiny"})
    poll(lambda: http("GET", base + "/api/model/status")[1],
         lambda s: s.get("loaded") and not s.get("is_loading"), 30, "the tiny model loaded")


def _wait_idle(base: str) -> dict:
    return poll(lambda: http("GET", base + "/api/training/status")[1],
                lambda s: not s.get("is_training"), 60, "the trainer idle")


# --- steering valid cases and checking answers ---------------------------------------------------

def _positive(case) -> bool:
    return case.meta is not None and case.meta.generation.mode.value == "positive"


def _prepare(case, base: str) -> None:
    """Keep valid requests short, and point a few of them at things that exist."""
    body = case.body if isinstance(case.body, dict) else None
    if case.path == "/api/model/generate":
        _ensure_loaded(base)
    if body is None:
        return
    tokens = body.get("max_tokens")
    if case.path == "/api/model/generate" and type(tokens) is int and 1 <= tokens <= 32768:
        # A valid max_tokens stays valid (so an invalid case stays invalid for its own reason) but
        # short: the server may well accept an invalid-by-the-document case (a nested unknown field).
        body["max_tokens"] = min(tokens, MAX_TOKENS)
    if not _positive(case):
        return  # invalid data must stay invalid: the server refuses it before doing anything
    key = case.operation.label
    steer = {
        "/api/training/start": {"model_name": "tiny", "dataset": "mini"},
        "/api/model/load": {"model_name": "tiny"},
        "/api/models/quantize": {"model_name": "tiny-pub"},
        "/api/models/export_gguf": {"model_name": "tiny-pub"},
        "/api/training/publish_checkpoint": {"training_dir": "models/ift/run1",
                                             "checkpoint_path": "models/ift/run1/0000010_adapters.safetensors"},
    }.get(case.path)
    if steer and STEER[key] < STEERED and sum(CASES.values()) % 4 == 1:
        STEER[key] += 1
        body.update(steer)
        if case.path == "/api/training/start":
            body["max_iterations"] = min(body.get("max_iterations", 5), 5)
            body.pop("resume_from", None)
            body.pop("general_dataset", None)
            _wait_idle(base)
        if case.path == "/api/model/load":
            body.pop("adapter_path", None)


def _after(case, response, base: str) -> None:
    if case.path == "/api/training/start" and response.status_code == 200:
        # A valid run started: stop it now and see how it ended.
        http("POST", base + "/api/training/stop")
        final = _wait_idle(base)
        RUNS.append({"request": case.body, "phase": final.get("phase"), "error": final.get("error")})


def _known(case, status: int, body: dict) -> str | None:
    for prefix, known_status, code, text in KNOWN_5XX:
        if case.path.startswith(prefix) and status == known_status and body.get("error_code") == code \
                and text in str(body.get("error", "")):
            return f"{prefix} {known_status} {code} {text}"
    return None


def _json(response) -> dict | None:
    try:
        body = json.loads(response.content)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


@schemathesis.check
def no_server_error(ctx, response, case):
    """No 5xx but the documented ones (and known, reported bugs, counted)."""
    status = response.status_code
    if status < 500:
        return None
    body = _json(response) or {}
    if (case.path, status, body.get("error_code")) in ALLOWED_5XX:
        return None
    known = _known(case, status, body)
    if known:
        KNOWN_HITS[known] += 1
        return None
    raise AssertionError(f"{status} from {case.method} {case.path}: {response.content[:500]!r}")


@schemathesis.check
def error_body_format(ctx, response, case):
    """Every error is the reference's body, and its status is the one its error_code maps to."""
    status = response.status_code
    if status < 400:
        return None
    body = _json(response)
    assert body is not None, f"{status} without a JSON object body: {response.content[:300]!r}"
    assert set(body) == ERROR_KEYS, f"{status}: keys {sorted(body)} instead of {sorted(ERROR_KEYS)}"
    assert body["success"] is False, body
    assert isinstance(body["error"], str) and body["error"], body
    assert body["error_code"] in ErrorCode.__members__, body
    assert isinstance(body["details"], dict) and isinstance(body["suggestion"], str), body
    expected = HTTP_STATUS[ErrorCode(body["error_code"])]
    assert status == expected, f"{status} with error_code {body['error_code']} (maps to {expected})"
    if status == 405:
        assert response.headers.get("allow"), "a 405 names the allowed methods (Allow)"
    return None


CHECKS = [no_server_error, error_body_format, status_code_conformance, content_type_conformance,
          response_schema_conformance, negative_data_rejection, unsupported_method]
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
                         suppress_health_check=list(HealthCheck), print_blob=True)


def _run(case, base: str, api: str) -> None:
    _prepare(case, base)
    # "web POST /api/model/load"; a probe with an undeclared method counts with its operation
    CASES[f"{api} {case.operation.label}"] += 1
    if case.method.upper() != case.operation.method.upper():
        PROBES[case.method.upper()] += 1
    started = time.monotonic()
    response = case.call_and_validate(base_url=base, checks=CHECKS, timeout=120)
    STATUSES[f"{response.status_code}"] += 1
    took = time.monotonic() - started
    assert took < 60, f"{case.method} {case.path} took {took:.1f} s"
    _after(case, response, base)


# --- the tests -----------------------------------------------------------------------------------

def test_the_served_documents_are_the_ones_fuzzed(fuzz_platform):
    for api, base in (("web", fuzz_platform.web), ("server", fuzz_platform.server)):
        served = requests.get(base + "/api/openapi.json", timeout=10).json()
        assert served == json.loads(json.dumps(openapi_document(api, base))), api


@pytest.mark.timeout(900 if SLOW else 300)
@web_schema.parametrize()
@FUZZ_SETTINGS
def test_fuzz_web_api(case, fuzz_platform):
    _run(case, fuzz_platform.web, "web")


if list(server_schema.get_all_operations()):  # FORGELLM_FUZZ_ONLY may name web operations only
    @pytest.mark.timeout(900 if SLOW else 300)
    @server_schema.parametrize()
    @FUZZ_SETTINGS
    def test_fuzz_model_server_api(case, fuzz_platform):
        _run(case, fuzz_platform.server, "server")


def test_fuzz_summary(fuzz_platform, capsys):
    """Prints what was tried (the README and bench/RESULTS.md quote it); fails on runs that broke."""
    total = sum(CASES.values())
    lines = [f"API fuzz: {total} cases over {len(CASES)} operations of both APIs "
             f"({EXAMPLES} generated per operation + the coverage phase), statuses {dict(sorted(STATUSES.items()))}",
             f"  of which undeclared-method probes: {sum(PROBES.values())} {dict(PROBES)}",
             f"  valid runs started and stopped: {len(RUNS)}; steered cases: {dict(STEER)}"]
    lines += [f"  known bug hit {count}x: {what}" for what, count in KNOWN_HITS.items()]
    lines += [f"  known bug not hit this run: {entry}" for entry in KNOWN_5XX
              if f"{entry[0]} {entry[1]} {entry[2]} {entry[3]}" not in KNOWN_HITS]
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    artifacts = Path(os.environ.get("FORGELLM_ARTIFACTS", Path(__file__).parent / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "fuzz_api.json").write_text(json.dumps(
        {"cases": total, "per_operation": CASES, "method_probes": PROBES, "statuses": STATUSES, "examples": EXAMPLES,
         "runs": RUNS, "known_bug_hits": KNOWN_HITS}, indent=1, default=str))
    failed = [run for run in RUNS if run["phase"] == "failed"]
    assert not failed, f"valid training requests whose run failed: {failed}"

