"""Soak: many HTTP pollers and Socket.IO subscribers during a real training run.

While the tiny model trains, N clients poll ``GET /api/training/status`` and N Socket.IO clients
follow the run (``subscribe_training``), spread over a few load processes
(``tests/helpers/soak_clients.py``), and one more client subscribes over a raw websocket and then
stops reading its socket. What must hold:

- no HTTP error (every poll a 200 with a status body);
- no event lost for a client that keeps up: every Socket.IO client's ``training_update`` sequence
  numbers are consecutive and its training iterations are exactly the ones the worker published on
  the bus, which are exactly the ``train`` lines of ``metrics.jsonl``;
- the stalled client is disconnected by the gateway (its TCP connection closed by the server,
  by engine.io's ping timeout) while the others' latency (Socket.IO receipt minus the moment the
  same process saw the event on the bus) stays low;
- the resident memory of every platform process is flat (end vs. a sample taken after warm-up).

The worker runs with one BLAS thread (OPENBLAS_NUM_THREADS=1): on a 2-core machine its default
threads would take both cores from the gateway and the clients under test. A client that keeps
answering pings but never reads is dropped by the gateway's backlog bound instead; that is tested
on its own below, with a flood, since the kernel absorbs ~4 MB for such a client first.

The short form (20 + 20 clients, ~20 s) runs with the suite; the full form (200 + 200 clients for
``FORGELLM_SOAK_SECONDS``, default 300) is marked ``slow`` and runs only when that variable is set:

    FORGELLM_SOAK_SECONDS=300 .venv/bin/pytest tests/test_soak.py -m slow -s

Each run writes its figures to ``$FORGELLM_ARTIFACTS/soak-<form>.json`` (default tests/artifacts/).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.procs import Platform, http, processes_of
from tests.helpers.tiny_lm import write_corpus, write_tiny_model

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("FORGELLM_ARTIFACTS", ROOT / "tests" / "artifacts"))
TCP_STATES = {"01": "ESTABLISHED", "04": "FIN_WAIT1", "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE",
              "08": "CLOSE_WAIT", "09": "LAST_ACK", "0B": "CLOSING"}
TRAINING = {"model_name": "tiny", "dataset": "grammar", "batch_size": 4, "learning_rate": 1e-3,
            "max_seq_length": 64, "warmup_steps": 5, "seed": 1, "max_iterations": 10_000_000,
            "early_stopping_patience": 0}


# --- clients that stop reading ----------------------------------------------------------------


class StalledClient:
    """A Socket.IO client over a raw websocket that subscribes and then never reads again
    (a small receive buffer, so the gateway's side backs up soon). It cannot answer pings, so
    engine.io's ping timeout is what drops it."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                           f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        assert self._frame().startswith("0{")  # engine.io open
        self.send("40")  # socket.io connect
        while not self._frame().startswith("40"):
            pass
        self.send('421["subscribe_training",{}]')
        while not self._frame().startswith("431"):  # the subscription is acknowledged
            pass
        self.stalled_at = time.monotonic()  # from here on nothing is read
        self.stalled_since = time.time()
        self.closed_after: float | None = None  # when the gateway closed its end
        self.closed_at: float | None = None

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        assert data, "connection closed during the handshake"
        return data

    def _frame(self) -> str:
        while True:
            size, at = (self.buffer[1] & 0x7F, 2) if len(self.buffer) >= 2 else (None, 0)
            if size == 126:
                size, at = (struct.unpack(">H", self.buffer[2:4])[0], 4) if len(self.buffer) >= 4 else (None, 0)
            elif size == 127:
                size, at = (struct.unpack(">Q", self.buffer[2:10])[0], 10) if len(self.buffer) >= 10 else (None, 0)
            if size is not None and len(self.buffer) >= at + size:
                payload, self.buffer = self.buffer[at:at + size], self.buffer[at + size:]
                return payload.decode()
            self.buffer += self._recv()

    def send(self, text: str) -> None:
        data, mask = text.encode(), os.urandom(4)
        assert len(data) < 126
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        self.sock.sendall(bytes([0x81, 0x80 | len(data)]) + mask + masked)

    def server_side(self) -> str:
        """The state of the gateway's end of this connection, from /proc/net/tcp: it says
        FIN_WAIT1 (or is gone) once the gateway closed it, even while our end, whose receive
        window is full, never sees the FIN arrive and stays ESTABLISHED."""
        local = f"0100007F:{self.sock.getpeername()[1]:04X}"
        remote = f"0100007F:{self.sock.getsockname()[1]:04X}"
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[2] == remote:
                return TCP_STATES.get(fields[3], fields[3])
        return "gone"

    def tick(self) -> None:
        """Called every 0.2 s: note when the gateway closed the connection."""
        if self.closed_after is None and self.server_side() != "ESTABLISHED":
            self.closed_after = round(time.monotonic() - self.stalled_at, 1)
            self.closed_at = time.time()

    def close(self) -> None:
        self.sock.close()


class PongingStalledClient(StalledClient):
    """Never reads either, but sends an engine.io pong every half second, so the ping timeout
    never fires: only the gateway's backlog bound (gateway/backpressure.py) can drop it."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self._last_pong = 0.0

    def tick(self) -> None:
        super().tick()
        if self.closed_after is None and time.monotonic() - self._last_pong >= 0.5:
            self._last_pong = time.monotonic()
            try:
                self.send("3")
            except OSError:
                pass


# --- resident memory ----------------------------------------------------------------------------


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def process_name(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    text = [a.decode(errors="replace") for a in argv if a]
    if "forgellm.services.training.worker" in text:
        return "worker"
    if "service" in text:
        return text[text.index("service") + 1]
    if "start" in text:
        return "supervisor"
    if "tests.helpers.soak_clients" in text:
        return f"load-{pid}"
    return " ".join(text)[:40]


def platform_memory(home: Path, exclude: set[int]) -> dict[str, float]:
    out = {}
    for pid in processes_of(home):
        if pid in exclude:
            continue
        mb = rss_mb(pid)
        if mb is not None:
            out[process_name(pid)] = round(mb, 1)
    return out


# --- the soak -----------------------------------------------------------------------------------


def soak(form: str, *, http_clients: int, sio_clients: int, seconds: float, processes: int, poll_s: float,
         steps_per_report: int, ping: tuple[float, float], max_backlog: int, warmup_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fl-") as name:
        home = Path(name)
        write_tiny_model(home / "models" / "base" / "tiny")
        write_corpus(home / "dataset" / "grammar")
        # one BLAS thread: on a small machine the worker would otherwise take every core
        platform = Platform(home, OPENBLAS_NUM_THREADS="1",
                            FORGELLM_GATEWAY_SOCKETIO_PING_INTERVAL_S=str(ping[0]),
                            FORGELLM_GATEWAY_SOCKETIO_PING_TIMEOUT_S=str(ping[1]),
                            FORGELLM_GATEWAY_SOCKETIO_MAX_BACKLOG=str(max_backlog))
        loads: list[subprocess.Popen[str]] = []
        stalled: list[StalledClient] = []
        try:
            platform.start().wait_healthy(timeout=60)
            reports = [home / f"load{i}.json" for i in range(processes)]
            for i, report in enumerate(reports):
                http_share, sio_share = (n // processes + (1 if i < n % processes else 0)
                                         for n in (http_clients, sio_clients))
                loads.append(subprocess.Popen(
                    [sys.executable, "-m", "tests.helpers.soak_clients", platform.web, "--http",
                     str(http_share), "--sio", str(sio_share), "--poll-s", str(poll_s),
                     "--deadline-s", str(seconds + 240), "--out", str(report)],
                    cwd=ROOT, env=platform.env, stdout=subprocess.PIPE, text=True))
            for load in loads:
                assert load.stdout is not None and load.stdout.readline().strip() == "ready", "a load process failed"
            load_pids = {load.pid for load in loads}
            stalled = [StalledClient(platform.web_port)]
            stop_watching = threading.Event()

            def watch_stalled() -> None:
                while not stop_watching.is_set():
                    for client in stalled:
                        client.tick()
                    time.sleep(0.2)

            watcher = threading.Thread(target=watch_stalled, daemon=True)
            watcher.start()

            code, reply, _ = http("POST", platform.web + "/api/training/start", {
                **TRAINING, "steps_per_report": steps_per_report, "steps_per_eval": steps_per_report * 20,
                "save_every": steps_per_report * 100})
            assert code == 200, (code, reply, platform.log()[-3000:])
            started = time.monotonic()
            load_before = os.getloadavg()
            cpu_before = {process_name(pid): cpu_seconds(pid) for pid in processes_of(home)}
            memory: list[tuple[float, dict[str, float]]] = []
            while (elapsed := time.monotonic() - started) < seconds:
                memory.append((round(elapsed, 1), platform_memory(home, load_pids)))
                time.sleep(min(5.0, max(0.1, seconds - elapsed)))
            memory.append((round(time.monotonic() - started, 1), platform_memory(home, load_pids)))
            cpu = {name: round(100 * (seconds_now - (cpu_before.get(name) or 0)) / (time.monotonic() - started))
                   for pid in processes_of(home)
                   if (name := process_name(pid)) and (seconds_now := cpu_seconds(pid)) is not None}
            status = http("GET", platform.web + "/api/training/status")[1]
            code, body, _ = http("POST", platform.web + "/api/training/stop")
            assert code == 200, (code, body, platform.log()[-3000:])
            for load in loads:
                assert load.wait(300) == 0, f"load process exited with {load.returncode}"
            stop_watching.set()
            watcher.join()
            results = [json.loads(report.read_text()) for report in reports]
            run_dir = home / reply["output_dir"]
            logged = [json.loads(line)["iteration"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                      if json.loads(line)["event"] == "train"]
        finally:
            for client in stalled:
                client.close()
            for load in loads:
                if load.poll() is None:
                    load.kill()
            platform.stop()
            platform.kill_everything()
        result = summarize(form, results, logged, memory, stalled, status,
                         dict(http_clients=http_clients, sio_clients=sio_clients, seconds=seconds,
                              processes=processes, poll_s=poll_s, steps_per_report=steps_per_report,
                              ping_interval_s=ping[0], ping_timeout_s=ping[1], max_backlog=max_backlog), warmup_s)
        result["cpu_percent_of_one_core"] = cpu  # over the soak, per process (load-* are the clients)
        result["machine"] = {"cores": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in load_before],
                             "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
        return result


def window_latency(results, start: float, end: float) -> dict[str, float | int]:
    """Latency of the events that left the bus in [start, end) (whole seconds), over every client."""
    rows = [row for r in results for sec, row in r["sio_latency_by_second"].items() if start <= int(sec) + 1
            and int(sec) < end]
    return {"events": sum(n for n, _, _ in rows), "worst_second_p99": max((p99 for _, p99, _ in rows), default=0),
            "max": max((m for _, _, m in rows), default=0)}


def summarize(form, results, logged, memory, stalled, status, setup, warmup_s) -> dict[str, Any]:
    sio = [client for r in results for client in r["sio"]]
    bus = results[0]["bus"]
    baseline = next(sample for t, sample in memory if t >= warmup_s)
    end = memory[-1][1]
    latencies = [r["sio_latency_s"] for r in results]
    return {
        "form": form, "setup": setup, "final_iteration": status.get("current_iteration"),
        "events_published": bus["updates"], "training_updates": len(bus["iterations"]),
        "metrics_train_lines": len(logged), "bus_matches_metrics": bus["iterations"] == logged,
        "bus_same_in_every_load_process": all(r["bus"]["iterations_digest"] == bus["iterations_digest"]
                                              for r in results),
        "sio_clients": len(sio),
        "sio_events_received": sum(c["updates"] for c in sio),
        "sio_lost": sum(c["seq_gaps"] for c in sio),
        "sio_out_of_order": sum(c["out_of_order"] for c in sio),
        "sio_clients_with_every_iteration": sum(c["iterations_digest"] == bus["iterations_digest"] for c in sio),
        "sio_clients_completed": sum(c["complete"] for c in sio),
        "sio_disconnects": sum(c["disconnects"] for c in sio),
        "sio_errors": [e for c in sio for e in c["errors"]],
        "sio_first_seq": sorted({c["first_seq"] for c in sio}, key=str), "bus_first_seq": bus["first_seq"],
        "sio_latency_s": {k: max(lat[k] or 0 for lat in latencies) for k in ("p50", "p95", "p99", "max")},
        "http_requests": sum(r["http"]["requests"] for r in results),
        "http_statuses": {k: sum(r["http"]["statuses"].get(k, 0) for r in results)
                          for k in {k for r in results for k in r["http"]["statuses"]}},
        "http_errors": {k: v for r in results for k, v in r["http"]["errors"].items()},
        "http_latency_s": {k: max(r["http"]["latency_s"][k] or 0 for r in results) for k in ("p50", "p99", "max")},
        "stalled_client_closed_by_server_after_s": stalled[0].closed_after,
        "sio_latency_while_stalled_client_connected": window_latency(
            results, stalled[0].stalled_since, stalled[0].closed_at or float("inf")),
        "sio_latency_after_it_was_dropped": window_latency(results, stalled[0].closed_at or float("inf"),
                                                           float("inf")),
        "rss_mb_after_warmup": baseline, "rss_mb_end": end,
        "rss_growth_mb": {name: round(end.get(name, 0) - mb, 1) for name, mb in baseline.items()},
        "rss_samples": memory,
    }


def check(result: dict[str, Any], *, max_latency_s: float, stalled_within_s: float) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"soak-{result['form']}.json").write_text(json.dumps(result, indent=1))
    shown = {k: v for k, v in result.items() if k != "rss_samples"}
    print(json.dumps(shown, indent=1))
    assert result["http_errors"] == {} and set(result["http_statuses"]) == {"200"}, result["http_errors"]
    assert result["http_requests"] > 0
    assert result["bus_matches_metrics"] and result["bus_same_in_every_load_process"]
    assert result["training_updates"] >= 10
    assert result["sio_errors"] == [] and result["sio_disconnects"] == 0
    assert result["sio_lost"] == 0 and result["sio_out_of_order"] == 0
    assert result["sio_clients_with_every_iteration"] == result["sio_clients"]  # nothing lost, nothing extra
    assert result["sio_clients_completed"] == result["sio_clients"]
    assert result["sio_first_seq"] == [result["bus_first_seq"]]
    assert result["sio_latency_s"]["p99"] < max_latency_s, result["sio_latency_s"]
    during = result["sio_latency_while_stalled_client_connected"]
    assert during["events"] > 0 and during["worst_second_p99"] < max_latency_s, during
    closed = result["stalled_client_closed_by_server_after_s"]
    assert closed is not None and closed < stalled_within_s, closed
    for name, mb in result["rss_mb_after_warmup"].items():
        assert name in result["rss_mb_end"], f"{name} is gone"
        growth = result["rss_mb_end"][name] - mb
        assert growth < max(15.0, 0.10 * mb), f"{name}: {mb} MB -> {result['rss_mb_end'][name]} MB"


def test_soak_short():
    """CI form: 20 HTTP pollers (every 0.5 s) + 20 Socket.IO subscribers for 20 s, an update every
    5 iterations (~14/s here); the stalled client is dropped by a 1 s ping / 2 s timeout."""
    result = soak("short", http_clients=20, sio_clients=20, seconds=20, processes=1, poll_s=0.5,
                  steps_per_report=5, ping=(1.0, 2.0), max_backlog=1000, warmup_s=5)
    check(result, max_latency_s=1.0, stalled_within_s=18)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not os.environ.get("FORGELLM_SOAK_SECONDS"), reason="FORGELLM_SOAK_SECONDS=300 runs it")
def test_soak_full():
    """200 HTTP pollers (every 1 s) + 200 Socket.IO subscribers for FORGELLM_SOAK_SECONDS, an
    update every 20 iterations (~3-4/s here), with the gateway's default ping (25 s + 20 s)."""
    seconds = float(os.environ.get("FORGELLM_SOAK_SECONDS") or 300)
    result = soak("full", http_clients=200, sio_clients=200, seconds=seconds, processes=2, poll_s=1.0,
                  steps_per_report=20, ping=(25.0, 20.0), max_backlog=1000, warmup_s=min(30.0, seconds / 5))
    check(result, max_latency_s=2.0, stalled_within_s=90)


async def test_a_client_that_pongs_but_never_reads_is_dropped_at_the_backlog_bound():
    """Ping timeouts cannot drop a client that keeps sending pongs while never reading: the
    kernel absorbs ~4 MB for it, then its engine.io queue grows. The gateway's BacklogGuard drops
    it at ``socketio_max_backlog`` queued packets, while a client that reads gets every event.
    (Flooded here with 2 KB events so the kernel buffers fill in seconds, not hours.)"""
    import asyncio

    import socketio
    from aiohttp import web

    from forgellm.gateway.backpressure import BacklogGuard

    sio = socketio.AsyncServer(async_mode="aiohttp", ping_interval=1, ping_timeout=2, logger=False,
                               engineio_logger=False)
    app = web.Application()
    sio.attach(app)

    async def subscribe(sid: str, data: Any = None) -> dict[str, Any]:
        await sio.enter_room(sid, "run")
        return {"success": True}

    sio.on("subscribe_training", subscribe)
    guard = BacklogGuard(sio, max_backlog=200, interval_s=0.2)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    guard.start()
    reader = socketio.AsyncClient(reconnection=False)
    got: list[int] = []
    reader.on("training_update", lambda data: got.append(data["seq"]))
    stop = threading.Event()
    try:
        stalled = await asyncio.to_thread(PongingStalledClient, port)

        def keep_ponging() -> None:
            while not stop.is_set():
                stalled.tick()
                time.sleep(0.2)

        threading.Thread(target=keep_ponging, daemon=True).start()
        await reader.connect(f"http://127.0.0.1:{port}", transports=["websocket"], wait_timeout=10)
        await reader.call("subscribe_training", {}, timeout=10)
        blob, sent, deadline = "x" * 2000, 0, time.monotonic() + 90
        while stalled.closed_after is None and time.monotonic() < deadline:
            for _ in range(50):
                sent += 1
                await sio.emit("training_update", {"seq": sent, "blob": blob}, to="run")
            await asyncio.sleep(0.01)  # about 5000 events (10 MB) a second at most
        assert stalled.closed_after is not None, "the client that never reads was not dropped"
        assert guard.dropped == 1
        while len(got) < sent and time.monotonic() < deadline:  # noqa: ASYNC110 (polled: the reader's own pace)
            await asyncio.sleep(0.05)
        assert got == list(range(1, sent + 1))  # the reader lost nothing
        assert reader.connected and len(list(sio.manager.get_participants("/", "run"))) == 1
    finally:
        stop.set()
        await reader.disconnect()
        guard.close()
        await runner.cleanup()
