"""Security rules: CORS closed by default and open only to configured origins (REST and
Socket.IO); no pickle, eval/exec, torch.load or trust_remote_code anywhere in the sources; and a
model folder that asks for its own code (``model_file``, a tokenizer ``auto_map``, pickled
``*.bin`` files) never gets it run, by the model server or the trainer."""

from __future__ import annotations

import ast
import fnmatch
import json
import pickle
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import socketio

from tests.helpers.procs import Platform, poll, running_platform
from tests.helpers.tiny_lm import write_corpus
from tests.helpers.tiny_model import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("services", "gateway", "bus", "schemas", "forgellm", "config")
TOKEN = "cors-test-token"
ALLOWED = "http://allowed.example"
SECOND = "https://second.example:8443"
EVIL = "http://evil.example"


def request(url: str, method: str = "GET", headers: dict[str, str] | None = None,
            body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def acao(headers: dict[str, str]) -> str | None:
    return {k.lower(): v for k, v in headers.items()}.get("access-control-allow-origin")


# --- CORS, closed by default (the shared default platform of conftest.py) ----------------------------


@pytest.mark.parametrize("origin", [EVIL, "null", ALLOWED])
def test_cors_is_closed_by_default(platform, origin):
    for base, path in ((platform.web, "/api/training/status"), (platform.web, "/api/health"),
                       (platform.server, "/api/model/status"), (platform.web, "/api/nope"), (platform.web, "/")):
        status, headers, _ = request(base + path, headers={"Origin": origin})
        assert status in (200, 404) and acao(headers) is None, (path, headers)
    status, headers, _ = request(platform.web + "/api/training/start", "OPTIONS", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert status != 204 and acao(headers) is None, (status, headers)


async def test_socketio_refuses_other_origins_by_default(platform):
    refused = socketio.AsyncClient(reconnection=False)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await refused.connect(platform.web, headers={"Origin": EVIL}, transports=["websocket"], wait_timeout=5)
    for headers in ({"Origin": platform.web}, {}):  # the page's own origin, and a non-browser client
        client = socketio.AsyncClient(reconnection=False)
        await client.connect(platform.web, headers=headers, transports=["websocket"], wait_timeout=5)
        await client.disconnect()


# --- a platform with CORS origins and an API token configured, and models that carry code ----------


def evil_model(folder: Path, tiny: Path, marker: Path) -> None:
    """A copy of the tiny model whose files ask for code: a model_file, a tokenizer auto_map and
    pickled .bin files, each of which would create ``marker`` if it ever ran."""
    shutil.copytree(tiny, folder)
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    (folder / "evil_model.py").write_text(code)
    (folder / "tokenization_evil.py").write_text(
        code + "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_file": "evil_model.py",
                                                    "auto_map": {"AutoModelForCausalLM": "evil_model.Model"}}))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**tokenizer_config, "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))

    class Payload:
        def __init__(self, target: Path) -> None:
            self.target = target

        def __reduce__(self):
            return (open, (str(self.target), "w"))

    live = folder / "payload-is-live"  # the payload works: unpickling it creates its file
    pickle.loads(pickle.dumps(Payload(live)))
    assert live.exists()
    live.unlink()
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt"):
        (folder / name).write_bytes(pickle.dumps(Payload(marker)))


@pytest.fixture(scope="module")
def guarded():
    with tempfile.TemporaryDirectory(prefix="fl-") as name:
        home = Path(name) / "ws"
        marker = Path(name) / "CODE_RAN"
        tiny = build_tiny_model(home / "models" / "base" / "tiny")
        evil_model(home / "models" / "base" / "evil", tiny, marker)
        # A model that loads (no model_file) but whose tokenizer asks for its own class.
        tok_only = home / "models" / "base" / "evil-tokenizer"
        evil_model(tok_only, tiny, marker)
        config = json.loads((tok_only / "config.json").read_text())
        config.pop("model_file")
        (tok_only / "config.json").write_text(json.dumps(config))
        write_corpus(home / "dataset" / "grammar", documents=6)
        with running_platform(home, FORGELLM_GATEWAY_CORS_ORIGINS=f"{ALLOWED}/,{SECOND}",
                              FORGELLM_SECURITY_API_TOKEN=TOKEN) as platform:
            platform.marker = marker
            yield platform


AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize("origin", [ALLOWED, SECOND])
def test_a_configured_origin_may_read_every_reply(guarded, origin):
    for method, path, body, expected in [
        ("GET", "/api/training/status", None, 200),
        ("GET", "/api/nope", None, 404),
        ("POST", "/api/training/start", b'{"model_name": "tiny", "dataset": "../x"}', 403),
        ("GET", "/", None, 200),  # a file response
    ]:
        status, headers, _ = request(guarded.web + path, method, {"Origin": origin, **AUTH,
                                                                  "Content-Type": "application/json"}, body)
        assert status == expected and acao(headers) == origin, (path, status, headers)
        assert "Origin" in headers.get("Vary", "") and headers.get("Access-Control-Expose-Headers") == "X-Request-ID"
        assert "Access-Control-Allow-Credentials" not in headers
    status, headers, _ = request(guarded.server + "/api/model/status", headers={"Origin": origin, **AUTH})
    assert status == 200 and acao(headers) == origin


def test_a_preflight_is_answered_before_the_token_check(guarded):
    status, headers, _ = request(guarded.web + "/api/training/start", "OPTIONS", headers={
        "Origin": ALLOWED, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "Content-Type, Authorization, X-Evil"})
    assert status == 204 and acao(headers) == ALLOWED
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "Content-Type, Authorization"  # not X-Evil
    status, headers, body = request(guarded.web + "/api/training/status", headers={"Origin": ALLOWED})
    assert status == 401 and acao(headers) == ALLOWED  # the page can read why it was refused
    assert json.loads(body)["error_code"] == "UNAUTHORIZED"


@pytest.mark.parametrize("origin", [EVIL, "null", "http://allowed.example.evil.com", "https://allowed.example",
                                    "http://second.example:8443"])
