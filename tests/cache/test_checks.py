"""The quality checks on real answers: Gemma 3 270M base's shipped answers (bad) and
well-formed replies (good)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from comeapi.cache.checks import (
    CHECKS,
    DEFAULT_ACTIONS,
    CheckPolicy,
    check_answer,
    failing,
    is_echo,
    is_loop,
    wrong_language,
)
from comeapi.errors import ConfigError

BAD = Path(__file__).parent / "data" / "gemma-base-answers.jsonl"
COFFEE = (
    ("system", "You are a helpful assistant. Answer briefly."),
    ("user", "How do I make a good cup of coffee?"),
)


def _bad() -> list[dict[str, Any]]:
    return [json.loads(line) for line in BAD.read_text(encoding="utf-8").splitlines()]


def _flags(d: dict[str, Any], policy: CheckPolicy | None = None) -> tuple[str, ...]:
    messages = tuple(tuple(m) for m in d["messages"]) if d["messages"] else None
    return check_answer(
        d["answer"],
        kind=d["kind"],
        prompt=d["prompt"],
        messages=messages,  # type: ignore[arg-type]
        finish_reason=d["finish_reason"],
        policy=policy,
    )


def _shipped(prompt: str, variant: int) -> dict[str, Any]:
    return next(d for d in _bad() if d["prompt"] == prompt and d["variant"] == variant)


# The answers issue 19 quotes, as Gemma 3 270M base wrote them (the old shipped cache).
@pytest.mark.parametrize(
    ("prompt", "variant", "expected"),
    [
        # <start_of_image> three times
        ("Write a short poem about the sea:", 4, {"special_token", "loop"}),
        # <strong> repeated
        ("東京でおすすめの観光地を教えてください。", 0, {"markup", "loop", "echo"}),
        # "mendatanguser" four times, the question repeated
        ("Hello! What can you help me with?", 3, {"loop", "echo"}),
        ("Hello! What can you help me with?", 2, {"loop", "echo", "language"}),
        # the coffee chat echoes its system prompt
        ("How do I make a good cup of coffee?", 2, {"echo"}),
        ("How do I make a good cup of coffee?", 3, {"echo", "loop"}),
        ("How do I make a good cup of coffee?", 0, {"echo", "language"}),
        # "大阪市北区・東京市・名古屋市…", cut in mid-word
        ("日本の首都はどこですか？", 1, {"truncated"}),
        ("Write a short poem about the sea:", 0, {"loop"}),
        ("Write a short poem about the sea:", 3, {"echo", "loop"}),
        ("The three most important things to know about Python are", 2, {"markup"}),
        ("おすすめの朝ごはんを教えてください。", 0, {"loop"}),
    ],
)
def test_the_quoted_bad_answers_are_flagged(prompt: str, variant: int, expected: set[str]) -> None:
    flags = set(_flags(_shipped(prompt, variant)))
    assert expected <= flags, flags


def test_every_old_shipped_answer_fails_a_check() -> None:
    answers = _bad()
    assert len(answers) == 50
    unflagged = [(d["prompt"], d["variant"]) for d in answers if not _flags(d)]
    assert unflagged == []
    # and the default policy would have regenerated most of them (truncated only flags)
    assert sum(failing(_flags(d)) for d in answers) >= 25


GOOD = [
    ("chat", "What is the capital of Japan?", "The capital of Japan is Tokyo.", "stop"),
    ("chat", "日本の首都はどこですか？", "日本の首都は東京です。", "stop"),
    (
        "chat",
        "How do I make a good cup of coffee?",
        "Start with freshly roasted beans and grind them just before brewing. Use about "
        "two tablespoons of coffee for every six ounces of water, heated to just below "
        "boiling, and let it steep for four minutes.",
        "stop",
    ),
    (
        "chat",
        "Write a short poem about the sea:",
        "The sea rolls in with silver light,\nIt hums a song into the night,\n"
        "Its waves return to kiss the shore,\nAnd whisper tales of distant lore.",
        "stop",
    ),
    (
        "chat",
        "Pythonの並列処理について説明してください",
        "Pythonでは、threadingやmultiprocessingモジュールを使って並列処理を行います。"
        "CPUを使う処理にはmultiprocessingが向いています。",
        "length",  # cut by max_tokens, but at the end of a sentence
    ),
    (
        "chat",
        "Give me three tips for learning Python.",
        "1. **Practice daily**: write a little code every day.\n2. **Read code**: study "
        "well-written projects.\n3. **Build something**: a small project teaches more "
        "than a tutorial.",
        "stop",
    ),
    ("chat", "Show me an HTML list with two items.", "<ul><li>One</li><li>Two</li></ul>", "stop"),
]


@pytest.mark.parametrize(("kind", "prompt", "answer", "finish"), GOOD)
def test_good_answers_pass(kind: str, prompt: str, answer: str, finish: str) -> None:
    messages = (("user", prompt),) if kind == "chat" else None
    flags = check_answer(answer, kind=kind, prompt=prompt, messages=messages, finish_reason=finish)
    assert flags == ()


def test_empty_and_whitespace() -> None:
    for text in ("", "  \n\t ", "\u3000", ":", " ...\n"):
        flags = check_answer(
            text, kind="prompt", prompt="Hello", messages=None, finish_reason="stop"
        )
        assert flags == ("empty",)


@pytest.mark.parametrize(
    "token",
    ["<start_of_image>", "<end_of_turn>", "<|im_end|>", "<|endoftext|>", "[INST]", "<unused12>"],
)
def test_special_token_text(token: str) -> None:
    text = f"The sea is wide.{token} And deep."
    flags = check_answer(text, kind="prompt", prompt="The sea", messages=None, finish_reason="stop")
    assert "special_token" in flags


def test_markup_unless_asked_for() -> None:
    text = "Python is <strong>easy</strong> to learn."
    plain = check_answer(
        text, kind="prompt", prompt="Tell me about Python.", messages=None, finish_reason="stop"
    )
    asked = check_answer(
        text, kind="prompt", prompt="Answer in HTML: Python?", messages=None, finish_reason="stop"
    )
    assert "markup" in plain
    assert "markup" not in asked


def test_an_invented_turn_is_markup() -> None:
    text = "Sure, I can help.\nUser: What else?\nAssistant: Anything."
    flags = check_answer(
        text, kind="chat", prompt="Hi", messages=(("user", "Hi"),), finish_reason="stop"
    )
    assert "markup" in flags


def test_truncated_only_when_cut_mid_sentence() -> None:
    def flags(text: str, finish: str, prompt: str = "Go on") -> tuple[str, ...]:
        return check_answer(text, kind="prompt", prompt=prompt, messages=None, finish_reason=finish)

    assert flags("It was a dark and stormy", "length") == ("truncated",)
    assert flags("It was a dark and stormy night.", "length") == ()
    assert flags("It was a dark and stormy", "stop") == ()
    assert flags('Add a touch of honey. This recipe is called a "mocha" or a "', "length") == (
        "truncated",
    )
    assert flags("Here is a simple recipe to try:", "length") == ("truncated",)
    assert flags('He said "stop."', "length") == ()
    assert flags("Done (see above).", "length") == ()
    assert flags("```python\nprint(1)\n```", "length") == ()
    assert flags("東京は日本の首都で", "length", "東京") == ("truncated",)
    assert flags("東京は日本の首都です。", "length", "東京") == ()


def test_loop_thresholds() -> None:
    assert is_loop("Sea animals\n\n" * 6)
    assert is_loop("<strong>" * 12)
    assert not is_loop("Sea animals swim in the deep blue water, far from the shore.")
    # SmolLM2: a phrase said three times in a row, in an answer that is otherwise fine
    assert is_loop(
        "Python is used for data analysis, science, machine learning, web development, data "
        "science, scientific computing, scientific computing, scientific computing, scientific "
        "computing"
    )
    assert not is_loop("No, no, I said the blue one.")
    # a phrase said twice in a longer answer is style, not a loop
    story = (
        "my grandmother and grandfather were the first people to own a house. They had "
        "their own garden. One day, my grandmother and grandfather were making bread."
    )
    assert not is_loop(story)


def test_echo_restating_the_question_is_not_echo() -> None:
    assert not is_echo("The capital of Japan is Tokyo.", "What is the capital of Japan?", None)
    assert is_echo("What is the capital of Japan? Tokyo.", "What is the capital of Japan?", None)
    assert is_echo("You are a helpful assistant. Answer briefly. Coffee!", "Coffee?", COFFEE)
    assert not is_echo("As a helpful assistant, here are tips.", "Coffee?", COFFEE)
    # an answer that is the prompt's words and nothing else (SmolLM2, seed 1000004)
    assert is_echo("How are you today?", "Hello, how are you today?", None)
    assert not is_echo("I'm fine, how are you today?", "Hello, how are you today?", None)


def test_language() -> None:
    assert wrong_language("I am fine, thank you.", "こんにちは、調子はどうですか？")
    assert not wrong_language("元気です。Pythonも好きです。", "こんにちは、調子はどうですか？")
    assert wrong_language("Coffee is good. あなたのおかげで眠れるか。", "How do I make coffee?")
    assert not wrong_language("Tokyo (東京) is the capital.", "What is the capital of Japan?")
    assert not wrong_language("12345", "こんにちは")


def test_policy_actions() -> None:
    default = CheckPolicy()
    assert default.action("truncated") == "flag"
    assert default.rejects == frozenset(CHECKS) - {"truncated"}
    assert not failing(("truncated",), default)
    assert failing(("truncated", "loop"), default)
    strict = CheckPolicy.parse(["truncated=reject", "language=off"])
    assert failing(("truncated",), strict)
    # an "off" check is not run at all
    flags = check_answer(
        "I am fine.",
        kind="prompt",
        prompt="元気ですか",
        messages=None,
        finish_reason="length",
        policy=strict,
    )
    assert flags == ()
    assert set(DEFAULT_ACTIONS) == set(CHECKS)


@pytest.mark.parametrize("spec", ["truncate=reject", "truncated=drop", "truncated"])
def test_policy_errors_name_the_setting(spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        CheckPolicy.parse([spec])
    assert info.value.param == "checks"


def test_flags_are_sorted_and_deterministic() -> None:
    d = _shipped("東京でおすすめの観光地を教えてください。", 0)
    first = _flags(d)
    assert list(first) == sorted(first)
    assert all(_flags(d) == first for _ in range(3))
