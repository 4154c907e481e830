"""Gateway benchmark: the whole platform under HTTP load, beside a bare aiohttp server.

    .venv/bin/python bench/gateway.py                # 10 s per endpoint, 64 connections
    .venv/bin/python bench/gateway.py --quick        # 3 s per endpoint
    .venv/bin/python bench/gateway.py --profile      # also py-spy the gateway during each run

It starts ``forgellm start --web-port P --server-port Q`` (FORGELLM_HOME = a temp folder),
waits until ``GET /api/health`` reports every component up, then loads with ``wrk``:

    bare     a bare aiohttp server (its own process) answering a constant JSON body: the
             ceiling of this load generator on this machine
    ours     GET /api/health            (gateway only: heartbeat table + system_info)
             GET /api/training/status   (gateway -> AsyncRpcClient -> trainer -> back)

Load generator: ``wrk`` (C, epoll, HTTP/1.1 keep-alive), one thread, 64 connections. On a
2-core machine a Python load generator would take a whole core away from the server it
measures; wrk needs a fraction of one. Falls back to an aiohttp client in its own process
when wrk is missing (``--client aiohttp`` forces it).

At the end the supervisor gets SIGINT and the benchmark checks that no process of the
platform (one with our FORGELLM_HOME in its environment) is left.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers.procs import processes_of  # noqa: E402  (the same check the tests use)

HERE = Path(__file__).resolve()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def get_json(url: str, timeout: float = 5.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")




# --------------------------------------------------------------------------------------------
# the bare baseline server


def role_bare_server(port: str) -> None:
    from aiohttp import web

    body = json.dumps({"success": True, "status": "healthy", "components": {"gateway": "running"}}).encode()

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/api/health", handler)
    web.run_app(app, host="127.0.0.1", port=int(port), access_log=None, print=None)


# --------------------------------------------------------------------------------------------
# load generators


def parse_wrk(text: str) -> dict:
    def latency_ms(value: str) -> float:
        m = re.match(r"([\d.]+)(us|ms|s)", value)
        number, unit = float(m.group(1)), m.group(2)
        return number / 1000 if unit == "us" else number * 1000 if unit == "s" else number

    out: dict = {"raw": text}
    out["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    out["requests"] = int(m.group(1))
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", text, re.M)
        out[f"p{pct}_ms"] = latency_ms(m.group(1)) if m else float("nan")
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    return out


def run_wrk(url: str, connections: int, duration: float, threads: int) -> dict:
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency", url]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result = parse_wrk(text)
    result["cmd"] = " ".join(cmd)
    return result


def role_aiohttp_client(url: str, connections: str, duration: str) -> None:
    """Fallback load generator: ``connections`` keep-alive workers in one asyncio process."""
    import aiohttp

    async def main() -> dict:
        samples: list[int] = []
        errors = 0
        end = time.monotonic() + float(duration)
        conn = aiohttp.TCPConnector(limit=int(connections))
        async with aiohttp.ClientSession(connector=conn) as session:
            async def worker() -> None:
                nonlocal errors
                while time.monotonic() < end:
                    t0 = time.perf_counter_ns()
                    async with session.get(url) as response:
                        await response.read()
                        if response.status != 200:
                            errors += 1
                    samples.append(time.perf_counter_ns() - t0)

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(int(connections))))
            elapsed = time.perf_counter() - t0
        samples.sort()
        n = len(samples)
        return {"rps": n / elapsed, "requests": n, "non2xx": errors, "socket_errors": 0,
                **{f"p{p}_ms": samples[min(n - 1, int(p / 100 * n))] / 1e6 for p in (50, 90, 99)}}

    print(json.dumps(asyncio.run(main())), flush=True)


def run_load(args: argparse.Namespace, url: str) -> dict:
    if args.client == "wrk":
        return run_wrk(url, args.connections, args.duration, args.threads)
    out = subprocess.run([sys.executable, str(HERE), "--role", "aiohttp-client", url, str(args.connections),
                          str(args.duration)], capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["cmd"] = f"aiohttp client, {args.connections} connections, {args.duration:g} s"
    return result


def profile_while(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    spy = Path(sys.prefix) / "bin" / "py-spy"
    if not spy.exists():
        return None
    return subprocess.Popen([str(spy), "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "97",
                             "-f", "raw", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize_profile(path: Path, top: int = 12) -> list[str]:
    from collections import Counter

    inclusive: Counter = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        if stack.endswith("(concurrent/futures/thread.py:81)"):
            continue  # an idle pool thread waiting for work
        total += n
        for frame in set(stack.split(";")):
            inclusive[frame] += n
    # frames on (almost) every stack are the entry points: skip them
    lines = [f"{c / total * 100:5.1f}%  {f}" for f, c in inclusive.most_common(80)
             if c < 0.95 * total and "site-packages/click" not in f][:top]
    return [f"py-spy of the gateway, {total} samples, inclusive:"] + lines


# --------------------------------------------------------------------------------------------


def start_platform(home: Path, web_port: int, server_port: int, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGELLM_")}
    env.update({"FORGELLM_HOME": str(home), "FORGELLM_LOGGING_FORMAT": "json", "PYTHONUNBUFFERED": "1"})
    return subprocess.Popen(
        [sys.executable, "-m", "forgellm", "start", "--web-port", str(web_port), "--server-port", str(server_port)],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    last: dict = {}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"forgellm start exited with {proc.returncode}")
        try:
            status, last = get_json(f"{base}/api/health", timeout=2)
            components = last.get("components", {})
            if status == 200 and components and all(state != "down" for state in components.values()):
                return last
        except (OSError, ValueError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"platform not healthy after {timeout:g} s: {last}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("role_args", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="3 s per run")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--client", choices=("wrk", "aiohttp"), default="wrk" if shutil.which("wrk") else "aiohttp")
    parser.add_argument("--profile", action="store_true", help="py-spy the gateway during each of our runs")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()
    if args.role == "bare-server":
        role_bare_server(*args.role_args)
        return
    if args.role == "aiohttp-client":
        role_aiohttp_client(*args.role_args)
        return
    if args.quick:
        args.duration = 3.0

    print(f"# bench/gateway.py  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  {platform.platform()}  "
          f"cpus={os.cpu_count()}  python {platform.python_version()}  client={args.client}  "
          f"connections={args.connections}  duration={args.duration:g}s")
    home = Path(tempfile.mkdtemp(prefix="fbench-gw-"))
    log = home / "platform.log"
    web_port, server_port, bare_port = free_port(), free_port(), free_port()
    base = f"http://127.0.0.1:{web_port}"
    results: dict = {}
    profiles: dict[str, list[str]] = {}
    say(f"[gateway] forgellm start --web-port {web_port} --server-port {server_port} (home {home})")
    t0 = time.monotonic()
    proc = start_platform(home, web_port, server_port, log)
    bare = None
    leftover: list[int] = []
    try:
        health = wait_healthy(base, proc)
        say(f"[gateway] healthy after {time.monotonic() - t0:.1f} s: {health['components']}")
        status, reply = get_json(f"{base}/api/training/status")
        assert status == 200, (status, reply)
        gateway_pid = next((pid for pid in processes_of(home)
                            if b"gateway" in Path(f"/proc/{pid}/cmdline").read_bytes()), None)

        bare = subprocess.Popen([sys.executable, str(HERE), "--role", "bare-server", str(bare_port)])
        for _ in range(100):
            try:
                get_json(f"http://127.0.0.1:{bare_port}/api/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        cases = [
            ("bare aiohttp, constant JSON", f"http://127.0.0.1:{bare_port}/api/health", None),
            ("ours GET /api/health", f"{base}/api/health", "health"),
            ("ours GET /api/training/status", f"{base}/api/training/status", "status"),
        ]
        for label, url, key in cases:
            say(f"[gateway] {label}: {args.duration:g} s, {args.connections} connections ...")
            spy = None
            if args.profile and key and gateway_pid:
                spy = profile_while(gateway_pid, args.duration - 1, home / f"{key}.spy")
            results[label] = run_load(args, url)
            if spy is not None:
                spy.wait()
                profiles[label] = summarize_profile(home / f"{key}.spy")
        stop_bare = bare
        bare = None
        stop_bare.send_signal(signal.SIGINT)
        stop_bare.wait(10)
    finally:
        if bare is not None:
            bare.kill()
        say("[gateway] stopping the platform (SIGINT to the supervisor) ...")
        t_stop = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        stop_s = time.monotonic() - t_stop
        time.sleep(0.5)
        leftover = processes_of(home)
        for pid in leftover:
            os.kill(pid, signal.SIGKILL)

    ceiling = results["bare aiohttp, constant JSON"]["rps"]
    targets = {"ours GET /api/health": 2000, "ours GET /api/training/status": 1000}
    print(f"\nload: {results['ours GET /api/health'].get('cmd', args.client)}")
    print(f"{'endpoint':<32} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'non-2xx':>8} "
          f"{'errors':>7} {'vs bare':>8} {'target':>18}")
    for label, r in results.items():
        target = targets.get(label)
        verdict = ""
        if target:
            ok = r["rps"] >= target and r["p99_ms"] <= 20 and not r["non2xx"] and not r["socket_errors"]
            verdict = f">={target}/s,p99<=20 {'MET' if ok else 'MISSED'}"
        print(f"{label:<32} {r['rps']:>9.0f} {r['p50_ms']:>8.2f} {r['p90_ms']:>8.2f} {r['p99_ms']:>8.2f} "
              f"{r['non2xx']:>8} {r['socket_errors']:>7} {r['rps'] / ceiling:>8.2f} {verdict:>18}")
    print(f"\nplatform stop: supervisor exit {code} after {stop_s:.1f} s; processes left: {len(leftover)}"
          + (f" (killed {leftover})" if leftover else ""))
    for label, lines in profiles.items():
        print(f"\n{label}: " + "\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "raw"}
                                         for k, v in results.items()}, indent=1))
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
