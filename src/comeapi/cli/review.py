"""``comeapi cache review|approve|reject|pin|unpin|edit|regenerate``: a person reviews the
answers a cache will serve (``comeapi.cache.review`` holds the rules).

Each change is one store write, which bumps the store's revision: a running gateway picks
it up at its next refresh (``cache_refresh``, 5 s); nginx keeps what it already stored until
those entries are purged (``make cache-purge KEYS=...``).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from comeapi.cli.options import (
    backend_urls_option,
    build_settings,
    generation_targets,
    settings_options,
    user_errors,
)
from comeapi.errors import ReviewConflictError

if TYPE_CHECKING:
    from comeapi.cache.store import Entry
    from comeapi.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])

STATE_STYLES = {"approved": "green", "pending": "yellow", "rejected": "red"}


def target_options(*, variant_required: bool) -> Callable[[F], F]:
    """``(--prompt TEXT | --key KEY) --variant K``: which answers a change is for."""

    def decorate(func: F) -> F:
        func = click.option(
            "--variant",
            type=click.IntRange(0),
            required=variant_required,
            help="The variant (default: every variant of the prompt)."
            if not variant_required
            else "The variant.",
        )(func)
        func = click.option(
            "--key", help="The prompt's cache key, or a prefix of it (8 characters or more)."
        )(func)
        return click.option(
            "--prompt",
            help="The prompt's text (for a chat: its last user message).",
        )(func)

    return decorate


@click.command("review")
@settings_options("store", "serve_states")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def review(ctx: click.Context, /, as_json: bool, **values: Any) -> None:
    """List every answer with its prompt, variant, review state, flags, model and text.

    ``served`` says whether the answer is served now under serve_states (approved, or
    approved and pending) and the pins.
    """
    from comeapi.cache.default import open_configured_store
    from comeapi.cache.review import group_entries, listing

    settings = build_settings(ctx, values)
    with user_errors(), open_configured_store(settings) as store:
        answers = listing(group_entries(store.entries()), settings.serve_states)
    if as_json:
        doc = {"store": settings.store, "serve_states": settings.serve_states, "answers": answers}
        click.echo(json.dumps(doc, ensure_ascii=False, indent=2))
        return
    prompts = len({a["key"] for a in answers})
    served = sum(a["served"] for a in answers)
    title = (
        f"{settings.store}: {len(answers)} answers of {prompts} prompts, {served} served "
        f"(serve_states {','.join(settings.serve_states)})"
    )
    table = Table(title=title, show_lines=True)
    table.add_column("prompt", max_width=24)
    table.add_column("v", justify="right")
    table.add_column("state", no_wrap=True)
    table.add_column("flags", max_width=12)
    table.add_column("served")
    table.add_column("model", max_width=12, overflow="fold")
    table.add_column("tokens", justify="right")
    table.add_column("text", ratio=1)
    previous = None
    for a in answers:
        first = a["key"] != previous
        previous = a["key"]
        prompt = f"{a['key'][:12]} {a['kind']}\n{a['prompt']}" if first else ""
        state = Text(a["state"], style=STATE_STYLES[a["state"]])
        for mark in ("pinned", "edited"):
            if a[mark]:
                state.append(f"\n{mark}")
        table.add_row(
            prompt,
            str(a["variant"]),
            state,
            Text(" ".join(a["flags"]), style="red"),
            "yes" if a["served"] else "no",
            a["model"] if first else "",
            str(a["completion_tokens"]),
            a["text"],
        )
    Console().print(table)


def _change(ctx: click.Context, action: str, values: dict[str, Any]) -> None:
    """Apply one review action as one store write and say what it did."""
    from comeapi.cache.checks import CheckPolicy
    from comeapi.cache.default import open_configured_store
    from comeapi.cache.review import apply
    from comeapi.models.tokens import TokenCounter

    target = {name: values.pop(name) for name in ("prompt", "key", "variant")}
    text = values.pop("text", None)
    settings = build_settings(ctx, values)
    policy = CheckPolicy.parse(settings.checks)
    counter = TokenCounter(settings.model_dir) if action == "edit" else None
    with user_errors(), open_configured_store(settings) as store:
        changed = apply(
            store,
            action,  # type: ignore[arg-type]
            text=text,
            policy=policy,
            count=None if counter is None else counter.count,
            **target,
        )
    done = {"approve": "approved", "reject": "rejected", "pin": "pinned", "unpin": "unpinned"}
    variants = ", ".join(str(e.variant) for e in changed)
    entry = changed[0]
    click.echo(
        f"{done.get(action, action + 'ed')} variant{'s' * (len(changed) > 1)} {variants} of "
        f"{entry.prompt!r} ({entry.key[:12]}) in {settings.store}"
    )
    if action == "edit":
        flags = ", ".join(entry.flags) or "none"
        click.echo(f"checks on the new text: {flags}; state {entry.state}")
        if entry.completion_tokens:
            click.echo(f"its usage: {entry.completion_tokens} completion tokens")
        else:
            click.echo(
                f"its usage: 0 completion tokens, not counted: {entry.model} is not in "
                f"{settings.model_dir} (--model-dir), or llama.cpp is not installed"
            )
    if action == "reject":
        click.echo(
            "a running gateway stops serving it at its next refresh; nginx keeps what it "
            f"stored until purged: make cache-purge KEYS={entry.key}"
        )


@click.command("approve")
@target_options(variant_required=False)
@settings_options("store")
@click.pass_context
def approve(ctx: click.Context, /, **values: Any) -> None:
    """Approve one variant of a prompt, or all of them."""
    _change(ctx, "approve", values)


@click.command("reject")
@target_options(variant_required=False)
@settings_options("store")
@click.pass_context
def reject(ctx: click.Context, /, **values: Any) -> None:
    """Reject one variant of a prompt, or all of them: it is never served again."""
    _change(ctx, "reject", values)


@click.command("pin")
@target_options(variant_required=True)
@settings_options("store")
@click.pass_context
def pin(ctx: click.Context, /, **values: Any) -> None:
    """Pin a variant: while a prompt has a served pinned variant, only pinned ones are
    served, and regeneration (warmup --force too) leaves them alone."""
    _change(ctx, "pin", values)


@click.command("unpin")
@target_options(variant_required=True)
@settings_options("store")
@click.pass_context
def unpin(ctx: click.Context, /, **values: Any) -> None:
    """Unpin a variant."""
    _change(ctx, "unpin", values)


@click.command("edit")
@target_options(variant_required=True)
@click.option(
    "--text", required=True, help="The answer's new text ('-': read it from standard input)."
)
@settings_options("store", "checks", "model_dir")
@click.pass_context
def edit(ctx: click.Context, /, **values: Any) -> None:
    """Replace an answer's text by one typed by a person (the old text stays in its
    history; the checks run on the new text; its tokens are counted with the model's
    vocabulary from --model-dir, for the usage the answer is served with)."""
    if values["text"] == "-":
        values["text"] = sys.stdin.read()
    _change(ctx, "edit", values)


@click.command("regenerate")
@target_options(variant_required=True)
@backend_urls_option
@click.option(
    "--local",
    is_flag=True,
    help="Generate with a backend this command starts on the models directory (--model-dir) "
    "and stops when done, rather than with a running one.",
)
@settings_options(
    "store",
    "backends",
    "backends_range",
    "model_dir",
    "checks",
    "check_retries",
    "connect_timeout",
    "request_timeout",
    "backend_api_key",
)
@click.pass_context
def regenerate(ctx: click.Context, /, urls: tuple[str, ...], local: bool, **values: Any) -> None:
    """Generate one variant again: a new seed, the same prompt and parameters, checked as
    warmup checks it. The old text stays in the answer's history; the new one is pending.
    A pinned variant is left alone (unpin it first)."""
    import asyncio

    from comeapi.cache.default import open_configured_store
    from comeapi.cache.review import find_key, group_entries, pick, refuse_pinned
    from comeapi.cache.review import regenerated as replaced

    target = {name: values.pop(name) for name in ("prompt", "key", "variant")}
    settings = build_settings(ctx, values)
    with user_errors(), open_configured_store(settings) as store:
        groups = group_entries(store.entries())
        key = find_key(groups, prompt=target["prompt"], key=target["key"])
        [entry] = pick(groups[key], target["variant"])
        refuse_pinned(entry)
        fresh = asyncio.run(_generate_again(settings, entry, urls, local=local))
        new = replaced(entry, fresh)
        if store.get(key, entry.variant) != entry:
            raise ReviewConflictError(
                f"variant {entry.variant} of {key[:12]} changed while it was being generated "
                "again: nothing written, run it again"
            )
        store.put(new)
    flags = ", ".join(new.flags) or "none"
    click.echo(
        f"regenerated variant {new.variant} of {new.prompt!r} ({key[:12]}) in {settings.store}: "
        f"seed {new.params.get('seed')}, checks failed: {flags}; state {new.state}"
    )
    click.echo(new.answer)


async def _generate_again(
    settings: Settings, entry: Entry, urls: tuple[str, ...], *, local: bool
) -> Entry:
    """A new checked generation of ``entry`` with a new seed: through a backend started for
    it (``local``), the given URLs, the configured backends, or the gateway, as warmup."""
    from comeapi.backend.supervisor import Supervisor
    from comeapi.cache.checks import CheckPolicy
    from comeapi.cache.generate import generate_variant, prompt_item
    from comeapi.cache.review import new_seed

    seed = new_seed(entry)
    targets, api_key = generation_targets(settings, urls)  # unless local: a backend of its own
    async with contextlib.AsyncExitStack() as stack:
        if local:
            # No key: it listens on loopback for this command alone.
            backend = Supervisor(settings, host="127.0.0.1", base_port=_free_port(), count=1)
            click.echo(f"starting a backend on {settings.model_dir} ...", err=True)
            await stack.enter_async_context(backend)
            targets, api_key = backend.urls(), None
        click.echo(
            f"regenerating variant {entry.variant} of {entry.prompt!r} ({entry.key[:12]}) "
            f"with seed {seed} via {', '.join(targets)}",
            err=True,
        )
        return await generate_variant(
            prompt_item(entry), entry.variant, seed, targets,
            policy=CheckPolicy.parse(settings.checks), retries=settings.check_retries,
            api_key=api_key, connect_timeout=settings.connect_timeout,
            request_timeout=settings.request_timeout,
        )  # fmt: skip


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
