"""``forgellm publish`` and ``forgellm dashboard``."""

from __future__ import annotations

from pathlib import Path

import click

from forgellm.client import ForgeLLMClient, ForgeLLMError, ServiceUnavailableError
from forgellm.config import load_settings
from forgellm.services.common.errors import ForgeError
from forgellm.services.common.runs import rank_checkpoints, resolve_run
from forgellm.services.common.workspace import Workspace
from forgellm.services.training.checkpoints import adapter_file


def _fail(exc: ForgeError) -> click.ClickException:
    return click.ClickException(str(exc) + (f"\n  {exc.suggestion}" if exc.suggestion else ""))


@click.command()
@click.argument("run_dir")
@click.option("--checkpoint", default="best", show_default=True,
              help="An iteration number, or 'best' (lowest validation loss).")
@click.option("--url", default=None, help="The platform's web API (default http://localhost:<web port>).")
def publish(run_dir: str, checkpoint: str, url: str | None) -> None:
    """Fuse one checkpoint of RUN_DIR into its base model, with dashboard and model card."""
    settings = load_settings()
    ws = Workspace(settings.home)
    try:
        run = resolve_run(ws, run_dir, field="run_dir")
        if checkpoint == "best":
            best = rank_checkpoints(ws, run).best
            if not best:
                raise click.ClickException("no ranked checkpoint in this run (no validation loss recorded)")
            iteration = best[0]
        elif checkpoint.isdigit():
            iteration = int(checkpoint)
        else:
            raise click.BadParameter("an iteration number or 'best'", param_hint="--checkpoint")
    except ForgeError as exc:
        raise _fail(exc) from None
    checkpoint_path = ws.relative(adapter_file(run, iteration))
    training_dir = ws.relative(run)
    client = ForgeLLMClient(url or f"http://localhost:{settings.gateway.web_port}", timeout=1800)
    try:
        client.health()
        reply = client.publish_checkpoint(checkpoint_path, training_dir)
        click.echo(f"published {reply.model_name}\n  {reply.published_model_path}\n  {reply.readme_path}")
        return
    except ServiceUnavailableError:
        pass  # no platform: publish in this process
    except ForgeLLMError as exc:
        raise click.ClickException(str(exc)) from None
    from forgellm.services.mlx_runtime import preload_blas
    from forgellm.services.publishing.job import publish_checkpoint

    preload_blas()
    try:
        done = publish_checkpoint(ws, checkpoint_path, training_dir,
                                  progress=lambda stage, fraction: click.echo(f"{fraction:4.0%} {stage}"))
    except ForgeError as exc:
        raise _fail(exc) from None
    click.echo(f"published {done.name}\n  {ws.relative(done.path)}\n  {ws.relative(done.readme)}")


@click.command()
@click.argument("run_dir")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("dashboard.png"),
              show_default=True)
def dashboard(run_dir: str, output: Path) -> None:
    """Draw RUN_DIR's training dashboard (loss, gap, lr, tokens/s, memory) into a PNG."""
    from forgellm.services.publishing.dashboard import draw_dashboard

    ws = Workspace(load_settings().home)
    try:
        run = resolve_run(ws, run_dir, field="run_dir")
    except ForgeError as exc:
        raise _fail(exc) from None
    click.echo(str(draw_dashboard(run, output)))


def _published_dir(ws: Workspace, model: str) -> Path:
    from forgellm.services.common.models import resolve_model

    try:
        ref = resolve_model(model, ws)
    except ForgeError as exc:
        raise _fail(exc) from None
    if ref.source != "published":
        raise click.ClickException("only published models (published/<name>) can be quantized or exported")
    return ref.path


@click.command()
@click.argument("model")
@click.option("--bits", type=click.Choice(["4", "8"]), default="4", show_default=True)
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True)
def quantize(model: str, bits: str, group_size: str) -> None:
    """Quantize the published MODEL into a new published model (published/<name>_q<bits>g<group>)."""
    from forgellm.services.mlx_runtime import preload_blas
    from forgellm.services.publishing.derive import quantize_published

    preload_blas()
    ws = Workspace(load_settings().home)
    try:
        path = quantize_published(ws, _published_dir(ws, model), int(bits), int(group_size))
    except ForgeError as exc:
        raise _fail(exc) from None
    click.echo(f"published/{path.name}\n  {ws.relative(path)}")


@click.command("export-gguf")
@click.argument("model")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the .gguf (default: inside the model's folder).")
def export_gguf_command(model: str, output: Path | None) -> None:
    """Export the published llama-family MODEL as an f16 GGUF (llama.cpp, Ollama)."""
    from forgellm.services.mlx_runtime import preload_blas
    from forgellm.services.publishing.derive import export_gguf

    preload_blas()
    ws = Workspace(load_settings().home)
    source = _published_dir(ws, model)
    try:
        out = export_gguf(source, output or source / f"{source.name}-f16.gguf")
    except ForgeError as exc:
        raise _fail(exc) from None
    click.echo(str(out))
