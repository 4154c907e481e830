"""Path attacks on every endpoint that takes a path or a name, against one running platform.

Each field (dataset, general_dataset, resume_from, training_dir, checkpoint_path, adapter_path,
the generate request's adapter, model_name on every endpoint, dataset info's model, browse path,
GGUF import path and name, quantize/export model_name) gets every attack: ``..`` sequences,
absolute paths outside, URL-encoded and double-encoded, backslashes, NUL bytes, over-long names
and segments, and symlinks inside the workspace pointing out. Every one must be a 4xx in the
reference's error format naming the field, never a 500; a folder outside the workspace (holding a
real model, a real run whose adapter fits the loaded model, a dataset, a GGUF and a sentinel
text) must stay byte-for-byte untouched, and its sentinel must never appear in a reply.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.procs import Platform, poll, running_platform
from tests.helpers.tiny_model import build_tiny_model, write_lora_run

SENTINEL = "SENTINEL-7f3a9c-outside-the-workspace"
REPLIES: list[str] = []  # every reply body of this module, checked for the sentinel at the end


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """(size, mtime, sha256) of every file under ``root`` (links not followed)."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            stat = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
            state[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns, digest)
    return state


@pytest.fixture(scope="module")
def world():
    """A platform with a loaded tiny model, and an ``out/`` folder beside its workspace."""
    with tempfile.TemporaryDirectory(prefix="fl-") as name:
        root = Path(name)
        home, out = root / "ws", root / "out"
        tiny = build_tiny_model(home / "models" / "base" / "tiny")
        write_lora_run(home / "models" / "cpt" / "run1", tiny, {10: 2.0, 20: 1.5})
        shutil.copytree(tiny, home / "models" / "published" / "pub")
        good = home / "dataset" / "good"
        good.mkdir(parents=True)
        (good / "a.txt").write_text("The heron crosses the estuary at dawn.\n\nIt returns at dusk.\n")
        (good / "b.txt").write_text("Tides rise twice a day at the observatory.\n")
        (home / "imports").mkdir()
        (home / "imports" / "junk.gguf").write_bytes(b"not a gguf file")

        # Outside the workspace: things every field would happily use if it got there.
        build_tiny_model(out / "model", seed=3)
        config = json.loads((out / "model" / "config.json").read_text())
        (out / "model" / "config.json").write_text(json.dumps({**config, "sentinel": SENTINEL}))
        (out / "model" / "README.md").write_text(SENTINEL)
        write_lora_run(out / "run", tiny, {10: 0.5})  # an adapter that fits the loaded model
        (out / "run" / "training_config.json").write_text(json.dumps(
            {"model_name": "tiny", "model_path": str(tiny), "training_type": "cpt", "sentinel": SENTINEL}))
        (out / "data").mkdir()
        (out / "data" / "secret.txt").write_text(f"{SENTINEL}\n\nmore secret text\n")
        (out / "data" / "secret.jsonl").write_text(json.dumps({"text": SENTINEL}) + "\n{broken " + SENTINEL + "\n")
        (out / "x.gguf").write_bytes(b"GGUF" + SENTINEL.encode())
        (out / "secret.txt").write_text(SENTINEL)

        # Inside the workspace: links that lead out.
        links = {
            home / "dataset" / "link_data": out / "data",
            home / "dataset" / "good" / "c.txt": out / "secret.txt",  # one file of a real dataset
            home / "models" / "cpt" / "link_run": out / "run",
            home / "models" / "base" / "link_model": out / "model",
            home / "models" / "published" / "link_pub": out / "model",
            home / "imports" / "link.gguf": out / "x.gguf",
            home / "link_out": out,
            home / "loop": home / "loop",  # a link to itself, here and in every listed folder
            home / "dataset" / "loop": home / "dataset" / "loop",
            home / "dataset" / "good" / "loop.txt": home / "dataset" / "good" / "loop.txt",
            home / "models" / "base" / "loop": home / "models" / "base" / "loop",
            home / "models" / "cpt" / "loop": home / "models" / "cpt" / "loop",
            home / "models" / "published" / "loop": home / "models" / "published" / "loop",
            home / "models" / "cpt" / "run1" / "0000030_adapters.safetensors":
                home / "models" / "cpt" / "run1" / "0000030_adapters.safetensors",
        }
        for link, target in links.items():
            os.symlink(target, link)
        # A checkpoint of a real run that is a link out (the run looks fine; its best file is not).
        evil = home / "models" / "cpt" / "evil_run"
        write_lora_run(evil, tiny, {10: 2.0})
        (evil / "0000010_adapters.safetensors").unlink()
        os.symlink(out / "run" / "0000010_adapters.safetensors", evil / "0000010_adapters.safetensors")

        before = snapshot(out)
        with running_platform(home) as platform:
            code, body = call(platform, "POST", "/api/model/load", {"model_name": "tiny"})
            assert code == 200, body
            poll(lambda: call(platform, "GET", "/api/model/status")[1], lambda s: s.get("loaded"), 60,
                 "the tiny model to load")
            yield World(platform, home, out)
            after = snapshot(out)
            assert after == before, "something outside the workspace was changed"
            assert not [reply for reply in REPLIES if SENTINEL in reply], "outside content leaked into a reply"
            log = platform.log()
            assert SENTINEL not in log, "outside content reached a log"


