"""Entry: the review fields, and the checksum rule that keeps entries from before them valid."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from comeapi.cache.store import Entry
from comeapi.errors import StoreError
from tests.cache.factory import reviewed, reviewed_entries

# An entry with no review, and its checksum as computed by comeapi before review existed
# (main at 34e0209, Entry.compute_checksum): the same entry must keep it.
PLAIN = Entry(
    key="k" * 64,
    variant=2,
    kind="prompt",
    prompt="Hello",
    answer="Hi there.",
    model="gemma-3-270m-q4_k_m.gguf",
    params={"seed": 2, "max_tokens": 8},
    finish_reason="stop",
    prompt_tokens=3,
    completion_tokens=4,
    created=1700000000.0,
)
CHECKSUM_BEFORE_REVIEW = "208c22c8cba61fbec7fbf8f4f8129dd4051145ad19cbafd9d6933918cbc825a0"


def test_an_entry_without_review_keeps_the_checksum_it_had_before_review() -> None:
    assert PLAIN.compute_checksum() == CHECKSUM_BEFORE_REVIEW
    old_line = {k: v for k, v in PLAIN.sealed().to_dict().items()}
    for name in ("state", "flags", "pinned", "history"):
        del old_line[name]  # what a version 1 export holds
    entry = Entry.from_dict(old_line)
    entry.verify()
    assert (entry.state, entry.flags, entry.pinned, entry.history) == ("pending", (), False, ())


@pytest.mark.parametrize(
    "review",
    [
        {"state": "approved"},
        {"state": "rejected"},
        {"flags": ("loop",)},
        {"pinned": True},
        {"history": ({"answer": "x", "why": "edit"},)},
    ],
)
def test_the_checksum_covers_every_review_field(review: dict[str, object]) -> None:
    sealed = PLAIN.sealed()
    changed = replace(sealed, **review)  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="fails its checksum"):
        changed.verify()
    resealed = reviewed(PLAIN, **review)
    assert resealed.checksum != CHECKSUM_BEFORE_REVIEW
    resealed.verify()


def test_review_fields_roundtrip_through_to_dict() -> None:
    for entry in reviewed_entries():
        doc = json.loads(json.dumps(entry.to_dict()))
        again = Entry.from_dict(doc)
        assert again == entry
        again.verify()


def test_edited_is_derived_from_the_last_replacement() -> None:
    assert not PLAIN.edited
    edit = {"answer": "a", "why": "edit"}
    regenerate = {"answer": "b", "why": "regenerate"}
    assert replace(PLAIN, history=(edit,)).edited
    assert not replace(PLAIN, history=(edit, regenerate)).edited
    assert replace(PLAIN, history=(regenerate, edit)).edited


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("state", "maybe", "state 'maybe' is not one of"),
        ("flags", "loop", "flags must be a list"),
        ("flags", [1], "flags must be a list"),
        ("pinned", "yes", "pinned must be true or false"),
        ("history", [["x"]], "history must be a list of objects"),
    ],
)
def test_malformed_review_fields_are_refused(field: str, value: object, message: str) -> None:
    doc = PLAIN.sealed().to_dict()
    doc[field] = value
    with pytest.raises((ValueError, TypeError), match=message):
        Entry.from_dict(doc)
