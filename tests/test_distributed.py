"""Distributed training on real processes: mlx.launch starting two ranks of the real worker on
the ring backend of mlx[cpu] (over loopback), the whole platform around them, a tiny llama.

Equivalence tolerance: a distributed step computes the same sums as one process in another
order (each rank sums its rows' cross-entropy, the ring adds the two partial sums; gradients are
summed per rank and then averaged). In float32 that moves results by a few ulps per operation;
over 20 Adam steps the observed gaps are ~1e-6 (loss, relative) and ~1e-6 (adapter weights of
magnitude ~0.2, absolute). The bounds below, 2e-5 relative and 5e-5 absolute, leave room for
that drift and are still ~1000x below what a wrong reduction (a mean of per-rank means, a
missing gradient average, a rank training on the wrong rows) moves them by.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import pytest
import socketio

from tests.helpers.procs import Platform, http, poll, processes_of, running_platform
from tests.helpers.runs import (
    FAST,
    metrics,
    start,
    status,
    stop_if_running,
    wait_done,
    write_training_workspace,
)

TWO = {"processes": 2}
FAKE_SSH = Path(__file__).parent / "helpers" / "fake_ssh"
HANG_TIMEOUT_S = 6


# With FORGELLM_TEST_REAL_SSH=1 (an sshd on 127.0.0.2 and 127.0.0.3 that takes this user's key),
# the two-host tests go over the real ssh instead of the stand-in.
REAL_SSH = os.environ.get("FORGELLM_TEST_REAL_SSH") == "1"
# mlx.launch says "rank N exited with code -9" (through ssh: 255), unless the survivors' failed
# collective ends the launch before it does: then the rank that said nothing is the one named.
HOW_A_DEAD_RANK_IS_NAMED = ("was killed (SIGKILL)", "ended abnormally (its ssh session exited with 255",
                            "vanished: rank")


@pytest.fixture(scope="module")
def cluster():
    """A platform whose trainer finds the ssh stand-in first on PATH (hosts 127.0.0.2 and
    127.0.0.3 run here through it; others reach the real ssh) and that calls a rank hung after
    a few seconds without a step."""
    path = os.environ["PATH"] if REAL_SSH else f"{FAKE_SSH}:{os.environ['PATH']}"
    with tempfile.TemporaryDirectory(prefix="fl-") as name:
        home = write_training_workspace(Path(name), uneven_chats=True)
        with running_platform(home, PATH=path,
                              FORGELLM_TRAINING_HANG_TIMEOUT_S=str(HANG_TIMEOUT_S)) as running:
            yield running


@pytest.fixture(autouse=True)
def no_run_left_behind(cluster):
    yield
    stop_if_running(cluster)


def refused(platform: Platform, **fields) -> dict:
    code, body, _ = http("POST", platform.web + "/api/training/start", {**FAST, **fields})
    assert code == 400, body
    return body


def rank_pids(run_dir: Path) -> dict[int, int]:
    found = {}
    for entry in (run_dir / "ranks").glob("*.json"):
        data = json.loads(entry.read_text())
        found[data["rank"]] = data["pid"]
    return found


def alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def curve(events: list[dict], key: str) -> list[tuple[int, float]]:
    kind = "train" if key == "train_loss" else "eval"
    return [(e["iteration"], e[key]) for e in events if e["event"] == kind]


def assert_same_run(platform: Platform, one: dict, two: dict, iteration: int) -> None:
    a, b = metrics(platform, one["output_dir"]), metrics(platform, two["output_dir"])
    for key in ("train_loss", "val_loss"):
        ca, cb = curve(a, key), curve(b, key)
        assert [i for i, _ in ca] == [i for i, _ in cb] and ca, (key, ca, cb)
        for (i, x), (_, y) in zip(ca, cb, strict=True):
            assert y == pytest.approx(x, rel=2e-5), (key, i, x, y)
    wa = mx.load(str(platform.home / one["output_dir"] / f"{iteration:07d}_adapters.safetensors"))
    wb = mx.load(str(platform.home / two["output_dir"] / f"{iteration:07d}_adapters.safetensors"))
    assert set(wa) == set(wb)
    for key in wa:
        assert mx.allclose(wa[key], wb[key], atol=5e-5, rtol=0).item(), key


@pytest.mark.parametrize("fields", [
    pytest.param({}, id="cpt-lora-packed-cosine"),
    pytest.param({"training_type": "ift", "dataset": "chat", "fine_tune_type": "dora", "lr_schedule": "linear"},
                 id="ift-dora-masked"),
    pytest.param({"fine_tune_type": "full", "learning_rate": 2e-4, "data_mixture_ratio": 0.6}, id="full-replay"),
])
def test_two_ranks_train_exactly_as_one_process(cluster, fields):
    run = {**fields, "max_iterations": 20, "save_every": 10, "steps_per_eval": 10}
    single = start(cluster, **run)
    assert wait_done(cluster)["phase"] == "completed"
    double = start(cluster, **run, distributed=TWO)
    during = poll(lambda: status(cluster), lambda s: s["world_size"] == 2 or not s["is_training"], 60, "world size")
    assert during["world_size"] == 2 and during["hosts"] == ["127.0.0.1"]
    done = wait_done(cluster)
    assert done["phase"] == "completed" and done["world_size"] == 2, done
    assert_same_run(cluster, single, double, 20)
    run_dir = cluster.home / double["output_dir"]
    layout = json.loads((run_dir / "training_config.json").read_text())["layout"]
    assert layout["world_size"] == 2 and layout["rank_hosts"] == ["127.0.0.1", "127.0.0.1"]
    assert sorted(rank_pids(run_dir)) == [0, 1]
    train = [e for e in metrics(cluster, double["output_dir"]) if e["event"] == "train"]
    assert all(len(e["rank_memory_gb"]) == 2 for e in train)
    assert all(e["memory_usage_gb"] == pytest.approx(max(e["rank_memory_gb"]), abs=1e-3) for e in train)
    assert all(e["host_memory_gb"]["127.0.0.1"] == pytest.approx(sum(e["rank_memory_gb"]), abs=1e-3) for e in train)
    single_tokens = [e["trained_tokens"] for e in metrics(cluster, single["output_dir"]) if e["event"] == "train"]
    assert [e["trained_tokens"] for e in train] == single_tokens  # every rank's tokens, counted once


def test_distributed_requests_are_checked_before_anything_starts(cluster):
    body = refused(cluster, batch_size=3, distributed=TWO)
    assert body["details"]["field"] == "batch_size" and "world size 2" in body["error"]
    body = refused(cluster, batch_size=4, distributed={"hosts": ["127.0.0.1", "mac2.local"], "backend": "ring"})
    assert body["details"]["field"] == "distributed.hosts[1]" and "mac2.local" in body["error"]
    body = refused(cluster, distributed={"hosts": ["192.0.2.10", "127.0.0.1"]})  # TEST-NET: never this machine
    assert body["details"]["field"] == "distributed.hosts[0]" and "192.0.2.10" in body["error"]
    body = refused(cluster, distributed={"hosts": ["127.0.0.1", "127.0.0.4"]})  # the real ssh: nothing listens
    assert body["details"]["host"] == "127.0.0.4" and "ssh" in body["error"] and "ssh-copy-id" in body["suggestion"]
    body = refused(cluster, distributed={"hostfile": "missing.json"})
    assert body["details"]["field"] == "distributed.hostfile"
    (cluster.home / "bad_hosts.json").write_text('[{"name": "x"}]')
    body = refused(cluster, distributed={"hostfile": "bad_hosts.json"})
    assert body["details"]["field"] == "distributed.hostfile" and "format" in body["error"]
    code, body, _ = http("POST", cluster.web + "/api/training/start", {**FAST, "distributed": {"processes": 0}})
    assert code == 400 and "processes" in json.dumps(body)
    assert not status(cluster)["is_training"]


def test_two_loopback_hosts_through_the_launchers_ssh_path(cluster):
    """127.0.0.2 and 127.0.0.3 are not 127.0.0.1, so mlx.launch starts both ranks over ssh (the
    stand-in runs the command here) and the ring connects the two addresses."""
    (cluster.home / "cluster.json").write_text(json.dumps([{"ssh": "127.0.0.2", "ips": ["127.0.0.2"]},
                                                           {"ssh": "127.0.0.3", "ips": ["127.0.0.3"]}]))
    for distributed in ({"hosts": ["127.0.0.2", "127.0.0.3"], "backend": "ring"}, {"hostfile": "cluster.json"}):
        reply = start(cluster, max_iterations=10, save_every=10, steps_per_eval=10, distributed=distributed)
        done = wait_done(cluster)
        assert done["phase"] == "completed" and done["hosts"] == ["127.0.0.2", "127.0.0.3"], done
        train = [e for e in metrics(cluster, reply["output_dir"]) if e["event"] == "train"]
        assert set(train[-1]["host_memory_gb"]) == {"127.0.0.2", "127.0.0.3"}
        ranks = {json.loads(p.read_text())["host"] for p in (cluster.home / reply["output_dir"] / "ranks").iterdir()}
        assert ranks == {"127.0.0.2", "127.0.0.3"}


async def test_kill_9_of_a_rank_on_another_host_ends_the_run_and_resumes_it(cluster):
    """The ranks of 127.0.0.2/127.0.0.3 are started over ssh: with the real ssh they are not in
    the launcher's process group, so what ends the survivor is its failed collective."""
    reply = await asyncio.to_thread(start, cluster, max_iterations=120, save_every=20, steps_per_eval=20,
                                    early_stopping_patience=0,
                                    distributed={"hosts": ["127.0.0.2", "127.0.0.3"], "backend": "ring"})
    await asyncio.to_thread(poll, lambda: status(cluster), lambda s: s["current_iteration"] >= 30, 90, "30 iterations")
    run_dir = cluster.home / reply["output_dir"]
    pids = rank_pids(run_dir)
    os.kill(pids[1], signal.SIGKILL)
    killed = time.monotonic()
    await asyncio.to_thread(poll, lambda: alive(pids[0]), lambda a: not a, 10, "rank 0 to end", 0.05)
    assert time.monotonic() - killed < 5.0
    final = await asyncio.to_thread(wait_done, cluster, 180)
    assert final["phase"] == "completed" and final["hosts"] == ["127.0.0.2", "127.0.0.3"], final
    resumes = [e for e in metrics(cluster, reply["output_dir"]) if e["event"] == "resume"]
    log = cluster.log()
    assert len(resumes) == 1 and any(f"rank 1 of 2 on 127.0.0.3 {words}" in log for words in HOW_A_DEAD_RANK_IS_NAMED)


