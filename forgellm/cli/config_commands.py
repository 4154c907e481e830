"""``forgellm config show``."""

from __future__ import annotations

import click
import msgspec

from forgellm.config import load_settings
from forgellm.config.settings import ConfigError


@click.group()
def config() -> None:
    """Inspect the configuration."""


@config.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of TOML.")
def show(as_json: bool) -> None:
    """Print the settings in force (defaults < file < FORGELLM_* environment)."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    data = settings.to_dict()
    if data["security"]["api_token"]:
        data["security"]["api_token"] = "***"
    if as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(data)).decode())
    else:
        click.echo(msgspec.toml.encode(data).decode())
