"""The matcher with the real default engine (USE), calibrated on examples/requirements-prompts.yaml
at the default bound (1%): which queries it answers as which prompt, and which it refuses."""

from __future__ import annotations

import pytest

from comeapi.cache.prompts import load_prompt_set
from tests.similar.conftest import HELDOUT, Calibrated

pytestmark = pytest.mark.slow

COFFEE_SYSTEM = (("system", "You are a helpful assistant. Answer briefly."),)


def _key(calibrated: Calibrated, text: str) -> str:
    return next(p.key for p in calibrated.calibration.prompts if p.text == text)


def test_every_shipped_prompt_is_calibrated_within_the_bound(calibrated: Calibrated) -> None:
    for p in calibrated.calibration.prompts:
        assert p.enabled, (p.text, p.reason)
        assert p.bound <= 0.01 and p.negatives >= 299
        assert p.served_share >= 0.4, p.text  # leave-one-out, on the calibration lists


JAPAN, PARALLEL = "日本の首都はどこですか？", "Python並列処理について説明してください"
COFFEE, TOKYO = "How do I make a good cup of coffee?", "東京でおすすめの観光地を教えてください。"


@pytest.mark.parametrize(
    ("query", "kind", "context", "prompt"),
    [
        ("What is the capital of Japan?", "prompt", (), JAPAN),
        ("日本の首都は？", "prompt", (), JAPAN),
        ("Pythonの並列処理について説明してください。", "prompt", (), PARALLEL),
        ("美味しいコーヒーの淹れ方を教えてください。", "chat", COFFEE_SYSTEM, COFFEE),
        ("東京の観光名所を教えて", "chat", (), TOKYO),
        # a yes/no question where a paraphrase in that form was labelled (お元気ですか？)
        ("お元気ですか？", "prompt", (), "こんにちは、調子はどうですか？"),
    ],
)
def test_paraphrases_are_answered_as_their_prompt(
    calibrated: Calibrated, query: str, kind: str, context: tuple[tuple[str, str], ...], prompt: str
) -> None:
    result = calibrated.matcher.match(query, kind, context)  # type: ignore[arg-type]
    assert result.key == _key(calibrated, prompt), result
    assert result.score >= calibrated.calibration.by_key()[result.key].threshold  # type: ignore[operator]


@pytest.mark.parametrize(
    ("query", "kind", "context"),
    [
        ("韓国の首都はどこですか？", "prompt", ()),
        ("What was the capital of Japan before Tokyo?", "prompt", ()),
        ("The five most important things to know about Python are", "prompt", ()),
        ("How do I make a good cup of tea?", "chat", COFFEE_SYSTEM),
        ("Hello! What can I help you with?", "chat", ()),
        ("東京でおすすめしない観光地を教えてください。", "chat", ()),
        # the right question in the wrong place: no system message, or as a /generate prompt
        ("How do I make a good cup of coffee?", "chat", ()),
        ("How do I make a good cup of coffee?", "prompt", ()),
        ("Tell me about quantum physics.", "prompt", ()),
        # all words known, yet another question: less than the prompt asks, or yes/no
        ("What is parallel processing?", "prompt", ()),
        ("Is coffee good?", "chat", COFFEE_SYSTEM),
        # yes/no questions, while the nearest paraphrase asks how, what or where
        ("Can Python do parallel processing?", "prompt", ()),
        ("東京は観光におすすめですか？", "chat", ()),
        ("Pythonで並列処理はできますか？", "prompt", ()),
    ],
)
def test_near_neighbours_and_other_questions_are_refused(
    calibrated: Calibrated, query: str, kind: str, context: tuple[tuple[str, str], ...]
) -> None:
    result = calibrated.matcher.match(query, kind, context)  # type: ignore[arg-type]
    assert not result.hit and result.reason, result


def test_a_query_no_prompt_could_take_is_refused_before_it_is_embedded(
    calibrated: Calibrated,
) -> None:
    result = calibrated.matcher.match("Tell me about quantum physics.", "prompt")
    assert result.reason is not None and result.reason.startswith("every known prompt refused")
    assert result.nearest is None and result.score == 0.0


def test_the_held_out_lists_zero_false_hits_and_most_paraphrases_served(
    calibrated: Calibrated,
) -> None:
    """The issue's numbers on tests/similar/heldout.yaml, which calibration never sees: no
    near neighbour answered, no paraphrase answered as another prompt, at least 70% of the
    paraphrases served, and of the cross-language ones too."""
    served = cross = cross_served = same = 0
    wrong, false_hits = [], []
    for item in load_prompt_set(HELDOUT).items:
        context = () if item.messages is None else item.messages[:-1]
        shown = item.prompt if item.messages is None else item.messages[-1][1]
        for query in item.same:
            key = calibrated.matcher.match(query, item.kind, context).key
            same += 1
            served += key == item.key
            if _japanese(query) != _japanese(shown):
                cross += 1
                cross_served += key == item.key
            if key is not None and key != item.key:
                wrong.append(query)
        for query in item.not_:
            if calibrated.matcher.match(query, item.kind, context).hit:
                false_hits.append(query)
    assert false_hits == [] and wrong == []
    assert served / same >= 0.7 and cross_served / cross >= 0.7, (served, cross_served, cross)


def _japanese(text: str) -> bool:
    return any("\u3040" <= ch <= "\u30ff" or "\u4e00" <= ch <= "\u9fff" for ch in text)
