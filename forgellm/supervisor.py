"""A Procfile supervisor (after honcho and circus): start every process, prefix its output
``HH:MM:SS name |``, restart one that dies with backoff, stop them all on SIGINT/SIGTERM.

Each child runs in its own process group (so a service's own children, such as a training
worker, are signalled with it) and, on Linux, gets SIGTERM if the supervisor itself dies.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from forgellm.services.common.process import die_with_parent

_LINE = re.compile(r"^(?P<name>[A-Za-z0-9_-]+):\s*(?P<command>.+)$")


@dataclass(frozen=True, slots=True)
class ProcEntry:
    name: str
    command: str


def parse_procfile(text: str) -> list[ProcEntry]:
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if not match:
            raise ValueError(f"Procfile line {number} is not 'name: command': {line!r}")
        entries.append(ProcEntry(match["name"], match["command"].strip()))
    names = [entry.name for entry in entries]
    if len(set(names)) != len(names):
        raise ValueError("Procfile names a process twice")
    return entries


def default_procfile() -> Path:
    return Path(__file__).resolve().parent.parent / "Procfile"


class Supervisor:
    def __init__(
        self,
        entries: list[ProcEntry],
        *,
        env: Mapping[str, str] | None = None,
        grace_s: float = 8.0,
        out: TextIO | None = None,
        max_backoff_s: float = 10.0,
        on_exit: Callable[[str, int, int, float | None], None] | None = None,
    ) -> None:
        self.entries = entries
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.grace_s = grace_s
        self.out = out or sys.stdout
        self.max_backoff_s = max_backoff_s
        self.on_exit = on_exit  # (name, pid, exit code, restart delay or None) as soon as a child dies
        self.stopping = asyncio.Event()
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.restarts: dict[str, int] = {entry.name: 0 for entry in entries}
        self._width = max([len(e.name) for e in entries] + [len("forgellm")])

    def say(self, name: str, text: str) -> None:
        self.out.write(f"{time.strftime('%H:%M:%S')} {name.ljust(self._width)} | {text}\n")
        self.out.flush()

    async def _pump(self, name: str, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.say(name, line.decode(errors="replace").rstrip("\n"))

    async def _spawn(self, entry: ProcEntry) -> asyncio.subprocess.Process:
        argv = shlex.split(os.path.expandvars(entry.command))
        if argv and argv[0] == "forgellm":
            # Run the same installation as the supervisor, whatever PATH says.
            argv = [sys.executable, "-m", "forgellm", *argv[1:]]
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
            preexec_fn=die_with_parent,
            limit=1 << 20,
        )

    async def _keep_alive(self, entry: ProcEntry) -> None:
        backoff = 0.5
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                proc = await self._spawn(entry)
            except OSError as exc:
                self.say("forgellm", f"cannot start {entry.name}: {exc}")
                proc = None
            if proc is not None:
                self.procs[entry.name] = proc
                self.say("forgellm", f"{entry.name} started (pid {proc.pid})")
                assert proc.stdout is not None
                pump = asyncio.ensure_future(self._pump(entry.name, proc.stdout))
                code = await proc.wait()
                if self.on_exit is not None:
                    self.on_exit(entry.name, proc.pid, code, None if self.stopping.is_set() else backoff)
                await pump
                if self.stopping.is_set():
                    self.say("forgellm", f"{entry.name} stopped (exit {code})")
                    return
                self.say("forgellm", f"{entry.name} exited with code {code}")
            if time.monotonic() - started > 30:
                backoff = 0.5  # it ran fine for a while: this is a fresh failure
            self.restarts[entry.name] += 1
            self.say("forgellm", f"restarting {entry.name} in {backoff:.1f} s")
            try:
                await asyncio.wait_for(self.stopping.wait(), backoff)
                return
            except TimeoutError:
                pass
            backoff = min(backoff * 2, self.max_backoff_s)

    def _signal_all(self, sig: int) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        keepers = [asyncio.ensure_future(self._keep_alive(entry)) for entry in self.entries]
        await self.stopping.wait()
        self.say("forgellm", "stopping all processes")
        self._signal_all(signal.SIGTERM)
        done, pending = await asyncio.wait(keepers, timeout=self.grace_s)
        if pending:
            late = [name for name, p in self.procs.items() if p.returncode is None]
            self.say("forgellm", f"still running after {self.grace_s:g} s, killing: {', '.join(late)}")
            self._signal_all(signal.SIGKILL)
            await asyncio.wait(pending, timeout=2)
        # Anything left in a child's process group (a worker that ignored SIGTERM) goes too.
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        return 0