def test_stop_ends_every_rank_at_one_iteration_with_a_final_checkpoint(cluster):
    reply = start(cluster, max_iterations=2000, save_every=500, steps_per_eval=500, distributed=TWO)
    poll(lambda: status(cluster), lambda s: s["current_iteration"] >= 15, 60, "15 iterations")
    run_dir = cluster.home / reply["output_dir"]
    pids = rank_pids(run_dir)
    code, body, _ = http("POST", cluster.web + "/api/training/stop")
    assert code == 200, body
    final = wait_done(cluster)
    assert final["phase"] == "stopped"
    events = metrics(cluster, reply["output_dir"])
    complete = [e for e in events if e["event"] == "complete"]
    assert len(complete) == 1 and complete[0]["stopped"]
    last = complete[0]["iteration"]
    assert (run_dir / f"{last:07d}_adapters.safetensors").is_file()
    assert [e["iteration"] for e in events if e["event"] == "checkpoint"][-1] == last
    assert not [pid for pid in pids.values() if alive(pid)]


@pytest.mark.parametrize("victim", [1, 0])
async def test_kill_9_of_one_rank_ends_the_others_and_resumes_the_layout(cluster, victim):
    reply = await asyncio.to_thread(start, cluster, max_iterations=120, save_every=20, steps_per_eval=20,
                                    early_stopping_patience=0, distributed=TWO)
    await asyncio.to_thread(poll, lambda: status(cluster), lambda s: s["current_iteration"] >= 30, 90, "30 iterations")
    run_dir = cluster.home / reply["output_dir"]
    pids = rank_pids(run_dir)
    client = socketio.AsyncClient(reconnection=False)
    errors: list[dict] = []
    said = asyncio.Event()

    def on_error(data: dict) -> None:
        errors.append(data)
        said.set()

    client.on("training_error", on_error)
    await client.connect(cluster.web, transports=["websocket"], wait_timeout=10)
    await client.call("subscribe_training", {"training_id": reply["training_id"]}, timeout=10)
    os.kill(pids[victim], signal.SIGKILL)
    killed = time.monotonic()
    survivor = pids[1 - victim]
    # waits longer than the 5 s it may take
    await asyncio.to_thread(poll, lambda: alive(survivor), lambda a: not a, 10, "the other rank to end", 0.05)
    assert time.monotonic() - killed < 5.0, "a rank outlived its dead peer by 5 s"
    await asyncio.wait_for(said.wait(), 10)
    await client.disconnect()
    assert errors, "no training_error"
    error = errors[0]
    named = [f"rank {victim} of 2 on 127.0.0.1 {words}" for words in HOW_A_DEAD_RANK_IS_NAMED]
    assert any(name in error["error"] for name in named), error
    final = await asyncio.to_thread(wait_done, cluster, 180)
    assert final["phase"] == "completed" and final["current_iteration"] == 120 and final["world_size"] == 2
    events = metrics(cluster, reply["output_dir"])
    assert [e["iteration"] % 20 for e in events if e["event"] == "resume"] == [0]
    assert len(rank_pids(run_dir)) == 2 and set(rank_pids(run_dir).values()).isdisjoint(pids.values())


