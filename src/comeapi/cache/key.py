"""The cache key: one normalisation and one hash, shared by every store and deployment.

Normalisation of each text (a prompt, or each message's content):
  1. Unicode NFC (the same Japanese text typed on macOS and Linux compares equal);
  2. line endings CRLF and CR become LF;
  3. surrounding whitespace (as ``str.strip`` sees it) is removed.
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

KEY_VERSION = 1


def normalise(text: str) -> str:
    return unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n").strip()


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
