"""Answer known prompts from an in-memory copy of the response store.

The hit path is: key the prompt, pick a variant uniformly at random, send bytes built from
the entry. No store query, no backend, no logging per request; hit counts are kept in memory
and written to the store in the background.
"""

from __future__ import annotations

import hmac
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import orjson
from starlette.datastructures import Headers

from comeapi.cache.key import request_key
from comeapi.cache.store import Entry, ResponseStore
from comeapi.errors import RequestError
from comeapi.models.bundled import BUNDLED_MODEL
from comeapi.protocol.requests import Kind
from comeapi.protocol.responses import StreamEncoder, Usage, full_body

log = logging.getLogger("comeapi.gateway.cache")

VARIANT_HEADER = "x-comeapi-variant"
SECRET_HEADER = "x-comeapi-variant-secret"
_PIECES = re.compile(r"\s*\S{1,4}|\s+$")
_JSON = b"application/json"
_SSE = b"text/event-stream"


@dataclass(frozen=True, slots=True)
class Hit:
    """A cached answer ready to send: the body and its raw ASGI headers (status 200)."""

    body: bytes
    headers: list[tuple[bytes, bytes]]

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode()
        return next((v.decode() for k, v in self.headers if k == wanted), None)

    @property
    def variant(self) -> int:
        return int(self.header("x-cache-variant") or -1)


