"""The prompt set file: the shipped default, and errors that name the field and the line."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from comeapi.cache.key import chat_key, prompt_key
from comeapi.cache.prompts import (
    DEFAULT_MODEL,
    DEFAULT_PARAMS,
    load_prompt_set,
    parse_prompt_set,
)
from comeapi.errors import ConfigError


def test_the_shipped_set_has_ten_english_prompts_for_the_default_model() -> None:
    """SmolLM2 writes English only: the shipped prompts are English versions of the
    requirements' (which are examples/requirements-prompts.yaml)."""
    shipped = load_prompt_set()
    assert len(shipped.items) == 10
    assert shipped.variants == 5
    assert shipped.model == DEFAULT_MODEL == "smollm2-135m-instruct-q4_1.gguf"
    assert len({item.key for item in shipped.items}) == 10
    assert {item.kind for item in shipped.items} == {"prompt", "chat"}
    texts = [
        c
        for i in shipped.items
        for c in ([i.prompt] if i.messages is None else [m[1] for m in i.messages])
    ]
    assert all(t.isascii() for t in texts)
    assert "What is the capital of Japan?" in texts
    assert shipped.policy().action("truncated") == "reject"  # every shipped answer is whole
    assert all(item.params["max_tokens"] <= 256 for item in shipped.items)


EXAMPLES = Path(__file__).parents[2] / "examples"


def test_the_requirements_prompts_are_an_example_set() -> None:
    """The requirements' ten prompts, Japanese and English, for a multilingual model."""
    example = load_prompt_set(EXAMPLES / "requirements-prompts.yaml")
    assert len(example.items) == 10
    assert example.model != DEFAULT_MODEL
    assert example.items[0].prompt == "こんにちは、調子はどうですか？"
    assert example.items[3].prompt == "日本の首都はどこですか？"
    assert example.items[8].messages == (
        ("system", "You are a helpful assistant. Answer briefly."),
        ("user", "How do I make a good cup of coffee?"),
    )
    japanese = [i for i in example.items if any("\u3040" <= ch <= "\u30ff" for ch in i.prompt)]
    assert len(japanese) == 5


def test_items_know_their_key_params_route_and_request() -> None:
    text = """
model: tiny.gguf
variants: 3
max_tokens: 16
prompts:
  - prompt: "  Hello\\r\\nworld  "
    temperature: 0.2
  - "bare string prompt"
  - messages:
      - {role: system, content: "Be brief."}
      - {role: user, content: "Hi"}
"""
    s = parse_prompt_set(text, "p.yaml")
    assert s.variants == 3
    first, bare, chat = s.items
    assert first.prompt == "Hello\nworld"
    assert first.key == prompt_key("Hello\nworld", "tiny.gguf")
    assert first.params == {**DEFAULT_PARAMS, "max_tokens": 16, "temperature": 0.2}
    assert first.route == "/v1/completions"
    assert first.request_body(2) == {
        "model": "tiny.gguf",
        "prompt": "Hello\nworld",
        "max_tokens": 16,
        "temperature": 0.2,
        "top_k": 40,
        "top_p": 0.9,
        "seed": 2,
    }
    assert bare.kind == "prompt" and bare.prompt == "bare string prompt"
    assert chat.kind == "chat"
    assert chat.prompt == "Hi"
    assert chat.key == chat_key([("system", "Be brief."), ("user", "Hi")], "tiny.gguf")
    assert chat.route == "/v1/chat/completions"
    assert chat.request_body(0)["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    assert chat.line == 9  # the text starts with an empty line


def test_json_files_work_too(tmp_path: Path) -> None:
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"prompts": [{"prompt": "日本語"}, {"prompt": "English"}]}))
    s = load_prompt_set(path)
    assert [i.prompt for i in s.items] == ["日本語", "English"]
    assert s.variants is None  # left to the `variants` setting
    assert s.source == "prompts.json"


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_prompt_set(text, "prompts.yaml")
    assert info.value.param == "prompts"
    return info.value.message


def test_bad_role_names_the_field_and_the_line() -> None:
    message = _error(
        """prompts:
  - prompt: a
  - prompt: b
  - prompt: c
  - messages:
      - role: robot
        content: hi
"""
    )
    assert message == (
        "prompts.yaml: prompts[3].messages[0].role: must be one of "
        "system, developer, user, assistant (got 'robot'), line 6"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("prompts: [\n", "not valid YAML/JSON"),
        ("- a\n- b\n", "must be a mapping with a 'prompts' list, line 1"),
        ("prompts: []\n", "prompts: must be a non-empty list"),
        ("model: x\n", "prompts: must be a non-empty list"),
        (
            "variants: 0\nprompts: [a]\n",
            "variants: must be an integer from 1 to 100 (got 0), line 1",
        ),
        ("variants: true\nprompts: [a]\n", "variants: must be an integer"),
        ("temperature: 3\nprompts: [a]\n", "temperature: must be a number from 0 to 2 (got 3)"),
        ("prompts:\n  - prompt: a\n    top_p: 0\n", "prompts[0].top_p: must be a number in (0, 1]"),
        (
            "prompts:\n  - prompt: a\n    max_tokens: '5'\n",
            "prompts[0].max_tokens: must be an integer",
        ),
        ("colour: red\nprompts: [a]\n", "colour: unknown field (expected one of model, variants"),
        ("prompts:\n  - prompt: a\n    foo: 1\n", "prompts[0].foo: unknown field, line 3"[:28]),
        ("prompts:\n  - {prompt: a, messages: []}\n", "prompts[0]: needs exactly one of"),
        ("prompts:\n  - temperature: 1\n", "prompts[0]: needs exactly one of"),
        ("prompts:\n  - prompt: '   '\n", "prompts[0].prompt: must be a non-empty string, line 2"),
        ("prompts:\n  - prompt: 5\n", "prompts[0].prompt: must be a non-empty string"),
        ("prompts:\n  - 5\n", "prompts[0]: must be a mapping"),
        ("prompts:\n  - messages: []\n", "prompts[0].messages: must be a non-empty list"),
        ("prompts:\n  - messages: [hi]\n", "prompts[0].messages[0]: must be a mapping"),
        (
            "prompts:\n  - messages:\n      - {role: user}\n",
            "prompts[0].messages[0].content: must be a non-empty string, line 3",
        ),
        ("prompts:\n  - prompt: a\n    prompt: b\n", "prompts[0].prompt: duplicate key, line 3"),
    ],
)
def test_errors_name_the_field_and_the_line(text: str, expected: str) -> None:
    assert expected in _error(text)


