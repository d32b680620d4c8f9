"""``comeapi warmup``: generate the prompt set's missing variants into the store, each one
checked (``comeapi.cache.checks``) and generated again while the policy rejects it; the
report says what was regenerated, and why, and what was kept flagged."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from comeapi.cli.options import (
    backend_urls_option,
    build_settings,
    generation_targets,
    settings_options,
    short,
    user_errors,
)
from comeapi.cli.progress import ProgressReport


@click.command()
@settings_options(
    "prompts",
    "store",
    "variants",
    "backends",
    "backends_range",
    "connect_timeout",
    "request_timeout",
    "health_timeout",
    "backend_api_key",
    "checks",
    "check_retries",
)
@backend_urls_option
@click.option(
    "--concurrency",
    type=click.IntRange(1, 256),
    default=None,
    help="Requests at once. Default: the backends' total capacity from /health, else 2.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Regenerate every variant, not only missing ones (pinned ones stay; the old text "
    "is kept in each entry's history).",
)
@click.option(
    "--wait",
    type=click.FloatRange(0),
    default=120.0,
    show_default=True,
    help="Seconds to wait for backends that are still loading (not for one that refuses "
    "the connection: that fails at once).",
)
@click.pass_context
def warmup(
    ctx: click.Context,
    /,
    urls: tuple[str, ...],
    concurrency: int | None,
    force: bool,
    wait: float,
    **values: Any,
) -> None:
    """Generate every missing variant of the prompt set into the store.

    Variant i is generated with seed i; an answer the quality checks reject (special
    tokens, markup, a loop, an echo, another language, empty) is generated again with seed
    i + k * 1,000,000 (k = 1 .. --check-retries), and the seed used is stored. Each answer is
    stored as it arrives, so an interrupted warmup loses nothing and a rerun fills only what
    is missing. Exits 1 when a variant could not be generated at all; answers kept with
    flags are listed (`comeapi cache check` fails on them).
    """
    from comeapi.cache.default import open_configured_store
    from comeapi.cache.prompts import load_prompt_set
    from comeapi.cache.warmup import run_warmup

    settings = build_settings(ctx, values)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here
    err = Console(stderr=True)
    with user_errors():
        prompt_set = load_prompt_set(settings.prompts)
        policy = prompt_set.policy(settings.checks)
        variants = values.get("variants") or prompt_set.variants or settings.variants
        targets, api_key = generation_targets(settings, urls)
        store = open_configured_store(settings)
        err.print(
            f"warmup: {len(prompt_set.items)} prompts x {variants} variants "
            f"({prompt_set.source}) into {settings.store} via {', '.join(targets)}",
            highlight=False,
        )
        progress: list[ProgressReport] = []
        counts = {"failed": 0, "flagged": 0}

        def on_wait(url: str, why: str) -> None:
            err.print(f"warmup: waiting up to {wait:g} s for {url}: {why}", highlight=False)

        def on_start(total: int) -> None:
            if total == 0:
                err.print("warmup: every variant is already stored", highlight=False)
            progress.append(ProgressReport(err, "generating", total).__enter__())

        def on_result(item: Any, variant: int, outcome: str) -> None:
            if outcome in counts:
                counts[outcome] += 1
            notes = [f"{n} {what}" for what, n in counts.items() if n]
            label = f"generating ({', '.join(notes)})" if notes else "generating"
            progress[0].advance(description=label)

        try:
            report = asyncio.run(
                run_warmup(
                    prompt_set,
                    store,
                    targets,
                    variants=variants,
                    concurrency=concurrency,
                    force=force,
                    connect_timeout=settings.connect_timeout,
                    request_timeout=settings.request_timeout,
                    health_timeout=settings.health_timeout,
                    api_key=api_key,
                    wait=wait,
                    policy=policy,
                    retries=settings.check_retries,
                    on_start=on_start,
                    on_result=on_result,
                    on_wait=on_wait,
                )
            )
        finally:
            if progress:
                progress[0].__exit__(None, None, None)
            store.close()
    print_report(report)
    if not report.ok:
        ctx.exit(1)


COLUMNS = ("present", "generated", "regenerated", "flagged", "failed")


def print_report(report: Any) -> None:
    out = Console()
    if not out.is_terminal:  # a log: long lines rather than rich's 80 columns
        out = Console(width=160)
    table = Table(title=f"warmup: {report.variants} variants per prompt")
    for column in ("#", "kind", "prompt", *COLUMNS, "complete"):
        table.add_column(column, justify="left" if column in ("kind", "prompt") else "right")
    for row in report.rows:
        cells = (row.present, row.generated, row.regenerated, len(row.flagged), row.failed)
        table.add_row(
            str(row.item.index),
            row.item.kind,
            short(row.item.prompt, 40),
            *(str(c) for c in cells),
            "yes" if row.complete else "NO",
        )
    totals = report.totals()
    table.add_row("", "", "total", *(str(totals[k]) for k in COLUMNS))
    out.print(table)
    where = ", ".join(f"{t.url} ({t.capacity or '?'})" for t in report.targets) or "-"
    out.print(
        f"{totals['generated']} generated ({totals['regenerated']} rejected tries generated "
        f"again, {totals['flagged']} kept with flags), {totals['present']} already present, "
        f"{totals['failed']} failed in {report.seconds:.1f}s "
        f"(concurrency {report.concurrency}; backends: {where})",
        highlight=False,
    )
    for row in report.rows:
        name = f"prompts[{row.item.index}]"
        for variant, tries in sorted(row.rejected.items()):
            said = "; ".join(f"seed {t.seed}: {', '.join(t.flags)}" for t in tries)
            out.print(f"regenerated: {name} variant {variant}: {said}", highlight=False)
        for variant, flags in sorted(row.flagged.items()):
            out.print(
                f"[yellow]flagged:[/yellow] {name} variant {variant}: {', '.join(flags)}",
                markup=True,
                highlight=False,
            )
        if row.pinned:
            out.print(f"note: {name}: {row.pinned} pinned variants left alone", highlight=False)
        if row.extra:
            out.print(f"note: {name} also has {row.extra} variants >= N (kept)", highlight=False)
    for failure in report.failures[:20]:
        out.print(f"[red]failed:[/red] {failure}", markup=True, highlight=False)
