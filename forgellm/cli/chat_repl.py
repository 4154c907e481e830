"""``forgellm cli generate``: in-process generation (no platform needed) and the chat REPL.

The model is loaded in this process with ``forgellm.services.generation`` (the library the
inference service uses), so a single shot and the REPL behave exactly like the REST API.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import click

HELP = """Commands:
  /help             show this help
  /q, /exit         quit
  /stats            turns, tokens and tokens/s of this session
  /system [prompt]  show the system prompt, or set it (clears the history)
  /clear            clear the conversation history (keeps the system prompt)
Anything else is sent to the model; Ctrl-C stops a generation, Ctrl-D quits."""


@dataclass
class Session:
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    turns: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def stats(self) -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        return (f"Turns: {self.turns}  Tokens: {self.tokens}  Tokens/s: {rate:.1f}  Time: {self.seconds:.2f} s  "
                f"History: {len(self.history)} messages")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def single_shot(engine: Any, loaded: Any, prompt: str, params: Any, *, system: str | None,
                is_base_model: bool) -> None:
    history = [{"role": "system", "content": system}] if system else []
    tokens = engine.prompt_tokens(loaded, prompt, history, is_base_model=is_base_model)
    engine.generate(loaded, tokens, params, on_text=_write)
    _write("\n")


def repl(engine: Any, loaded: Any, params: Any, *, system: str | None, is_base_model: bool) -> None:
    raw = is_base_model or loaded.model_type != "instruct"
    session = Session(system=system)
    adapter = f", adapter {loaded.adapter.note}" if loaded.adapter else ""
    click.echo(f"Model: {loaded.name} ({'base: raw completion, no history' if raw else loaded.model_type}{adapter})")
    click.echo("Type /help for commands, /q to quit.")
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            click.echo("")
            break
        except KeyboardInterrupt:
            click.echo("")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, argument = text.partition(" ")
            argument = argument.strip()
            if command in ("/q", "/exit", "/quit"):
                break
            if command == "/help":
                click.echo(HELP)
            elif command == "/stats":
                click.echo(session.stats())
            elif command == "/clear":
                session.history.clear()
                click.echo("History cleared.")
            elif command == "/system":
                if argument:
                    session.system = argument
                    session.history.clear()
                    click.echo(f"System prompt set: {argument}")
                else:
                    click.echo(f"System prompt: {session.system}" if session.system else "No system prompt.")
            else:
                click.echo(f"Unknown command {command}; /help lists them.")
            continue
        history = [] if raw else session.messages()
        tokens = engine.prompt_tokens(loaded, text, history, is_base_model=raw)
        started = time.perf_counter()
        try:
            result = engine.generate(loaded, tokens, params, on_text=_write)
        except KeyboardInterrupt:
            click.echo("\n[interrupted]")
            continue
        _write("\n")
        session.turns += 1
        session.tokens += result.tokens_generated
        session.seconds += time.perf_counter() - started
        if not raw:
            session.history += [{"role": "user", "content": text}, {"role": "assistant", "content": result.text}]
