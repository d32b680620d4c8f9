"""The gateway's index of the response store: every answer in memory, looked up by key.

A lookup is: key the request, pick a variant uniformly at random (or the slot a trusted
proxy chose). No store query, no backend, no logging; hits are counted in memory and written
to the store in the background. How a hit is encoded is ``cache.replies``; which slot a
proxy may force is ``gateway.forced``; what /status shows is ``gateway.cache_status``.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio.to_thread

from comeapi.cache.key import canonical_model, choose_default_model, lookup_key, uncacheable
from comeapi.cache.replies import entry_from_answer
from comeapi.cache.store import Entry, ResponseStore
from comeapi.models.bundled import BUNDLED_MODEL
from comeapi.protocol.requests import GenerationRequest

log = logging.getLogger("comeapi.gateway.cache")


@dataclass(frozen=True, slots=True)
class Lookup:
    """The cache's verdict on one request.

    ``entry`` is the variant chosen on a hit. On a miss, ``key`` is the prompt's key (None
    when the request asks for what no stored answer carries) and ``forced_variant`` the slot
    a trusted proxy asked for: the gateway generates it with that seed and stores it.
    """

    entry: Entry | None
    key: str | None = None
    forced_variant: int | None = None


MISS_UNKEYED = Lookup(None)


class ResponseCache:
    """The gateway's view of a ResponseStore: an index in memory, hits counted in memory."""

    def __init__(
        self,
        store: ResponseStore,
        *,
        variants: int,
        default_model: str | None = None,
        variant_secret: str | None = None,
        store_misses: bool = False,
        rng: random.Random | None = None,
    ):
        self.store = store
        self.variants = variants
        self.variant_secret = variant_secret
        self.store_misses = store_misses
        self._configured_model = default_model
        # Uniform, not secret: a Mersenne Twister seeded from os.urandom, rather than a
        # system call per hit (SystemRandom).
        self._rng = rng or random.Random()
        self._index: dict[str, tuple[Entry, ...]] = {}
        self.default_model = canonical_model(default_model or BUNDLED_MODEL)
        self._revision: int | None = None
        self._pending_hits: Counter[tuple[str, int]] = Counter()
        self._stored_hits: dict[tuple[str, int], int] = {}
        self.hits = 0
        self.misses = 0
        #: Why the store cannot be read or written right now, for /status (None: all well).
        self.problem: str | None = None

    # --- loading -------------------------------------------------------------------------

    def reload(self) -> None:
        """Read the whole store into memory (blocking: call from a thread once running)."""
        revision = self.store.revision()
        index = self.store.load_index()
        models = {e.model for group in index.values() for e in group}
        self._stored_hits = self.store.hit_counts()
        self._index, self._revision = index, revision
        self.default_model = choose_default_model(self._configured_model, models, BUNDLED_MODEL)
        log.info("cache: %d prompts, %d answers loaded", len(index), self.answer_count())

    async def refresh(self) -> None:
        """Reload if the store changed (an import, a warmup) and write pending hit counts.
        A store that cannot be read or written is said once (a warning and ``problem``),
        not at every refresh; the answers loaded are served meanwhile, hits kept."""
        try:
            revision = await anyio.to_thread.run_sync(self.store.revision)
            if revision is None or revision != self._revision:
                await anyio.to_thread.run_sync(self.reload)
        except Exception as exc:
            self._failed("read", exc)
            return
        await self.flush_hits()

    async def flush_hits(self) -> None:
        if not self._pending_hits:
            self._recovered()
            return
        pending, self._pending_hits = self._pending_hits, Counter()
        try:
            await anyio.to_thread.run_sync(self.store.record_hits, pending)
        except Exception as exc:
            self._pending_hits.update(pending)  # keep them for the next flush
            self._failed("write hit counts to", exc)
            return
        self._recovered()
        for slot, n in pending.items():
            self._stored_hits[slot] = self._stored_hits.get(slot, 0) + n

    def _failed(self, action: str, exc: Exception) -> None:
        problem = f"cannot {action} the store: {getattr(exc, 'message', None) or exc}"
        if self.problem is None:
            log.warning("cache: %s; serving the answers loaded, retrying at each refresh", problem)
        else:
            log.debug("cache: still %s", problem)
        self.problem = problem

    def _recovered(self) -> None:
        if self.problem is not None:
            log.warning("cache: the store works again (was: %s)", self.problem)
            self.problem = None

    # --- the hit path --------------------------------------------------------------------

    def lookup(self, request: GenerationRequest, forced: int | None = None) -> Lookup:
        """A hit, or the miss's key. ``request`` is already validated: the verdict on a
        body never depends on what the cache holds. ``forced`` is the slot a trusted proxy
        chose (``gateway.forced``)."""
        if uncacheable(request) is not None:
            return MISS_UNKEYED
        return self.lookup_key(lookup_key(request, self.default_model), forced)

    def lookup_key(self, key: str, forced: int | None = None) -> Lookup:
        """``lookup`` for a request whose key is known (``key_of``)."""
        group = self._index.get(key)
        if group:
            if forced is None:
                # random() is one C call; randrange's Python-level rejection loop costs
                # more than the rest of the lookup. The bias of flooring a 53-bit float
                # for a handful of variants is below 1e-15.
                entry = group[int(self._rng.random() * len(group))]
                self.hits += 1
                self._pending_hits[(key, entry.variant)] += 1
                return Lookup(entry)
            for entry in group:
                if entry.variant == forced:
                    self.hits += 1
                    self._pending_hits[(key, forced)] += 1
                    return Lookup(entry)
        self.misses += 1
        return Lookup(None, key, forced)

    def key_of(self, request: GenerationRequest) -> str | None:
        """The key ``lookup`` would use for ``request``, None when no stored answer fits it."""
        if uncacheable(request) is not None:
            return None
        return lookup_key(request, self.default_model)

    # --- filling slots from forwarded answers --------------------------------------------

    def slot_to_fill(self, key: str) -> int | None:
        """The lowest variant of ``key`` not yet stored (for stored misses), or None if full."""
        present = {e.variant for e in self._index.get(key, ())}
        return next((v for v in range(self.variants) if v not in present), None)

    async def store_answer(
        self, lookup: Lookup, request: GenerationRequest, answer: Mapping[str, Any]
    ) -> None:
        """Store a forwarded answer: in the slot a trusted proxy chose, or (with store_misses)
        in the lowest free slot. The in-memory index follows at once. StoreError if the
        store refuses the write."""
        if lookup.key is None:
            return
        variant = lookup.forced_variant
        if variant is None and self.store_misses:
            variant = self.slot_to_fill(lookup.key)
        if variant is None:
            return
        model = canonical_model(request.model or self.default_model)
        entry = entry_from_answer(lookup.key, variant, model, request, answer)
        if entry is None:
            return
        entry = entry.sealed()
        try:
            await anyio.to_thread.run_sync(self.store.put, entry)
        except Exception as exc:
            self._failed("write an answer to", exc)
            raise
        group = [e for e in self._index.get(entry.key, ()) if e.variant != variant]
        self._index[entry.key] = tuple(sorted([*group, entry], key=lambda e: e.variant))

    # --- what it holds ----------------------------------------------------------------------

    def groups(self) -> Mapping[str, tuple[Entry, ...]]:
        """Every key's stored variants (read-only)."""
        return self._index

    def models(self) -> set[str]:
        return {group[0].model for group in self._index.values() if group}

    def answer_count(self) -> int:
        return sum(len(group) for group in self._index.values())

    def known_prompts(self) -> list[str]:
        return sorted({group[0].prompt for group in self._index.values() if group})

    def hit_count(self, key: str, variant: int) -> int:
        """Hits of one slot since the store began counting, those not yet written included."""
        slot = (key, variant)
        return self._stored_hits.get(slot, 0) + self._pending_hits.get(slot, 0)