def test_duplicates_after_normalisation_are_rejected() -> None:
    decomposed = unicodedata.normalize("NFD", "ごはん")
    message = _error(
        f"""prompts:
  - prompt: "ごはん"
  - prompt: "Hi"
  - prompt: "  {decomposed}\\r\\n"
"""
    )
    assert "prompts[2]: same prompt as prompts[0] after normalisation" in message
    assert message.endswith("line 4")


def test_every_error_is_reported_at_once() -> None:
    message = _error("variants: 0\nprompts:\n  - prompt: ''\n  - messages: x\n")
    assert len(message.splitlines()) == 3


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_prompt_set(tmp_path / "missing.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="cannot read"):
        load_prompt_set(binary)


def test_the_set_says_what_the_checks_do_and_settings_override_it() -> None:
    s = parse_prompt_set("checks: {truncated: reject, language: off}\nprompts: [Hi]\n", "p.yaml")
    policy = s.policy()
    assert policy.action("truncated") == "reject" and policy.action("language") == "off"
    assert policy.action("loop") == "reject"  # the default for what the file leaves
    assert s.policy(["truncated=flag"]).action("truncated") == "flag"
    with pytest.raises(ConfigError) as info:
        parse_prompt_set("prompts: [Hi]\nchecks:\n  truncate: reject\n  loop: maybe\n", "p.yaml")
    message = info.value.message
    assert "p.yaml: checks.truncate: unknown check" in message and "line 3" in message
    assert "p.yaml: checks.loop: must be reject, flag or off (got 'maybe'), line 4" in message


def test_stop_strings_are_an_optional_parameter() -> None:
    s = parse_prompt_set(
        'stop: "\\n\\n"\nprompts:\n  - Once\n  - {prompt: Twice, stop: [".", "!"]}\n', "p.yaml"
    )
    once, twice = s.items
    assert once.params["stop"] == ["\n\n"] and twice.params["stop"] == [".", "!"]
    assert once.request_body(0)["stop"] == ["\n\n"]
    assert "stop" not in parse_prompt_set("prompts: [Hi]\n", "p.yaml").items[0].params
    with pytest.raises(ConfigError, match=r"prompts\[0\]\.stop: must be a string or up to 4"):
        parse_prompt_set("prompts:\n  - {prompt: Hi, stop: []}\n", "p.yaml")


REQUIREMENTS_PROMPTS = Path(__file__).parents[2] / "examples" / "requirements-prompts.yaml"


def test_items_carry_their_labelled_examples_normalised() -> None:
    parsed = parse_prompt_set(
        """prompts:
  - prompt: "Hi"
    same: ["  Hello\\r\\n", "やあ"]
    not: ["Bye"]
  - messages: [{role: user, content: "Tea?"}]
    same: ["A cup of tea?"]
  - prompt: "Plain"
""",
        "t.yaml",
    )
    first, chat, plain = parsed.items
    assert first.same == ("Hello", "やあ") and first.not_ == ("Bye",)
    assert chat.same == ("A cup of tea?",) and chat.not_ == ()
    assert plain.same == () and plain.not_ == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("prompts:\n  - prompt: a\n    same: b\n", "prompts[0].same: must be a list"),
        ("prompts:\n  - prompt: a\n    not: [b, 3]\n", "prompts[0].not[1]: must be a non-empty"),
        (
            "prompts:\n  - prompt: a\n    same: [b, ' b ']\n",
            "prompts[0].same[1]: 'b' is listed twice",
        ),
        (
            "prompts:\n  - prompt: a\n    same: [b]\n    not: [b]\n",
            "prompts[0].not: 'b' is also listed under 'same'",
        ),
        (
            "prompts:\n  - {prompt: a, same: [x]}\n  - {prompt: c, same: [x]}\n",
            "prompts[1].same: 'x' is also under prompts[0].same",
        ),
    ],
)
def test_bad_examples_name_the_field(text: str, expected: str) -> None:
    assert expected in _error(text)


def test_the_requirements_prompts_keep_the_first_shipped_set_with_labelled_lists() -> None:
    """examples/requirements-prompts.yaml: the 10 prompts of the first shipped archive, each
    with at least 10 + 10 examples, English and Japanese on both sides."""
    labelled = load_prompt_set(REQUIREMENTS_PROMPTS)
    assert len(labelled.items) == 10
    assert labelled.items[0].prompt == "こんにちは、調子はどうですか？"
    assert sum(i.kind == "chat" for i in labelled.items) == 3
    for item in labelled.items:
        for examples in (item.same, item.not_):
            assert len(examples) >= 10, item.prompt
            japanese = [t for t in examples if any("\u3040" <= c <= "\u9fff" for c in t)]
            assert 0 < len(japanese) < len(examples), item.prompt
