"""Run real ForgeLLM processes for tests: the whole platform (`forgellm start`) or one process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PROCESS_NAMES = ("broker", "trainer", "inference", "catalog", "publisher")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def isolated_env(home: Path, **settings: str) -> dict[str, str]:
    """The test's environment: no FORGELLM_* leaking in from outside, the workspace at ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGELLM_")}
    env.update({"FORGELLM_HOME": str(home), "FORGELLM_LOGGING_FORMAT": "json", "PYTHONUNBUFFERED": "1"})
    env.update(settings)
    return env


def poll(fetch, done, timeout: float, what: str, interval: float = 0.1) -> Any:
    """Call ``fetch()`` until ``done(value)``; returns that value or fails naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last: {value}")
        time.sleep(interval)


def processes_of(home: Path) -> list[int]:
    """Pids of every live process started for the workspace ``home`` (read from /proc)."""
    marker = f"FORGELLM_HOME={home}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                status = (entry / "status").read_text()
                if "\nState:\tZ" not in status:
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def worker_pid(home: Path) -> int | None:
    """The training worker of the platform at ``home`` (other workspaces may run workers of
    their own), or None when it has none."""
    for pid in processes_of(home):
        try:
            if b"forgellm.services.training.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:  # it exited meanwhile
            continue
    return None


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
         raw: bytes | None = None, timeout: float = 30) -> tuple[int, dict[str, Any], dict[str, str]]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


class Platform:
    """`forgellm start` in a subprocess, on free ports, with its own workspace."""

    def __init__(self, home: Path, procfile: Path | None = None, **settings: str) -> None:
        self.home = home
        self.web_port = free_port()
        self.server_port = free_port()
        self.env = isolated_env(home, **settings)
        self.procfile = procfile
        self.log_path = home / "platform.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def web(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def server(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def start(self) -> Platform:
        self.home.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "forgellm", "start",
                "--web-port", str(self.web_port), "--server-port", str(self.server_port)]
        if self.procfile:
            argv += ["--procfile", str(self.procfile)]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.home)
        return self

    def health(self) -> dict[str, Any] | None:
        try:
            return http("GET", self.web + "/api/health", timeout=5)[1]
        except (OSError, ValueError):
            return None

    def wait_until(self, predicate, timeout: float = 30.0, what: str = "condition") -> Any:
        """Poll ``predicate(health)`` until it is truthy; fails with the platform log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = self.health()
            if health and predicate(health):
                return health
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; log:\n{self.log()[-4000:]}")

    def wait_healthy(self, names: tuple[str, ...] = PROCESS_NAMES, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_until(
            lambda h: all(h["components"].get(n) not in (None, "down") for n in names),
            timeout, f"{names} running")

    def pid_of(self, name: str) -> int:
        """Pid of the process ``name`` (its latest incarnation), from the supervisor's log."""
        marker = f"{name} started (pid "
        lines = [line for line in self.log().splitlines() if marker in line]
        assert lines, f"{name} never started"
        return int(lines[-1].split(marker)[1].split(")")[0])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code

    def kill_everything(self) -> None:
        for pid in processes_of(self.home):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@contextlib.contextmanager
def running_platform(home: Path, **settings: str) -> Iterator[Platform]:
    """A started, healthy platform for the block; stopped and cleaned up after it."""
    platform = Platform(home, **settings).start()
    try:
        platform.wait_healthy()
        yield platform
    finally:
        platform.stop()
        platform.kill_everything()


def start_process(name: str, home: Path, *args: str, **settings: str) -> subprocess.Popen[bytes]:
    """One `forgellm service NAME` process, its output kept in ``home/NAME.log``."""
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / f"{name}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "forgellm", "service", name, *args],
                            env=isolated_env(home, **settings), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
