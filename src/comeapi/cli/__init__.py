"""The ``comeapi`` command. Each subcommand lives in its own module and is imported lazily,
so ``comeapi cache ls`` never pays for llama.cpp or the web stack."""

from __future__ import annotations

import importlib
import logging

import click

from comeapi import __version__

# name -> "module:attribute"; the module is imported only when the command runs.
COMMANDS = {
    "backend": "comeapi.cli.backend:backend",
    "backends": "comeapi.cli.backend:backends",
    "models": "comeapi.cli.models:models",
    "serve": "comeapi.cli.serve:serve",
    "up": "comeapi.cli.serve:up",
    "warmup": "comeapi.cli.warmup:warmup",
    "cache": "comeapi.cli.cache:cache",
    "bench": "comeapi.cli.bench:bench",
    "aws": "comeapi.cli.aws:aws",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        command = getattr(importlib.import_module(module), attr)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="comeapi")
@click.option(
    "--config",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="TOML settings file (also COMEAPI_CONFIG).",
)
@click.pass_context
def main(ctx: click.Context, config: str | None) -> None:
    """comeapi: cached LLM answers in front of a llama.cpp backend pool."""
    ctx.obj = {"config": config}
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
