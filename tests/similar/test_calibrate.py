"""Calibration's logic on a small labelled set with a stand-in embedder (character
trigrams): which prompts stay exact-only and why, where thresholds land, what is stored.
The real engine on the shipped lists is tests/similar/test_matcher.py."""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence

import numpy as np
import pytest

from comeapi.cache.prompts import parse_prompt_set
from comeapi.errors import ConfigError
from comeapi.similar import Calibration, Matcher, calibrate, upper_bound
from comeapi.similar.engines import Vectors


class TrigramEmbedder:
    """Texts as hashed character trigrams: similar spelling, similar vector."""

    name = "trigrams"

    def embed(self, texts: Sequence[str]) -> Vectors:
        rows = np.zeros((len(texts), 256), dtype=np.float32)
        for i, text in enumerate(texts):
            padded = f"  {text.lower()}  "
            for j in range(len(padded) - 2):
                rows[i, zlib.crc32(padded[j : j + 3].encode()) % 256] += 1.0
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        unit: Vectors = rows / np.maximum(norms, 1e-12)
        return unit


SET = """
prompts:
  - prompt: "How do I brew coffee?"
    same: ["How do I brew good coffee?", "How should I brew coffee?", "How to brew coffee?",
           "How do you brew coffee?", "How do I brew coffee at home?"]
    not: ["How do I brew tea?", "How do I brew beer?", "How do I not brew coffee?",
          "How do I brew 3 coffees?", "Where do I buy coffee?"]
  - prompt: "Tell me a joke"
    same: ["Tell me a funny joke", "Tell me a joke please", "Tell a joke", "A joke, please",
           "Tell me one joke"]
    not: ["Tell me a story", "Tell me two jokes", "Tell me a sad joke", "Explain a joke",
          "Do not tell me a joke"]
  - prompt: "No examples here"
"""


def _calibrated(max_false_hits: float) -> Calibration:
    return calibrate(parse_prompt_set(SET, "t.yaml").items, TrigramEmbedder(), max_false_hits)


def test_prompts_without_paraphrases_or_enough_negatives_stay_exact_only() -> None:
    strict = _calibrated(0.01)  # 1%: 299 negatives would be needed, there are 15
    coffee, joke, bare = strict.prompts
    assert not coffee.enabled and not joke.enabled and not bare.enabled
    assert "15 labelled negatives cannot bound the false-hit rate under 1.00%" in coffee.reason
    assert bare.reason == "no labelled paraphrases (same:)"
    assert coffee.bound == pytest.approx(upper_bound(0, 15))


def test_thresholds_keep_the_bound_within_the_setting() -> None:
    loose = _calibrated(0.2)  # 15 negatives: 0 false hits bound the rate at 18.1%
    for p in loose.prompts[:2]:
        assert p.enabled, p.reason
        assert p.negatives == 15  # every labelled text but its own paraphrases
        assert p.false_hits == 0 and p.bound == pytest.approx(upper_bound(0, 15))
        assert p.bound < 0.2
        assert 0 < p.served <= len(p.same)
        assert p.threshold is not None and 0.0 < p.threshold < 1.0


def test_the_calibration_is_plain_data_that_round_trips_through_json() -> None:
    fitted = _calibrated(0.2)
    again = Calibration.from_dict(json.loads(json.dumps(fitted.to_dict(), ensure_ascii=False)))
    assert again == fitted


@pytest.mark.parametrize(
    "broken",
    [{}, {"v": 2}, {"v": 1, "engine": "x", "max_false_hits": 0.01, "confidence": 0.95,
                    "prompts": [{"key": "k", "kind": "image"}]}],
)  # fmt: skip
def test_a_malformed_calibration_is_a_config_error(broken: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        Calibration.from_dict(broken)


def test_a_calibration_only_works_with_the_engine_that_fitted_it() -> None:
    fitted = _calibrated(0.2)

    class Other(TrigramEmbedder):
        name = "another engine"

    with pytest.raises(ConfigError, match="fitted with 'trigrams'"):
        Matcher(fitted, Other())


def test_matching_with_the_fitted_thresholds() -> None:
    matcher = Matcher(_calibrated(0.2), TrigramEmbedder())
    coffee, joke, _ = matcher.calibration.prompts
    assert matcher.match("How do I brew coffee?", "prompt").key == coffee.key
    assert matcher.match("Tell me a joke", "prompt").key == joke.key
    for refused in ("How do I brew tea?", "Tell me 2 jokes", "Do not tell me a joke"):
        result = matcher.match(refused, "prompt")
        assert not result.hit and result.reason, refused
    # the prompts are /generate prompts: a chat with the same text is another kind
    assert matcher.match("Tell me a joke", "chat").reason == (
        "no known prompt of this kind and context"
    )


def test_a_query_far_longer_than_any_labelled_text_is_refused_unread() -> None:
    matcher = Matcher(_calibrated(0.2), TrigramEmbedder())
    long_query = "How do I brew coffee? " * 20
    assert matcher.match(long_query, "prompt").reason == (
        f"longer than {matcher.max_chars} characters"
    )


def test_the_bound_setting_must_be_a_rate() -> None:
    with pytest.raises(ValueError):
        _calibrated(0.0)
