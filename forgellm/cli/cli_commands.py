"""``forgellm cli …``: talk to models directly: ``info`` (facts from the files), ``generate`` (in-process)."""

from __future__ import annotations

from pathlib import Path

import click

from forgellm.config import load_settings
from forgellm.services.common.errors import ForgeError
from forgellm.services.common.models import human_count, model_facts, resolve_model
from forgellm.services.common.runs import adapter_facts
from forgellm.services.common.workspace import Workspace


@click.group("cli")
def cli_group() -> None:
    """Use a model from the command line."""


def _architecture(path: Path, fallback: str | None) -> str:
    from forgellm.services.common.models import read_json

    architectures = read_json(path / "config.json").get("architectures") or []
    if architectures:
        return architectures[0].removesuffix("ForCausalLM").removesuffix("LMHeadModel")
    return fallback or "unknown"


def _fail(exc: ForgeError) -> click.ClickException:
    hint = f"\n  {exc.suggestion}" if exc.suggestion else ""
    return click.ClickException(f"{exc}: {exc.details.get('model_name') or exc.details.get('adapter_path', '')}{hint}")


@cli_group.command()
@click.option("--model", required=True, help="Hub id, models/base folder, published/<name> or a path.")
@click.option("--adapter-path", default=None, help="A run folder or one checkpoint file.")
def info(model: str, adapter_path: str | None) -> None:
    """Show what a model (and adapter) really is, read from its files."""
    workspace = Workspace(load_settings().home)
    try:
        ref = resolve_model(model, workspace)
    except ForgeError as exc:
        raise _fail(exc) from None
    facts = model_facts(ref.path)
    context = f"{facts.context_length:,} tokens" if facts.context_length else "unknown"
    click.echo("Model Information:")
    click.echo(f"  Name: {model}")
    click.echo(f"  Type: {'Instruct' if facts.type == 'instruct' else 'Base'} Model")
    click.echo(f"  Architecture: {_architecture(ref.path, facts.architecture)}")
    click.echo(f"  Parameters: {human_count(facts.parameters)} ({facts.parameters:,})")
    click.echo(f"  Quantization: {facts.quantization}")
    click.echo(f"  Context Length: {context}")
    click.echo(f"  Location: {ref.path}")
    if adapter_path:
        try:
            adapter = adapter_facts(workspace.resolve(adapter_path, field="adapter_path", allow_absolute=True))
        except ForgeError as exc:
            raise _fail(exc) from None
        targets = ", ".join(key.rsplit(".", 1)[-1] for key in adapter.targets) or "mlx-lm defaults"
        click.echo("")
        click.echo("Adapter Information:")
        click.echo(f"  Path: {adapter_path}")
        click.echo(f"  Type: {adapter.type} Adapter")
        click.echo(f"  Rank: {adapter.rank if adapter.rank is not None else 'n/a'}")
        click.echo(f"  Alpha: {adapter.alpha:g}" if adapter.alpha is not None else "  Alpha: n/a")
        if adapter.scale is not None:
            click.echo(f"  Scale: {adapter.scale:g}")
        if adapter.layers is not None:
            click.echo(f"  Layers: {adapter.layers}")
        click.echo(f"  Target Modules: {targets}")


@cli_group.command()
@click.option("--model", required=True, help="Hub id, models/base folder, published/<name> or a path.")
@click.option("--adapter-path", default=None, help="A run folder (its best checkpoint) or one checkpoint file.")
@click.option("--prompt", default=None, help="Answer this and exit; without it, an interactive chat.")
@click.option("--max-tokens", type=click.IntRange(1, 32768), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(0.0, 10.0), default=0.7, show_default=True)
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.9, show_default=True)
@click.option("--repetition-penalty", type=click.FloatRange(0.0, 10.0, min_open=True), default=1.0,
              show_default=True)
@click.option("--seed", type=int, default=None, help="Seed the sampler (reproducible output).")
@click.option("--system", "system_prompt", default=None, help="System prompt.")
@click.option("--base-model", is_flag=True, help="Raw completion: no chat template.")
def generate(model: str, adapter_path: str | None, prompt: str | None, max_tokens: int, temperature: float,
             top_p: float, repetition_penalty: float, seed: int | None, system_prompt: str | None,
             base_model: bool) -> None:
    """Generate text with a model loaded in this process (no platform needed).

    With --prompt: print the answer and exit. Without: a chat REPL that streams tokens and keeps
    the conversation (/help, /q, /exit, /stats, /system [prompt], /clear).
    """
    from forgellm.logs import configure_logging

    settings = load_settings()
    configure_logging("cli", "warning", settings.logging.format)
    workspace = Workspace(settings.home)
    try:
        ref = resolve_model(model, workspace)
        adapter = None
        if adapter_path:
            from forgellm.services.generation.adapters import resolve_adapter

            adapter = resolve_adapter(workspace, adapter_path)
    except ForgeError as exc:
        raise _fail(exc) from None
    from forgellm.cli import chat_repl
    from forgellm.services.generation import engine  # imports MLX (after OpenBLAS)

    if prompt is None:
        click.echo(f"Loading {model}…", err=True)
    try:
        loaded = engine.load(ref.path, name=model, adapter=adapter)
        params = engine.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                       repetition_penalty=repetition_penalty, seed=seed)
        if prompt is not None:
            chat_repl.single_shot(engine, loaded, prompt, params, system=system_prompt, is_base_model=base_model)
        else:
            chat_repl.repl(engine, loaded, params, system=system_prompt, is_base_model=base_model)
    except ForgeError as exc:
        hint = f"\n  {exc.suggestion}" if exc.suggestion else ""
        raise click.ClickException(f"{exc}{hint}") from None
