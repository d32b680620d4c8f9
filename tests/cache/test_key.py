"""The cache key: normalisation and hash must never change silently (nginx, DynamoDB and
exported archives depend on the exact bytes)."""

from __future__ import annotations

import hashlib
import unicodedata

import pytest

from comeapi.cache.key import chat_key, normalise, prompt_key, request_key

MODEL = "gemma-3-270m-q4_k_m.gguf"


def test_prompt_key_is_sha256_of_documented_canonical_json() -> None:
    canon = '{"model":"gemma-3-270m-q4_k_m.gguf","prompt":"こんにちは、調子はどうですか？","v":1}'
    expected = hashlib.sha256(canon.encode("utf-8")).hexdigest()
    assert prompt_key("こんにちは、調子はどうですか？", MODEL) == expected
    # Pinned: a change here breaks every cache already exported or deployed.
    assert expected == "93a0e5eb4f12001158e09a71e808169e261303181afbf0f3cd71254f4ce6f83d"


def test_chat_key_is_sha256_of_documented_canonical_json() -> None:
    canon = (
        '{"messages":[["system","Be brief."],["user","Hello"]],'
        '"model":"gemma-3-270m-q4_k_m.gguf","v":1}'
    )
    key = chat_key([("system", "Be brief."), ("user", "Hello")], MODEL)
    assert key == hashlib.sha256(canon.encode("utf-8")).hexdigest()
    assert key == "7221eed36b67a08ff0d339b3bb8ece6b4f1f4708e68505c11300ee8247831386"


def test_nfc_makes_composed_and_decomposed_japanese_equal() -> None:
    composed = "がぎぐげご"
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    assert prompt_key(composed, MODEL) == prompt_key(decomposed, MODEL)
    assert chat_key([("user", decomposed)], MODEL) == chat_key([("user", composed)], MODEL)


@pytest.mark.parametrize("variant", ["a\r\nb", "a\rb", "  a\nb  ", "\ta\nb\n\n", "\u3000a\nb"])
def test_line_endings_and_surrounding_whitespace_do_not_matter(variant: str) -> None:
    assert normalise(variant) == "a\nb"
    assert prompt_key(variant, MODEL) == prompt_key("a\nb", MODEL)


def test_inner_whitespace_and_case_matter() -> None:
    assert prompt_key("a  b", MODEL) != prompt_key("a b", MODEL)
    assert prompt_key("a\n\nb", MODEL) != prompt_key("a\nb", MODEL)
    assert prompt_key("Hello", MODEL) != prompt_key("hello", MODEL)


def test_chat_and_prompt_with_the_same_text_differ() -> None:
    assert prompt_key("Hello", MODEL) != chat_key([("user", "Hello")], MODEL)


def test_roles_order_and_model_are_part_of_the_key() -> None:
    base = chat_key([("system", "S"), ("user", "U")], MODEL)
    assert base != chat_key([("user", "S"), ("user", "U")], MODEL)
    assert base != chat_key([("user", "U"), ("system", "S")], MODEL)
    assert base != chat_key([("system", "S"), ("user", "U")], "other.gguf")
    assert prompt_key("x", MODEL) != prompt_key("x", "other.gguf")


def test_keys_are_64_hex_whatever_the_prompt_length() -> None:
    key = prompt_key("長い" * 10_000, MODEL)
    assert len(key) == 64
    assert int(key, 16) >= 0


def test_request_key_dispatches_on_messages() -> None:
    assert request_key(MODEL, prompt="hi") == prompt_key("hi", MODEL)
    assert request_key(MODEL, messages=[("user", "hi")]) == chat_key([("user", "hi")], MODEL)
    with pytest.raises(ValueError):
        request_key(MODEL)


def test_long_runs_of_combining_marks_are_refused() -> None:
    from comeapi.errors import RequestError

    attack = "a" + "\u0301\u0316" * 60_000  # CPython's NFC of this takes tens of seconds
    with pytest.raises(RequestError):
        normalise(attack)
    # Real text with combining marks (NFD Japanese, stacked accents) is still keyed.
    assert normalise("か\u3099") == "が"
    assert normalise("e" + "\u0301" * 30) == "é" + "\u0301" * 29


def test_the_written_document_is_what_json_dumps_writes() -> None:
    """prompt_key/chat_key write the canonical document by hand: it must be json.dumps's,
    character for character, for any text (quotes, backslashes, controls, U+2028, emoji)."""
    import json
    import random

    rng = random.Random(20261201)
    alphabet = '"\\/\b\f\n\r\t\x00\x01\x1f\x7f a Zé日\u2028\u2029\ufeff😀\U0010ffff'
    for _ in range(500):
        text = "x" + "".join(rng.choice(alphabet) for _ in range(rng.randrange(30))) + "y"
        role = rng.choice(["user", "system", 'a"b'])
        model = rng.choice([MODEL, 'm\\"odel.gguf'])

        def dumped(doc: dict[str, object]) -> str:
            canon = json.dumps(doc, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
            return hashlib.sha256(canon.encode("utf-8")).hexdigest()

        norm = normalise(text)
        assert prompt_key(text, model) == dumped({"model": model, "prompt": norm, "v": 1})
        assert chat_key([(role, text)], model) == dumped(
            {"messages": [[role, norm]], "model": model, "v": 1}
        )
