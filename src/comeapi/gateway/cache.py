"""Answer known prompts from an in-memory copy of the response store.

The hit path is: key the prompt, pick a variant uniformly at random, send bytes built from
the entry. No store query, no backend, no logging per request; hit counts are kept in memory
and written to the store in the background. Which variants may be picked (``serve_states``,
pinning: ``comeapi.cache.serving``) is decided when the store is loaded or an answer changes,
never per request.
"""

from __future__ import annotations

import hmac
import logging
import random
import time
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import anyio.to_thread
import orjson

from comeapi.cache.key import canonical_model, choose_default_model, lookup_key, uncacheable
from comeapi.cache.replies import hit_body, hit_stream
from comeapi.cache.serving import DEFAULT_SERVE_STATES, marks, served_entries
from comeapi.cache.store import Entry, ResponseStore
from comeapi.errors import RequestError
from comeapi.models.bundled import BUNDLED_MODEL
from comeapi.protocol.requests import GenerationRequest

log = logging.getLogger("comeapi.gateway.cache")

VARIANT_HEADER = "x-comeapi-variant"
SECRET_HEADER = "x-comeapi-variant-secret"
#: On an answer to a forced slot whose own variant is not served: the slot asked for (the
#: answer is another, servable variant, named by X-Cache-Variant).
SLOT_HEADER = "x-comeapi-slot"
#: On a forwarded answer the cache would not serve (not reviewed while only approved answers
#: are served, or a prompt whose answers were all turned down): a proxy must not keep it.
NO_STORE_HEADER = "x-comeapi-no-store"
_JSON = b"application/json"
_SSE = b"text/event-stream"


@dataclass(frozen=True, slots=True)
class Hit:
    """A cached answer ready to send: the body and its raw ASGI headers (status 200), and
    the entry it came from (for the request log)."""

    body: bytes
    headers: list[tuple[bytes, bytes]]
    entry: Entry

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode()
        return next((v.decode() for k, v in self.headers if k == wanted), None)

    @property
    def variant(self) -> int:
        return int(self.header("x-cache-variant") or -1)


