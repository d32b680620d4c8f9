"""The guards refuse the near neighbours that embeddings score as paraphrases.

The pairs are of the kinds peers serve as false hits: opposite questions (GPTCache issue #694;
vLLM semantic-router #2691: "turn on" / "turn off dark mode" at cosine 0.9+), another number,
another place, another object, another role.
"""

from __future__ import annotations

import pytest

from comeapi.similar.guards import Vocabulary, refusal
from comeapi.similar.text import features


def _refusal(prompt: str, query: str, *same: str) -> str | None:
    vocabulary = Vocabulary.of(features(t) for t in (prompt, *same))
    return refusal(features(query), features(prompt), vocabulary)


@pytest.mark.parametrize(
    ("prompt", "query", "reason"),
    [
        # opposite questions
        ("How do I turn on dark mode?", "How do I turn off dark mode?", "new words: off"),
        ("How do I turn off dark mode?", "How do I turn on dark mode?", "new words: on"),
        ("Is port 6379 open by default?", "Is port 6379 closed by default?", "new words: clos"),
        ("Hello! What can you help me with?", "Hello! What can't you help me with?", "negation"),
        ("What should I eat for breakfast?", "What should I not eat for breakfast?", "negation"),
        (
            "東京でおすすめの観光地を教えてください。",
            "東京でおすすめしない観光地を教えてください。",
            "negation",
        ),
        (
            "Write a short poem about the sea:",
            "Write a long poem about the sea:",
            "new words: long",
        ),
        (
            "海についての短い詩を書いてください。",
            "海についての長い詩を書いてください。",
            "new words: 長",
        ),
        # another number, in any notation
        (
            "The three most important things to know about Python are",
            "The five most important things to know about Python are",
            "numbers differ (5 vs 3)",
        ),
        (
            "Pythonについて知っておくべき最も重要な3つのことは",
            "Pythonについて知っておくべき最も重要な五つのことは",
            "numbers differ (5 vs 3)",
        ),
        ("Write a short poem about the sea:", "Write three short poems about the sea:", "numbers"),
        ("How do I make a good cup of coffee?", "How do I make coffee for 20 people?", "numbers"),
        # another place
        ("日本の首都はどこですか？", "韓国の首都はどこですか？", "new words: 韓国"),
        ("What is the capital of Japan?", "What is the capital of Korea?", "new words: korea"),
        (
            "東京でおすすめの観光地を教えてください。",
            "京都でおすすめの観光地を教えてください。",
            "京都",
        ),
        (
            "東京でおすすめの観光地を教えてください。",
            "大阪でおすすめの観光地を教えてください。",
            "大阪",
        ),
        # another object, another time, another question
        (
            "How do I make a good cup of coffee?",
            "How do I make a good cup of tea?",
            "new words: tea",
        ),
        (
            "美味しいコーヒーの淹れ方を教えてください。",
            "美味しい紅茶の淹れ方を教えてください。",
            "紅茶",
        ),
        (
            "おすすめの朝ごはんを教えてください。",
            "おすすめの晩ごはんを教えてください。",
            "new words: 晩",
        ),
        ("おすすめの朝ごはんを教えてください。", "おすすめのおやつを教えてください。", "おやつ"),
        (
            "Python並列処理について説明してください",
            "Python非同期処理について説明してください",
            "非同期処理",
        ),
        ("コーヒー", "コーヒーメーカー", "new words: コーヒーメーカー"),
        ("What is the capital of Japan?", "What was the capital of Japan?", "new words: was"),
        ("How are you today?", "Who are you today?", "new words: who"),
        # another role: the same words with the person swapped
        ("Hello! What can you help me with?", "Hello! What can I help you with?", "new words: i"),
        ("Hello! What can you help me with?", "What could you have helped me with?", "have"),
    ],
)
def test_near_neighbours_are_refused(prompt: str, query: str, reason: str) -> None:
    refused = _refusal(prompt, query)
    assert refused is not None and reason in refused


