"""What the backend's HTTP layer needs from an inference engine: the ``Engine`` protocol and
the events it streams (``TextDelta``, ``Finished``).

Two engines implement it: ``SerialEngine`` (one request at a time per process, llama-cpp-python's
high-level ``Llama``) and ``BatchedEngine`` (S slots decoded together, continuous batching);
``server.make_engine`` picks one for the settings.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Protocol

from comeapi.protocol.requests import GenerationRequest
from comeapi.protocol.responses import TokenLogprob, Usage


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of choice ``index``'s text (may hold several tokens, or none of a split UTF-8
    char), with the log probabilities of the tokens it completes when they were asked."""

    text: str
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event of choice ``index``: why it stopped ("stop" or "length"), its prompt's
    tokens and the tokens it generated."""

    reason: str
    usage: Usage
    index: int = 0


Event = TextDelta | Finished


def choice_count(request: GenerationRequest) -> int:
    """Choices in the answer: ``n`` per prompt. Choice ``i`` answers prompt ``i // n``
    (OpenAI's order)."""
    return max(1, len(request.prompts)) * request.n


def total_usage(request: GenerationRequest, finished: Iterable[Finished]) -> Usage:
    """The answer's usage: each prompt's tokens once, every choice's generated tokens."""
    prompt = completion = 0
    for done in finished:
        if done.index % request.n == 0:
            prompt += done.usage.prompt_tokens
        completion += done.usage.completion_tokens
    return Usage(prompt_tokens=prompt, completion_tokens=completion)


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
        """Stream every choice of one request (``choice_count``), their events interleaved;
        it ends after the last choice's ``Finished``. Closing the iterator early (client
        gone) stops it and frees its capacity at once. Raises RequestError /
        ContextLengthError for bad input before the first event."""
        ...

    async def close(self) -> None:
        """Stop every generation and free the models."""
        ...
