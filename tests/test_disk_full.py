"""A full disk while a checkpoint is written and while a model is published, on real processes.

The workspace is a small tmpfs (mounted here; the tests are skipped where mounting is not
allowed). The tiny model and datasets fit; once the run has written some checkpoints a ballast
file takes all but a few KB, so the next checkpoint (or the fused weights of a publish) cannot be
written. What must hold: a clear DISK_FULL error with a suggestion about disk space (Socket.IO
``training_error`` and status; ``publish.error`` and a 507), every checkpoint already on disk
still loads, nothing half-written is left looking valid, the services keep answering, and once
the ballast is gone the same platform trains, resumes and publishes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import pytest
import socketio
from safetensors import safe_open

from tests.helpers.procs import Platform, http, poll
from tests.helpers.tiny_lm import write_corpus, write_tiny_model

RUN = {"model_name": "tiny", "dataset": "grammar", "batch_size": 4, "learning_rate": 2e-3, "max_seq_length": 64,
       "warmup_steps": 5, "steps_per_report": 5, "seed": 1, "save_every": 20, "steps_per_eval": 20,
       "early_stopping_patience": 0}
KB = 1024


@contextlib.contextmanager
def tmpfs(size_mb: int) -> Iterator[Path]:
    """A fresh tmpfs of ``size_mb`` MiB, unmounted afterwards; skips the test where mount is refused."""
    path = Path(tempfile.mkdtemp(prefix="fl-df-"))  # short: ipc socket paths live under it
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                              capture_output=True, text=True, timeout=30)
        refused = done.returncode != 0 and (done.stderr.strip() or f"exit {done.returncode}")
    except (OSError, subprocess.SubprocessError) as exc:
        refused = str(exc)
    if refused:
        path.rmdir()
        pytest.skip(f"cannot mount a tmpfs to fill (needs root or CAP_SYS_ADMIN): {refused}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
        path.rmdir()


def free_bytes(home: Path) -> int:
    return shutil.disk_usage(home).free


def fill(home: Path, leave: int) -> int:
    """Grow the ballast file until only about ``leave`` bytes stay free; returns what is free."""
    ballast = home / "ballast"
    with open(ballast, "ab") as handle:
        want = free_bytes(home) - leave
        if want > 0:
            try:
                os.posix_fallocate(handle.fileno(), handle.seek(0, os.SEEK_END), want)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return free_bytes(home)


def empty(home: Path) -> None:
    (home / "ballast").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def disk():
    """A platform whose whole workspace is a 24 MiB tmpfs; its log is kept outside it."""
    with tmpfs(24) as home, tempfile.TemporaryDirectory(prefix="fl-log-") as logs:
        write_tiny_model(home / "models" / "base" / "tiny")
        write_corpus(home / "dataset" / "grammar")
        platform = Platform(home)
        platform.log_path = Path(logs) / "platform.log"
        platform.start()
        try:
            platform.wait_healthy(timeout=60)
            yield platform
        finally:
            platform.stop()
            platform.kill_everything()
            empty(home)


@pytest.fixture(autouse=True)
def no_ballast_left(disk):
    yield
    empty(disk.home)
    if status(disk).get("is_training"):
        http("POST", disk.web + "/api/training/stop")
        wait_done(disk)


def status(platform: Platform) -> dict:
    return http("GET", platform.web + "/api/training/status")[1]


def wait_done(platform: Platform, timeout: float = 120) -> dict:
    return poll(lambda: status(platform), lambda s: not s["is_training"], timeout, "the run to end", 0.2)


def start(platform: Platform, **fields) -> dict:
    code, body, _ = http("POST", platform.web + "/api/training/start", {**RUN, **fields})
    assert code == 200, body
    return body


def ping(platform: Platform, service: str) -> None:
    """The service answers on its command socket (not only via heartbeats)."""
    from forgellm.bus import RpcClient
    from forgellm.config import bus_address, load_settings
    from forgellm.schemas import PingReply, PingRequest

    client = RpcClient(bus_address(load_settings(env=platform.env), service), service, timeout_s=5)
    try:
        assert isinstance(client.request(PingRequest()), PingReply)
    finally:
        client.close()


def checkpoints_on_disk(run_dir: Path) -> list[int]:
    return sorted(int(p.name[:7]) for p in run_dir.glob("[0-9]" * 7 + "_adapters.safetensors"))


def assert_run_files_whole(run_dir: Path) -> list[int]:
    """Every checkpoint on disk is complete and loads; nothing temporary or orphaned is left."""
    iterations = checkpoints_on_disk(run_dir)
    for it in iterations:
        adapter = run_dir / f"{it:07d}_adapters.safetensors"
        optimizer = run_dir / "optimizer" / f"{it:07d}_optimizer.safetensors"
        weights = mx.load(str(adapter))
        assert weights and all(mx.all(mx.isfinite(w)).item() for w in weights.values()), adapter
        with safe_open(str(adapter), "numpy") as handle:
            assert handle.metadata()["iteration"] == str(it)
            for key in handle.keys():
                handle.get_tensor(key)
        assert mx.load(str(optimizer)), optimizer
        assert json.loads((run_dir / "optimizer" / f"{it:07d}_state.json").read_text())["iteration"] == it
    mx.load(str(run_dir / "adapters.safetensors"))
    # optimizer files of a checkpoint whose adapter file never appeared were removed with it
    orphans = {int(p.name[:7]) for p in (run_dir / "optimizer").iterdir()} - set(iterations)
    assert not orphans, f"optimizer files without a checkpoint: {sorted(orphans)}"
    leftovers = [p.name for p in run_dir.rglob(".*")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    return iterations


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# --- the write primitives, without processes ---------------------------------------------------


def test_a_checkpoint_file_that_does_not_fit_leaves_the_old_one_and_no_partial_file():
    from forgellm.services.common.errors import is_disk_full
    from forgellm.services.training.checkpoints import atomic_save_safetensors, atomic_write_text

    with tmpfs(1) as home:
        path = home / "0000010_adapters.safetensors"
        atomic_save_safetensors(path, {"w": mx.ones((1000,))})
        with pytest.raises(OSError) as raised:
            atomic_save_safetensors(path, {"w": mx.zeros((1_000_000,))})  # 4 MB into what is left of 1 MiB
        assert raised.value.errno == errno.ENOSPC and is_disk_full(raised.value)
        assert mx.array_equal(mx.load(str(path))["w"], mx.ones((1000,))).item()
        assert sorted(p.name for p in home.iterdir()) == [path.name]
        fill(home, 0)
        with pytest.raises(OSError):
            atomic_write_text(home / "state.json", "x" * 100_000)
        assert not (home / "state.json").exists() and not list(home.glob(".*"))
        # MLX's own writer drops errno; the free space on the device still tells a full disk
        with pytest.raises(RuntimeError) as mlx_error:
            mx.save_safetensors(str(home / "direct.safetensors"), {"w": mx.zeros((100_000,))})
        assert is_disk_full(mlx_error.value, home)
        assert not is_disk_full(RuntimeError("[write] Unable to write 10 bytes to file."), Path("/"))


def test_metrics_appended_after_a_torn_line_start_on_a_line_of_their_own(tmp_path):
    from forgellm.services.training.worker import Metrics

    (tmp_path / "metrics.jsonl").write_text('{"event": "train", "iteration": 5}\n{"event": "tra')  # cut short
    Metrics(tmp_path).write("resume", iteration=5)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[1] == '{"event": "tra' and json.loads(lines[2])["event"] == "resume"


# --- training ----------------------------------------------------------------------------------


async def test_disk_full_while_writing_a_checkpoint(disk):
    client = socketio.AsyncClient(reconnection=False)
    errors: list[dict] = []
    client.on("training_error", lambda data: errors.append(data))
    await client.connect(disk.web, transports=["websocket"], wait_timeout=10)
    await client.call("subscribe_training", {}, timeout=10)
    reply = await asyncio.to_thread(start, disk, max_iterations=100_000)
    run_dir = disk.home / reply["output_dir"]
    await asyncio.to_thread(poll, lambda: checkpoints_on_disk(run_dir), lambda c: len(c) >= 2, 120,
                            "two checkpoints")
    sizes = [p.stat().st_size for p in (run_dir / "optimizer").glob("*_optimizer.safetensors")]
    leave = 16 * KB  # room for the metrics lines until the next checkpoint, not for the checkpoint
    assert min(sizes) > 3 * leave, sizes
    left = fill(disk.home, leave)
    assert left <= leave + 4 * KB
    filled_at = time.monotonic()

    final = await asyncio.to_thread(wait_done, disk, 60)
    await asyncio.to_thread(poll, lambda: errors, bool, 10, "a training_error on Socket.IO")
    await client.disconnect()
    assert time.monotonic() - filled_at < 60
    error = errors[0]
    assert len(errors) == 1, errors  # one clear error, not a second, vaguer one from the service
    assert error["error_code"] == "DISK_FULL" and "checkpoint" in error["error"], error
    assert "disk space" in error["suggestion"] and "resume_from" in error["suggestion"]
    assert final["phase"] == "failed" and final["error_code"] == "DISK_FULL", final
    assert final["error"] == error["error"] and "disk space" in final["suggestion"]

    # earlier checkpoints intact, the failed one gone entirely (not left looking valid)
    on_disk = assert_run_files_whole(run_dir)
    assert len(on_disk) >= 2 and error["iteration"] not in on_disk and max(on_disk) < error["iteration"]
    logged = [m["iteration"] for m in metrics(run_dir) if m["event"] == "checkpoint"]
    assert logged == on_disk

    # the services keep running, and a start on a disk with no room at all is a clear 507
    for service in ("trainer", "catalog", "publisher"):
        await asyncio.to_thread(ping, disk, service)
    fill(disk.home, 0)
    code, body, _ = await asyncio.to_thread(http, "POST", disk.web + "/api/training/start", {**RUN})
    assert code == 507 and body["error_code"] == "DISK_FULL" and "disk space" in body["suggestion"], body
    await asyncio.to_thread(disk.wait_until, lambda h: h["components"]["trainer"] == "idle", 5, "trainer idle")

    # space freed: the run resumes from its last good checkpoint, and a new run completes
    empty(disk.home)
    last = max(on_disk)
    await asyncio.to_thread(start, disk, max_iterations=last + 20, resume_from=reply["output_dir"])
    resumed = await asyncio.to_thread(wait_done, disk)
    assert resumed["phase"] == "completed" and resumed["current_iteration"] == last + 20, resumed
    assert resumed["error"] is None
    events = metrics(run_dir)
    assert [e["iteration"] for e in events if e["event"] == "resume"] == [last]
    assert events[-1]["event"] == "complete"
    assert_run_files_whole(run_dir)
    fresh = await asyncio.to_thread(start, disk, max_iterations=20)
    assert (await asyncio.to_thread(wait_done, disk))["phase"] == "completed"
    assert assert_run_files_whole(disk.home / fresh["output_dir"]) == [20]


# --- publishing --------------------------------------------------------------------------------


def published_names(platform: Platform) -> set[str]:
    code, body, _ = http("GET", platform.web + "/api/models")
    assert code == 200, body
    return {m["name"] for m in body["published_models"]}


def publish(platform: Platform, run: str, iteration: int) -> tuple[int, dict]:
    code, body, _ = http("POST", platform.web + "/api/training/publish_checkpoint", {
        "checkpoint_path": f"{run}/{iteration:07d}_adapters.safetensors", "training_dir": run}, timeout=300)
    return code, body


@pytest.mark.parametrize(("leave_kb", "failing_stage"), [
    (32, "fusing adapter into base model"),  # no room for the fused weights (MLX's writer fails)
    (480, "drawing training dashboard"),  # the weights (391 KiB) fit, the dashboard PNG does not
])
async def test_disk_full_while_publishing(disk, leave_kb, failing_stage):
    import mlx_lm
    import zmq.asyncio

    from forgellm.bus import AsyncSubscriber
    from forgellm.config import bus_address, load_settings
    from forgellm.schemas import PublishComplete, PublishError, PublishProgress

    reply = await asyncio.to_thread(start, disk, max_iterations=20, save_every=10, steps_per_eval=10)
    assert (await asyncio.to_thread(wait_done, disk))["phase"] == "completed"
    run = reply["output_dir"]
    published = disk.home / "models" / "published"
    before = await asyncio.to_thread(published_names, disk)
    on_disk_before = sorted(p.name for p in published.iterdir()) if published.exists() else []
    ctx = zmq.asyncio.Context()
    subscriber = AsyncSubscriber(ctx, bus_address(load_settings(env=disk.env), "events_out"),
                                 ("publish.", "service.heartbeat"))
    try:
        while (await asyncio.wait_for(subscriber.recv(), 10)).topic != "service.heartbeat":
            pass  # the subscription is live
        fill(disk.home, leave_kb * KB)
        code, body = await asyncio.to_thread(publish, disk, run, 20)
        assert code == 507 and body["error_code"] == "DISK_FULL", (code, body)
        assert "disk space" in body["suggestion"] and "publishing" in body["error"], body
        stages = []
        while True:
            record = await asyncio.wait_for(subscriber.recv(), 10)
            if isinstance(record.body, PublishProgress):
                stages.append(record.body.stage)
            if isinstance(record.body, PublishError):
                break
        assert stages[-1] == failing_stage, stages
        assert record.body.error_code == "DISK_FULL" and "disk space" in record.body.suggestion
        assert record.body.error == body["error"]

        # nothing half-written: no staging folder, no new model, the listing unchanged
        assert sorted(p.name for p in published.iterdir()) == on_disk_before
        assert await asyncio.to_thread(published_names, disk) == before
        await asyncio.to_thread(ping, disk, "publisher")
        await asyncio.to_thread(disk.wait_until, lambda h: h["components"]["publisher"] == "idle", 5,
                                "publisher idle")  # heartbeats: at most a second behind
        assert_run_files_whole(disk.home / run)  # the checkpoint it read is untouched

        empty(disk.home)
        code, body = await asyncio.to_thread(publish, disk, run, 20)
        assert code == 200, body
        while not isinstance((record := await asyncio.wait_for(subscriber.recv(), 10)).body, PublishComplete):
            pass
        model, _ = await asyncio.to_thread(mlx_lm.load, str(disk.home / body["published_model_path"]))
        assert body["model_name"] in await asyncio.to_thread(published_names, disk)
    finally:
        subscriber.close()
        ctx.destroy(linger=0)
