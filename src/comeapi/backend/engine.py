"""What the backend's HTTP layer needs from an inference engine.

Two engines implement it: ``SerialEngine`` (one request at a time per process, llama-cpp-python's
high-level ``Llama``) and ``BatchedEngine`` (S slots decoded together, continuous batching).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from comeapi.protocol.requests import GenerationRequest
from comeapi.protocol.responses import Usage


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of generated text (may hold several tokens, or none of a split UTF-8 char)."""

    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event of a generation: why it stopped ("stop" or "length") and token counts."""

    reason: str
    usage: Usage


Event = TextDelta | Finished


class Engine(Protocol):
    @property
    def capacity(self) -> int:
        """Requests it can run at once."""
        ...

    @property
    def in_flight(self) -> int:
        """Requests running or admitted now."""
        ...

    @property
    def ready(self) -> bool:
        """True once the default model is loaded and work can be taken."""
        ...

    def loaded_models(self) -> list[str]:
        """Names of the models in memory now."""
        ...

    async def start(self) -> None:
        """Load the default model (off the event loop)."""
        ...

    def generate(self, request: GenerationRequest, model_name: str) -> AsyncIterator[Event]:
        """Stream one generation. Closing the iterator early (client gone) stops it and frees
        its capacity at once. Raises RequestError/ContextLengthError for bad input."""
        ...

    async def close(self) -> None:
        """Stop every generation and free the models."""
        ...
