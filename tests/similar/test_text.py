"""What the guards read in a text: words by script, numbers in three notations, negation."""

from __future__ import annotations

import pytest

from comeapi.similar.text import features, stem


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("日本の首都はどこですか？", {"k:日本", "k:首都", "h:どこ"}),
        ("What's the capital of Japan?", {"l:what", "l:capital", "l:japan"}),
        ("Which city is Japan's capital?", {"l:what", "l:city", "l:capital", "l:japan"}),
        # の joins two hiragana nouns; particles and endings fall away
        ("おすすめのおやつを教えてください。", {"h:おすすめ", "h:おやつ", "k:教"}),
        ("東京でおすすめの観光地", {"k:東京", "h:おすすめ", "k:観光地"}),
        ("美味しいコーヒーを淹れたい", {"k:美味", "t:コーヒー", "k:淹"}),
        # full-width Latin and half-width katakana read as their plain forms
        ("Ｐｙｔｈｏｎ ｺｰﾋｰ", {"l:python", "t:コーヒー"}),
        # greetings and request framing carry no content; "I" and "me" do
        ("Hello! Can you please tell me", {"l:me"}),
        ("What can I help you with?", {"l:what", "l:i", "l:help"}),
        # the perfect asks about the past: "have" counts there only
        ("What could you have helped me with?", {"l:what", "l:have", "l:help", "l:me"}),
        ("What do you have for me?", {"l:what", "l:me"}),
    ],
)
def test_content_words_by_script(text: str, words: set[str]) -> None:
    assert features(text).words == words


@pytest.mark.parametrize(
    ("text", "numbers"),
    [
        ("The three most important things", (3,)),
        ("The 3 most important things", (3,)),
        ("最も重要な3つのこと", (3,)),
        ("最も重要な三つのこと", (3,)),
        ("Ｐython ３つ", (3,)),
        ("日本で二番目に大きい都市", (2,)),
        ("二十五人", (25,)),
        ("Python 3.12", ("3.12",)),
        ("three things about Python 3", (3, 3)),  # counted: "Python 3" is another number
        # "a" is no number, "one" and 一杯 are 1 (the guards compare 1 only where the prompt
        # counts something); 一番 ("most") is not a number at all
        ("a good cup of coffee", ()),
        ("one good cup of coffee", (1,)),
        ("美味しいコーヒーを一杯", (1,)),
        ("一番大事なこと", ()),
        ("ten cups for 20 people", (10, 20)),
    ],
)
def test_numbers_in_digits_words_and_kanji(text: str, numbers: tuple[int | str, ...]) -> None:
    assert features(text).numbers == numbers


@pytest.mark.parametrize(
    ("text", "negated"),
    [
        ("What can't you help me with?", True),
        ("What can’t you help me with?", True),  # a curly apostrophe
        ("How do I make coffee without a machine?", True),
        ("What should I not eat for breakfast?", True),
        ("東京でおすすめしない観光地", True),
        ("あなたにできないことは何ですか？", True),
        ("コーヒーを飲まないほうがいい人は？", True),
        ("元気がありません", True),
        # polite requests in a negative form are not negations
        ("おすすめの朝ごはんを教えてくれない？", False),
        ("おすすめはありませんか？", False),
        ("What can you help me with?", False),
        ("日本の首都はどこですか？", False),
    ],
)
def test_negation_in_english_and_japanese(text: str, negated: bool) -> None:
    assert features(text).negated is negated


def test_light_stemming_joins_inflections_only() -> None:
    assert stem("cups") == stem("cup")
    assert stem("brewing") == stem("brewed") == stem("brew")
    assert stem("making") == stem("make")
    assert stem("glass") == "glass" and stem("bus") == "bus"
    assert stem("cities") == "city"
    assert stem("sea") != stem("season")
    # superlative and adverb endings are not cut: "forest" was "for", "early" was "ear"
    assert stem("forest") == "forest" and stem("early") == "early"


@pytest.mark.parametrize(
    ("text", "yes_no"),
    [
        ("Is breakfast good?", True),
        ("Does Python support parallelism?", True),
        ("Should I eat breakfast?", True),
        # requests in a question's form, and questions with a question word
        ("Can you recommend a good breakfast?", False),
        ("Do you know the capital of Japan?", False),
        ("Is there a good breakfast?", False),
        ("Is it true? What is the capital?", False),
        ("How do I make coffee?", False),
        ("日本の首都はどこですか？", False),
        # Japanese: か after です/ます with no question word; requests in that form are not
        ("東京は観光におすすめですか？", True),
        ("こんにちは、元気ですか？", True),
        ("Pythonの並列処理とは何ですか？", False),
        ("朝食のおすすめはありますか？", False),
        ("おすすめの朝ごはんを教えてくれますか？", False),
        ("東京の観光地を教えてくれませんか？", False),
    ],
)
def test_yes_no_questions(text: str, yes_no: bool) -> None:
    assert features(text).yes_no is yes_no
