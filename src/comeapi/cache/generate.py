"""Generating one variant of a prompt through backends over HTTP, checked before it is kept.

An answer is asked of a backend (or a gateway) with a given seed; the quality checks
(``comeapi.cache.checks``) score it, and an answer the policy rejects is generated again
with the next seed, ``seed + k * RESEED_STRIDE`` (k = 1..retries), so every kept answer is
reproducible from the seed stored in its params. When every try is rejected the best one is
kept, its flags saying why. Warmup and ``comeapi cache regenerate`` both come through here.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from comeapi.cache.checks import CheckPolicy, check_answer, failing
from comeapi.cache.key import chat_key, prompt_key
from comeapi.cache.prompts import PromptItem
from comeapi.cache.store import Entry
from comeapi.errors import UnavailableError
from comeapi.protocol.requests import Kind
from comeapi.protocol.responses import Answer, read_answer

HEADERS = {"Cache-Control": "no-cache"}  # a gateway in between must not answer from its cache
ATTEMPTS = 3  # per generation, across targets
CHECK_RETRIES = 3  # new seeds for an answer the checks reject
RESEED_STRIDE = 1_000_000
MAX_BUSY_WAIT = 5.0  # longest pause on a 503 before trying again (s)
MAX_BUSY_WAITS = 10


@dataclass(frozen=True, slots=True)
class Rejected:
    """A generation the checks rejected: its seed and the checks it failed."""

    seed: int
    flags: tuple[str, ...]


@dataclass(slots=True)
class Outcome:
    """The answer kept, and the generations rejected before it (oldest first)."""

    entry: Entry
    rejected: list[Rejected] = field(default_factory=list)


class _Failed(Exception):
    """One request for one answer failed (the message says why)."""

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class VariantGenerator:
    """Generates checked variants through ``urls``; a failed request moves to the next URL."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        urls: Sequence[str],
        *,
        policy: CheckPolicy | None = None,
        retries: int = CHECK_RETRIES,
    ):
        if not urls:
            raise ValueError("no backend URL to generate with")
        self.client = client
        self.urls = list(urls)
        self.policy = policy or CheckPolicy()
        self.retries = retries

    async def generate(self, item: PromptItem, variant: int, seed: int, home: int = 0) -> Outcome:
        """Variant ``variant`` of ``item``, first with ``seed``, then with further seeds while
        the checks reject it. UnavailableError when no backend gives an answer."""
        outcome: Outcome | None = None
        for k in range(self.retries + 1):
            tried = seed + k * RESEED_STRIDE
            entry = await self._answer(item, variant, tried, home)
            flags = check_answer(
                entry.answer,
                kind=item.kind,
                prompt=item.prompt,
                messages=item.messages,
                finish_reason=entry.finish_reason,
                policy=self.policy,
            )
            entry = replace(entry, flags=flags, checksum="").sealed()
            if outcome is None:
                outcome = Outcome(entry)
            elif _rank(entry, self.policy) < _rank(outcome.entry, self.policy):
                outcome.entry = entry
            if not failing(flags, self.policy):
                outcome.entry = entry
                return outcome
            outcome.rejected.append(Rejected(tried, flags))
        assert outcome is not None
        return outcome

    async def _answer(self, item: PromptItem, variant: int, seed: int, home: int) -> Entry:
        rotation = itertools.islice(itertools.cycle(range(len(self.urls))), home, None)
        errors: list[str] = []
        busy_waits = 0
        while len(errors) < ATTEMPTS:
            url = self.urls[next(rotation)]
            try:
                return await self._request(url, item, variant, seed)
            except _Failed as exc:
                if exc.retry_after is not None and busy_waits < MAX_BUSY_WAITS:
                    busy_waits += 1  # busy or loading: not the backend's fault, wait and retry
                    await asyncio.sleep(min(exc.retry_after, MAX_BUSY_WAIT))
                    continue
                errors.append(f"{url}: {exc}")
                await asyncio.sleep(0.2 * len(errors))
        raise UnavailableError(" | ".join(errors), retry_after=5)

    async def _request(self, url: str, item: PromptItem, variant: int, seed: int) -> Entry:
        body = {**item.request_body(variant), "seed": seed}
        try:
            response = await self.client.post(url + item.route, json=body, headers=HEADERS)
        except httpx.TimeoutException as exc:
            raise _Failed(f"timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise _Failed(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code == 503:
            raise _Failed("busy (503)", retry_after=_retry_after(response))
        if response.status_code != 200:
            raise _Failed(f"HTTP {response.status_code}: {_error_message(response)}")
        kind: Kind = "chat" if item.kind == "chat" else "completion"  # item.route's
        entry = _entry(item, variant, body, read_answer(kind, response.content))
        if entry is None:
            raise _Failed(f"malformed answer: no text in {response.content[:200]!r}")
        return entry


async def generate_variant(
    item: PromptItem,
    variant: int,
    seed: int,
    urls: Sequence[str],
    *,
    policy: CheckPolicy | None = None,
    retries: int = CHECK_RETRIES,
    api_key: str | None = None,
    connect_timeout: float = 5.0,
    request_timeout: float = 600.0,
    client: httpx.AsyncClient | None = None,
) -> Entry:
    """One checked variant of ``item`` generated through ``urls`` (backends or a gateway),
    first with ``seed``: the ``Entry`` kept, ``flags`` set (empty when it passed every
    check), its seed in ``params``. UnavailableError when no URL gives an answer."""
    if client is None:
        timeout = httpx.Timeout(request_timeout, connect=connect_timeout)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        async with httpx.AsyncClient(timeout=timeout, headers=headers) as own:
            return await generate_variant(
                item, variant, seed, urls, policy=policy, retries=retries, client=own
            )
    generator = VariantGenerator(client, urls, policy=policy, retries=retries)
    return (await generator.generate(item, variant, seed)).entry


def prompt_item(entry: Entry) -> PromptItem:
    """The prompt item that generates ``entry`` again: same prompt, model and parameters
    (its seed aside, which each generation sets)."""
    params = {k: v for k, v in entry.params.items() if k != "seed"}
    if entry.messages is not None:
        key = chat_key(entry.messages, entry.model)
    else:
        key = prompt_key(entry.prompt, entry.model)
    if key != entry.key:
        raise ValueError(f"entry {entry.key}#{entry.variant}: its prompt does not give its key")
    return PromptItem(-1, entry.kind, entry.prompt, entry.messages, entry.model, params, key)


def _rank(entry: Entry, policy: CheckPolicy) -> tuple[int, int]:
    """Which of two rejected answers to keep: fewer rejecting checks, then fewer flags."""
    rejects = policy.rejects
    return sum(f in rejects for f in entry.flags), len(entry.flags)


def _entry(
    item: PromptItem, variant: int, body: dict[str, Any], answer: Answer | None
) -> Entry | None:
    params = {k: v for k, v in body.items() if k not in ("model", "prompt", "messages")}
    entry = Entry.from_answer(
        answer,
        key=item.key,
        variant=variant,
        kind=item.kind,
        prompt=item.prompt,
        messages=item.messages,
        model=item.model,
        params=params,
    )
    return None if entry is None else entry.sealed()


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.2, float(response.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


def _error_message(response: httpx.Response) -> str:
    try:
        message = response.json()["error"]["message"]
        return str(message)[:300]
    except (ValueError, KeyError, TypeError):
        return response.text[:300]