def test_other_origins_get_nothing(guarded, origin):
    status, headers, _ = request(guarded.web + "/api/training/status", headers={"Origin": origin, **AUTH})
    assert status == 200 and acao(headers) is None, headers
    status, headers, _ = request(guarded.web + "/api/training/start", "OPTIONS", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST"})
    assert status != 204 and acao(headers) is None, (status, headers)


async def test_socketio_takes_the_configured_origins_only(guarded):
    for origin in (ALLOWED, SECOND):
        client = socketio.AsyncClient(reconnection=False)
        await client.connect(guarded.web, headers={"Origin": origin}, auth={"token": TOKEN},
                             transports=["websocket"], wait_timeout=5)
        assert (await client.call("subscribe_training", {}, timeout=5))["success"] is True
        await client.disconnect()
    refused = socketio.AsyncClient(reconnection=False)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await refused.connect(guarded.web, headers={"Origin": EVIL}, auth={"token": TOKEN},
                              transports=["websocket"], wait_timeout=5)


# --- model files never run code ---------------------------------------------------------------------


def call(platform: Platform, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    status, _, raw = request(platform.web + path, method, {**AUTH, "Content-Type": "application/json"},
                             json.dumps(body).encode() if body is not None else None)
    return status, json.loads(raw)


def test_the_model_server_never_runs_code_from_a_model_folder(guarded):
    for name in ("evil", "evil-tokenizer"):
        status, body = call(guarded, "POST", "/api/model/load", {"model_name": name})
        assert status == 200, body
        final = poll(lambda: call(guarded, "GET", "/api/model/status")[1], lambda s: not s["is_loading"], 60,
                     f"the load of {name} to end")
        assert not guarded.marker.exists(), f"loading {name} ran code from the model folder"
        if name == "evil":
            assert final["loaded"] is False and "trust_remote_code" in (final["error"] or ""), final
        else:  # its tokenizer.json is used as it is; the auto_map class is never imported
            assert final["loaded"] is True or "trust_remote_code" in (final["error"] or ""), final
    # and the loaded tiny model keeps working afterwards
    status, body = call(guarded, "POST", "/api/model/load", {"model_name": "tiny"})
    assert status == 200
    poll(lambda: call(guarded, "GET", "/api/model/status")[1], lambda s: s["loaded"], 60, "tiny to load")


def test_the_trainer_never_runs_code_from_a_model_folder(guarded):
    status, body = call(guarded, "POST", "/api/training/start", {
        "model_name": "evil", "dataset": "grammar", "max_iterations": 2, "batch_size": 1, "max_seq_length": 16})
    assert status == 200, body
    final = poll(lambda: call(guarded, "GET", "/api/training/status")[1], lambda s: not s["is_training"], 120,
                 "the run to end")
    assert final["phase"] == "failed" and "trust_remote_code" in (final["error"] or ""), final
    assert not guarded.marker.exists(), "the training worker ran code from the model folder"


# --- the sources ----------------------------------------------------------------------------------------

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}
UNSAFE_ATTR_CALLS = {("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("yaml", "load"),
                     ("yaml", "unsafe_load"), ("yaml", "full_load"), ("builtins", "eval"), ("builtins", "exec")}
TEXT_RULES = [re.compile(r"trust_remote_code\s*=\s*True"), re.compile(r"[\"']trust_remote_code[\"']\s*:\s*True"),
              re.compile(r"\btorch\.load\b"), re.compile(r"\bsharded_load\b")]
# (file relative to the repository, rule) -> why it is needed. Empty: nothing needs an exception.
ALLOWED_USES: dict[tuple[str, str], str] = {}


def violations(source: str, where: str) -> list[tuple[str, str]]:
    """(rule, where:line) for every unsafe construct in ``source``."""
    found: list[tuple[str, str]] = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        line = f"{where}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [("pickle", line) for alias in node.names if alias.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in PICKLE_MODULES:
                found.append(("pickle", line))
            if any(alias.name == "sharded_load" for alias in node.names):
                found.append(("trust_remote_code", line))  # mlx-lm's sharded_load trusts tokenizer code
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in ("eval", "exec"):
                found.append((func.id, line))
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) \
                    and (func.value.id, func.attr) in UNSAFE_ATTR_CALLS:
                found.append((f"{func.value.id}.{func.attr}", line))
            for keyword in node.keywords:
                if keyword.arg == "trust_remote_code" and not (
                        isinstance(keyword.value, ast.Constant) and keyword.value.value is False):
                    found.append(("trust_remote_code", line))
                if keyword.arg == "allow_pickle" and not (
                        isinstance(keyword.value, ast.Constant) and keyword.value.value is False):
                    found.append(("allow_pickle", line))
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value in ("trust_remote_code", "allow_pickle") and not (
                        isinstance(value, ast.Constant) and value.value is False):
                    found.append((key.value, line))
    for number, text in enumerate(source.splitlines(), 1):
        found += [(rule.pattern, f"{where}:{number}") for rule in TEXT_RULES if rule.search(text)]
    return found


def python_sources() -> list[Path]:
    files = [p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 50, "the scan found too few files: wrong root?"
    return sorted(files)


def test_no_pickle_eval_exec_torch_load_or_trust_remote_code_in_the_sources():
    found = []
    for path in python_sources():
        rel = str(path.relative_to(ROOT))
        for rule, where in violations(path.read_text(), rel):
            if (rel, rule) not in ALLOWED_USES:
                found.append(f"{where}: {rule}")
    assert not found, "unsafe constructs:\n" + "\n".join(found)


def test_the_scan_catches_what_it_looks_for():
    planted = '''
import pickle
from dill import loads
import yaml, torch, numpy as np
eval("1")
exec("x = 1")
torch.load("m.pt")
yaml.load(text)
np.load("a.npy", allow_pickle=True)
AutoTokenizer.from_pretrained(p, trust_remote_code=True)
load_tokenizer(p, {"trust_remote_code": True})
mlx_lm.load(p, trust_remote_code=flag)
from mlx_lm.utils import sharded_load
'''
    rules = {rule for rule, _ in violations(planted, "planted.py")}
    assert {"pickle", "eval", "exec", "torch.load", "yaml.load", "allow_pickle", "trust_remote_code"} <= rules
    harmless = ("mx.eval(x)\nmodel.eval()\nyaml.safe_load(t)\nload(p, trust_remote_code=False)\n"
                "mx.load('a.safetensors')\n")
    assert violations(harmless, "harmless.py") == []


def test_pulls_never_download_code():
    from forgellm.services.modelio.hub import PULL_PATTERNS

    for name in ("modeling_evil.py", "tokenization_x.py", "pytorch_model.bin", "model.pt", "x.pkl",
                 "optimizer.pt", "setup.sh", "model.onnx"):
        assert not any(fnmatch.fnmatch(name, pattern) for pattern in PULL_PATTERNS), name
