"""Faults during a real training run under `forgellm start` (issue 8).

Kill -9, in turn, the broker, every service, the gateway and the training worker while the run
trains and while HTTP callers keep asking. After each: the supervisor (or the trainer, for its
worker) brings it back; callers got answers or 503/504, never a hang; a Socket.IO client
reconnects and gets the run's current state; training goes on or resumes from its last
checkpoint. At the end every checkpoint, optimizer state, metrics line and a model published
from the run loads. Then SIGTERM to `forgellm start` interrupts the run with a final checkpoint,
and the next start resumes it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import socketio

from tests.helpers.procs import Platform, http, processes_of, worker_pid

RUN = {"model_name": "tiny", "dataset": "grammar", "batch_size": 4, "learning_rate": 2e-3, "max_seq_length": 64,
       "max_iterations": 100_000, "save_every": 25, "steps_per_eval": 25, "early_stopping_patience": 0}
VICTIMS = ("broker", "catalog", "inference", "publisher", "gateway", "worker", "trainer")
ALLOWED = {200, 503, 504}  # while something is down, callers get one of these, or the gateway's port is closed


def status(platform: Platform) -> dict:
    return http("GET", platform.web + "/api/training/status", timeout=10)[1]


def load_tiny(platform: Platform) -> None:
    code, body, _ = http("POST", platform.web + "/api/model/load", {"model_name": "tiny"})
    assert code == 200, body
    platform.wait_until(lambda h: http("GET", platform.web + "/api/model/status")[1].get("loaded"), 60, "model")


def generate_until_cut(platform: Platform, first_token: threading.Event) -> dict:
    """Stream a long generation; say how the stream ended."""
    request = urllib.request.Request(platform.web + "/api/model/generate", method="POST", headers={
        "Content-Type": "application/json"}, data=json.dumps({
            "prompt": "Tell me a long story", "max_tokens": 30000, "streaming": True}).encode())
    tokens, end = 0, "finished"
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            for line in response:
                frame = json.loads(line)
                if "token" in frame:
                    tokens += 1
                    first_token.set()
                elif frame.get("done"):
                    end = "error line" if frame.get("success") is False else "finished"
                    return {"tokens": tokens, "end": end, "last": frame}
    except (OSError, ValueError) as exc:  # the connection was cut: also an honest end
        return {"tokens": tokens, "end": "cut", "error": repr(exc)}
    return {"tokens": tokens, "end": end}


def resume_events(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [event for event in map(json.loads, lines) if event["event"] == "resume"]


class Callers:
    """Threads that keep calling one endpoint of each service through the gateway and record
    every outcome: a status code, 'refused' (the gateway's port is closed) or 'hang'."""

    PATHS = ("/api/training/status", "/api/checkpoints", "/api/model/status", "/api/health")

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.outcomes: dict[str, list[object]] = {path: [] for path in self.PATHS}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._call, args=(path,), daemon=True) for path in self.PATHS]

    def __enter__(self) -> Callers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(15)

    def _call(self, path: str) -> None:
        while not self.stop.is_set():
            try:
                with urllib.request.urlopen(self.platform.web + path, timeout=8) as response:
                    self.outcomes[path].append(response.status)
            except urllib.error.HTTPError as exc:
                body = json.loads(exc.read() or b"{}")
                self.outcomes[path].append(exc.code if "error_code" in body else f"{exc.code} without error body")
            except TimeoutError:
                self.outcomes[path].append("hang")
            except (urllib.error.URLError, ConnectionError) as exc:
                reason = getattr(exc, "reason", exc)
                if isinstance(reason, TimeoutError):
                    self.outcomes[path].append("hang")
                    continue
                self.outcomes[path].append(
                    "refused" if isinstance(reason, (ConnectionRefusedError, ConnectionResetError))
                    or "Connection reset" in str(reason) or "Remote end closed" in str(reason) else repr(exc))
            time.sleep(0.05)

    def bad(self) -> dict[str, list[object]]:
        return {path: [o for o in outcomes if o not in ALLOWED and o != "refused"]
                for path, outcomes in self.outcomes.items() if any(o not in ALLOWED and o != "refused"
                                                                  for o in outcomes)}


