"""``forgellm cli …``: talk to models directly (``info`` now; ``generate`` with inference)."""

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
