"""The missed-queries count (``gateway.misses``): normalised, bounded, what it keeps."""

from __future__ import annotations

from comeapi.gateway.misses import MAX_CHARS, MissedQueries
from comeapi.protocol.requests import GenerationRequest, parse_request


def chat(text: str, *before: tuple[str, str]) -> GenerationRequest:
    messages = [{"role": r, "content": c} for r, c in before]
    messages.append({"role": "user", "content": text})
    return parse_request("chat", {"messages": messages}, max_tokens_limit=4096)


def prompt(text: str) -> GenerationRequest:
    return parse_request("completion", {"prompt": text}, max_tokens_limit=4096)


def test_misses_are_counted_by_normalised_text_and_kind_most_first() -> None:
    missed = MissedQueries()
    missed.add(chat("Capital of Peru?"))
    missed.add(chat("  Capital of Peru?\n"), "What is the capital of Japan?", 0.71, "Peru")
    missed.add(chat("Capital of Peru?", ("system", "Be brief.")))
    missed.add(prompt("Capital of Peru?"))
    top = missed.top(5)
    assert [(m["query"], m["kind"], m["count"]) for m in top] == [
        ("Capital of Peru?", "chat", 3),
        ("Capital of Peru?", "prompt", 1),
    ]
    assert top[0]["nearest_prompt"] == "What is the capital of Japan?" and top[0]["score"] == 0.71


def test_memory_is_bounded_and_a_frequent_miss_outlives_one_off_ones() -> None:
    missed = MissedQueries(size=3)
    for _ in range(5):
        missed.add(prompt("often"))
    for n in range(100):
        missed.add(prompt(f"once {n}"))
    assert len(missed) == 3
    assert missed.top(1)[0] == {**missed.top(1)[0], "query": "often", "count": 5}
    missed.add(prompt("x" * 10 * MAX_CHARS))
    assert max(len(m["query"]) for m in missed.top(3)) == MAX_CHARS


def test_a_chat_that_does_not_end_with_the_user_is_not_counted() -> None:
    missed = MissedQueries()
    request = parse_request(
        "chat",
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        max_tokens_limit=4096,
    )
    missed.add(request)
    assert len(missed) == 0


def test_a_repeat_without_its_nearest_prompt_keeps_the_one_named_first() -> None:
    missed = MissedQueries()
    missed.add(chat("Capital of Peru?"), "What is the capital of Japan?", 0.7, "new words: peru")
    assert chat("Capital of Peru?") in missed and chat("Capital of Chile?") not in missed
    missed.add(chat("Capital of Peru?"), None, None, "every known prompt refused")
    (top,) = missed.top(1)
    assert top["nearest_prompt"] == "What is the capital of Japan?" and top["count"] == 2
