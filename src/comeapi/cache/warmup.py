"""Warmup: generate every missing variant of a prompt set through backends, over HTTP.

Variant ``i`` is generated with ``seed = i`` (reproducible), as many at once as the backends
have free slots; a blank answer (a base model may emit only whitespace) is not worth caching,
so that slot is generated again with ``seed = i + k * RESEED_STRIDE``, k = 1..BLANK_RESEEDS;
each answer is stored the moment it arrives (one atomic write), so a warmup killed at any
moment keeps everything already written and a rerun fills only the gaps.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from comeapi.cache.prompts import PromptItem, PromptSet
from comeapi.cache.store import Entry, ResponseStore
from comeapi.errors import StoreError, UnavailableError
from comeapi.protocol.health import read_health

HEADERS = {"Cache-Control": "no-cache"}  # a gateway in between must not answer from its cache
DEFAULT_CONCURRENCY = 2
ATTEMPTS = 3  # per variant, across targets
BLANK_RESEEDS = 3
RESEED_STRIDE = 1_000_000
MAX_BUSY_WAIT = 5.0  # longest pause on a 503 before trying again (s)

Outcome = Literal["generated", "failed"]
OnResult = Callable[[PromptItem, int, Outcome], None]
OnWait = Callable[[str, str], None]  # (url, why it is not ready yet)


@dataclass(slots=True)
class Target:
    url: str
    capacity: int | None  # None: its /health does not say (a gateway)


@dataclass(slots=True)
class PromptRow:
    item: PromptItem
    present: int = 0  # variants below N already stored before this run
    generated: int = 0
    failed: int = 0
    extra: int = 0  # variants >= N found in the store (left alone)
    complete: bool = False


@dataclass(slots=True)
class WarmupReport:
    variants: int
    concurrency: int
    targets: list[Target]
    rows: list[PromptRow]
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures and all(r.complete for r in self.rows)

    def totals(self) -> dict[str, int]:
        return {
            "present": sum(r.present for r in self.rows),
            "generated": sum(r.generated for r in self.rows),
            "failed": sum(r.failed for r in self.rows),
        }


class _Failed(Exception):
    """One attempt at one variant failed (the message says why)."""

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


async def probe_targets(
    client: httpx.AsyncClient,
    urls: Sequence[str],
    *,
    probe_timeout: float,
    wait: float,
    on_wait: OnWait | None = None,
) -> list[Target]:
    """The targets that answer ``GET /health`` with ``{"status": "ok"}``; UnavailableError
    when none does.

    Waits up to ``wait`` seconds for targets that are loading (or slow to answer), telling
    ``on_wait`` what it waits for; not for one that refuses the connection: nothing listens
    there, and waiting would only hide that.
    """
    deadline = time.monotonic() + wait
    reasons: dict[str, str] = {}
    ready: dict[str, Target] = {}
    refused: set[str] = set()
    while True:
        for url in urls:
            if url in ready or url in refused:
                continue
            target, reason, hopeless = await _probe(client, url, probe_timeout)
            if target is not None:
                ready[url] = target
            elif hopeless:
                refused.add(url)
            elif on_wait is not None and reasons.get(url) != reason and wait > 0:
                on_wait(url, reason)
            reasons[url] = reason
        if all(u in ready or u in refused for u in urls) or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.5)
    if not ready:
        detail = "; ".join(f"{u}: {r}" for u, r in reasons.items())
        hint = " (start them first, e.g. `comeapi up`)" if refused else ""
        raise UnavailableError(f"no backend is ready for warmup ({detail}){hint}", retry_after=5)
    return [ready[u] for u in urls if u in ready]


async def _probe(
    client: httpx.AsyncClient, url: str, probe_timeout: float
) -> tuple[Target | None, str, bool]:
    """The target if it is ready, else why not, and whether waiting cannot help."""
    try:
        response = await client.get(f"{url}/health", timeout=probe_timeout)
    except httpx.ConnectError as exc:
        return None, f"nothing listens there ({exc or 'connection refused'})", True
    except httpx.TimeoutException:
        return None, f"no answer to /health within {probe_timeout:g} s", False
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}", False
    health = read_health(response.status_code, response.content)
    if health.state == "loading":
        return None, "still loading its model", False
    if not health.ready:
        return None, health.reason or "not ready", False
    return Target(url, health.capacity), "ok", False


def plan(
    prompt_set: PromptSet,
    present: dict[str, set[int]],
    variants: int,
    *,
    force: bool = False,
    pinned: Collection[tuple[str, int]] = (),
) -> tuple[list[PromptRow], list[tuple[PromptRow, int]]]:
    """The per-prompt rows and the (row, variant) jobs still to generate. ``force`` makes
    every variant a job again, except a pinned one (a person chose to keep it)."""
    rows, jobs = [], []
    for item in prompt_set.items:
        have = present.get(item.key, set())
        row = PromptRow(item, extra=sum(1 for v in have if v >= variants))
        for variant in range(variants):
            if variant in have and (not force or (item.key, variant) in pinned):
                row.present += 1
            else:
                jobs.append((row, variant))
        rows.append(row)
    return rows, jobs


async def run_warmup(
    prompt_set: PromptSet,
    store: ResponseStore,
    urls: Sequence[str],
    *,
    variants: int,
    concurrency: int | None = None,
    force: bool = False,
    connect_timeout: float = 5.0,
    request_timeout: float = 600.0,
    health_timeout: float = 2.0,
    api_key: str | None = None,
    wait: float = 60.0,
    on_start: Callable[[int], None] | None = None,
    on_result: OnResult | None = None,
    on_wait: OnWait | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> WarmupReport:
    """Fill ``store`` with variants 0..N-1 of every prompt of ``prompt_set``."""
    started = time.monotonic()
    present = await asyncio.to_thread(store.variants_by_key)
    pinned = await asyncio.to_thread(_pinned, store) if force else set()
    rows, jobs = plan(prompt_set, present, variants, force=force, pinned=pinned)
    timeout = httpx.Timeout(request_timeout, connect=connect_timeout)
    headers = {**HEADERS, **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    async with httpx.AsyncClient(timeout=timeout, transport=transport, headers=headers) as client:
        targets: list[Target] = []
        if jobs:
            targets = await probe_targets(
                client, urls, probe_timeout=health_timeout, wait=wait, on_wait=on_wait
            )
        width = concurrency or _capacity(targets) or DEFAULT_CONCURRENCY
        report = WarmupReport(variants, width, targets, rows)
        if on_start is not None:
            on_start(len(jobs))
        if jobs:
            await _Runner(client, store, targets, report, on_result).run(jobs, width)
    final = await asyncio.to_thread(store.variants_by_key)
    for row in rows:
        have = final.get(row.item.key, set())
        row.complete = all(v in have for v in range(variants))
    report.seconds = time.monotonic() - started
    return report


def _pinned(store: ResponseStore) -> set[tuple[str, int]]:
    return {(e.key, e.variant) for e in store.entries() if e.pinned}


def _capacity(targets: list[Target]) -> int | None:
    if not targets or any(t.capacity is None for t in targets):
        return None
    return sum(t.capacity or 0 for t in targets)


class _Runner:
    def __init__(
        self,
        client: httpx.AsyncClient,
        store: ResponseStore,
        targets: list[Target],
        report: WarmupReport,
        on_result: OnResult | None,
    ):
        self.client = client
        self.store = store
        self.report = report
        self.on_result = on_result
        # Slot list weighted by capacity: worker i starts on slots[i % len].
        self.slots = [t.url for t in targets for _ in range(t.capacity or 1)]
        self.urls = [t.url for t in targets]
        self.store_failed: StoreError | None = None

    async def run(self, jobs: list[tuple[PromptRow, int]], width: int) -> None:
        queue: asyncio.Queue[tuple[PromptRow, int]] = asyncio.Queue()
        for job in jobs:
            queue.put_nowait(job)
        workers = [asyncio.create_task(self._worker(i, queue)) for i in range(width)]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
        if self.store_failed is not None:
            raise self.store_failed

    async def _worker(self, i: int, queue: asyncio.Queue[tuple[PromptRow, int]]) -> None:
        home = self.urls.index(self.slots[i % len(self.slots)])
        while self.store_failed is None:
            try:
                row, variant = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            entry = await self._generate(row, variant, home)
            if entry is None:
                self._done(row, variant, "failed")
                continue
            try:
                await asyncio.to_thread(self.store.put, entry)
            except StoreError as exc:  # the store is unusable: stop, don't waste generations
                self.store_failed = exc
                self.report.failures.append(f"store: {exc.message}")
                self._done(row, variant, "failed")
                return
            self._done(row, variant, "generated")

    def _done(self, row: PromptRow, variant: int, outcome: Outcome) -> None:
        if outcome == "generated":
            row.generated += 1
        else:
            row.failed += 1
        if self.on_result is not None:
            self.on_result(row.item, variant, outcome)

    async def _generate(self, row: PromptRow, variant: int, home: int) -> Entry | None:
        rotation = itertools.islice(itertools.cycle(range(len(self.urls))), home, None)
        errors: list[str] = []
        busy_waits = 0
        seed = variant
        while len(errors) < ATTEMPTS:
            url = self.urls[next(rotation)]
            try:
                entry = await self._request(url, row.item, variant, seed)
                if entry.answer.strip() or seed >= variant + BLANK_RESEEDS * RESEED_STRIDE:
                    return entry
                seed += RESEED_STRIDE
                continue
            except _Failed as exc:
                if exc.retry_after is not None and busy_waits < 10:
                    busy_waits += 1  # busy or loading: not the backend's fault, wait and retry
                    await asyncio.sleep(min(exc.retry_after, MAX_BUSY_WAIT))
                    continue
                errors.append(f"{url}: {exc}")
                await asyncio.sleep(0.2 * len(errors))
        name = f"prompts[{row.item.index}] variant {variant}"
        self.report.failures.append(f"{name}: {' | '.join(errors)}")
        return None

    async def _request(self, url: str, item: PromptItem, variant: int, seed: int) -> Entry:
        body = {**item.request_body(variant), "seed": seed}
        try:
            response = await self.client.post(url + item.route, json=body)
        except httpx.TimeoutException as exc:
            raise _Failed(f"timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise _Failed(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code == 503:
            raise _Failed("busy (503)", retry_after=_retry_after(response))
        if response.status_code != 200:
            raise _Failed(f"HTTP {response.status_code}: {_error_message(response)}")
        try:
            return _entry(item, variant, body, response.json())
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise _Failed(f"malformed answer: {exc!r}") from exc


def _entry(item: PromptItem, variant: int, body: dict[str, Any], data: Any) -> Entry:
    choice = data["choices"][0]
    text = choice["message"]["content"] if item.kind == "chat" else choice["text"]
    if not isinstance(text, str):
        raise TypeError(f"answer text is {type(text).__name__}")
    usage = data.get("usage") or {}
    params = {k: v for k, v in body.items() if k not in ("model", "prompt", "messages")}
    return Entry(
        key=item.key,
        variant=variant,
        kind=item.kind,
        prompt=item.prompt,
        messages=item.messages,
        answer=text,
        model=item.model,
        params=params,
        finish_reason=str(choice.get("finish_reason") or "stop"),
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)),
        created=time.time(),
    ).sealed()


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