def test_a_frozen_rank_is_found_by_the_watchdog_and_the_layout_resumed(cluster):
    reply = start(cluster, max_iterations=100, save_every=20, steps_per_eval=20, early_stopping_patience=0,
                  distributed=TWO)
    poll(lambda: status(cluster), lambda s: s["current_iteration"] >= 25, 90, "25 iterations")
    pids = rank_pids(cluster.home / reply["output_dir"])
    os.kill(pids[1], signal.SIGSTOP)  # alive, connected, silent: rank 0 waits in a collective
    try:
        failed = poll(lambda: metrics(cluster, reply["output_dir"]),
                      lambda ev: any(e["event"] == "resume" for e in ev), HANG_TIMEOUT_S + 30, "the resume")
    finally:
        if alive(pids[1]):
            os.kill(pids[1], signal.SIGCONT)
    assert not alive(pids[0]) and not alive(pids[1])
    final = wait_done(cluster, 180)
    assert final["phase"] == "completed" and final["current_iteration"] == 100, final
    assert [e["iteration"] % 20 for e in failed if e["event"] == "resume"] == [0]
    log = cluster.log()
    assert "hung" in log and f"training.hang_timeout_s = {HANG_TIMEOUT_S}" in log


def test_resume_on_another_world_size_continues_the_same_run(cluster):
    run = {"max_iterations": 40, "save_every": 20, "steps_per_eval": 20, "seed": 11}
    reply = start(cluster, **run)
    assert wait_done(cluster)["phase"] == "completed"
    run_dir = cluster.home / reply["output_dir"]
    uninterrupted = mx.load(str(run_dir / "0000040_adapters.safetensors"))
    before = curve(metrics(cluster, reply["output_dir"]), "train_loss")
    resumed = start(cluster, **run, distributed=TWO,
                    resume_from=f"{reply['output_dir']}/0000020_adapters.safetensors")
    assert resumed["training_id"] == reply["training_id"]
    done = wait_done(cluster)
    assert done["phase"] == "completed" and done["world_size"] == 2
    events = metrics(cluster, reply["output_dir"])
    cut = next(i for i, e in enumerate(events) if e["event"] == "resume")
    after = [(i, x) for i, x in curve(events[cut:], "train_loss")]
    expected = [(i, x) for i, x in before if i > 20]
    assert [i for i, _ in after] == [i for i, _ in expected]
    for (_, x), (_, y) in zip(expected, after, strict=True):
        assert y == pytest.approx(x, rel=2e-5)
    again = mx.load(str(run_dir / "0000040_adapters.safetensors"))
    for key in uninterrupted:
        assert mx.allclose(again[key], uninterrupted[key], atol=5e-5, rtol=0).item(), key
    assert json.loads((run_dir / "training_config.json").read_text())["layout"]["world_size"] == 2


