"""A stored answer as the client gets it, the same on every tier that serves it (the gateway,
the Lambda handler; nginx replays the gateway's bytes)."""

from __future__ import annotations

from typing import Any

from comeapi.cache.store import Entry
from comeapi.protocol.requests import GenerationRequest, Kind
from comeapi.protocol.responses import StreamEncoder, Usage, full_body


def hit_body(kind: Kind, entry: Entry) -> dict[str, Any]:
    """The JSON answer of a hit: the route's shape, plus the variant it is."""
    usage = Usage(entry.prompt_tokens, entry.completion_tokens)
    doc = full_body(
        kind, model=entry.model, text=entry.answer, finish_reason=entry.finish_reason, usage=usage
    )
    doc["variant"] = entry.variant
    return doc


def hit_stream(request: GenerationRequest, entry: Entry) -> bytes:
    """The SSE answer of a streamed hit: about one word per chunk, as a live stream."""
    usage = Usage(entry.prompt_tokens, entry.completion_tokens)
    encoder = StreamEncoder(request.kind, entry.model, include_usage=request.include_usage)
    return encoder.answer(entry.answer, entry.finish_reason, usage)
