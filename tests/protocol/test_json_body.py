"""The request body as JSON: what every tier's parser accepts, numbers as JSON writes them,
no deeper than MAX_DEPTH (docs/cache.md, "What a request means", rule 1)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from comeapi.errors import RequestError
from comeapi.protocol import json_body
from comeapi.protocol.json_body import decode_json


@pytest.mark.parametrize("raw", [b"", b"{", b"nul", b"\xff", b"[1]", b'"text"', b"[" * 10_000])
def test_decode_json_refuses_non_objects(raw: bytes) -> None:
    with pytest.raises(RequestError) as err:
        decode_json(raw)
    assert err.value.code == "invalid_json"


def test_decode_json_object() -> None:
    assert decode_json(b'{"prompt": "\\u65e5"}') == {"prompt": "日"}


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": "Hello\\udc00"}',
        b'{"prompt": "Hello", "\\ud800": 1}',
        # replaced by a later duplicate: orjson refuses it all the same (the differential
        # test found the standard library's json letting it through)
        b'{"prompt": "Hello\\udc00", "prompt": "Hello"}',
    ],
)
@pytest.mark.parametrize("parser", ["orjson", "json"])
def test_a_lone_surrogate_is_invalid_json_for_both_parsers(
    raw: bytes, parser: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if parser == "json":  # as in the Lambda package, which has no orjson
        monkeypatch.setattr(json_body, "_loads", lambda: json_body._json_loads)
    with pytest.raises(RequestError) as err:
        decode_json(raw)
    assert err.value.code == "invalid_json"
    assert decode_json(b'{"prompt": "\\ud83d\\ude00"}') == {"prompt": "\U0001f600"}


@pytest.mark.parametrize(
    "number", [b"01", b"00", b"-01", b".5", b"-.5", b"1.", b"1.e5", b"0.", b"+1", b"1e400"]
)
def test_numbers_json_forbids_are_invalid_json(number: bytes) -> None:
    with pytest.raises(RequestError) as err:
        decode_json(b'{"prompt": "x", "top_p": ' + number + b"}")
    assert err.value.code == "invalid_json" and err.value.param is None


def nested(depth: int, leaf: Any = 0) -> Any:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def test_nesting_depth_is_limited_on_the_text() -> None:
    assert json_body.MAX_DEPTH == 31
    assert decode_json(json.dumps({"z": nested(30)}).encode())["z"] == nested(30)
    for body in (
        json.dumps({"z": nested(31)}).encode(),
        # njs refuses while it reads: a deep value replaced by a later duplicate counts too
        b'{"z": ' + json.dumps(nested(31)).encode() + b', "z": 1, "prompt": "x"}',
    ):
        with pytest.raises(RequestError, match="nested more than 31 levels") as err:
            decode_json(body)
        assert err.value.code == "invalid_json" and err.value.param is None
    # Brackets in strings are text, escaped quotes and backslashes included.
    tricky = '\\"[{' * 40 + '\\\\"]' + "\\\\" * 3
    assert decode_json(json.dumps({"prompt": tricky, "z": nested(30)}).encode())


def depth_of(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    return 0


def test_the_depth_scan_agrees_with_the_decoded_value() -> None:
    rng = random.Random(5)
    texts = ["", "x", '"', "\\", "[", "]", "{", "}", '\\"[', '"]{', "日本", "\\u005b"]

    def value(depth: int) -> Any:
        if depth == 0 or rng.random() < 0.05:
            return rng.choice([0, None, "".join(rng.choices(texts, k=rng.randint(0, 6)))])
        # One deep child, its siblings shallow: a few hundred values per document.
        items = [value(depth - 1), *(value(min(depth - 1, 2)) for _ in range(rng.randint(0, 2)))]
        rng.shuffle(items)
        if rng.random() < 0.5:
            return items
        return {"".join(rng.choices(texts, k=2)) + str(i): v for i, v in enumerate(items)}

    for _ in range(2000):
        doc = {"prompt": "x", "z": value(rng.randint(25, 36))}
        raw = json.dumps(doc, ensure_ascii=rng.random() < 0.5).encode()
        assert json_body._too_deep(raw) == (depth_of(doc) > json_body.MAX_DEPTH), raw
