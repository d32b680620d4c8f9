"""What a person does to the answers a cache will serve, the same from the CLI, the HTTP API
and the dashboard: find a prompt's answers, approve, reject, pin, unpin, edit, regenerate.

Each change is a new sealed ``Entry`` (nothing here writes): the caller writes all of one
change in one store write, which bumps the store's revision, so running gateways reload.
The rules:
  - reject unpins (a rejected answer is never pinned); pinning a rejected answer is refused;
  - edit keeps the old text in ``history`` (``why: edit``), re-runs the checks on the new
    text (its ``flags``), and makes a rejected answer pending again (the text it was
    rejected for is gone); an approved answer stays approved. An edited answer reports
    ``finish_reason: stop`` and 0 completion tokens (no model counted them);
  - regenerate replaces the text by a new generation (a new seed, the same parameters), keeps
    the old one in ``history`` (``why: regenerate``) and is pending; a pinned answer is not
    regenerated (unpin it first).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

from comeapi.cache.checks import CheckPolicy, check_answer
from comeapi.cache.key import normalise
from comeapi.cache.serving import served_entries
from comeapi.cache.store import Entry, ResponseStore
from comeapi.errors import (
    AmbiguousPromptError,
    AnswerNotFoundError,
    RequestError,
    ReviewConflictError,
)

Action = Literal["approve", "reject", "pin", "unpin", "edit", "regenerate"]
ACTIONS: tuple[Action, ...] = ("approve", "reject", "pin", "unpin", "edit", "regenerate")
#: Actions that may apply to every variant of a prompt at once.
PROMPT_ACTIONS: tuple[Action, ...] = ("approve", "reject")
MIN_KEY_PREFIX = 8
MAX_TEXT_CHARS = 100_000
MAX_SEED = 2**31 - 1


def find_key(
    groups: Mapping[str, Sequence[Entry]], *, prompt: str | None = None, key: str | None = None
) -> str:
    """The key of the cached prompt named by ``key`` (or a unique prefix of it, at least
    MIN_KEY_PREFIX characters) or by ``prompt`` (its text, for a chat its last user message,
    compared after normalisation). AnswerNotFoundError, or AmbiguousPromptError listing the
    candidates."""
    if (prompt is None) == (key is None):
        raise RequestError("name the prompt by its text or by its key (one of the two)")
    if key is not None:
        key = key.strip().lower()
        if key in groups:
            return key
        found = [k for k in groups if k.startswith(key)] if len(key) >= MIN_KEY_PREFIX else []
        what = f"key {key!r}"
        param = "key"
    else:
        assert prompt is not None
        wanted = normalise(prompt)
        found = [k for k, g in groups.items() if g and normalise(g[0].prompt) == wanted]
        what = f"prompt {prompt!r}"
        param = "prompt"
    if not found:
        raise AnswerNotFoundError(f"no cached prompt has the {what}", param=param)
    if len(found) > 1:
        candidates = [describe(groups[k][0]) for k in sorted(found)]
        listing = "; ".join(
            f"{c['key'][:12]} ({c['kind']}, {c['model']}{_system(c)})" for c in candidates
        )
        raise AmbiguousPromptError(
            f"the {what} names {len(found)} cached prompts: {listing}; name one by --key",
            candidates,
            param=param,
        )
    return found[0]


def pick(group: Sequence[Entry], variant: int | None) -> list[Entry]:
    """The variant ``variant`` of a prompt's entries, or all of them (None)."""
    if variant is None:
        return list(group)
    chosen = [e for e in group if e.variant == variant]
    if not chosen:
        have = ", ".join(str(e.variant) for e in group)
        raise AnswerNotFoundError(
            f"prompt {group[0].key[:12]} has no variant {variant} (it has {have})",
            param="variant",
        )
    return chosen


def change(
    entry: Entry,
    action: Action,
    *,
    text: str | None = None,
    policy: CheckPolicy | None = None,
    tokens: int | None = None,
) -> Entry:
    """``entry`` after ``action`` (all but regenerate, which needs a generation); ``policy``
    says which checks run on an edited text, ``tokens`` is how many tokens it is (None: not
    known, recorded as 0)."""
    if action == "approve":
        return _sealed(entry, state="approved")
    if action == "reject":
        return _sealed(entry, state="rejected", pinned=False)
    if action == "pin":
        if entry.state == "rejected":
            raise ReviewConflictError(
                f"{_name(entry)} is rejected: approve it (or leave it pending) before pinning it"
            )
        return _sealed(entry, pinned=True)
    if action == "unpin":
        return _sealed(entry, pinned=False)
    if action == "edit":
        if text is None:
            raise RequestError("edit needs the new text", param="text")
        return edited(entry, text, policy=policy, tokens=tokens)
    raise RequestError(f"{action!r} is not an action here", param="action")


def edited(
    entry: Entry,
    text: str,
    *,
    policy: CheckPolicy | None = None,
    now: float | None = None,
    tokens: int | None = None,
) -> Entry:
    """``entry`` with ``text`` typed by a person in place of its answer; its usage counts
    ``tokens`` completion tokens (``comeapi.models.tokens``; None: not known, 0)."""
    if not text.strip():
        raise RequestError("the new text is empty: reject the answer instead", param="text")
    if len(text) > MAX_TEXT_CHARS:
        raise RequestError(f"the new text is over {MAX_TEXT_CHARS} characters", param="text")
    if text == entry.answer:
        raise RequestError("the new text is the answer's current text", param="text")
    flags = check_answer(
        text, kind=entry.kind, prompt=entry.prompt, messages=entry.messages,
        finish_reason="stop", policy=policy,
    )  # fmt: skip
    return _sealed(
        entry,
        answer=text,
        finish_reason="stop",
        completion_tokens=tokens or 0,
        flags=flags,
        state="pending" if entry.state == "rejected" else entry.state,
        history=(*entry.history, _earlier(entry, "edit", now)),
    )


