"""The ``forgellm`` command."""

from __future__ import annotations

import click

from forgellm.cli.bus_commands import bus
from forgellm.cli.cli_commands import cli_group
from forgellm.cli.config_commands import config
from forgellm.cli.models_commands import models
from forgellm.cli.platform_commands import server, service, start, web
from forgellm.cli.publish_commands import dashboard, export_gguf_command, publish, quantize
from forgellm.cli.train_command import train


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="forgellm")
def main() -> None:
    """ForgeLLM: continue pre-training and instruction-tune language models with MLX."""


for command in (start, server, web, service, bus, config, models, cli_group, train, publish, dashboard, quantize,
                export_gguf_command):
    main.add_command(command)

__all__ = ["main"]
