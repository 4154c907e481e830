"""``forgellm cli generate`` (single shot and the REPL on a real terminal) and
``forgellm server --model`` preloading, with the tiny MLX model."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pexpect
import pytest

from forgellm.services.generation import engine
from tests.helpers.procs import Platform, free_port, http, isolated_env
from tests.helpers.tiny_model import build_tiny_model, write_lora_run


@pytest.fixture(scope="module")
def home():
    with tempfile.TemporaryDirectory(prefix="fl-") as name:
        root = Path(name)
        tiny = build_tiny_model(root / "models" / "base" / "tiny")
        write_lora_run(root / "models" / "ift" / "run1", tiny, {10: 2.0, 20: 1.5})
        yield root


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "forgellm", "cli", "generate", *args], env=isolated_env(home),
                          cwd=home, capture_output=True, timeout=120)


def expected(home: Path, prompt: str, max_tokens: int, adapter: str | None = None) -> str:
    from forgellm.services.common.workspace import Workspace
    from forgellm.services.generation.adapters import resolve_adapter

    choice = resolve_adapter(Workspace(home), adapter) if adapter else None
    loaded = engine.load(home / "models" / "base" / "tiny", name="tiny", adapter=choice)
    tokens = engine.prompt_tokens(loaded, prompt)
    return engine.generate(loaded, tokens, engine.SamplingParams(max_tokens=max_tokens, temperature=0.0)).text


def test_single_shot_prints_the_answer(home):
    done = cli(home, "--model", "tiny", "--prompt", "Tell me a story", "--max-tokens", "20", "--temperature", "0")
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode() == expected(home, "Tell me a story", 20) + "\n"
    adapted = cli(home, "--model", "tiny", "--adapter-path", "models/ift/run1", "--prompt", "Tell me a story",
                  "--max-tokens", "20", "--temperature", "0")
    assert adapted.returncode == 0, adapted.stderr.decode()
    assert adapted.stdout.decode() == expected(home, "Tell me a story", 20, "models/ift/run1") + "\n"
    assert adapted.stdout != done.stdout


def test_single_shot_errors_are_clear(home):
    done = cli(home, "--model", "nope", "--prompt", "hi")
    assert done.returncode == 1 and b"Model not found" in done.stderr
    done = cli(home, "--model", "tiny", "--prompt", "hi", "--temperature", "-1")
    assert done.returncode == 2 and b"--temperature" in done.stderr


def test_repl_commands_on_a_real_terminal(home):
    child = pexpect.spawn(sys.executable, ["-m", "forgellm", "cli", "generate", "--model", "tiny",
                                           "--max-tokens", "8", "--temperature", "0"],
                          env=isolated_env(home), cwd=str(home), encoding="utf-8", timeout=60)
    try:
        child.expect("Type /help")
        child.expect(">>> ")
        child.sendline("/help")
        for command in ("/q, /exit", "/stats", "/system", "/clear"):
            child.expect_exact(command)
        child.expect(">>> ")
        child.sendline("/stats")
        child.expect(r"Turns: 0  Tokens: 0 .*History: 0 messages")
        child.sendline("Hello there")
        child.expect(">>> ")
        child.sendline("How are you?")
        child.expect(">>> ")
        child.sendline("/stats")
        child.expect(r"Turns: 2  Tokens: (\d+)  Tokens/s: ([\d.]+) .*History: 4 messages")
        tokens, rate = int(child.match.group(1)), float(child.match.group(2))
        assert 2 <= tokens <= 16 and rate > 0
        child.sendline("/system")
        child.expect("No system prompt.")
        child.sendline("/system You answer in one word.")
        child.expect("System prompt set: You answer in one word.")
        child.sendline("/system")
        child.expect("System prompt: You answer in one word.")
        child.sendline("Hi")
        child.expect(">>> ")
        child.sendline("/clear")
        child.expect("History cleared.")
        child.sendline("/stats")
        child.expect(r"Turns: 3 .*History: 0 messages")
        child.sendline("/nonsense")
        child.expect("Unknown command /nonsense")
        child.sendline("/q")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0

    child = pexpect.spawn(sys.executable, ["-m", "forgellm", "cli", "generate", "--model", "tiny"],
                          env=isolated_env(home), cwd=str(home), encoding="utf-8", timeout=60)
    child.expect(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_server_with_model_preloads_it(home):
    platform = Platform(home).start()
    server = None
    try:
        platform.wait_healthy()
        port = free_port()
        log = open(home / "server.log", "wb")
        server = subprocess.Popen([sys.executable, "-m", "forgellm", "server", "--port", str(port),
                                   "--model", "tiny", "--adapter", "models/ift/run1"],
                                  env=isolated_env(home), stdout=log, stderr=subprocess.STDOUT, cwd=home)
        deadline = time.monotonic() + 60
        body: dict = {}
        while time.monotonic() < deadline:
            try:
                code, body, _ = http("GET", f"http://127.0.0.1:{port}/api/model/status", timeout=5)
            except OSError:
                code = 0
            if code == 200 and body["loaded"]:
                break
            time.sleep(0.2)
        assert body.get("loaded") and body["model_name"] == "tiny", (home / "server.log").read_text()
        assert body["adapter_file"].endswith("0000020_adapters.safetensors")
        assert re.search(r"preload_started", (home / "server.log").read_text())
    finally:
        if server is not None:
            server.terminate()
            server.wait(15)
        platform.stop()
        platform.kill_everything()