@dataclass(frozen=True, slots=True)
class Lookup:
    """The cache's verdict on one request.

    ``hit`` is set on a hit. On a miss, ``key`` is the prompt's key (None when the request
    asks for what no stored answer carries) and ``forced_variant`` the slot a trusted proxy
    asked for: the gateway generates it with that seed and stores it. ``keep`` is False when
    the forwarded answer will not be served from the cache (NO_STORE_HEADER).
    """

    hit: Hit | None
    key: str | None = None
    forced_variant: int | None = None
    keep: bool = True  # whether a proxy may keep a forwarded answer to this request


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
    ):
        self.store = store
        self.variants = variants
        self.store_misses = store_misses
        self.serve_states = frozenset(serve_states)
        # A new answer is pending: may a proxy keep one that the gateway forwarded?
        self._keep_new = "pending" in self.serve_states
        self._configured_model = default_model
        self._secret = variant_secret.encode() if variant_secret else None
        # Uniform, not secret: a Mersenne Twister seeded from os.urandom, rather than a
        # system call per hit (SystemRandom).
        self._rng = rng or random.Random()
        self._index: dict[str, tuple[Entry, ...]] = {}  # every stored variant, by key
        self._served: dict[str, tuple[Entry, ...]] = {}  # the ones served; keys with none left out
        self._generate_bodies: dict[tuple[str, int], bytes] = {}
        self.default_model = canonical_model(default_model or BUNDLED_MODEL)
        self._revision: int | None = None
        self._pending_hits: Counter[tuple[str, int]] = Counter()
        self._stored_hits: dict[tuple[str, int], int] = {}
        self.hits = 0
        self.misses = 0

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
        self._generate_bodies = {}
        self.default_model = choose_default_model(self._configured_model, models, BUNDLED_MODEL)
        log.info(
            "cache: %d prompts, %d answers loaded, %d served (%s)",
            len(index),
            self.answer_count(),
            sum(len(g) for g in self._served.values()),
            ",".join(sorted(self.serve_states)),
        )

    async def refresh(self) -> None:
        """Reload if the store changed (an import, a warmup) and write pending hit counts."""
        revision = await anyio.to_thread.run_sync(self.store.revision)
        if revision is None or revision != self._revision:
            await anyio.to_thread.run_sync(self.reload)
        await self.flush_hits()

    async def flush_hits(self) -> None:
        if not self._pending_hits:
            return
        pending, self._pending_hits = self._pending_hits, Counter()
        try:
            await anyio.to_thread.run_sync(self.store.record_hits, pending)
        except Exception:
            self._pending_hits.update(pending)  # keep them for the next flush
            log.exception("cache: could not record hit counts")
            return
        for slot, n in pending.items():
            self._stored_hits[slot] = self._stored_hits.get(slot, 0) + n

    # --- the hit path --------------------------------------------------------------------

    def lookup(self, request: GenerationRequest, forced: int | None = None) -> Lookup:
        """A hit, or the miss's key. ``request`` is already validated: the verdict on a
        body never depends on what the cache holds. ``forced`` is the slot a trusted proxy
        chose (``forced_variant``)."""
        if uncacheable(request) is not None:
            return MISS_UNKEYED
        key = lookup_key(request, self.default_model)
        group = self._served.get(key, ())
        if forced is not None:
            return self._forced(request, key, group, forced)
        if group:
            return self._hit(request, group[self._rng.randrange(len(group))])
        self.misses += 1
        return Lookup(None, key, keep=self._keep_new and key not in self._index)

    def _forced(
        self, request: GenerationRequest, key: str, group: tuple[Entry, ...], forced: int
    ) -> Lookup:
        """The slot a trusted proxy chose: its variant if served; a stored variant that is
        not served is stood in for by a served one (the same one for the same slot); an
        empty slot is generated with its seed."""
        for entry in group:
            if entry.variant == forced:
                return self._hit(request, entry)
        stored = any(e.variant == forced for e in self._index.get(key, ()))
        if stored and group:
            return self._hit(request, group[forced % len(group)], slot=forced)
        self.misses += 1
        if stored:  # reviewed out, and nothing served in its place: never overwrite it
            return Lookup(None, key, keep=False)
        return Lookup(None, key, forced, keep=self._keep_new)

    def forced_variant(self, variant: bytes | None, secret: bytes) -> int | None:
        """The variant a trusted proxy chose (X-Comeapi-Variant with the shared secret in
        X-Comeapi-Variant-Secret); the header is ignored from anyone else."""
        if variant is None or self._secret is None:
            return None
        if not hmac.compare_digest(secret, self._secret):
            return None
        if not variant.isdigit() or int(variant) >= self.variants:
            raise RequestError(
                f"{VARIANT_HEADER}: expected 0..{self.variants - 1}, got {variant.decode()!r}",
                param=VARIANT_HEADER,
            )
        return int(variant)

    def _hit(self, request: GenerationRequest, entry: Entry, slot: int | None = None) -> Lookup:
        self.hits += 1
        self._pending_hits[(entry.key, entry.variant)] += 1
        if request.stream:
            payload = hit_stream(request, entry)
            headers = _headers(_SSE, payload, entry.variant, stream=True)
        elif request.kind == "generate":  # no id or timestamp in ComeAPI's body: encode it once
            cached = (entry.key, entry.variant)
            payload = self._generate_bodies.get(cached) or orjson.dumps(hit_body("generate", entry))
            self._generate_bodies[cached] = payload
            headers = _headers(_JSON, payload, entry.variant)
        else:
            payload = orjson.dumps(hit_body(request.kind, entry))
            headers = _headers(_JSON, payload, entry.variant)
        if slot is not None:
            headers.append((SLOT_HEADER.encode(), str(slot).encode()))
        return Lookup(Hit(payload, headers, entry))

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
        entry = _entry_from_answer(lookup.key, variant, model, request, answer)
        if entry is None:
            return
        await self.put([entry.sealed()])

    async def put(self, entries: Sequence[Entry]) -> None:
        """Write ``entries`` to the store in one write, then into the index at once (what is
        served follows). StoreError if the store refuses them: the index is unchanged."""
        await anyio.to_thread.run_sync(self.store.put_many, entries)
        for entry in entries:
            group = [e for e in self._index.get(entry.key, ()) if e.variant != entry.variant]
            self._index[entry.key] = tuple(sorted([*group, entry], key=lambda e: e.variant))
            self._generate_bodies.pop((entry.key, entry.variant), None)
        for key in {e.key for e in entries}:
            served = served_entries(self._index[key], self.serve_states)
            if served:
                self._served[key] = served
            else:
                self._served.pop(key, None)

    def groups(self) -> Mapping[str, tuple[Entry, ...]]:
        """Every stored variant by key (a read-only view of the index)."""
        return MappingProxyType(self._index)

    def group(self, key: str) -> tuple[Entry, ...]:
        """Every stored variant of ``key`` (served or not), in variant order."""
        return self._index.get(key, ())

    def served_variants(self, key: str) -> tuple[int, ...]:
        return tuple(e.variant for e in self._served.get(key, ()))

    def entries(self) -> list[Entry]:
        """Every stored answer, by prompt and variant."""
        return [e for key in sorted(self._index) for e in self._index[key]]

    # --- reporting ------------------------------------------------------------------------

    def models(self) -> set[str]:
        return {group[0].model for group in self._index.values() if group}

    def answer_count(self) -> int:
        return sum(len(group) for group in self._index.values())

    def known_prompts(self) -> list[str]:
        """The prompts a request can hit (those with an answer served)."""
        return sorted({group[0].prompt for group in self._served.values()})

    def status(self) -> dict[str, Any]:
        prompts = []
        for key, group in self._index.items():
            hits = {e.variant: self._hit_total(key, e.variant) for e in group}
            prompts.append(
                {
                    "key": key,
                    "prompt": group[0].prompt,
                    "kind": group[0].kind,
                    "model": group[0].model,
                    "variants": len(group),
                    "served_variants": list(self.served_variants(key)),
                    "marks": marks(group),
                    "hits": sum(hits.values()),
                    "hits_by_variant": {str(v): n for v, n in sorted(hits.items())},
                }
            )
        looked_up = self.hits + self.misses
        return {
            "prompts": len(self._index),
            "answers": self.answer_count(),
            "served_answers": sum(len(g) for g in self._served.values()),
            "serve_states": sorted(self.serve_states),
            "variants_per_prompt": self.variants,
            "hits": self.hits,
            "misses": self.misses,
            "hit_ratio": round(self.hits / looked_up, 4) if looked_up else None,
            "store_problem": self.store.problem,
            "by_prompt": sorted(prompts, key=lambda p: p["prompt"]),
        }

    def _hit_total(self, key: str, variant: int) -> int:
        slot = (key, variant)
        return self._stored_hits.get(slot, 0) + self._pending_hits.get(slot, 0)