@dataclass(frozen=True, slots=True)
class Lookup:
    """The cache's verdict on one request.

    ``hit`` is set on a hit. On a miss, ``key`` is the prompt's key (None when the body
    has no usable prompt) and ``forced_variant`` the slot a trusted proxy asked for: the
    gateway generates it with that seed and stores it.
    """

    hit: Hit | None
    key: str | None = None
    model: str | None = None
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
        self.store_misses = store_misses
        self._configured_model = default_model
        self._secret = variant_secret.encode() if variant_secret else None
        self._rng = rng or random.SystemRandom()
        self._index: dict[str, tuple[Entry, ...]] = {}
        self._generate_bodies: dict[tuple[str, int], bytes] = {}
        self._models: dict[str, str] = {}
        self.default_model = default_model or BUNDLED_MODEL
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
        aliases = {m: m for m in models}
        aliases.update({m.removesuffix(".gguf"): m for m in models})
        self._stored_hits = self.store.hit_counts()
        self._index, self._models, self._revision = index, aliases, revision
        self._generate_bodies = {}
        if self._configured_model:
            self.default_model = self._configured_model
        elif len(models) == 1:
            self.default_model = next(iter(models))
        log.info("cache: %d prompts, %d answers loaded", len(index), self.answer_count())

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

    def lookup(self, kind: Kind, body: Mapping[str, Any], headers: Headers) -> Lookup:
        key, model = self._key(kind, body)
        if key is None:
            return MISS_UNKEYED
        group = self._index.get(key, ())
        forced = self._forced_variant(headers)
        if forced is not None:
            for entry in group:
                if entry.variant == forced:
                    return self._hit(kind, body, entry)
            self.misses += 1
            return Lookup(None, key, model, forced)
        if group:
            return self._hit(kind, body, group[self._rng.randrange(len(group))])
        self.misses += 1
        return Lookup(None, key, model)

    def _key(self, kind: Kind, body: Mapping[str, Any]) -> tuple[str | None, str]:
        asked = (body.get("model_name") or body.get("model")) if kind == "generate" else None
        asked = asked or body.get("model")
        model = self._models.get(asked, asked) if isinstance(asked, str) else self.default_model
        if kind == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                return None, model
            pairs = []
            for m in messages:
                if not isinstance(m, dict):
                    return None, model
                role, content = m.get("role"), m.get("content")
                if isinstance(content, list):  # OpenAI content parts
                    content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
                if not isinstance(role, str) or not isinstance(content, str):
                    return None, model
                pairs.append((role, content))
            return request_key(model, messages=pairs), model
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt.strip():
            return None, model
        return request_key(model, prompt=prompt), model

    def _forced_variant(self, headers: Headers) -> int | None:
        """The variant a trusted proxy chose; the header is ignored from anyone else."""
        raw = headers.get(VARIANT_HEADER)
        if raw is None or self._secret is None:
            return None
        given = headers.get(SECRET_HEADER, "").encode()
        if not hmac.compare_digest(given, self._secret):
            return None
        if not raw.isdigit() or int(raw) >= self.variants:
            raise RequestError(
                f"{VARIANT_HEADER}: expected 0..{self.variants - 1}, got {raw!r}",
                param=VARIANT_HEADER,
            )
        return int(raw)

    def _hit(self, kind: Kind, body: Mapping[str, Any], entry: Entry) -> Lookup:
        self.hits += 1
        self._pending_hits[(entry.key, entry.variant)] += 1
        usage = Usage(entry.prompt_tokens, entry.completion_tokens)
        if body.get("stream") is True:
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            enc = StreamEncoder(kind, entry.model, include_usage=include_usage)
            chunks = [enc.start()]
            chunks += [enc.delta(piece) for piece in _PIECES.findall(entry.answer)]
            chunks.append(enc.finish(entry.finish_reason, usage))
            payload = b"".join(chunks)
            return Lookup(Hit(payload, _headers(_SSE, payload, entry.variant, stream=True)))
        if kind == "generate":  # no id or timestamp in ComeAPI's body: encode it once
            slot = (entry.key, entry.variant)
            payload = self._generate_bodies.get(slot) or self._encode(kind, entry, usage)
            self._generate_bodies[slot] = payload
        else:
            payload = self._encode(kind, entry, usage)
        return Lookup(Hit(payload, _headers(_JSON, payload, entry.variant)))

    @staticmethod
    def _encode(kind: Kind, entry: Entry, usage: Usage) -> bytes:
        doc = full_body(
            kind,
            model=entry.model,
            text=entry.answer,
            finish_reason=entry.finish_reason,
            usage=usage,
        )
        doc["variant"] = entry.variant
        return orjson.dumps(doc)

    # --- filling slots from forwarded answers --------------------------------------------

    def slot_to_fill(self, key: str) -> int | None:
        """The lowest variant of ``key`` not yet stored (for stored misses), or None if full."""
        present = {e.variant for e in self._index.get(key, ())}
        return next((v for v in range(self.variants) if v not in present), None)

    async def store_answer(
        self, lookup: Lookup, kind: Kind, body: Mapping[str, Any], answer: Mapping[str, Any]
    ) -> None:
        """Store a forwarded answer: in the slot a trusted proxy chose, or (with store_misses)
        in the lowest free slot. The in-memory index follows at once."""
        if lookup.key is None or lookup.model is None:
            return
        variant = lookup.forced_variant
        if variant is None and self.store_misses:
            variant = self.slot_to_fill(lookup.key)
        if variant is None:
            return
        entry = _entry_from_answer(lookup.key, variant, lookup.model, kind, body, answer)
        if entry is None:
            return
        entry = entry.sealed()
        await anyio.to_thread.run_sync(self.store.put, entry)
        group = [e for e in self._index.get(entry.key, ()) if e.variant != variant]
        self._index[entry.key] = tuple(sorted([*group, entry], key=lambda e: e.variant))
        self._generate_bodies.pop((entry.key, variant), None)

    # --- reporting ------------------------------------------------------------------------

    def models(self) -> set[str]:
        return {group[0].model for group in self._index.values() if group}

    def answer_count(self) -> int:
        return sum(len(group) for group in self._index.values())

    def known_prompts(self) -> list[str]:
        return sorted({group[0].prompt for group in self._index.values() if group})

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
                    "hits": sum(hits.values()),
                    "hits_by_variant": {str(v): n for v, n in sorted(hits.items())},
                }
            )
        looked_up = self.hits + self.misses
        return {
            "prompts": len(self._index),
            "answers": self.answer_count(),
            "variants_per_prompt": self.variants,
            "hits": self.hits,
            "misses": self.misses,
            "hit_ratio": round(self.hits / looked_up, 4) if looked_up else None,
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
    key: str,
    variant: int,
    model: str,
    kind: Kind,
    body: Mapping[str, Any],
    answer: Mapping[str, Any],
) -> Entry | None:
    """An Entry from a backend's JSON answer, or None when the answer is not one."""
    try:
        if kind == "generate":
            text, finish = answer["response"], answer.get("finish_reason", "stop")
        else:
            choice = answer["choices"][0]
            text = choice["text"] if kind == "completion" else choice["message"]["content"]
            finish = choice.get("finish_reason") or "stop"
        usage = answer.get("usage") or {}
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(text, str):
        return None
    messages = None
    if kind == "chat":
        messages = tuple((str(m["role"]), _content(m["content"])) for m in body["messages"])
        prompt = next((c for r, c in reversed(messages) if r == "user"), messages[-1][1])
    else:
        raw = body["prompt"]
        prompt = raw[0] if isinstance(raw, list) else raw
    params = {k: body[k] for k in ("max_tokens", "temperature", "top_k", "top_p") if k in body}
    params["seed"] = body.get("seed", variant)
    return Entry(
        key=key,
        variant=variant,
        kind="chat" if kind == "chat" else "prompt",
        prompt=str(prompt).strip(),
        answer=text,
        model=model,  # the model the key was made with, whatever the backend calls it
        messages=messages,
        params=params,
        finish_reason=str(finish),
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)),
        created=time.time(),
    )


def _content(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)
