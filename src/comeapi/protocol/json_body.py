"""A request body as JSON, read as strictly on every tier: what orjson (the gateway, the
backend), the standard library's json (the Lambda package) and njs's JSON.parse (nginx,
deploy/nginx/njs/comeapi_key.js, which checks the rest itself) all accept, and no deeper than
``MAX_DEPTH``. docs/cache.md, "What a request means", rule 1; tests/conformance checks it.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable
from typing import Any

from comeapi.errors import RequestError

# Levels of arrays and objects a body's text may nest, its own object included: njs's
# JSON.parse reads no deeper (NJS_JSON_MAX_DEPTH 32: the 32nd is "Nested too deep"), orjson
# reads 1,023, so every tier refuses what nginx cannot read (docs/cache.md, "What a request
# means").
MAX_DEPTH = 31
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
_SQUARE = bytes.maketrans(b"{}", b"[]")


def decode_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or RequestError. A UTF-8 byte order mark is refused, as
    by every JSON parser of the other tiers, and so is nesting deeper than ``MAX_DEPTH``."""
    try:
        body = _loads()(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise RequestError(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object", code="invalid_json")
    # Counting brackets (C speed) spares the scan on every body that cannot be that deep.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _too_deep(raw):
        raise RequestError(
            f"request body is not valid JSON: nested more than {MAX_DEPTH} levels deep",
            code="invalid_json",
        )
    return body


def _too_deep(raw: bytes) -> bool:
    """Whether the JSON text ``raw`` nests more than MAX_DEPTH levels. The text, not the
    decoded value: njs refuses while parsing, so a deep value that a later duplicate key
    replaces counts too. On text orjson has accepted, all in C:
      escaped backslashes, then escaped quotes out: every quote left opens or closes a string;
      quotes and brackets only, and "" out (an empty string, or nothing between two strings);
      what lies between the strings left, with its brackets all written [] (they pair up);
      then each pass removes the pairs adjacent before it: the innermost level.
    """
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    quoted = unescaped.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    brackets = b"".join(quoted.split(b'"')[::2]).translate(_SQUARE)
    for _ in range(MAX_DEPTH):
        brackets = brackets.replace(b"[]", b"")
        if not brackets:
            return False
    return True


@functools.cache
def _loads() -> Callable[[bytes], Any]:
    """orjson where installed (the gateway, the backend); the Lambda package has json only."""
    try:
        import orjson
    except ImportError:
        return _json_loads
    return orjson.loads


def _json_loads(raw: bytes) -> Any:
    """json.loads made to agree with orjson: no byte order mark, NaN, Infinity, numbers
    beyond a double or lone surrogates; integers beyond 64 bits become floats."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raise ValueError("a byte order mark is not JSON")
    text = raw.decode("utf-8")
    value = json.loads(
        text, parse_constant=_no_constant, parse_int=_int64, parse_float=_finite_float
    )
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):
        # Every string of the text, keys and values a later duplicate key replaced included:
        # orjson refuses a lone surrogate wherever it is. Encoding one raises.
        every_string = json.loads(text, object_pairs_hook=lambda pairs: pairs)
        json.dumps(every_string, ensure_ascii=False).encode("utf-8")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _int64(text: str) -> int | float:
    value = int(text)
    return value if -(2**63) <= value < 2**64 else _finite_float(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):
        raise ValueError(f"number {text[:20]} is out of range")
    return value
