"""``comeapi cache check [--store URL | FILE]``: the quality checks over every stored answer,
exit status 1 when an answer that is served fails one (for operators' CI).

The checks are run again on each answer's current text (a store written before the checks
existed has no flags; an edited answer has new text), so the flags shown are today's; a
stored ``flags`` that disagrees is pointed out. What is served follows ``serve_states`` and
the pins, as on every tier (``comeapi.cache.serving``); a rejected or unserved answer that
fails a check is listed, but does not fail the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from comeapi.cli.options import build_settings, settings_options, short, user_errors


@click.command("check")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False), required=False)
@settings_options("store", "serve_states", "prompts", "checks")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def check(ctx: click.Context, /, file: Path | None, as_json: bool, **values: Any) -> None:
    """Run the quality checks over a store (--store, default: the store setting) or an
    export archive (FILE: .tar.gz or .jsonl); exit 1 when a served answer fails one.

    Checks set to off (the prompt set's `checks`, --checks NAME=off) are not counted.
    """
    from comeapi.cache.archive import read_entries_file
    from comeapi.cache.default import open_configured_store
    from comeapi.cache.prompts import load_prompt_set

    settings = build_settings(ctx, values)
    if file is not None and values.get("store"):
        raise click.UsageError("give a store (--store) or a FILE, not both")
    with user_errors():
        policy = load_prompt_set(settings.prompts).policy(settings.checks)
        if file is not None:
            source = str(file)
            entries = read_entries_file(file)
        else:
            source = settings.store
            with open_configured_store(settings) as store:
                entries = list(store.entries())
    results = _results(entries, settings.serve_states, policy)
    failing = [r for r in results if r["flags"] and r["served"]]
    if as_json:
        doc = {
            "source": source,
            "serve_states": settings.serve_states,
            "checked": len(results),
            "served": sum(r["served"] for r in results),
            "failing_served": len(failing),
            "answers": results,
        }
        click.echo(json.dumps(doc, ensure_ascii=False, indent=2))
    else:
        _print(source, settings.serve_states, results, failing)
    if failing:
        ctx.exit(1)


def _results(entries: list[Any], serve_states: list[str], policy: Any) -> list[dict[str, Any]]:
    """One result per answer, by prompt then variant."""
    from comeapi.cache.checks import check_entry
    from comeapi.cache.review import group_entries
    from comeapi.cache.serving import served_entries

    groups = group_entries(entries)
    out = []
    for key in sorted(groups, key=lambda k: (groups[k][0].prompt, k)):
        served = {e.variant for e in served_entries(groups[key], frozenset(serve_states))}
        for e in groups[key]:
            out.append(
                {
                    "key": e.key,
                    "prompt": e.prompt,
                    "kind": e.kind,
                    "model": e.model,
                    "variant": e.variant,
                    "state": e.state,
                    "served": e.variant in served,
                    "flags": list(check_entry(e, policy)),
                    "stored_flags": list(e.flags),
                    "text": e.answer,
                }
            )
    return out


def _print(
    source: str,
    serve_states: list[str],
    results: list[dict[str, Any]],
    failing: list[dict[str, Any]],
) -> None:
    out = Console()
    if not out.is_terminal:  # a CI log: long lines rather than rich's 80 columns
        out = Console(width=160)
    flagged = [r for r in results if r["flags"]]
    served = sum(r["served"] for r in results)
    if flagged:
        table = Table(title=f"{source}: answers that fail a check", show_lines=True)
        table.add_column("prompt", max_width=32)
        table.add_column("v", justify="right")
        table.add_column("state")
        table.add_column("served")
        table.add_column("flags", style="red")
        table.add_column("text", ratio=1)
        for r in flagged:
            state = r["state"] + (
                "" if r["flags"] == r["stored_flags"] else "\n(stored flags differ)"
            )
            table.add_row(
                r["prompt"],
                str(r["variant"]),
                state,
                Text("yes", style="bold red") if r["served"] else Text("no"),
                " ".join(r["flags"]),
                short(r["text"], 160),
            )
        out.print(table)
    out.print(
        f"{source}: {len(results)} answers checked, {served} served "
        f"(serve_states {','.join(serve_states)}); {len(flagged)} fail a check, "
        f"{len(failing)} of them served",
        highlight=False,
    )
    if failing:
        out.print("[red]FAILED:[/red] a served answer fails a check", markup=True)
    else:
        out.print("ok: every served answer passes every check", highlight=False)