def _headers(
    content_type: bytes, body: bytes, variant: int, *, stream: bool = False
) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"x-cache", b"HIT"),
        (b"x-cache-variant", str(variant).encode()),
    ]
    if stream:
        headers.append((b"cache-control", b"no-cache"))
    return headers


def _entry_from_answer(
    key: str, variant: int, model: str, request: GenerationRequest, answer: Mapping[str, Any]
) -> Entry | None:
    """An Entry from a backend's JSON answer, or None when the answer is not one."""
    kind = request.kind
    try:
        if kind == "generate":
            text, finish = answer["response"], answer.get("finish_reason", "stop")
        else:
            choice = answer["choices"][0]
            text = choice["text"] if kind == "completion" else choice["message"]["content"]
            finish = choice.get("finish_reason") or "stop"
        usage = answer.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens", 0))
        completion_tokens = int(usage.get("completion_tokens", 0))
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    if not isinstance(text, str):
        return None
    messages = None
    if request.messages is not None:
        messages = tuple((m.role, m.content) for m in request.messages)
        prompt = next((c for r, c in reversed(messages) if r == "user"), messages[-1][1])
    else:
        assert request.prompt is not None
        prompt = request.prompt
    params: dict[str, Any] = {
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_k": request.top_k,
        "top_p": request.top_p,
        "seed": request.seed if request.seed is not None else variant,
    }
    return Entry(
        key=key,
        variant=variant,
        kind="chat" if messages is not None else "prompt",
        prompt=prompt.strip(),
        answer=text,
        model=model,  # the model the key was made with, whatever the backend calls it
        messages=messages,
        params={k: v for k, v in params.items() if v is not None},
        finish_reason=str(finish),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        created=time.time(),
    )
