"""Which stored answers are served: the one owner of the rule every tier applies at load time.

An answer is served when its review state is one of ``serve_states`` (``approved``, or
``approved,pending``; a rejected answer never is). Pinning narrows it: when any servable
variant of a prompt is pinned, only the pinned ones are served. A prompt with no servable
variant is a miss, never an empty answer.

The gateway applies this to its in-memory index, the Lambda handler to the catalogue of its
snapshot or table, comeapi behind nginx to the slots warmup fills; each once per load, never
per request. The catalogue of a DynamoDB table carries each prompt's review as ``marks``, one
letter per variant (``p``ending, ``a``pproved, ``r``ejected; upper case when pinned), so a
reader knows what it may pick without reading every entry.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

from comeapi.cache.store import REVIEW_STATES, Entry, ReviewState

DEFAULT_SERVE_STATES: tuple[ReviewState, ...] = ("approved", "pending")
SERVABLE_STATES: tuple[ReviewState, ...] = ("approved", "pending")
_LETTERS: dict[str, ReviewState] = {s[0]: s for s in REVIEW_STATES}


def parse_serve_states(value: str | Iterable[str]) -> frozenset[ReviewState]:
    """``"approved,pending"`` (or a list) as a set; ValueError saying what is wrong."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    names = [p.strip() for p in parts if p.strip()]
    states: set[ReviewState] = set()
    for name in names:
        state = next((s for s in SERVABLE_STATES if s == name), None)
        if state is None:
            why = "a rejected answer is never served" if name == "rejected" else "unknown state"
            raise ValueError(f"{name!r}: {why}; expected approved, or approved,pending")
        states.add(state)
    if "approved" not in states:
        raise ValueError("expected approved, or approved,pending (approved answers are served)")
    return frozenset(states)


def served_entries(group: Sequence[Entry], serve: Collection[str]) -> tuple[Entry, ...]:
    """The variants of one prompt that may be served, in variant order."""
    servable = tuple(e for e in group if e.state in serve)
    pinned = tuple(e for e in servable if e.pinned)
    return pinned or servable


def mark(state: str, pinned: bool) -> str:
    """One variant's letter in a catalogue's ``marks``."""
    letter = state[0]
    return letter.upper() if pinned else letter


def marks(entries: Iterable[Entry]) -> str:
    """The ``marks`` of a prompt's variants 0, 1, 2, ... given in that order."""
    return "".join(mark(e.state, e.pinned) for e in entries)


def served_variants(marks: str, variants: int, serve: Collection[str]) -> tuple[int, ...]:
    """The variant numbers a catalogue row allows: ``marks`` empty (a table written before
    review) means every variant is pending. ValueError on a letter that is not a state."""
    if not marks:
        return tuple(range(variants)) if "pending" in serve else ()
    if len(marks) != variants:
        raise ValueError(f"marks {marks!r} do not cover {variants} variants")
    servable = []
    pinned = []
    for v, letter in enumerate(marks):
        state = _LETTERS.get(letter.lower())
        if state is None:
            raise ValueError(f"marks {marks!r}: {letter!r} is not a review state")
        if state in serve:
            servable.append(v)
            if letter.isupper():
                pinned.append(v)
    return tuple(pinned or servable)