@dataclass
class World:
    platform: Platform
    home: Path
    out: Path


def call(platform: Platform, method: str, endpoint: str, body: Any = None, *, raw_query: str | None = None,
         timeout: float = 30) -> tuple[int, dict[str, Any]]:
    """One request; the reply must be JSON (an error page would fail the test)."""
    url = platform.web + endpoint + (f"?{raw_query}" if raw_query is not None else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            code, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        code, text = exc.code, exc.read().decode()
    REPLIES.append(text)
    return code, json.loads(text)


# --- the fields --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    id: str
    method: str
    endpoint: str
    field: str
    valid: str  # a good value, for the NUL attack's prefix
    target: str  # what the field names, under out/
    link: str | None  # a link inside the workspace that leads to it
    base: dict[str, Any]  # the rest of the request
    escape: frozenset[int] = frozenset({403})  # the status of a name that leads outside

    def send(self, world: World, value: str) -> tuple[int, dict[str, Any]]:
        if self.method == "GET":
            query = {**self.base, self.field: value}
            # Encoded attacks are sent as they are, so the server decodes them once.
            raw = "&".join(f"{k}={urllib.parse.quote(v, safe='%' if '%' in v else '')}" for k, v in query.items())
            return call(world.platform, "GET", self.endpoint, raw_query=raw)
        return call(world.platform, "POST", self.endpoint, {**self.base, self.field: value})


START = {"model_name": "tiny", "dataset": "good", "max_iterations": 2, "batch_size": 1, "max_seq_length": 16}
CKPT = "models/cpt/run1/0000010_adapters.safetensors"
FIELDS = [
    Field("start.dataset", "POST", "/api/training/start", "dataset", "good", "data", "link_data", START),
    Field("start.general_dataset", "POST", "/api/training/start", "general_dataset", "good", "data",
          "dataset/link_data", {**START, "data_mixture_ratio": 0.5}),
    Field("start.resume_from", "POST", "/api/training/start", "resume_from", "models/cpt/run1", "run",
          "models/cpt/link_run", START),
    Field("start.model_name", "POST", "/api/training/start", "model_name", "tiny", "model", "link_model", START),
    Field("load.model_name", "POST", "/api/model/load", "model_name", "tiny", "model",
          "published/link_pub", {}),
    Field("load.adapter_path", "POST", "/api/model/load", "adapter_path", "models/cpt/run1", "run",
          "models/cpt/link_run", {"model_name": "tiny"}),
    Field("generate.adapter", "POST", "/api/model/generate", "adapter", "models/cpt/run1",
          "run/0000010_adapters.safetensors", "models/cpt/link_run", {"prompt": "hi", "max_tokens": 1}),
    Field("dataset_info.model", "GET", "/api/dataset/info", "model", "tiny", "model", "models/base/link_model", {}),
    Field("checkpoints.training_dir", "GET", "/api/checkpoints", "training_dir", "models/cpt/run1", "run",
          "models/cpt/link_run", {}),
    Field("dashboard.training_dir", "GET", "/api/dashboard/data", "training_dir", "models/cpt/run1", "run",
          "models/cpt/link_run", {}),
    Field("publish.training_dir", "POST", "/api/training/publish_checkpoint", "training_dir", "models/cpt/run1",
          "run", "models/cpt/link_run", {"checkpoint_path": CKPT}),
    Field("publish.checkpoint_path", "POST", "/api/training/publish_checkpoint", "checkpoint_path", CKPT,
          "run/0000010_adapters.safetensors", "models/cpt/evil_run/0000010_adapters.safetensors",
          {"training_dir": "models/cpt/run1"}),
    Field("browse.path", "GET", "/api/filesystem/browse", "path", "dataset", "data", "link_out", {}),
    Field("import_gguf.path", "POST", "/api/models/import_gguf", "path", "imports/junk.gguf", "x.gguf",
          "imports/link.gguf", {"name": "imported"}),
    Field("import_gguf.name", "POST", "/api/models/import_gguf", "name", "imported", "model", None,
          {"path": "imports/junk.gguf"}, frozenset({400})),
    Field("quantize.model_name", "POST", "/api/models/quantize", "model_name", "published/pub", "model",
          "published/link_pub", {}),
    Field("export_gguf.model_name", "POST", "/api/models/export_gguf", "model_name", "published/pub", "model",
          "published/link_pub", {}),
]

ESCAPE = None  # the field's own status for a name that leads out (403, or 400 for a plain name)
NOT_THERE = frozenset({400, 404})  # a literal name that exists nowhere
ATTACKS: list[tuple[str, str, frozenset[int] | None]] = [
    ("dotdot", "../out/{target}", ESCAPE),
    ("dotdot-deep", "../../../../../../../../../../etc/passwd", ESCAPE),
    ("dot-then-dotdot", "./../out/{target}", ESCAPE),
    ("inside-then-out", "models/../../out/{target}", ESCAPE),
    ("trailing-slash", "../out/{target}/", ESCAPE),
    ("absolute-outside", "{out}/{target}", ESCAPE),
    ("absolute-etc", "/etc", ESCAPE),
    ("absolute-root", "/", ESCAPE),
    ("symlink-out", "{link}", ESCAPE),
    ("url-encoded", "%2e%2e%2fout%2f{target}", frozenset({400, 403, 404})),  # a query decodes it once
    ("url-encoded-upper", "%2E%2E/%2E%2E/etc", frozenset({400, 403, 404})),
    ("double-encoded", "%252e%252e%252fout%252f{target}", NOT_THERE),
    ("backslash", "..\\out\\{target_bs}", NOT_THERE),
    ("backslash-mixed", "..\\/..\\/out", frozenset({400, 403, 404})),
    ("nul", "{valid}\x00/../../out", frozenset({400})),
    ("nul-only", "\x00", frozenset({400})),
    ("long", "a" * 5000, frozenset({400})),
    ("long-segment", "b" * 300, frozenset({400})),
    ("many-segments", "a/" * 700, frozenset({400})),
    ("unicode-dots", "\u2025/out/{target}", NOT_THERE),
    ("fullwidth-dots", "\uff0e\uff0e\uff0fout", NOT_THERE),
    ("tilde", "~/../../out", frozenset({400, 403, 404})),
    ("file-url", "file://{out}/{target}", NOT_THERE),
    ("symlink-loop", "loop/inner", frozenset({400, 403, 404})),
]


def expand(template: str, field: Field, world: World) -> str | None:
    if "{link}" in template and field.link is None:
        return None
    return template.format(out=world.out, target=field.target, target_bs=field.target.replace("/", "\\"),
                           link=field.link, valid=field.valid)


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.id)
@pytest.mark.parametrize(("attack", "template", "expected"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_is_refused(world, field, attack, template, expected):
    value = expand(template, field, world)
    if value is None:
        pytest.skip("no such link for this field")
    code, body = field.send(world, value)
    allowed = field.escape if expected is ESCAPE else expected
    assert code in allowed, (code, body)
    assert body["success"] is False and isinstance(body["error"], str) and body["error"]
    assert isinstance(body["error_code"], str) and isinstance(body["suggestion"], str)
    assert body["details"].get("field") == field.field, body
    if code == 403:
        assert body["error_code"] == "PATH_OUTSIDE_WORKSPACE", body


# --- what the refusals did not do -----------------------------------------------------------------


def test_the_platform_is_unchanged_after_the_attacks(world):
    """Run after the attacks (file order): nothing trained, published, imported or loaded."""
    _, status = call(world.platform, "GET", "/api/training/status")
    assert status["is_training"] is False and status.get("training_id") is None
    _, model = call(world.platform, "GET", "/api/model/status")
    assert model["loaded"] is True and model["model_name"] == "tiny" and model["adapter_path"] is None
    published = sorted(p.name for p in (world.home / "models" / "published").iterdir())
    assert published == ["link_pub", "loop", "pub"]
    assert sorted(p.name for p in (world.home / "models" / "base").iterdir()) == ["link_model", "loop", "tiny"]
    assert sorted(p.name for p in (world.home / "models" / "cpt").iterdir()) == [
        "evil_run", "link_run", "loop", "run1"]
    _, health = call(world.platform, "GET", "/api/health")
    assert health["status"] == "healthy", health


# --- the same fields, used well: the refusals above are not everything failing ----------------------


def test_valid_values_still_work(world):
    call_ = world.platform
    for folder in (".", "dataset", "dataset/good", "models/base", "models/cpt", "models/cpt/run1", "models/published"):
        code, body = call(call_, "GET", "/api/filesystem/browse", raw_query=f"path={folder}")  # symlink loops
        assert code == 200 and "loop" not in json.dumps(body), body
    code, body = call(call_, "GET", "/api/models")
    assert code == 200 and "loop" not in json.dumps(body), body
    code, body = call(call_, "GET", "/api/filesystem/browse", raw_query="path=dataset")
    assert code == 200 and "good" in {d["name"] for d in body["directories"]}
    assert "link_data" not in {d["name"] for d in body["directories"]}
    code, body = call(call_, "GET", "/api/checkpoints", raw_query="training_dir=models/cpt/run1")
    assert code == 200 and body["best_checkpoints"] == [20, 10]
    code, body = call(call_, "GET", "/api/dashboard/data", raw_query="training_dir=models/cpt/run1")
    assert code == 200 and body["training_config"]["model_name"] == "tiny"
    code, body = call(call_, "GET", "/api/dataset/info", raw_query="model=tiny")
    assert code == 200 and "link_data" not in {d["name"] for d in body["datasets"]}
    code, body = call(call_, "POST", "/api/model/generate", {"prompt": "hi", "max_tokens": 2,
                                                             "adapter": "models/cpt/run1"})
    assert code == 200 and body["adapter_file"] == "models/cpt/run1/0000020_adapters.safetensors", body


def test_listings_leave_out_what_links_outside(world):
    _, models = call(world.platform, "GET", "/api/models")
    names = json.dumps(models)
    assert "link_model" not in names and "link_pub" not in names and "link_run" not in names
    _, checkpoints = call(world.platform, "GET", "/api/checkpoints", raw_query="training_dir=models/cpt/evil_run")
    assert checkpoints["checkpoints"] == [] and checkpoints["best_checkpoints"] == []


@pytest.mark.parametrize(("endpoint", "body"), [
    ("/api/model/load", {"model_name": "tiny", "adapter_path": "models/cpt/evil_run"}),
    ("/api/model/generate", {"prompt": "hi", "max_tokens": 1, "adapter": "models/cpt/evil_run"}),
])
def test_a_run_whose_checkpoint_links_out_is_not_used(world, endpoint, body):
    """evil_run looks like a run, but its only checkpoint is a link to an adapter outside."""
    code, reply = call(world.platform, "POST", endpoint, body)
    assert code in (403, 404), reply
    assert reply["details"].get("field") in ("adapter_path", "adapter"), reply


def test_a_dataset_file_linking_out_is_not_read(world):
    """dataset/good/c.txt links to the outside sentinel: a run on 'good' never reads it (the run's
    own document count is checked by the trainer before it starts: 2 files, not 3)."""
    from forgellm.services.training.data import load_documents

    docs = load_documents(world.home / "dataset" / "good")
    assert [where for where, _ in docs] == ["good/a.txt", "good/b.txt"]
    assert SENTINEL not in json.dumps(docs)


@pytest.mark.parametrize("path", [
    "/api/published/..%2f..%2f..%2fout%2fsecret.md",
    "/api/published/%2e%2e/%2e%2e/%2e%2e/out/secret.md",
    "/api/published/link_pub/README.md",
    "/api/published/pub/..%5c..%5c..%5cout%5cmodel%5cREADME.md",
    "/api/published/pub/%00README.md",
    "/api/published/" + "c" * 300 + "/README.md",
])
def test_published_files_refuse_escapes(world, path):
    code, body = call(world.platform, "GET", path)
    assert code in (400, 403, 404), body
    assert body["success"] is False and body["error_code"] in ("PATH_OUTSIDE_WORKSPACE", "NOT_FOUND",
                                                               "INVALID_REQUEST")
