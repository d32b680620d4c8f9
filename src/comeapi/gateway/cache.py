"""The gateway's index of the response store: every answer in memory, looked up by key.

A lookup is: key the request, pick a variant uniformly at random (or the slot a trusted
proxy chose). No store query, no backend, no logging; hits are counted in memory and written
to the store in the background. Which variants may be picked (``serve_states``, pinning:
``comeapi.cache.serving``) is decided when the store is loaded or an answer changes, never
per request. How a hit is encoded is ``cache.replies``; which slot a proxy may force is
``gateway.forced``; what /status shows is ``gateway.cache_status``.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import anyio.to_thread

from comeapi.cache.key import canonical_model, choose_default_model, lookup_key, uncacheable
from comeapi.cache.replies import entry_from_answer
from comeapi.cache.serving import DEFAULT_SERVE_STATES, served_entries
from comeapi.cache.store import Entry, ResponseStore
from comeapi.gateway.misses import MissedQueries
from comeapi.models.bundled import BUNDLED_MODEL
from comeapi.protocol.requests import GenerationRequest
from comeapi.protocol.responses import Answer

if TYPE_CHECKING:  # numpy and the matcher are imported only when match=similar
    from comeapi.gateway.similar import SimilarMatching

log = logging.getLogger("comeapi.gateway.cache")


@dataclass(frozen=True, slots=True)
class Lookup:
    """The cache's verdict on one request.

    ``entry`` is the variant chosen on a hit; ``slot`` is set when it stands in for the slot
    a trusted proxy asked for, whose own variant is not served (``forced.SLOT_HEADER``). On
    a miss, ``key`` is the prompt's key (None when the request asks for what no stored answer
    carries) and ``forced_variant`` the slot a trusted proxy asked for: the gateway generates
    it with that seed and stores it. ``keep`` is False when the forwarded answer will not be
    served from the cache (``forced.NO_STORE_HEADER``).
    """

    entry: Entry | None
    key: str | None = None
    forced_variant: int | None = None
    keep: bool = True  # whether a proxy may keep a forwarded answer to this request
    slot: int | None = None


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
        serve_states: Collection[str] = DEFAULT_SERVE_STATES,
        rng: random.Random | None = None,
        similar: SimilarMatching | None = None,
    ):
        self.store = store
        self.variants = variants
        self.variant_secret = variant_secret
        self.store_misses = store_misses
        #: With match=similar: the store's calibration, loaded with the answers.
        self.similar = similar
        #: The queries missed most often (in memory, this process only).
        self.missed = MissedQueries()
        self.serve_states = frozenset(serve_states)
        # A new answer is pending: may a proxy keep one that the gateway forwarded?
        self._keep_new = "pending" in self.serve_states
        self._configured_model = default_model
        # Uniform, not secret: a Mersenne Twister seeded from os.urandom, rather than a
        # system call per hit (SystemRandom).
        self._rng = rng or random.Random()
        self._index: dict[str, tuple[Entry, ...]] = {}  # every stored variant, by key
        self._served: dict[str, tuple[Entry, ...]] = {}  # the ones served; keys with none left out
        self.default_model = canonical_model(default_model or BUNDLED_MODEL)
        self._revision: int | None = None
        self._pending_hits: Counter[tuple[str, int]] = Counter()
        self._stored_hits: dict[tuple[str, int], int] = {}
        self.hits = 0
        self.misses = 0
        self.similar_hits = 0  # of the hits, requests answered as a prompt they paraphrase
        #: Why the store cannot be read or written right now, for /status (None: all well).
        self.problem: str | None = None

    # --- loading -------------------------------------------------------------------------

    def reload(self) -> None:
        """Read the whole store into memory (blocking: call from a thread once running)."""
        revision = self.store.revision()
        index = self.store.load_index()
        models = {e.model for group in index.values() for e in group}
        self._stored_hits = self.store.hit_counts()
        served = {k: served_entries(g, self.serve_states) for k, g in index.items()}
        self._index, self._revision = index, revision
        self._served = {k: g for k, g in served.items() if g}
        self.default_model = choose_default_model(self._configured_model, models, BUNDLED_MODEL)
        if self.similar is not None:
            self.similar.load(self.store.calibration())
        log.info(
            "cache: %d prompts, %d answers loaded, %d served (%s)",
            len(index),
            self.answer_count(),
            self.served_count(),
            ",".join(sorted(self.serve_states)),
        )

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
        group = self._served.get(key)
        if forced is not None:
            return self._forced(key, group or (), forced)
        if group:
            # random() is one C call; randrange's Python-level rejection loop costs more
            # than the rest of the lookup. The bias of flooring a 53-bit float for a
            # handful of variants is below 1e-15.
            entry = group[int(self._rng.random() * len(group))]
            self.hits += 1
            self._pending_hits[(key, entry.variant)] += 1
            return Lookup(entry)
        self.misses += 1
        return Lookup(None, key, keep=self._keep_new and key not in self._index)

    def similar_hit(self, key: str) -> Entry | None:
        """A served variant of ``key`` for a request that missed its own key but paraphrases
        this prompt (``gateway.similar``): counted as a hit of ``key`` instead of a miss."""
        group = self._served.get(key)
        if not group:
            return None
        entry = group[int(self._rng.random() * len(group))]
        self.misses -= 1
        self.hits += 1
        self.similar_hits += 1
        self._pending_hits[(key, entry.variant)] += 1
        return entry

    def _forced(self, key: str, group: tuple[Entry, ...], forced: int) -> Lookup:
        """The slot a trusted proxy chose: its variant if served; a stored variant that is
        not served is stood in for by a served one (the same one for the same slot); an
        empty slot is generated with its seed."""
        for entry in group:
            if entry.variant == forced:
                self.hits += 1
                self._pending_hits[(key, forced)] += 1
                return Lookup(entry)
        stored = any(e.variant == forced for e in self._index.get(key, ()))
        if stored and group:
            entry = group[forced % len(group)]
            self.hits += 1
            self._pending_hits[(key, entry.variant)] += 1
            return Lookup(entry, slot=forced)
        self.misses += 1
        if stored:  # reviewed out, and nothing served in its place: never overwrite it
            return Lookup(None, key, keep=False)
        return Lookup(None, key, forced, keep=self._keep_new)

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
        self, lookup: Lookup, request: GenerationRequest, answer: Answer | None
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
        await self.put([entry.sealed()])

    async def put(self, entries: Sequence[Entry]) -> None:
        """Write ``entries`` to the store in one write, then into the index at once (what is
        served follows). StoreError if the store refuses them: the index is unchanged."""
        try:
            await anyio.to_thread.run_sync(self.store.put_many, entries)
        except Exception as exc:
            self._failed("write an answer to", exc)
            raise
        for entry in entries:
            group = [e for e in self._index.get(entry.key, ()) if e.variant != entry.variant]
            self._index[entry.key] = tuple(sorted([*group, entry], key=lambda e: e.variant))
        for key in {e.key for e in entries}:
            served = served_entries(self._index[key], self.serve_states)
            if served:
                self._served[key] = served
            else:
                self._served.pop(key, None)

    # --- what it holds ----------------------------------------------------------------------

    def groups(self) -> Mapping[str, tuple[Entry, ...]]:
        """Every key's stored variants, served or not (a read-only view of the index)."""
        return MappingProxyType(self._index)

    def group(self, key: str) -> tuple[Entry, ...]:
        """Every stored variant of ``key`` (served or not), in variant order."""
        return self._index.get(key, ())

    def served_variants(self, key: str) -> tuple[int, ...]:
        return tuple(e.variant for e in self._served.get(key, ()))

    def served_count(self) -> int:
        return sum(len(group) for group in self._served.values())

    def entries(self) -> list[Entry]:
        """Every stored answer, by prompt and variant."""
        return [e for key in sorted(self._index) for e in self._index[key]]

    def models(self) -> set[str]:
        return {group[0].model for group in self._index.values() if group}

    def answer_count(self) -> int:
        return sum(len(group) for group in self._index.values())

    def known_prompts(self) -> list[str]:
        """The prompts a request can hit (those with an answer served)."""
        return sorted({group[0].prompt for group in self._served.values()})

    def hit_count(self, key: str, variant: int) -> int:
        """Hits of one slot since the store began counting, those not yet written included."""
        slot = (key, variant)
        return self._stored_hits.get(slot, 0) + self._pending_hits.get(slot, 0)