class Watcher:
    """A Socket.IO client that reconnects by itself and subscribes again on every connect."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = socketio.AsyncClient(reconnection=True, reconnection_delay=0.2, reconnection_delay_max=1)
        self.connects = 0
        self.snapshots: list[dict] = []
        self.updates: list[dict] = []
        self.client.on("connect", self._on_connect)
        self.client.on("training_update", self._on_update)

    async def _on_connect(self) -> None:
        self.connects += 1
        asyncio.ensure_future(self.client.call("subscribe_training", {}, timeout=10))

    def _on_update(self, data: dict) -> None:
        (self.snapshots if data.get("snapshot") else self.updates).append(data)

    async def start(self) -> None:
        await self.client.connect(self.url, transports=["websocket"], wait_timeout=10)


def load_every_file(run_dir: Path) -> tuple[int, int]:
    """Every checkpoint and optimizer state loads; every metrics line parses. Returns counts."""
    import mlx.core as mx  # the test reads what the trainer wrote, as a user's tools would

    files = sorted(run_dir.glob("*_adapters.safetensors")) + sorted((run_dir / "optimizer").glob("*.safetensors"))
    for file in files:
        assert mx.load(str(file)), f"{file} is empty"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    for line in lines:
        json.loads(line)
    assert not list(run_dir.rglob("*.tmp*")) and not list(run_dir.rglob(".*tmp*")), "half-written files left"
    return len(files), len(lines)


@pytest.mark.timeout(900)
async def test_kill_9_in_turn_during_a_run(fresh_platform):
    from tests.helpers.tiny_lm import write_corpus, write_tiny_model

    platform = fresh_platform
    write_tiny_model(platform.home / "models" / "base" / "tiny")
    write_corpus(platform.home / "dataset" / "grammar")
    platform.start().wait_healthy(timeout=60)
    code, started, _ = await asyncio.to_thread(http, "POST", platform.web + "/api/training/start", RUN)
    assert code == 200, started
    run_dir = platform.home / started["output_dir"]
    watcher = Watcher(platform.web)
    await watcher.start()

    async def progress_beyond(iteration: int, what: str, timeout: float = 90) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                now = await asyncio.to_thread(status, platform)
            except OSError:  # the gateway itself may be restarting
                now = {}
            if now.get("training_id") == started["training_id"] and now.get("current_iteration", 0) > iteration \
                    and now.get("phase") == "training":
                return now
            assert time.monotonic() < deadline, f"{what}: no progress beyond {iteration} ({now})"
            await asyncio.sleep(0.2)

    reached = await progress_beyond(30, "first checkpoint")
    _, live, _ = await asyncio.to_thread(http, "GET", platform.web + "/api/dashboard/realtime")
    busy = live["current_metrics"]["gpu_utilization"]  # measured (CUDA, Metal) or null: never invented
    assert busy is None or 0 <= busy <= 100, live
    with Callers(platform) as callers:
        for victim in VICTIMS:
            before = await progress_beyond(reached["current_iteration"], f"before killing {victim}")
            pid = worker_pid(platform.home) if victim == "worker" else platform.pid_of(victim)
            assert pid, victim
            connects, resumes = watcher.connects, len(resume_events(run_dir))
            generation = None
            if victim == "inference":  # mid-request: a long streamed generation is under way
                await asyncio.to_thread(load_tiny, platform)
                first_token = threading.Event()
                generation = asyncio.ensure_future(asyncio.to_thread(generate_until_cut, platform, first_token))
                assert await asyncio.to_thread(first_token.wait, 60), "the generation never started"
            os.kill(pid, signal.SIGKILL)
            began = time.monotonic()
            if victim != "worker":
                await asyncio.to_thread(platform.wait_until, lambda h, v=victim, p=pid: platform.pid_of(v) != p,
                                        30, f"{victim} restarted")
                await asyncio.to_thread(platform.wait_healthy, timeout=60)
            after = before["current_iteration"]
            if victim in ("worker", "trainer"):  # the run resumes from its last checkpoint, same id
                deadline = time.monotonic() + 60
                while len(resume_events(run_dir)) == resumes:
                    assert time.monotonic() < deadline, f"no resume after killing the {victim}"
                    await asyncio.sleep(0.1)
                after = resume_events(run_dir)[-1]["iteration"]
                assert (run_dir / f"{after:07d}_adapters.safetensors").is_file() and worker_pid(platform.home) != pid, \
                    (run_dir / "metrics.jsonl").read_text().splitlines()[-12:]
            reached = await progress_beyond(after, f"training after killing {victim}", 120)
            if generation is not None:
                ended_with = await asyncio.wait_for(generation, 60)
                assert ended_with["tokens"] > 0 and ended_with["end"] in ("error line", "cut"), ended_with
                print("the generation in hand ended with:", ended_with)
            if victim == "gateway":  # the Socket.IO client came back and got the run's state at once
                deadline = time.monotonic() + 30
                while watcher.connects == connects or not watcher.snapshots:
                    assert time.monotonic() < deadline, "the Socket.IO client did not reconnect"
                    await asyncio.sleep(0.1)
                assert watcher.snapshots[-1]["training_id"] == started["training_id"]
            print(f"killed {victim}: back and training in {time.monotonic() - began:.1f} s, "
                  f"iteration {reached['current_iteration']}")
            assert time.monotonic() - began < 120
        assert not callers.bad(), callers.bad()
        counted = {path: len(outcomes) for path, outcomes in callers.outcomes.items()}
        print("calls made during the kills:", counted, "non-200:",
              {p: sorted({str(o) for o in outcomes if o != 200}) for p, outcomes in callers.outcomes.items()})
    await watcher.client.disconnect()
    assert watcher.connects >= 2 and len(watcher.updates) > 10

    code, _, _ = await asyncio.to_thread(http, "POST", platform.web + "/api/training/stop")
    assert code == 200
    await asyncio.to_thread(platform.wait_until, lambda h: status(platform).get("phase") in ("completed", "stopped"),
                            60, "the run stopped")
    checkpoints_and_states, lines = load_every_file(run_dir)
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.count("resume") >= 2  # after the worker's and the trainer's deaths
    complete = [e for e in events if e["event"] == "complete"][-1]
    assert complete["stopped"] is True
    # The curve is intact: every resume starts from a checkpoint on disk (a SIGKILLed worker's
    # last periodic one; a worker whose trainer died writes one where it stopped), and no
    # reported iteration is missing from the curve.
    for resume in (e for e in events if e["event"] == "resume"):
        assert (run_dir / f"{resume['iteration']:07d}_adapters.safetensors").is_file()
    logged = {e["iteration"] for e in events if e["event"] == "train"}
    missing = [i for i in range(10, complete["iteration"] - 10, 10) if i not in logged]
    assert not missing, missing
    print(f"{checkpoints_and_states} checkpoint/optimizer files and {lines} metrics lines load; "
          f"final iteration {complete['iteration']}")

    # A model published from the run after all that loads too.
    best = complete.get("best_checkpoints") or [complete["iteration"]]
    checkpoint = f"{started['output_dir']}/{best[0]:07d}_adapters.safetensors"
    code, published, _ = await asyncio.to_thread(
        http, "POST", platform.web + "/api/training/publish_checkpoint",
        {"checkpoint_path": checkpoint, "training_dir": started["output_dir"]}, None, None, 120)
    assert code == 200, published
    import mlx.core as mx

    folder = platform.home / published["published_model_path"]
    weights = list(folder.glob("*.safetensors"))
    assert weights and all(mx.load(str(w)) for w in weights)


@pytest.mark.timeout(300)
def test_sigterm_to_start_interrupts_the_run_and_the_next_start_resumes_it(fresh_platform):
    from tests.helpers.tiny_lm import write_corpus, write_tiny_model

    platform = fresh_platform
    write_tiny_model(platform.home / "models" / "base" / "tiny")
    write_corpus(platform.home / "dataset" / "grammar")
    platform.start().wait_healthy(timeout=60)
    code, started, _ = http("POST", platform.web + "/api/training/start", {**RUN, "save_every": 1000})
    assert code == 200, started
    platform.wait_until(lambda h: status(platform).get("current_iteration", 0) >= 40, 90, "training under way")
    began = time.monotonic()
    assert platform.stop(signal.SIGTERM) == 0
    assert time.monotonic() - began < 10 and processes_of(platform.home) == []
    run_dir = platform.home / started["output_dir"]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "interrupted"
    stopped_at = events[-1]["iteration"]
    assert stopped_at >= 40 and (run_dir / f"{stopped_at:07d}_adapters.safetensors").is_file()  # the final one
    load_every_file(run_dir)

    platform.start().wait_healthy(timeout=60)
    resumed = platform.wait_until(lambda h: status(platform).get("current_iteration", 0) > stopped_at, 90,
                                  "the run resumed after the restart")
    now = status(platform)
    assert now["training_id"] == started["training_id"] and now["is_training"] and resumed
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resume = [e for e in events if e["event"] == "resume"][-1]
    assert resume["iteration"] == stopped_at
    assert http("POST", platform.web + "/api/training/stop")[0] == 200
