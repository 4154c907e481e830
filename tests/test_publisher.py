"""Publishing on real processes and MLX: exactly the chosen checkpoint is fused, with a valid
dashboard PNG and model card; bad paths are refused; a killed publish leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import struct
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
import yaml

from forgellm.services.publishing.fuse import load_with_checkpoint
from tests.helpers.procs import Platform, http
from tests.helpers.tiny_lm import write_corpus, write_tiny_model

TOKENS = mx.array([[5, 17, 42, 8, 99, 23, 7]])


@pytest.fixture(scope="module")
def published_run():
    with tempfile.TemporaryDirectory(prefix="fl-") as name:
        home = Path(name)
        write_tiny_model(home / "models" / "base" / "tiny")
        write_corpus(home / "dataset" / "grammar")
        platform = Platform(home).start()
        try:
            platform.wait_healthy()
            status, reply, _ = http("POST", platform.web + "/api/training/start", {
                "model_name": "tiny", "dataset": "grammar", "batch_size": 4, "learning_rate": 3e-3,
                "max_seq_length": 64, "max_iterations": 40, "save_every": 20, "steps_per_eval": 20})
            assert status == 200, reply
            platform.wait_until(lambda h: h["components"]["training_pipeline"] == "idle"
                                and (home / reply["output_dir"] / "0000040_adapters.safetensors").exists(),
                                120, "run finished")
            yield platform, reply["output_dir"]
        finally:
            platform.stop()
            platform.kill_everything()


def publish(platform: Platform, run: str, iteration: int) -> tuple[int, dict]:
    status, body, _ = http("POST", platform.web + "/api/training/publish_checkpoint", {
        "checkpoint_path": f"{run}/{iteration:07d}_adapters.safetensors", "training_dir": run}, timeout=300)
    return status, body


def logits(model) -> mx.array:
    out = model(TOKENS)
    mx.eval(out)
    return out


def test_each_published_model_is_base_plus_exactly_its_checkpoint(published_run):
    platform, run = published_run
    run_dir = platform.home / run
    adapter_config = json.loads((run_dir / "adapter_config.json").read_text())
    base = platform.home / "models" / "base" / "tiny"
    results = {}
    for iteration in (20, 40):
        status, body = publish(platform, run, iteration)
        assert status == 200, body
        assert body["success"] is True and body["model_name"].startswith("published/tiny_lr0_003_bs4_iter40_")
        assert f"_{iteration:07d}_" in body["model_name"]
        fused, _ = mlx_lm.load(str(platform.home / body["published_model_path"]))
        reference, _, _ = load_with_checkpoint(base, adapter_config, run_dir / f"{iteration:07d}_adapters.safetensors")
        assert mx.allclose(logits(fused), logits(reference), atol=1e-4).item()
        results[iteration] = (logits(fused), body)
    assert not mx.allclose(results[20][0], results[40][0], atol=1e-3).item()  # two different checkpoints
    base_model, _ = mlx_lm.load(str(base))
    assert not mx.allclose(results[20][0], logits(base_model), atol=1e-3).item()
    _, models, _ = http("GET", platform.web + "/api/models")
    names = {m["name"] for m in models["published_models"]}
    assert {results[20][1]["model_name"], results[40][1]["model_name"]} <= names
    got, body, _ = http("POST", platform.server + "/api/model/load", {"model_name": results[40][1]["model_name"]})
    assert got == 200, body
    platform.wait_until(lambda h: http("GET", platform.server + "/api/model/status")[1]["loaded"], 60, "loaded")
    got, answer, _ = http("POST", platform.server + "/api/model/generate", {"prompt": "The heron", "max_tokens": 5})
    assert got == 200 and answer["tokens_generated"] >= 1


def test_dashboard_and_model_card(published_run):
    platform, run = published_run
    status, body = publish(platform, run, 40)
    assert status == 200, body
    png = (platform.home / body["dashboard_path"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (1800, 1100)
    card = (platform.home / body["readme_path"]).read_text()
    front = yaml.safe_load(card.split("---", 2)[1])
    assert front["base_model"] == "tiny" and front["library_name"] == "mlx" and "mlx" in front["tags"]
    assert front["forgellm"]["checkpoint"] == f"{run}/0000040_adapters.safetensors"
    assert front["forgellm"]["checkpoint_iteration"] == 40
    assert "license" in front
    meta = json.loads((platform.home / body["published_model_path"] / "publish.json").read_text())
    assert meta["checkpoint_iteration"] == 40 and meta["rank"] in (1, 2) and meta["checkpoints_in_run"] == 2
    assert meta["perplexity"] == pytest.approx(2.718281828 ** meta["validation_loss"], rel=1e-6)
    assert "iteration **40**" in card and "forgellm train" in card and f"{meta['validation_loss']:.4f}" in card


@pytest.mark.parametrize(
    ("checkpoint", "training_dir", "status", "code"),
    [
        ("{run}/0000099_adapters.safetensors", "{run}", 404, "CHECKPOINT_NOT_FOUND"),
        ("{run}/0000020_adapters.safetensors", "models/cpt/nope", 404, "RUN_NOT_FOUND"),
        ("models/base/tiny/model.safetensors", "{run}", 400, "INVALID_REQUEST"),
        ("../../etc/passwd", "{run}", 403, "PATH_OUTSIDE_WORKSPACE"),
        ("{run}/0000020_adapters.safetensors", "/etc", 403, "PATH_OUTSIDE_WORKSPACE"),
    ],
)
def test_bad_publish_requests(published_run, checkpoint, training_dir, status, code):
    platform, run = published_run
    got, body, _ = http("POST", platform.web + "/api/training/publish_checkpoint", {
        "checkpoint_path": checkpoint.format(run=run), "training_dir": training_dir.format(run=run)})
    assert (got, body["error_code"]) == (status, code), body


def test_kill_9_during_publish_leaves_nothing_half_written(published_run):
    platform, run = published_run
    published = platform.home / "models" / "published"
    before = {p.name for p in published.iterdir()} if published.exists() else set()
    import threading

    for _attempt in range(5):
        victim = platform.pid_of("publisher")
        thread = threading.Thread(target=publish, args=(platform, run, 20), daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not list(published.glob(".publishing-*")):
            time.sleep(0.002)
        if list(published.glob(".publishing-*")):
            os.kill(victim, signal.SIGKILL)
            break
        thread.join()  # it finished before we could catch it: try again
        before = {p.name for p in published.iterdir()}
    else:
        pytest.fail("could not catch a publish in progress")
    thread.join(60)
    platform.wait_until(lambda h: h["components"]["publisher"] == "idle" and platform.pid_of("publisher") != victim,
                        30, "publisher restarted")
    after = {p.name for p in published.iterdir()}
    assert after == before  # no new model, and the restarted publisher removed the partial folder
    status, body = publish(platform, run, 20)  # a retry works
    assert status == 200, body
    mlx_lm.load(str(platform.home / body["published_model_path"]))


def test_quantize_and_gguf_round_trip(published_run, tmp_path):
    from forgellm.services.modelio.gguf import import_gguf

    platform, run = published_run
    status, body = publish(platform, run, 40)
    assert status == 200, body
    name = body["model_name"]
    original, _ = mlx_lm.load(str(platform.home / body["published_model_path"]))
    got, quant, _ = http("POST", platform.web + "/api/models/quantize",
                         {"model_name": name, "bits": 8, "group_size": 32}, timeout=300)
    assert got == 200, quant
    assert quant["model_name"] == f"{name}_q8g32"
    qdir = platform.home / quant["published_model_path"]
    quantization = json.loads((qdir / "config.json").read_text())["quantization"]
    assert {"group_size": 32, "bits": 8}.items() <= quantization.items()
    quantized, _ = mlx_lm.load(str(qdir))
    difference = mx.abs(logits(quantized) - logits(original))
    assert difference.mean().item() < 0.05 * logits(original).std().item()  # 8-bit stays close
    _, models, _ = http("GET", platform.web + "/api/models")
    assert quant["model_name"] in {m["name"] for m in models["published_models"]}

    got, export, _ = http("POST", platform.web + "/api/models/export_gguf", {"model_name": name}, timeout=300)
    assert got == 200, export
    gguf = platform.home / export["gguf_path"]
    assert gguf.read_bytes()[:4] == b"GGUF" and export["size_mb"] > 0
    back, tokenizer = mlx_lm.load(str(import_gguf(gguf, tmp_path / "back")))
    assert mx.allclose(logits(back), logits(original), atol=2e-2).item()  # f16 round trip keeps the logits
    assert tokenizer.chat_template

    for payload, field in [({"model_name": name, "bits": 3}, "bits"), ({"model_name": name, "group_size": 48},
                                                                         "group_size")]:
        got, error, _ = http("POST", platform.web + "/api/models/quantize", payload)
        assert got == 400 and error["details"]["field"] == field
    got, error, _ = http("POST", platform.web + "/api/models/quantize", {"model_name": "tiny"})
    assert got == 400 and "published" in error["error"]
    got, error, _ = http("POST", platform.web + "/api/models/export_gguf", {"model_name": quant["model_name"]})
    assert got == 400 and "quantized" in error["error"]


async def test_publish_reports_progress_and_completion_on_the_bus(published_run):
    import asyncio

    import zmq.asyncio

    from forgellm.bus import AsyncSubscriber
    from forgellm.config import bus_address, load_settings
    from forgellm.schemas import PublishComplete, PublishError, PublishProgress

    platform, run = published_run
    settings = load_settings(env=platform.env)
    ctx = zmq.asyncio.Context()
    subscriber = AsyncSubscriber(ctx, bus_address(settings, "events_out"), ("publish.", "service.heartbeat"))
    try:
        while (await asyncio.wait_for(subscriber.recv(), 10)).topic != "service.heartbeat":
            pass  # the subscription is live
        status, body = await asyncio.to_thread(publish, platform, run, 20)
        assert status == 200, body
        seen = []
        while not seen or not isinstance(seen[-1], PublishComplete):
            record = await asyncio.wait_for(subscriber.recv(), 10)
            if record.topic.startswith("publish."):
                seen.append(record.body)
        stages = [event.stage for event in seen if isinstance(event, PublishProgress)]
        assert stages[0] == "fusing adapter into base model" and stages[-1] == "done"
        assert seen[-1].published_model_path == body["published_model_path"]
        got, _ = await asyncio.to_thread(publish, platform, run, 99)  # a missing checkpoint
        assert got == 404
        while True:
            record = await asyncio.wait_for(subscriber.recv(), 10)
            if isinstance(record.body, PublishError):
                assert "0000099" in record.body.error
                break
    finally:
        subscriber.close()
        ctx.destroy(linger=0)


async def test_publish_progress_reaches_socketio_with_the_request_id(published_run):
    import asyncio

    import socketio

    platform, run = published_run
    client = socketio.AsyncClient(reconnection=False)
    events: list[tuple[str, dict]] = []
    for kind in ("publish_progress", "publish_complete", "publish_error"):
        client.on(kind, lambda data, kind=kind: events.append((kind, data)))
    await client.connect(platform.web, transports=["websocket"], wait_timeout=10)
    try:
        request_id = "pubprogress0001"
        status, body, headers = await asyncio.to_thread(
            http, "POST", platform.web + "/api/training/publish_checkpoint",
            {"checkpoint_path": f"{run}/0000040_adapters.safetensors", "training_dir": run},
            {"X-Request-ID": request_id}, None, 300)
        assert status == 200 and headers["X-Request-ID"] == request_id, body
        deadline = time.monotonic() + 10
        while not any(kind == "publish_complete" and data["correlation_id"] == request_id for kind, data in events):
            assert time.monotonic() < deadline, events
            await asyncio.sleep(0.05)
        mine = [data for kind, data in events if kind == "publish_progress" and data["correlation_id"] == request_id]
        assert mine[0]["stage"] == "fusing adapter into base model" and mine[-1]["stage"] == "done"
        fractions = [data["fraction"] for data in mine]
        assert fractions == sorted(fractions) and fractions[-1] == 1.0
    finally:
        await client.disconnect()


def test_a_run_without_a_usable_training_config_is_a_400_not_a_500(published_run):
    from tests.helpers.tiny_model import write_lora_run

    platform, _ = published_run
    foreign = platform.home / "models" / "ift" / "foreign"  # adapters made elsewhere: no model_path
    write_lora_run(foreign, platform.home / "models" / "base" / "tiny", {10: 1.0})
    status, body = publish(platform, "models/ift/foreign", 10)
    assert status == 400 and body["details"]["field"] == "training_dir" and "model_path" in body["error"], body
