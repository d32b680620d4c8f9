"""The review rules: naming a prompt's answers, and what each action does to an entry."""

from __future__ import annotations

import pytest

from comeapi.cache.key import chat_key
from comeapi.cache.review import (
    change,
    describe,
    edit_tokens,
    edited,
    find_key,
    group_entries,
    listing,
    pick,
    regenerated,
    used_seeds,
)
from comeapi.cache.store import Entry
from comeapi.errors import (
    AmbiguousPromptError,
    AnswerNotFoundError,
    RequestError,
    ReviewConflictError,
)
from tests.cache.factory import MODEL, chat_entry, prompt_entry, reviewed


def groups_of(*entries: Entry) -> dict[str, list[Entry]]:
    return group_entries(entries)


def test_a_prompt_is_found_by_its_text_key_or_key_prefix() -> None:
    groups = groups_of(prompt_entry("Once upon a time", 0), chat_entry("東京のおすすめは？", 0))
    key = prompt_entry("Once upon a time", 0).key
    assert find_key(groups, prompt="  Once upon a time\r\n") == key  # normalised like keys
    assert find_key(groups, key=key) == key
    assert find_key(groups, key=key[:8].upper()) == key
    chat = chat_entry("東京のおすすめは？", 0).key
    assert find_key(groups, prompt="東京のおすすめは？") == chat  # a chat: its last user message
    with pytest.raises(AnswerNotFoundError, match="no cached prompt has the prompt 'Nope'"):
        find_key(groups, prompt="Nope")
    with pytest.raises(AnswerNotFoundError):
        find_key(groups, key=key[:7])  # too short a prefix to be trusted
    with pytest.raises(RequestError, match="one of the two"):
        find_key(groups, prompt="Once upon a time", key=key)


def test_a_name_shared_by_several_prompts_lists_them() -> None:
    other_system = (("system", "Answer in French."), ("user", "Hi"))
    other = Entry(
        key=chat_key(other_system, MODEL), variant=0, kind="chat", prompt="Hi",
        answer="Salut", model=MODEL, messages=other_system,
    ).sealed()  # fmt: skip
    groups = groups_of(prompt_entry("Hi", 0), chat_entry("Hi", 0), other)
    with pytest.raises(AmbiguousPromptError, match="names 3 cached prompts") as info:
        find_key(groups, prompt="Hi")
    candidates = info.value.candidates
    assert {c["kind"] for c in candidates} == {"prompt", "chat"}
    assert "Answer in French." in info.value.message
    assert info.value.to_dict()["error"]["code"] == "ambiguous_prompt"
    assert len(info.value.to_dict()["error"]["candidates"]) == 3


def test_pick_one_variant_or_all() -> None:
    group = [prompt_entry("p", v) for v in range(3)]
    assert pick(group, None) == group
    assert pick(group, 2) == [group[2]]
    with pytest.raises(AnswerNotFoundError, match="has no variant 7 \\(it has 0, 1, 2\\)"):
        pick(group, 7)


def test_approve_reject_pin_unpin() -> None:
    entry = prompt_entry("p", 0)
    approved = change(entry, "approve")
    assert approved.state == "approved" and approved.answer == entry.answer
    approved.verify()
    pinned = change(approved, "pin")
    assert pinned.pinned and pinned.state == "approved"
    rejected = change(pinned, "reject")
    assert rejected.state == "rejected" and not rejected.pinned  # a rejected answer is unpinned
    with pytest.raises(ReviewConflictError, match="is rejected: approve it"):
        change(rejected, "pin")
    assert not change(pinned, "unpin").pinned


def test_edit_keeps_the_old_text_and_checks_the_new_one() -> None:
    entry = reviewed(prompt_entry("Write a short poem about the sea:", 4), state="rejected")
    fixed = edited(entry, "Waves fold over the quiet sand.", now=1234.0)
    assert fixed.answer == "Waves fold over the quiet sand." and fixed.edited
    assert fixed.state == "pending"  # the rejected text is gone
    assert fixed.finish_reason == "stop" and fixed.completion_tokens == 0
    assert fixed.flags == ()
    assert fixed.history == (
        {
            "answer": entry.answer,
            "finish_reason": "length",
            "params": entry.params,
            "flags": [],
            "completion_tokens": 8,
            "replaced": 1234.0,
            "why": "edit",
        },
    )
    fixed.verify()
    # The checks run on the new text: a leaked special token is flagged.
    leaked = edited(fixed, "Waves <start_of_image> fold")
    assert "special_token" in leaked.flags and len(leaked.history) == 2
    approved = edited(change(entry, "approve"), "A new text.")
    assert approved.state == "approved"  # a person's text of an approved answer stays so
    for bad in ("", "   ", fixed.answer):
        with pytest.raises(RequestError):
            edited(fixed, bad)


def test_an_edited_text_is_served_with_its_own_token_count() -> None:
    entry = prompt_entry("Write a short poem about the sea:", 1)  # 8 generated tokens
    assert change(entry, "edit", text="Waves.", tokens=3).completion_tokens == 3
    assert change(entry, "edit", text="Waves.").completion_tokens == 0  # not known
    assert change(entry, "approve", tokens=3).completion_tokens == 8  # only an edit counts
    asked: list[tuple[str, str]] = []

    def count(model: str, text: str) -> int:
        asked.append((model, text))
        return 11

    assert edit_tokens(entry, "edit", "Waves.", count) == 11
    assert asked == [(MODEL, "Waves.")]  # with the entry's own model
    assert edit_tokens(entry, "approve", None, count) is None
    assert edit_tokens(entry, "edit", "Waves.", None) is None


def test_regenerate_replaces_the_text_and_keeps_the_old_one() -> None:
    entry = reviewed(prompt_entry("p", 2), state="approved", flags=("loop",))
    fresh = reviewed(prompt_entry("p", 2, answer="a new answer"), flags=("truncated",))
    fresh = reviewed(fresh, params={**fresh.params, "seed": 777})
    after = regenerated(entry, fresh, now=99.0)
    assert after.answer == "a new answer" and after.state == "pending"
    assert after.flags == ("truncated",) and after.params["seed"] == 777
    assert after.history[-1]["why"] == "regenerate" and after.history[-1]["flags"] == ["loop"]
    assert not after.edited
    assert used_seeds(after) == {2, 777}
    with pytest.raises(ReviewConflictError, match="pinned: unpin it"):
        regenerated(change(entry, "pin"), fresh)


def test_listing_says_what_is_served() -> None:
    group = [
        reviewed(prompt_entry("p", 0), state="approved"),
        reviewed(prompt_entry("p", 1), state="rejected"),
        prompt_entry("p", 2),
    ]
    by_default = listing(groups_of(*group), {"approved", "pending"})
    assert [a["served"] for a in by_default] == [True, False, True]
    assert [a["served"] for a in listing(groups_of(*group), {"approved"})] == [True, False, False]
    doc = describe(group[1])
    for field in ("prompt", "kind", "model", "variant", "state", "flags", "text"):
        assert field in doc
    assert doc["state"] == "rejected" and doc["text"] == group[1].answer
