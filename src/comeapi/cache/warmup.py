"""Warmup: generate every missing variant of a prompt set through backends, over HTTP.

Variant ``i`` is generated with ``seed = i`` (reproducible), as many at once as the backends
have free slots; the quality checks score each answer, and one the policy rejects is
generated again with further seeds (``comeapi.cache.generate``), the reasons kept in the
entry's ``flags``. Each answer is stored the moment it arrives (one atomic write), so a
warmup killed at any moment keeps everything already written and a rerun fills only the
gaps. ``--force`` regenerates every variant but the pinned ones, keeping the old text in
the entry's history.

``generate_variant`` (one checked variant, e.g. for ``comeapi cache regenerate``) and
``prompt_item`` (an entry's prompt item) are public here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import httpx

from comeapi.cache.checks import CheckPolicy
from comeapi.cache.generate import (
    CHECK_RETRIES,
    RESEED_STRIDE,
    Rejected,
    VariantGenerator,
    generate_variant,
    prompt_item,
)
from comeapi.cache.prompts import PromptItem, PromptSet
from comeapi.cache.review import regenerated
from comeapi.cache.store import Entry, ResponseStore
from comeapi.errors import StoreError, UnavailableError
from comeapi.protocol.health import read_health

__all__ = [
    "CHECK_RETRIES",
    "RESEED_STRIDE",
    "PromptRow",
    "Target",
    "WarmupReport",
    "generate_variant",
    "plan",
    "probe_targets",
    "prompt_item",
    "run_warmup",
]

DEFAULT_CONCURRENCY = 2

Outcome = Literal["generated", "flagged", "failed"]
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
    generated: int = 0  # stored by this run (flagged ones included)
    failed: int = 0
    extra: int = 0  # variants >= N found in the store (left alone)
    pinned: int = 0  # variants --force left alone
    complete: bool = False
    # variant -> the generations the checks rejected before the one stored
    rejected: dict[int, list[Rejected]] = field(default_factory=dict)
    # variant -> the flags of the answer stored (every try was rejected, or flag-only checks)
    flagged: dict[int, tuple[str, ...]] = field(default_factory=dict)

    @property
    def regenerated(self) -> int:
        """Generations thrown away because the checks rejected them."""
        return sum(len(r) for r in self.rejected.values())


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
            "regenerated": sum(r.regenerated for r in self.rows),
            "flagged": sum(len(r.flagged) for r in self.rows),
        }


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
    pinned: set[tuple[str, int]] | frozenset[tuple[str, int]] = frozenset(),
) -> tuple[list[PromptRow], list[tuple[PromptRow, int]]]:
    """The per-prompt rows and the (row, variant) jobs still to generate (``force``: every
    variant but the ``pinned`` (key, variant) ones)."""
    rows, jobs = [], []
    for item in prompt_set.items:
        have = present.get(item.key, set())
        row = PromptRow(item, extra=sum(1 for v in have if v >= variants))
        for variant in range(variants):
            if variant in have and not force:
                row.present += 1
            elif variant in have and (item.key, variant) in pinned:
                row.present += 1
                row.pinned += 1
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
    policy: CheckPolicy | None = None,
    retries: int = CHECK_RETRIES,
    on_start: Callable[[int], None] | None = None,
    on_result: OnResult | None = None,
    on_wait: OnWait | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> WarmupReport:
    """Fill ``store`` with variants 0..N-1 of every prompt of ``prompt_set``, each checked
    under ``policy`` and generated again up to ``retries`` times while it is rejected."""
    started = time.monotonic()
    present = await asyncio.to_thread(store.variants_by_key)
    pinned = await asyncio.to_thread(_pinned, store) if force else set()
    rows, jobs = plan(prompt_set, present, variants, force=force, pinned=pinned)
    timeout = httpx.Timeout(request_timeout, connect=connect_timeout)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
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
            generator = VariantGenerator(
                client, [t.url for t in targets], policy=policy, retries=retries
            )
            await _Runner(generator, store, targets, report, on_result).run(jobs, width)
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
        generator: VariantGenerator,
        store: ResponseStore,
        targets: list[Target],
        report: WarmupReport,
        on_result: OnResult | None,
    ):
        self.generator = generator
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
            try:
                outcome = await self.generator.generate(row.item, variant, variant, home)
            except UnavailableError as exc:
                name = f"prompts[{row.item.index}] variant {variant}"
                self.report.failures.append(f"{name}: {exc.message}")
                self._done(row, variant, "failed")
                continue
            try:
                await asyncio.to_thread(self._store, outcome.entry)
            except StoreError as exc:  # the store is unusable: stop, don't waste generations
                self.store_failed = exc
                self.report.failures.append(f"store: {exc.message}")
                self._done(row, variant, "failed")
                return
            if outcome.rejected:
                row.rejected[variant] = outcome.rejected
            if outcome.entry.flags:
                row.flagged[variant] = outcome.entry.flags
            self._done(row, variant, "flagged" if outcome.entry.flags else "generated")

    def _store(self, entry: Entry) -> None:
        """Write ``entry``; over an earlier answer (``--force``) as its regeneration, the
        old text kept in its history."""
        old = self.store.get(entry.key, entry.variant)
        if old is None:
            self.store.put(entry)
        elif not old.pinned:  # pinned meanwhile: a person chose that one, it stays
            self.store.put(regenerated(old, entry))

    def _done(self, row: PromptRow, variant: int, outcome: Outcome) -> None:
        if outcome == "failed":
            row.failed += 1
        else:
            row.generated += 1
        if self.on_result is not None:
            self.on_result(row.item, variant, outcome)
