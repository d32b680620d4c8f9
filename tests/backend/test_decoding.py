"""Prompt preparation and the token-to-text assembler (UTF-8 splits, stop strings)."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import pytest

from comeapi.backend.decoding import (
    PREFILL_CHUNK,
    ChatTemplate,
    ChoiceText,
    TextAssembler,
    completion_budget,
    prompt_texts,
    prompt_tokens,
    reusable_prefix,
)
from comeapi.errors import ContextLengthError, RequestError
from comeapi.protocol.requests import parse_request
from comeapi.protocol.responses import TokenLogprob
from tests.helpers import BUNDLED_MODEL


def feed_all(assembler: TextAssembler, pieces: list[bytes]) -> str:
    return "".join(assembler.feed(p) for p in pieces) + assembler.flush()


def test_split_utf8_characters_are_joined() -> None:
    data = "héllo 日本".encode()
    pieces = [data[i : i + 1] for i in range(len(data))]  # one byte at a time
    assembler = TextAssembler(())
    out = [assembler.feed(p) for p in pieces]
    assert "".join(out) + assembler.flush() == "héllo 日本"
    assert all("\ufffd" not in piece for piece in out)


def test_invalid_utf8_becomes_replacement_not_an_error() -> None:
    assert feed_all(TextAssembler(()), [b"ok \xff", b" end"]) == "ok \ufffd end"


def test_stop_string_inside_one_piece() -> None:
    assembler = TextAssembler(["STOP"])
    assert feed_all(assembler, [b"abc STOP def"]) == "abc "
    assert assembler.stopped


def test_stop_string_across_pieces_is_never_sent() -> None:
    assembler = TextAssembler(["</end>"])
    sent = [assembler.feed(p) for p in [b"one </", b"en", b"d> two"]]
    assert sent == ["one ", "", ""]
    assert assembler.stopped
    assert assembler.flush() == ""


def test_held_back_prefix_is_released_when_it_is_not_a_stop() -> None:
    assembler = TextAssembler(["</end>"])
    assert assembler.feed(b"a </e") == "a "
    assert assembler.feed(b"x") == "</ex"
    assert assembler.flush() == ""
    assembler = TextAssembler(["</end>"])
    assert feed_all(assembler, [b"tail </en"]) == "tail </en"  # the end releases the rest
    assert not assembler.stopped


def test_earliest_of_several_stops_wins() -> None:
    assert feed_all(TextAssembler(["b", "a"]), [b"xxab"]) == "xx"


@pytest.mark.parametrize(
    ("n_prompt", "max_tokens", "expected"),
    [(10, 5, 5), (10, None, 118), (10, 118, 118)],
)
def test_completion_budget(n_prompt: int, max_tokens: int | None, expected: int) -> None:
    request = parse_request(
        "chat",
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": max_tokens},
        max_tokens_limit=1000,
    )
    assert completion_budget(request, n_prompt, 128) == expected


def test_completion_budget_refuses_what_does_not_fit() -> None:
    request = parse_request("generate", {"prompt": "x", "max_tokens": 119}, max_tokens_limit=999)
    with pytest.raises(ContextLengthError) as err:
        completion_budget(request, 10, 128)
    assert err.value.param == "max_tokens"
    with pytest.raises(ContextLengthError) as err:
        completion_budget(request, 128, 128)
    assert err.value.param == "prompt"


@pytest.mark.slow
def test_chat_uses_gemma_turns_and_one_bos(model_dir: Path) -> None:
    llama = llama_cpp.Llama(
        str(model_dir / BUNDLED_MODEL), n_ctx=128, vocab_only=True, verbose=False
    )
    template = ChatTemplate(llama)
    assert template.name == "gemma"  # the bundled GGUF has no template of its own
    request = parse_request(
        "chat",
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
            ]
        },
        max_tokens_limit=100,
    )
    tokens = prompt_tokens(llama, template, request)
    assert tokens.count(llama.token_bos()) == 1 and tokens[0] == llama.token_bos()
    text = llama.detokenize(tokens, special=True).decode()
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    )


class _StubLlama:
    """Just what ChatTemplate reads from a Llama whose GGUF carries a Jinja template."""

    metadata = {
        "general.architecture": "test",
        "tokenizer.chat_template": (
            "{{ bos_token }}{% for m in messages %}"
            "{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
            "[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}"
        ),
    }

    def token_bos(self) -> int:
        return 1

    def token_eos(self) -> int:
        return 2

    def detokenize(self, tokens: list[int], special: bool = False) -> bytes:
        return {1: b"<s>", 2: b"</s>"}[tokens[0]]


def test_the_gguf_own_template_is_used_when_present() -> None:
    template = ChatTemplate(_StubLlama())  # type: ignore[arg-type]
    assert template.name == "gguf"
    chat = parse_request(
        "chat", {"messages": [{"role": "user", "content": "Hi"}]}, max_tokens_limit=10
    )
    assert chat.messages is not None
    assert template.render(chat.messages) == "<s>[user]Hi</s>[assistant]"
    system = parse_request(
        "chat", {"messages": [{"role": "system", "content": "x"}]}, max_tokens_limit=10
    )
    assert system.messages is not None
    with pytest.raises(RequestError, match="no system role"):
        template.render(system.messages)


def test_models_without_a_template_get_chatml() -> None:
    stub = _StubLlama()
    stub.metadata = {"general.architecture": "qwen3"}  # type: ignore[misc]
    template = ChatTemplate(stub)  # type: ignore[arg-type]
    assert template.name == "chatml"
    chat = parse_request(
        "chat", {"messages": [{"role": "user", "content": "Hi"}]}, max_tokens_limit=10
    )
    assert chat.messages is not None
    assert (
        template.render(chat.messages) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_character_cut_by_max_tokens_is_dropped_not_replaced() -> None:
    # "日" is e6 97 a5: the generation ended after two of its three bytes.
    assert feed_all(TextAssembler(()), [b"ok ", b"\xe6\x97"]) == "ok "


def entry(text: str) -> TokenLogprob:
    return TokenLogprob(text, text.encode(), -1.0)


def feed_tokens(choice: ChoiceText, tokens: list[bytes]) -> tuple[str, list[TokenLogprob]]:
    text, entries = "", []
    for raw in tokens:
        piece, released = choice.feed(raw, entry(raw.decode("utf-8", errors="replace")))
        text += piece
        entries += released
    piece, released = choice.finish()
    return text + piece, entries + released


def test_log_probabilities_leave_with_their_text_and_carry_offsets() -> None:
    text, entries = feed_tokens(ChoiceText((), base=6), [b" Paris", b" is", b" big"])
    assert text == " Paris is big"
    assert [(e.token, e.offset) for e in entries] == [(" Paris", 6), (" is", 12), (" big", 15)]


def test_tokens_of_a_stop_string_are_dropped_with_it() -> None:
    choice = ChoiceText(("\n\n",))
    text, entries = feed_tokens(choice, [b"One", b" two", b"\n", b"\n", b"three"])
    assert text == "One two" and choice.stopped
    assert [e.token for e in entries] == ["One", " two"]
    # A token that starts before the stop string keeps its entry.
    text, entries = feed_tokens(ChoiceText(("two",)), [b"One", b" tw", b"o!"])
    assert text == "One " and [e.token for e in entries] == ["One", " tw"]


def test_a_held_back_token_is_released_with_its_text() -> None:
    choice = ChoiceText(("STOP",))
    piece, released = choice.feed(b"ST", entry("ST"))
    assert (piece, released) == ("", [])  # might start the stop string
    piece, released = choice.feed(b"ay", entry("ay"))
    assert piece == "STay" and [e.token for e in released] == ["ST", "ay"]


def test_reusable_prefix_keeps_whole_chunks_and_one_token_to_compute() -> None:
    c = PREFILL_CHUNK
    old = list(range(3 * c + 40))
    assert reusable_prefix(old, old[: 2 * c] + [-1] * 50) == 2 * c  # common 2 chunks
    assert reusable_prefix(old, old[: 2 * c - 1] + [-1] * 50) == c  # not the partial one
    assert reusable_prefix(old, [*old, 7, 8]) == 3 * c  # the last partial chunk is recomputed
    assert reusable_prefix(old[: 2 * c], old[: 2 * c]) == c  # the same prompt: one token left
    assert reusable_prefix([], old) == 0 and reusable_prefix(old, [1]) == 0


def test_tool_support_is_read_from_the_template() -> None:
    assert not ChatTemplate(_StubLlama()).supports_tools  # type: ignore[arg-type]
    tooled = _StubLlama()
    tooled.metadata = {  # type: ignore[misc]
        "tokenizer.chat_template": (
            "{% if tools %}{% for t in tools %}[tool {{ t.function.name }}]{% endfor %}{% endif %}"
            "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        )
    }
    template = ChatTemplate(tooled)  # type: ignore[arg-type]
    assert template.supports_tools
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    body = {"messages": [{"role": "user", "content": "Hi"}], "tools": tools}
    request = parse_request("chat", body, max_tokens_limit=10)
    with pytest.raises(RequestError, match="do not call tools") as info:
        prompt_texts(template, request)
    assert info.value.param == "tools"
    with pytest.raises(RequestError, match="no tool support"):
        prompt_texts(ChatTemplate(_StubLlama()), request)  # type: ignore[arg-type]
    unused = parse_request("chat", {**body, "tool_choice": "none"}, max_tokens_limit=10)
    assert prompt_texts(template, unused) == ["[user]Hi"]
    required = parse_request(
        "chat", {**body, "tools": None, "tool_choice": "required"}, max_tokens_limit=10
    )
    with pytest.raises(RequestError) as info:
        prompt_texts(template, required)
    assert info.value.param == "tool_choice"
