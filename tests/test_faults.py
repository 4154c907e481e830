"""Faults with real processes under `forgellm start`: dead, stuck and crash-looping services."""

from __future__ import annotations

import os
import re
import signal
import sys
import time

from tests.helpers.procs import http, processes_of


def test_endpoints_of_a_service_that_is_not_running_answer_503_quickly(fresh_platform, tmp_path):
    procfile = tmp_path / "Procfile"
    procfile.write_text("broker: forgellm service broker\ngateway: forgellm service gateway\n")
    fresh_platform.procfile = procfile
    fresh_platform.start()
    fresh_platform.wait_healthy(names=("broker",))
    for path in ("/api/training/status", "/api/models", "/api/model/status", "/api/dashboard/realtime"):
        started = time.monotonic()
        status, body, _ = http("GET", fresh_platform.web + path)
        assert status == 503, body
        assert body["error_code"] == "SERVICE_UNAVAILABLE" and body["suggestion"]
        assert time.monotonic() - started < 2.5  # never the full timeout (5 s x 3 tries)
    status, body, _ = http("GET", fresh_platform.web + "/api/health")
    assert status == 200 and body["status"] == "degraded"
    assert body["components"]["trainer"] == "down" and body["components"]["training_pipeline"] == "down"


def test_kill_9_of_a_service_is_seen_and_repaired(fresh_platform):
    fresh_platform.start().wait_healthy()
    victim = fresh_platform.pid_of("trainer")
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    fresh_platform.wait_until(lambda h: h["components"]["trainer"] == "down", 5, "trainer down")
    assert time.monotonic() - killed_at < 3.0
    health = fresh_platform.wait_until(lambda h: h["components"]["trainer"] == "idle", 15, "trainer back")
    assert fresh_platform.pid_of("trainer") != victim
    assert health["components"]["catalog"] == "running"  # one crash never stops the others
    status, body, _ = http("GET", fresh_platform.web + "/api/training/status")
    assert status == 200 and body["is_training"] is False
    assert "trainer exited with code -9" in fresh_platform.log()
    code = fresh_platform.stop(signal.SIGINT)
    assert code == 0
    assert processes_of(fresh_platform.home) == []


def test_a_stuck_service_gives_504_then_503(fresh_platform):
    fresh_platform.env.update(FORGELLM_TIMEOUTS_RPC_S="0.5", FORGELLM_TIMEOUTS_READ_RETRIES="1")
    fresh_platform.start().wait_healthy()
    pid = fresh_platform.pid_of("trainer")
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        status, body, _ = http("GET", fresh_platform.web + "/api/training/status")
        assert status == 504 and body["error_code"] == "SERVICE_TIMEOUT", body
        assert "2 tries" in body["error"]
        assert time.monotonic() - started < 2.0
        fresh_platform.wait_until(lambda h: h["components"]["trainer"] == "down", 5, "trainer down")
        status, body, _ = http("GET", fresh_platform.web + "/api/training/status")
        assert status == 503 and body["error_code"] == "SERVICE_UNAVAILABLE"
    finally:
        os.kill(pid, signal.SIGCONT)
    fresh_platform.wait_until(lambda h: h["components"]["trainer"] == "idle", 10, "trainer back")


def test_crash_looping_process_backs_off_and_others_keep_running(fresh_platform, tmp_path):
    procfile = tmp_path / "Procfile"
    procfile.write_text(
        "broker: forgellm service broker\n"
        "gateway: forgellm service gateway\n"
        f"crasher: {sys.executable} -c 'import sys; print(\"crashing\"); sys.exit(3)'\n"
    )
    fresh_platform.procfile = procfile
    fresh_platform.start().wait_healthy(names=("broker",))
    fresh_platform.wait_until(lambda h: fresh_platform.log().count("crasher exited with code 3") >= 3, 15,
                              "three crashes")
    log = fresh_platform.log()
    delays = [float(d) for d in re.findall(r"restarting crasher in ([0-9.]+) s", log)]
    assert delays[:3] == [0.5, 1.0, 2.0]
    assert re.search(r"^\d\d:\d\d:\d\d crasher +\| crashing$", log, re.M)
    status, body, _ = http("GET", fresh_platform.web + "/api/health")
    assert status == 200 and body["components"]["broker"] == "running"


def test_sigterm_stops_everything_within_10_s(fresh_platform):
    fresh_platform.start().wait_healthy()
    children = processes_of(fresh_platform.home)
    assert len(children) >= 7  # supervisor + 6 processes
    started = time.monotonic()
    assert fresh_platform.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 10
    assert processes_of(fresh_platform.home) == []
    log = fresh_platform.log()
    for name in ("broker", "trainer", "inference", "catalog", "publisher", "gateway"):
        assert f"{name} stopped (exit 0)" in log


def test_kill_9_of_the_trainer_service_mid_run_resumes_the_run(fresh_platform):
    from tests.helpers.tiny_lm import write_corpus, write_tiny_model

    write_tiny_model(fresh_platform.home / "models" / "base" / "tiny")
    write_corpus(fresh_platform.home / "dataset" / "grammar")
    fresh_platform.start().wait_healthy()
    status, reply, _ = http("POST", fresh_platform.web + "/api/training/start", {
        "model_name": "tiny", "dataset": "grammar", "batch_size": 4, "learning_rate": 2e-3, "max_seq_length": 64,
        "max_iterations": 800, "save_every": 50, "steps_per_eval": 50, "early_stopping_patience": 0})
    assert status == 200, reply
    fresh_platform.wait_until(lambda h: http("GET", fresh_platform.web + "/api/training/status")[1]
                              .get("current_iteration", 0) >= 100, 60, "training under way")
    os.kill(fresh_platform.pid_of("trainer"), signal.SIGKILL)
    # the worker stops with a checkpoint (its parent-death signal), the supervisor restarts the
    # trainer, and the new trainer resumes the run under the same id
    fresh_platform.wait_until(lambda h: http("GET", fresh_platform.web + "/api/training/status")[1]
                              .get("training_id") == reply["training_id"], 30, "run taken up again")
    fresh_platform.wait_until(
        lambda h: http("GET", fresh_platform.web + "/api/training/status")[1].get("phase") == "completed",
        180, "resumed run completed")
    final = http("GET", fresh_platform.web + "/api/training/status")[1]
    assert final["current_iteration"] == 800 and final["training_id"] == reply["training_id"]
    import json

    events = [json.loads(line) for line in
              (fresh_platform.home / reply["output_dir"] / "metrics.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert "interrupted" in kinds and kinds.index("interrupted") < kinds.index("resume")
    assert [e for e in events if e["event"] == "complete"][-1]["iteration"] == 800
