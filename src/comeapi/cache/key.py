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
M is the model file name (e.g. "gemma-3-270m-q4_k_m.gguf"). A hash keeps every key 64 bytes,
whatever the prompt's length: DynamoDB caps a partition key at 2048 bytes, nginx a cache key
at proxy_buffer_size.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterable, Sequence

from comeapi.errors import RequestError

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


def prompt_key(prompt: str, model: str) -> str:
    return _digest({"model": model, "prompt": normalise(prompt), "v": KEY_VERSION})


def chat_key(messages: Iterable[tuple[str, str]], model: str) -> str:
    canon = [[role, normalise(content)] for role, content in messages]
    return _digest({"messages": canon, "model": model, "v": KEY_VERSION})


def request_key(
    model: str, prompt: str | None = None, messages: Sequence[tuple[str, str]] | None = None
) -> str:
    """The key of a prompt request or, when ``messages`` is given, of a chat request."""
    if messages is not None:
        return chat_key(messages, model)
    if prompt is None:
        raise ValueError("a key needs a prompt or messages")
    return prompt_key(prompt, model)


def _digest(doc: dict[str, object]) -> str:
    canon = json.dumps(doc, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()
