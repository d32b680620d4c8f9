"""The cache key: one normalisation and one hash, shared by every store and deployment.

Normalisation of each text (a prompt, or each message's content):
  1. Unicode NFC (the same Japanese text typed on macOS and Linux compares equal);
  2. line endings CRLF and CR become LF;
  3. surrounding whitespace (as ``str.strip`` sees it) is removed.
Text with more than 30 combining marks in a row is refused (RequestError), see below.
Inner whitespace is kept: it can change what a prompt means.

The key is the lowercase hex SHA-256 of the UTF-8 of a canonical JSON document
(keys sorted, no spaces, non-ASCII kept as is):
  prompt requests (/generate, /v1/completions): {"model":M,"prompt":P,"v":1}
  chat requests (/v1/chat/completions):         {"messages":[[ROLE,CONTENT],...],"model":M,"v":1}
M is the model file name (e.g. "gemma-3-270m-q4_k_m.gguf"); a name without ".gguf" is the same
model (``canonical_model``). A hash keeps every key 64 bytes,
whatever the prompt's length: DynamoDB caps a partition key at 2048 bytes, nginx a cache key
at proxy_buffer_size.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable, Sequence
from json.encoder import encode_basestring as _json_string
from typing import TYPE_CHECKING

from comeapi.errors import RequestError

if TYPE_CHECKING:
    from comeapi.protocol.requests import GenerationRequest

KEY_VERSION = 1
MAX_COMBINING_RUN = 30


def normalise(text: str) -> str:
    if not unicodedata.is_normalized("NFC", text):
        _check_stream_safe(text)
    return unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n").strip()


def _check_stream_safe(text: str) -> None:
    """RequestError for a run of more than 30 combining marks (UAX #15's stream-safe limit).

    CPython's NFC reorders such a run in quadratic time: 12,000 marks took 88 ms here, a
    256 KiB body would hold the event loop for seconds. No real text needs such a run.
    """
    run = 0
    for ch in text:
        if unicodedata.combining(ch):
            run += 1
            if run > MAX_COMBINING_RUN:
                raise RequestError(
                    f"the prompt has more than {MAX_COMBINING_RUN} combining marks in a row",
                    param="prompt",
                    code="invalid_unicode",
                )
        else:
            run = 0


# The canonical document is written directly, with json's own C string encoder: exactly what
# json.dumps(doc, ensure_ascii=False, separators=(",", ":"), sort_keys=True) writes
# (tests/cache/test_key.py checks it), at a fifth of the cost on the hit path.
_VERSION_TAIL = f',"v":{KEY_VERSION}}}'


def prompt_key(prompt: str, model: str) -> str:
    q = _json_string
    doc = '{"model":' + q(canonical_model(model)) + ',"prompt":' + q(normalise(prompt))
    return _sha256(doc + _VERSION_TAIL)


def chat_key(messages: Iterable[tuple[str, str]], model: str) -> str:
    q = _json_string
    pairs = ",".join(f"[{q(role)},{q(normalise(content))}]" for role, content in messages)
    return _sha256(
        '{"messages":[' + pairs + '],"model":' + q(canonical_model(model)) + _VERSION_TAIL
    )


def request_key(
    model: str, prompt: str | None = None, messages: Sequence[tuple[str, str]] | None = None
) -> str:
    """The key of a prompt request or, when ``messages`` is given, of a chat request."""
    if messages is not None:
        return chat_key(messages, model)
    if prompt is None:
        raise ValueError("a key needs a prompt or messages")
    return prompt_key(prompt, model)


def canonical_model(name: str) -> str:
    """The model file a name means: "gemma-3-270m-q4_k_m" is "gemma-3-270m-q4_k_m.gguf"."""
    return name if name.endswith(".gguf") else name + ".gguf"


def choose_default_model(configured: str | None, cached: Iterable[str], bundled: str) -> str:
    """The model a request that names none means, on every tier: the configured default;
    else the only model the cache holds; else the bundled model."""
    if configured:
        return canonical_model(configured)
    models = set(cached)
    return models.pop() if len(models) == 1 else bundled


def uncacheable(request: GenerationRequest) -> str | None:
    """The field that asks for something a stored answer does not carry, or None.

    A cached answer is one text, generated once: it cannot answer a request for several
    choices, log probabilities, a format (or a grammar), tools, echoed prompts, a new
    document (OpenAI's null prompt), or about an image. Sampling
    fields (temperature, top_p, top_k, max_tokens, seed, stop, penalties) are ignored on
    purpose: the stored variants were generated with warmup's own parameters.
    """
    if request.messages is not None:
        for i, message in enumerate(request.messages):
            if message.media:
                return f"messages.{i}.content"
    if len(request.prompts) > 1 or request.prompt == "":
        return "prompt"  # several prompts, or OpenAI's null prompt (a new document's start)
    if request.n > 1:
        return "n"
    if request.logprobs:
        return "logprobs"
    if request.logit_bias:
        return "logit_bias"
    if request.response_format is not None:
        return request.response_format.field  # response_format, grammar or json_schema
    if request.echo:
        return "echo"
    if request.tools and request.tool_choice != "none":
        return "tools"
    return None


def lookup_key(request: GenerationRequest, default_model: str) -> str:
    """The key of a validated request (check ``uncacheable`` first)."""
    model = request.model or default_model
    if request.messages is not None:
        return chat_key(((m.role, m.content) for m in request.messages), model)
    assert request.prompt is not None
    return prompt_key(request.prompt, model)


def _sha256(doc: str) -> str:
    return hashlib.sha256(doc.encode("utf-8")).hexdigest()
