"""The trainer on real processes and real MLX, with a tiny llama: REST, Socket.IO, checkpoints,
early stopping, stop, 409, resume equivalence and a worker killed with -9."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import pytest
import socketio

from tests.helpers.procs import http, running_platform, worker_pid
from tests.helpers.runs import (
    FAST,
    metrics,
    start,
    status,
    stop_if_running,
    wait_done,
    write_training_workspace,
)


@pytest.fixture(scope="module")
def trainer():
    with tempfile.TemporaryDirectory(prefix="fl-") as name:
        with running_platform(write_training_workspace(Path(name))) as running:
            yield running


@pytest.fixture(autouse=True)
def no_run_left_behind(trainer):
    yield
    stop_if_running(trainer)


async def test_cpt_run_lowers_validation_loss_live_over_socketio(trainer):
    client = socketio.AsyncClient(reconnection=False)
    updates, complete = [], asyncio.get_running_loop().create_future()
    client.on("training_update", lambda data: updates.append(data))
    client.on("training_complete", lambda data: complete.done() or complete.set_result(data))
    await client.connect(trainer.web, transports=["websocket"], wait_timeout=10)
    await client.call("subscribe_training", {}, timeout=10)
    reply = await asyncio.to_thread(start, trainer, max_iterations=60, save_every=20, steps_per_eval=10)
    assert reply["training_id"].startswith("cpt_") and reply["output_dir"].startswith("models/cpt/tiny_lr0_002_bs4_")
    done = await asyncio.wait_for(complete, 120)
    await client.disconnect()
    assert done["success"] is True and done["stopped"] is False and done["final_iteration"] == 60
    assert done["output_dir"] == reply["output_dir"] and len(done["best_checkpoints"]) == 3
    live = [u for u in updates if u.get("iteration")]
    assert [u["iteration"] for u in live] == list(range(5, 61, 5))
    assert all(u["training_id"] == reply["training_id"] and u["tokens_per_second"] > 0 for u in live)
    evals = [m["val_loss"] for m in metrics(trainer, reply["output_dir"]) if m["event"] == "eval"]
    assert len(evals) == 6 and evals[-1] < evals[0] * 0.8
    final = status(trainer)
    assert final["phase"] == "completed" and final["current_iteration"] == 60 and final["progress_percentage"] == 100
    _, checkpoints, _ = http("GET", trainer.web + "/api/checkpoints")
    assert sorted(c["iteration"] for c in checkpoints["checkpoints"]) == [20, 40, 60]
    assert checkpoints["best_checkpoints"] == done["best_checkpoints"]
    lrs = {m["iteration"]: m["learning_rate"] for m in metrics(trainer, reply["output_dir"]) if m["event"] == "train"}
    assert lrs[5] == pytest.approx(2e-3) and lrs[60] == pytest.approx(2e-4)  # warm-up peak, cosine floor
    run_dir = trainer.home / reply["output_dir"]
    assert json.loads((run_dir / "adapter_config.json").read_text())["lora_parameters"]["rank"] == 8
    assert (run_dir / "optimizer" / "0000040_optimizer.safetensors").is_file()
    assert not list(run_dir.glob(".*tmp*"))  # nothing half-written left behind


def test_start_validation_errors(trainer):
    for fields, code, field in [
        ({"model_name": "org/not-here"}, "MODEL_NOT_FOUND", None),
        ({"dataset": "nope"}, "DATASET_NOT_FOUND", "dataset"),
        ({"dataset": "../../etc"}, "PATH_OUTSIDE_WORKSPACE", "dataset"),
        ({"batch_size": 0}, "INVALID_REQUEST", "batch_size"),
        ({"data_mixture_ratio": 1.5}, "INVALID_REQUEST", "data_mixture_ratio"),
        ({"general_dataset": "nope", "data_mixture_ratio": 0.5}, "DATASET_NOT_FOUND", "general_dataset"),
    ]:
        got, body, _ = http("POST", trainer.web + "/api/training/start", {**FAST, **fields})
        assert body["error_code"] == code, body
        assert got in (400, 403, 404)
        if field:
            assert body["details"]["field"] == field
    bad = trainer.home / "dataset" / "badchat"
    bad.mkdir(exist_ok=True)
    (bad / "x.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + '{"oops": 1}\n')
    got, body, _ = http("POST", trainer.web + "/api/training/start", {**FAST, "dataset": "badchat",
                                                                       "training_type": "ift"})
    assert got == 400 and "badchat/x.jsonl:2" in body["error"]


def test_ift_run_and_409_while_running_then_graceful_stop(trainer):
    reply = start(trainer, dataset="chat", training_type="ift", max_iterations=100000, save_every=1000,
                  steps_per_eval=1000)
    assert reply["training_id"].startswith("ift_") and reply["output_dir"].startswith("models/ift/")
    got, body, _ = http("POST", trainer.web + "/api/training/start", FAST)
    assert got == 409 and body["error_code"] == "TRAINING_ALREADY_RUNNING"
    deadline = time.monotonic() + 60
    while status(trainer)["current_iteration"] < 10:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    got, body, _ = http("POST", trainer.web + "/api/training/stop")
    assert got == 200 and body["success"] is True
    final = wait_done(trainer)
    assert final["phase"] == "stopped" and final["current_iteration"] < 100000
    events = metrics(trainer, reply["output_dir"])
    complete = [e for e in events if e["event"] == "complete"][-1]
    assert complete["stopped"] is True
    last_checkpoint = [e for e in events if e["event"] == "checkpoint"][-1]
    assert last_checkpoint["iteration"] == complete["iteration"]  # the final checkpoint was written
    assert (trainer.home / reply["output_dir"] / last_checkpoint["file"]).is_file()
    got, body, _ = http("POST", trainer.web + "/api/training/stop")
    assert got == 409 and body["error_code"] == "NO_TRAINING_RUNNING"


def test_early_stop_on_a_corpus_built_to_overfit(trainer):
    # Full fine-tuning of the tiny model memorises 6 short random documents within ~50 steps
    # (train loss 4.8 -> 0.3) while the loss on the 2 held-out ones climbs (3.9 -> 8.4).
    reply = start(trainer, dataset="noise", max_iterations=400, save_every=10, steps_per_eval=10,
                  fine_tune_type="full", learning_rate=3e-3, batch_size=2, max_seq_length=32,
                  overfitting_threshold=0.02, early_stopping_patience=2, validation_split=0.25,
                  warmup_steps=0, lr_schedule="constant")
    final = wait_done(trainer)
    assert final["phase"] == "early stopped", final
    events = metrics(trainer, reply["output_dir"])
    complete = [e for e in events if e["event"] == "complete"][-1]
    assert complete["iteration"] < 400 and complete["reason"].startswith("early stop")
    evals = {e["iteration"]: e["val_loss"] for e in events if e["event"] == "eval"}
    best_iteration = min(evals, key=evals.get)
    _, body, _ = http("GET", trainer.web + "/api/checkpoints", None)
    assert body["best_checkpoints"][0] == best_iteration
    assert [c for c in body["checkpoints"] if c["is_best"]][0]["iteration"] == best_iteration
    assert list(evals.values())[-1] > evals[best_iteration] * 1.02


def test_resume_matches_an_uninterrupted_run(trainer):
    # dropout on: the random stream must be restored too
    reply = start(trainer, max_iterations=40, save_every=20, steps_per_eval=20, seed=11, lora_dropout=0.1)
    assert wait_done(trainer)["phase"] == "completed"
    run_dir = trainer.home / reply["output_dir"]
    uninterrupted = mx.load(str(run_dir / "0000040_adapters.safetensors"))
    shutil.copy(run_dir / "metrics.jsonl", run_dir.parent / "uninterrupted_metrics.jsonl")
    resumed = start(trainer, max_iterations=40, save_every=20, steps_per_eval=20, seed=11, lora_dropout=0.1,
                    resume_from=f"{reply['output_dir']}/0000020_adapters.safetensors")
    assert resumed["output_dir"] == reply["output_dir"] and resumed["training_id"] == reply["training_id"]
    assert wait_done(trainer)["phase"] == "completed"
    again = mx.load(str(run_dir / "0000040_adapters.safetensors"))
    assert set(again) == set(uninterrupted)
    for key in uninterrupted:
        assert mx.allclose(again[key], uninterrupted[key], atol=1e-5).item(), key
    events = metrics(trainer, reply["output_dir"])
    assert [e["iteration"] for e in events if e["event"] == "resume"] == [20]
    cut = next(i for i, e in enumerate(events) if e["event"] == "resume")

    def curve(part):
        return [(e["iteration"], round(e["train_loss"], 4)) for e in part
                if e["event"] == "train" and e["iteration"] > 20]

    assert curve(events[cut:]) == curve(events[:cut]) != []  # the same curve, appended to the same file


async def test_kill_9_of_the_worker_is_reported_and_resumed(trainer):
    reply = await asyncio.to_thread(start, trainer, max_iterations=1500, save_every=50, steps_per_eval=50,
                                    early_stopping_patience=0)
    deadline = time.monotonic() + 60
    while (await asyncio.to_thread(status, trainer))["current_iteration"] < 60:
        assert time.monotonic() < deadline
    worker = await asyncio.to_thread(worker_pid, trainer.home)
    assert worker is not None, "no training worker running"
    client = socketio.AsyncClient(reconnection=False)
    errors = []
    client.on("training_error", lambda data: errors.append((time.monotonic(), data)))
    await client.connect(trainer.web, transports=["websocket"], wait_timeout=10)
    await client.call("subscribe_training", {"training_id": reply["training_id"]}, timeout=10)
    os.kill(worker, signal.SIGKILL)
    killed = time.monotonic()
    slowest = 0.0
    while not errors and time.monotonic() - killed < 10:  # waits longer than the 3 s it must take
        asked = time.monotonic()
        await asyncio.to_thread(http, "GET", trainer.web + "/api/training/status")
        slowest = max(slowest, time.monotonic() - asked)
        await asyncio.sleep(0.05)
    assert errors, "no training_error within 10 s"
    assert errors[0][0] - killed < 3.0
    error = errors[0][1]
    assert "SIGKILL" in error["error"] and "memory" in error["suggestion"]
    assert slowest < 0.1  # the service answered status throughout
    await client.disconnect()
    final = await asyncio.to_thread(wait_done, trainer, 180)
    assert final["phase"] == "completed" and final["current_iteration"] == 1500
    events = metrics(trainer, reply["output_dir"])
    assert [e["iteration"] for e in events if e["event"] == "resume"][0] % 50 == 0


def test_mixture_with_self_synthesized_replay(trainer):
    reply = start(trainer, max_iterations=10, save_every=10, steps_per_eval=10, data_mixture_ratio=0.5)
    assert wait_done(trainer)["phase"] == "completed"
    events = metrics(trainer, reply["output_dir"])
    assert "preparing replay text" in [e.get("phase") for e in events if e["event"] == "phase"]
    caches = list((trainer.home / ".forgellm" / "replay").glob("tiny-*.jsonl"))
    assert len(caches) == 1
    texts = [json.loads(line)["text"] for line in caches[0].read_text().splitlines()]
    assert texts and all(isinstance(t, str) for t in texts)
    domain_only = start(trainer, max_iterations=10, save_every=10, steps_per_eval=10)
    wait_done(trainer)
    rows_mixed = [e for e in events if e["event"] == "start"][0]["train_rows"]
    rows_domain = [e for e in metrics(trainer, domain_only["output_dir"]) if e["event"] == "start"][0]["train_rows"]
    assert rows_mixed == 2 * rows_domain  # r = 0.5: as many general rows as domain rows
    before = caches[0].stat().st_mtime_ns
    again = start(trainer, max_iterations=10, save_every=10, steps_per_eval=10, data_mixture_ratio=0.5)
    wait_done(trainer)
    assert caches[0].stat().st_mtime_ns == before  # cached per base model: nothing generated again
    assert [e for e in metrics(trainer, again["output_dir"]) if e["event"] == "start"][0]["train_rows"] == rows_mixed
