"""``TokenCounter``: an edited answer's tokens, counted with the model's own vocabulary (the
bundled GGUF, loaded vocabulary-only), and None when they cannot be counted."""

from __future__ import annotations

from pathlib import Path

import pytest
from llama_cpp import Llama

from comeapi.models.tokens import TokenCounter
from tests.helpers import BUNDLED_MODEL, MODEL_DIR

TEXTS = [
    "Waves on the shore.",
    "日本の首都は東京です。",
    "A line\nand another, with <end_of_turn> typed as text.",
]


@pytest.fixture(scope="module")
def reference() -> Llama:
    """llama-cpp-python's own high-level tokenizer over the same file (another code path)."""
    return Llama(str(MODEL_DIR / BUNDLED_MODEL), vocab_only=True, verbose=False)


@pytest.mark.parametrize("text", TEXTS)
def test_counts_as_the_models_tokenizer_does(reference: Llama, text: str) -> None:
    counter = TokenCounter(MODEL_DIR)
    expected = len(reference.tokenize(text.encode(), add_bos=False, special=False))
    assert expected > 0
    assert counter.count(BUNDLED_MODEL, text) == expected
    # The name without .gguf, as requests may give it.
    assert counter.count(BUNDLED_MODEL.removesuffix(".gguf"), text) == expected


def test_a_longer_text_is_more_tokens() -> None:
    counter = TokenCounter(MODEL_DIR)
    one = counter.count(BUNDLED_MODEL, "The sea.")
    assert one is not None
    assert counter.count(BUNDLED_MODEL, "The sea. " * 50) == pytest.approx(one * 50, rel=0.2)


def test_unknown_when_the_model_is_not_there(tmp_path: Path) -> None:
    assert TokenCounter(MODEL_DIR).count("no-such-model.gguf", "x") is None
    assert TokenCounter(tmp_path / "missing").count(BUNDLED_MODEL, "x") is None


def test_unknown_when_llama_cpp_cannot_read_the_file(tmp_path: Path) -> None:
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    counter = TokenCounter(tmp_path)
    assert counter.count("broken.gguf", "hello") is None
    assert counter.count("broken", "hello") is None  # tried once, remembered
