"""The catalog through a running platform: models, runs, checkpoints, datasets, browse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

import pytest

from tests.helpers.procs import Platform, http, running_platform
from tests.helpers.workspace import write_model, write_run


@pytest.fixture(scope="module")
def catalog():
    with tempfile.TemporaryDirectory(prefix="fl-") as name:
        home = Path(name) / "ws"
        hf = Path(name) / "hf"
        write_model(home / "models" / "base" / "tiny-chat")
        write_model(home / "models" / "base" / "tiny-base", chat=False, quantized_bits=4)
        write_run(home / "models" / "cpt" / "tiny_lr1e_04_bs2_iter30", {10: 2.5, 20: 2.1, 30: 2.3})
        write_run(home / "models" / "ift" / "tiny_ift_run", {5: 1.9}, kind="ift")
        write_model(home / "models" / "published" / "tiny_run_0000020_20250115_104500")
        snapshot = hf / "models--org--cached-model" / "snapshots" / "abc123"
        write_model(snapshot)
        (hf / "models--org--cached-model" / "refs").mkdir(parents=True)
        (hf / "models--org--cached-model" / "refs" / "main").write_text("abc123")
        (hf / "models--org--not-mlx" / "snapshots" / "x").mkdir(parents=True)  # no weights: not listed
        data = home / "dataset" / "my_domain"
        data.mkdir(parents=True)
        (data / "a.txt").write_text("alpha beta gamma " * 100)
        (data / "b.md").write_text("# Title\n\nSome words here.\n")
        (data / "c.jsonl").write_text(json.dumps({"text": "one line of text"}) + "\n")
        (data / "ignored.bin").write_bytes(b"\x00\x01")
        outside = Path(name) / "outside"
        outside.mkdir()
        (outside / "secret.txt").write_text("secret")
        os.symlink(outside, home / "dataset" / "link_out")
        os.symlink(outside / "secret.txt", home / "escape.txt")
        with running_platform(home, HF_HUB_CACHE=str(hf)) as running:
            yield running


def get(platform: Platform, endpoint: str, **query: str):
    url = platform.web + endpoint + ("?" + urllib.parse.urlencode(query) if query else "")
    return http("GET", url)


def test_models_lists_every_kind_with_real_facts(catalog):
    status, body, _ = get(catalog, "/api/models")
    assert status == 200 and body["success"] is True
    base = {m["name"]: m for m in body["base_models"]}
    assert base["tiny-chat"]["type"] == "instruct" and base["tiny-base"]["type"] == "base"
    assert base["tiny-chat"]["path"] == "base/tiny-chat" and base["tiny-chat"]["size_gb"] > 0
    assert [m["name"] for m in body["cached_models"]] == ["org/cached-model"]
    assert body["cached_models"][0]["cached"] is True
    assert [m["path"] for m in body["cpt_models"]] == ["cpt/tiny_lr1e_04_bs2_iter30"]
    assert body["cpt_models"][0]["created_at"].endswith("Z")
    assert [m["name"] for m in body["ift_models"]] == ["tiny_ift_run"]
    assert [m["name"] for m in body["published_models"]] == ["published/tiny_run_0000020_20250115_104500"]


def test_a_model_added_while_running_is_seen(catalog):
    write_model(catalog.home / "models" / "base" / "added-later")
    _, body, _ = get(catalog, "/api/models")
    assert "added-later" in {m["name"] for m in body["base_models"]}


def test_checkpoints_are_ranked_by_validation_loss(catalog):
    status, body, _ = get(catalog, "/api/checkpoints", training_dir="models/cpt/tiny_lr1e_04_bs2_iter30")
    assert status == 200
    assert [(c["iteration"], c["rank"], c["is_best"]) for c in body["checkpoints"]] == [
        (20, 1, True), (30, 2, False), (10, 3, False)]
    assert body["checkpoints"][0]["path"] == "models/cpt/tiny_lr1e_04_bs2_iter30/0000020_adapters.safetensors"
    assert body["checkpoints"][0]["validation_loss"] == 2.1 and body["checkpoints"][0]["size_mb"] > 0
    assert body["best_checkpoints"] == [20, 30, 10]


def test_checkpoints_of_the_current_run_and_unknown_runs(catalog):
    state = catalog.home / ".forgellm"
    state.mkdir(exist_ok=True)
    (state / "current_run").write_text("models/ift/tiny_ift_run")
    _, body, _ = get(catalog, "/api/checkpoints")
    assert body["best_checkpoints"] == [5]
    status, body, _ = get(catalog, "/api/checkpoints", training_dir="models/cpt/nope")
    assert status == 404 and body["error_code"] == "RUN_NOT_FOUND"


def test_dashboard_data(catalog):
    status, body, _ = get(catalog, "/api/dashboard/data", training_dir="models/cpt/tiny_lr1e_04_bs2_iter30")
    assert status == 200
    rows = {row["iteration"]: row for row in body["training_data"]}
    assert rows[10]["training_loss"] == 3.0 and rows[10]["validation_loss"] == 2.5
    assert rows[40]["validation_loss"] is None and rows[40]["learning_rate"] == 1e-4
    assert body["best_checkpoints"] == [20, 30, 10]
    assert body["training_config"]["batch_size"] == 2
    perf = body["performance_metrics"]
    assert perf["avg_tokens_per_second"] == pytest.approx(102.5)
    assert perf["peak_memory_gb"] == pytest.approx(1.9)
    # losses 3.0 2.5 2.2 2.0: deltas -0.5 -0.3 -0.2 (std 0.1247), mean loss 2.425
    assert perf["training_stability"] == pytest.approx(1 - 0.124722 / 2.425, abs=1e-4)


def test_dataset_info_estimates_and_says_how(catalog):
    status, body, _ = get(catalog, "/api/dataset/info")
    assert status == 200
    info = {d["name"]: d for d in body["datasets"]}["my_domain"]
    files = [catalog.home / "dataset" / "my_domain" / n for n in ("a.txt", "b.md", "c.jsonl")]
    size = sum(f.stat().st_size for f in files)
    assert info["file_count"] == 3 and info["estimated_tokens"] == size // 4
    assert info["total_size_mb"] == round(size / 1024**2, 6)
    assert "bytes / 4" in info["token_method"]
    assert "link_out" not in {d["name"] for d in body["datasets"]}  # it points outside the workspace


def test_dataset_info_with_an_unknown_model_is_404(catalog):
    status, body, _ = get(catalog, "/api/dataset/info", model="org/does-not-exist")
    assert status == 404 and body["error_code"] == "MODEL_NOT_FOUND"
    assert body["details"]["model_name"] == "org/does-not-exist" and body["details"]["searched_paths"]
    assert "forgellm models pull org/does-not-exist" in body["suggestion"]


def test_browse_lists_inside_the_workspace(catalog):
    status, body, _ = get(catalog, "/api/filesystem/browse", path="dataset")
    assert status == 200 and body["path"] == "dataset"
    dirs = {d["name"]: d for d in body["directories"]}
    assert dirs["my_domain"]["file_count"] == 4 and dirs["my_domain"]["size_mb"] > 0
    assert "link_out" not in dirs  # a symlink out of the workspace is not shown
    status, body, _ = get(catalog, "/api/filesystem/browse", path="dataset/my_domain")
    assert {f["name"] for f in body["files"]} == {"a.txt", "b.md", "c.jsonl", "ignored.bin"}


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("..", 403, "PATH_OUTSIDE_WORKSPACE"),
        ("dataset/../../", 403, "PATH_OUTSIDE_WORKSPACE"),
        ("/etc", 403, "PATH_OUTSIDE_WORKSPACE"),
        ("dataset/link_out", 403, "PATH_OUTSIDE_WORKSPACE"),
        ("escape.txt", 403, "PATH_OUTSIDE_WORKSPACE"),
        ("dataset/\x00", 400, "INVALID_REQUEST"),
        ("a" * 5000, 400, "INVALID_REQUEST"),
        ("no/such/folder", 404, "NOT_FOUND"),
    ],
)
def test_browse_refuses_to_leave_the_workspace(catalog, path, status, code):
    got_status, body, _ = get(catalog, "/api/filesystem/browse", path=path)
    assert (got_status, body["error_code"]) == (status, code), body
    assert "secret" not in json.dumps(body)


def test_browse_refuses_url_encoded_escapes(catalog):
    got, body, _ = http("GET", catalog.web + "/api/filesystem/browse?path=%2E%2E%2F%2E%2E")
    assert got == 403 and body["error_code"] == "PATH_OUTSIDE_WORKSPACE"


def test_dataset_info_counts_with_the_models_own_tokenizer(catalog):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["alpha", "beta", "gamma", "#", "Title", "Some", "words", "here.", "one", "line", "of", "text"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(catalog.home / "models" / "base" / "tiny-chat" / "tokenizer.json"))
    status, body, _ = get(catalog, "/api/dataset/info", model="tiny-chat")
    assert status == 200
    info = {d["name"]: d for d in body["datasets"]}["my_domain"]
    assert info["estimated_tokens"] == 300 + 5 + 4  # a.txt 300 words, b.md 5, c.jsonl 4
    assert info["token_method"] == "tokenizer of tiny-chat"


def run_cli(platform, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "forgellm", *args], env=platform.env, capture_output=True,
                          text=True, timeout=60)


def test_cli_info_reads_the_files(catalog):
    out = run_cli(catalog, "cli", "info", "--model", "tiny-base",
                  "--adapter-path", "models/cpt/tiny_lr1e_04_bs2_iter30/0000020_adapters.safetensors")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    # 32x16 fp16 embedding + 2 layers of 16x16 weights packed 4-bit into 16x2 uint32
    assert "Parameters: 1,024" not in text and "(1,024)" in text
    assert "Type: Base Model" in text and "Architecture: Llama" in text
    assert "Quantization: 4-bit (group size 8)" in text and "Context Length: 4,096 tokens" in text
    assert "Type: LoRA Adapter" in text and "Rank: 8" in text and "Alpha: 16" in text
    assert "Target Modules: q_proj, v_proj" in text
    chat = run_cli(catalog, "cli", "info", "--model", "published/tiny_run_0000020_20250115_104500")
    assert "Type: Instruct Model" in chat.stdout and "Quantization: fp16" in chat.stdout
    missing = run_cli(catalog, "cli", "info", "--model", "org/unknown")
    assert missing.returncode != 0 and "Model not found" in missing.stderr and "Traceback" not in missing.stderr