def regenerated(entry: Entry, fresh: Entry, *, now: float | None = None) -> Entry:
    """``entry`` with the text of ``fresh`` (a new generation of the same prompt and
    parameters), pending, the old text kept in its history."""
    refuse_pinned(entry)
    if (fresh.key, fresh.model) != (entry.key, entry.model):
        raise ValueError("a regenerated answer must be of the same prompt and model")
    return _sealed(
        entry,
        answer=fresh.answer,
        params=fresh.params,
        finish_reason=fresh.finish_reason,
        prompt_tokens=fresh.prompt_tokens,
        completion_tokens=fresh.completion_tokens,
        created=fresh.created,
        flags=fresh.flags,
        state="pending",
        history=(*entry.history, _earlier(entry, "regenerate", now)),
    )


def refuse_pinned(entry: Entry) -> None:
    if entry.pinned:
        raise ReviewConflictError(f"{_name(entry)} is pinned: unpin it before regenerating it")


def used_seeds(entry: Entry) -> set[int]:
    """Every seed this answer was generated with, now or before (a new one must differ)."""
    seeds = {entry.params.get("seed")} | {h.get("params", {}).get("seed") for h in entry.history}
    return {s for s in seeds if isinstance(s, int)}


def new_seed(entry: Entry) -> int:
    """A random seed this answer was never generated with, for regenerate (warmup's own
    retries use seed + k x 1,000,000, so a random one rarely repeats them either)."""
    used = used_seeds(entry)
    while (seed := secrets.randbelow(MAX_SEED)) in used:
        pass
    return seed


def describe(entry: Entry, *, served: bool | None = None) -> dict[str, Any]:
    """One answer as the review listings show it (``comeapi cache review --json``, the HTTP
    API, the dashboard)."""
    doc: dict[str, Any] = {
        "key": entry.key,
        "variant": entry.variant,
        "kind": entry.kind,
        "model": entry.model,
        "prompt": entry.prompt,
        "messages": [list(m) for m in entry.messages] if entry.messages is not None else None,
        "text": entry.answer,
        "state": entry.state,
        "flags": list(entry.flags),
        "pinned": entry.pinned,
        "edited": entry.edited,
        "finish_reason": entry.finish_reason,
        "prompt_tokens": entry.prompt_tokens,
        "completion_tokens": entry.completion_tokens,
        "params": entry.params,
        "created": entry.created,
        "history": [dict(h) for h in entry.history],
    }
    if served is not None:
        doc["served"] = served
    return doc


def listing(
    groups: Mapping[str, Sequence[Entry]], serve_states: Iterable[str]
) -> list[dict[str, Any]]:
    """Every answer, by prompt then variant, each saying whether it is served now."""
    serve = frozenset(serve_states)
    out = []
    for key in sorted(groups, key=lambda k: (groups[k][0].prompt, k)):
        served = {e.variant for e in served_entries(groups[key], serve)}
        out += [describe(e, served=e.variant in served) for e in groups[key]]
    return out


def apply(
    store: ResponseStore,
    action: Action,
    *,
    prompt: str | None = None,
    key: str | None = None,
    variant: int | None = None,
    text: str | None = None,
    policy: CheckPolicy | None = None,
    count: Callable[[str, str], int | None] | None = None,
) -> list[Entry]:
    """Apply ``action`` to the named answers of ``store`` in one write; returns them.
    ``count(model, text)`` gives an edited text's tokens (``TokenCounter.count``)."""
    groups = group_entries(store.entries())
    chosen = pick(groups[find_key(groups, prompt=prompt, key=key)], variant)
    changed = [
        change(e, action, text=text, policy=policy, tokens=edit_tokens(e, action, text, count))
        for e in chosen
    ]
    store.put_many(changed)
    return changed


def edit_tokens(
    entry: Entry, action: Action, text: str | None, count: Callable[[str, str], int | None] | None
) -> int | None:
    """The tokens of the text an edit of ``entry`` puts in (None: no edit, or not known)."""
    if action != "edit" or text is None or count is None:
        return None
    return count(entry.model, text)


def group_entries(entries: Iterable[Entry]) -> dict[str, list[Entry]]:
    groups: dict[str, list[Entry]] = {}
    for e in sorted(entries, key=lambda e: (e.key, e.variant)):
        groups.setdefault(e.key, []).append(e)
    return groups


def _earlier(entry: Entry, why: str, now: float | None) -> dict[str, Any]:
    return {
        "answer": entry.answer,
        "finish_reason": entry.finish_reason,
        "params": entry.params,
        "flags": list(entry.flags),
        "completion_tokens": entry.completion_tokens,
        "replaced": time.time() if now is None else now,
        "why": why,
    }


def _sealed(entry: Entry, **changes: Any) -> Entry:
    return replace(entry, **changes, checksum="").sealed()


def _name(entry: Entry) -> str:
    return f"variant {entry.variant} of {entry.key[:12]}"


def _system(candidate: Mapping[str, Any]) -> str:
    messages = candidate.get("messages") or []
    system = next((c for r, c in messages if r in ("system", "developer")), None)
    return f", system {system[:40]!r}" if system else ""