def test_early_stopping_and_checkpoint_ranking_work_distributed(cluster):
    reply = start(cluster, dataset="noise", learning_rate=5e-3, max_iterations=400, save_every=10,
                  steps_per_eval=10, early_stopping_patience=2, overfitting_threshold=0.02, distributed=TWO)
    done = wait_done(cluster)
    assert done["phase"] == "early stopped", done
    complete = [e for e in metrics(cluster, reply["output_dir"]) if e["event"] == "complete"][0]
    assert complete["iteration"] < 400 and complete["best_checkpoints"]


def test_platform_sigterm_interrupts_the_ranks_and_the_next_start_resumes_the_layout():
    with tempfile.TemporaryDirectory(prefix="fl-") as name:
        home = write_training_workspace(Path(name))
        platform = Platform(home).start()
        try:
            platform.wait_healthy()
            reply = start(platform, max_iterations=120, save_every=1000, steps_per_eval=1000, distributed=TWO)
            poll(lambda: status(platform), lambda s: s["current_iteration"] >= 20, 90, "20 iterations")
            pids = rank_pids(home / reply["output_dir"])
            platform.stop(signal.SIGTERM, timeout=30)
            assert not [pid for pid in pids.values() if alive(pid)]
            assert not processes_of(home)
            events = metrics(platform, reply["output_dir"])
            assert events[-1]["event"] == "interrupted" and events[-2]["event"] == "checkpoint"
            platform = Platform(home).start()
            platform.wait_healthy()
            done = poll(lambda: status(platform), lambda s: s["phase"] == "completed", 180, "the resumed run")
            assert done["training_id"] == reply["training_id"] and done["world_size"] == 2
            assert [e["event"] for e in metrics(platform, reply["output_dir"])].count("resume") == 1
        finally:
            platform.stop()
            platform.kill_everything()