@pytest.mark.parametrize(
    ("prompt", "query", "same"),
    [
        ("日本の首都はどこですか？", "日本の首都はどこ？", ()),
        (
            "日本の首都はどこですか？",
            "What's the capital of Japan?",
            ("What is the capital of Japan?",),
        ),
        (
            "日本の首都はどこですか？",
            "Which city is Japan's capital?",
            ("What city is the capital of Japan?",),
        ),
        (
            "The three most important things to know about Python are",
            "3 most important things about Python",
            (),
        ),
        (
            "Pythonについて知っておくべき最も重要な3つのことは",
            "Pythonで最も重要な三つのことは？",
            (),
        ),
        (
            "How do I make a good cup of coffee?",
            "美味しいコーヒーを一杯淹れる方法を教えて",
            ("美味しいコーヒーの淹れ方",),
        ),
        ("おすすめの朝ごはんを教えてください。", "おすすめの朝ごはんを教えてくれない？", ()),
        # a kanji run made of known runs: 東京 + 観光 + 名所
        ("東京でおすすめの観光地を教えてください。", "東京観光名所を教えて", ("観光の名所",)),
        ("Recommend a breakfast", "Any breakfast recommendations?", ()),
        ("How are you?", "Good afternoon, how are you?", ()),
    ],
)
def test_paraphrases_pass(prompt: str, query: str, same: tuple[str, ...]) -> None:
    assert _refusal(prompt, query, *same) is None


PYTHON_USES = "What is Python used for? Answer in two sentences."


@pytest.mark.parametrize(
    ("query", "refused"),
    [
        # a labelled paraphrase without the instruction shows its number may be left out ...
        ("What is Python used for?", None),
        ("What is Python used for? Answer in 2 sentences.", None),
        # ... but another count is refused, "one" included: the prompt counts sentences
        ("What is Python used for? Answer in five sentences.", "numbers differ (5 vs 2)"),
        ("What is Python used for? Answer in one sentence.", "numbers differ (1 vs 2)"),
        ("What is Python 3 used for?", "numbers differ (3 vs 2)"),
    ],
)
def test_numbers_are_the_prompts_or_a_labelled_paraphrases(query: str, refused: str | None) -> None:
    assert _refusal(PYTHON_USES, query, "What do people use Python for?") == refused


def test_one_is_no_count_where_the_prompt_counts_nothing() -> None:
    """ "One cup" asks what "a cup" asks; a prompt without numbers does not count."""
    coffee = "How do I make a good cup of coffee?"
    assert _refusal(coffee, "How do I make one good cup of coffee?") is None
    assert (
        _refusal(coffee, "美味しいコーヒーを一杯淹れる方法を教えて", "美味しいコーヒーの淹れ方")
        is None
    )
    assert (
        _refusal(coffee, "How do I make two good cups of coffee?") == "numbers differ (2 vs none)"
    )


def test_a_query_without_content_is_refused() -> None:
    assert _refusal("Hello! What can you help me with?", "Hello!") == "no content words"


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        # the core words of the paraphrases in the query's language must all be there
        ("What is the capital?", "missing words: japan"),
        ("首都はどこですか？", "missing words: 日本"),
        ("Is Japan's capital big?", "new words: big"),
    ],
)
def test_core_words(query: str, reason: str) -> None:
    same = (
        "What is the capital of Japan?",
        "What's Japan's capital?",
        "Tell me the capital of Japan.",
        "日本の首都は？",
        "日本の首都を教えて",
    )
    refused = _refusal("日本の首都はどこですか？", query, *same)
    assert refused is not None and reason in refused


def test_core_words_need_a_few_paraphrases_in_that_language() -> None:
    """Two English paraphrases say too little about which words every one must have."""
    assert (
        _refusal(
            "日本の首都はどこですか？", "What is the capital?", "What is the capital of Japan?"
        )
        is None
    )


def test_a_greeting_lends_no_words_to_the_vocabulary() -> None:
    """ "Good afternoon, how are you?" is a paraphrase; its "good" does not make "How good are
    you?" (at a task) one."""
    refused = _refusal("How are you?", "How good are you?", "Good afternoon, how are you?")
    assert refused == "new words: good"
