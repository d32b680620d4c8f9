"""The queries the cache missed most often, with the nearest known prompt and its score, so
an operator sees which paraphrases to label (``comeapi cache label``) or prompts to add.

Kept in memory per gateway process (each worker counts its own; a restart starts again):
a store write per miss would put the store on the miss path of every tier, and these counts
are a hint for labelling, not a record. Bounded: at most ``size`` distinct queries, the
least counted dropped first when a new one comes. What is kept is the query's normalised
text (a prompt, or a chat's last user message, cut to ``MAX_CHARS``), its kind, counts and
what the matcher said; never a header, so never an API key.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from comeapi.cache.key import normalise
from comeapi.protocol.requests import GenerationRequest

MAX_QUERIES = 1000
MAX_CHARS = 300

Context = tuple[tuple[str, str], ...]


def query_of(request: GenerationRequest) -> tuple[str, Context, str] | None:
    """The part of a request matched by meaning: (kind, the messages before it, text); None
    for a chat that does not end with a user message."""
    if request.messages is None:
        return "prompt", (), request.prompt or ""
    *before, last = ((m.role, m.content) for m in request.messages)
    if last[0] != "user":
        return None
    return "chat", tuple(before), last[1]


@dataclass(slots=True)
class MissedQuery:
    text: str
    kind: str
    count: int
    last_seen: float
    nearest: str | None = None  # the nearest known prompt (with --match similar)
    score: float | None = None
    reason: str | None = None  # why it was not answered as that prompt

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.text,
            "kind": self.kind,
            "count": self.count,
            "last_seen": round(self.last_seen, 3),
            "nearest_prompt": self.nearest,
            "score": None if self.score is None else round(self.score, 3),
            "reason": self.reason,
        }


class MissedQueries:
    """Counts of missed queries, at most ``size`` of them."""

    def __init__(self, size: int = MAX_QUERIES):
        self.size = size
        self._seen: dict[tuple[str, str], MissedQuery] = {}

    def add(
        self,
        request: GenerationRequest,
        nearest: str | None = None,
        score: float | None = None,
        reason: str | None = None,
    ) -> None:
        slot = _slot(request)
        if slot is None:
            return
        kind, text = slot
        seen = self._seen.get(slot)
        if seen is None:
            if len(self._seen) >= self.size:
                # The least counted (the oldest of those) makes room: a query missed often
                # stays however many one-off queries come after it.
                drop = min(self._seen, key=lambda k: (self._seen[k].count, self._seen[k].last_seen))
                del self._seen[drop]
            seen = self._seen[slot] = MissedQuery(text, kind, 0, 0.0)
        seen.count += 1
        seen.last_seen = time.time()
        if nearest is not None:  # a repeat is matched without naming its nearest prompt
            seen.nearest, seen.score = nearest, score
        if reason is not None:
            seen.reason = reason

    def __contains__(self, request: object) -> bool:
        """Whether this request's query was counted already."""
        if not isinstance(request, GenerationRequest):
            return False
        slot = _slot(request)
        return slot is not None and slot in self._seen

    def top(self, n: int) -> list[dict[str, Any]]:
        """The ``n`` most missed, most first."""
        ranked = sorted(self._seen.values(), key=lambda q: (-q.count, -q.last_seen))
        return [q.to_dict() for q in ranked[:n]]

    def __len__(self) -> int:
        return len(self._seen)


def _slot(request: GenerationRequest) -> tuple[str, str] | None:
    query = query_of(request)
    return None if query is None else (query[0], normalise(query[2])[:MAX_CHARS])
