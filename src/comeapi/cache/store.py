"""What a response store is: N answers ("variants") per prompt key, whole or absent.

``ResponseStore`` is the public face; each backend (SQLite, DynamoDB) implements the small
hooks below it. Every store keeps entries whole: a reader sees an entry completely or not at
all, and a failed write leaves what was there. Storage errors surface as ``StoreError``.

An entry carries its review (``state``, ``flags``, ``pinned``, ``history``) beside the answer.
Its checksum covers every field, but a review field at its default value is left out of the
checksummed document, so an entry written before review existed keeps its checksum and reads
as ``pending``, unflagged, unpinned, with no history.
"""

from __future__ import annotations

import hashlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from comeapi.errors import StoreError
from comeapi.protocol.responses import Answer

EntryKind = Literal["prompt", "chat"]
ReviewState = Literal["pending", "approved", "rejected"]
REVIEW_STATES: tuple[ReviewState, ...] = ("pending", "approved", "rejected")
#: Why an earlier text of an answer was replaced (``Entry.history``).
REPLACED_BY = ("edit", "regenerate")
#: The review fields at their defaults: omitted from the checksummed document (see above).
_REVIEW_DEFAULTS: dict[str, Any] = {
    "state": "pending",
    "flags": [],
    "pinned": False,
    "history": [],
}


@dataclass(frozen=True, slots=True)
class Entry:
    """One pre-generated answer: variant ``variant`` of prompt ``key``."""

    key: str
    variant: int
    kind: EntryKind
    prompt: str  # the prompt, or for chat the last user message (for listings)
    answer: str
    model: str
    messages: tuple[tuple[str, str], ...] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    created: float = 0.0
    # The review: see comeapi.cache.review for what changes these and comeapi.cache.serving
    # for what is served. ``flags`` are the quality checks the current text fails (sorted);
    # ``history`` the earlier texts, oldest first, each {"answer", "finish_reason", "params",
    # "flags", "completion_tokens", "replaced" (Unix time), "why": "edit" | "regenerate"}.
    state: ReviewState = "pending"
    flags: tuple[str, ...] = ()
    pinned: bool = False
    history: tuple[dict[str, Any], ...] = ()
    checksum: str = ""

    @property
    def edited(self) -> bool:
        """Whether the current text was typed by a person: the last replacement was an edit."""
        return bool(self.history) and self.history[-1].get("why") == "edit"

    def compute_checksum(self) -> str:
        """SHA-256 over everything but the checksum itself (canonical JSON), review fields at
        their defaults left out (so entries from before review keep their checksums)."""
        doc = self.to_dict()
        doc.pop("checksum")
        for name, default in _REVIEW_DEFAULTS.items():
            if doc[name] == default:
                del doc[name]
        canon = json.dumps(doc, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()

    def sealed(self) -> Entry:
        """This entry with its checksum filled in."""
        return replace(self, checksum=self.compute_checksum())

    def verify(self) -> None:
        if self.checksum != self.compute_checksum():
            raise StoreError(f"entry {self.key}#{self.variant} fails its checksum", code="corrupt")

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "variant": self.variant,
            "kind": self.kind,
            "prompt": self.prompt,
            "messages": [list(m) for m in self.messages] if self.messages is not None else None,
            "answer": self.answer,
            "model": self.model,
            "params": self.params,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "created": self.created,
            "state": self.state,
            "flags": list(self.flags),
            "pinned": self.pinned,
            "history": [dict(h) for h in self.history],
            "checksum": self.checksum,
        }

    @classmethod
    def from_answer(
        cls,
        answer: Answer | None,
        *,
        key: str,
        variant: int,
        kind: EntryKind,
        prompt: str,
        messages: tuple[tuple[str, str], ...] | None,
        model: str,
        params: dict[str, Any],
    ) -> Entry | None:
        """A new (pending, unsealed) entry holding a backend's ``answer``
        (``protocol.responses.read_answer``); None when the answer has no text."""
        if answer is None or answer.text is None:
            return None
        return cls(
            key=key,
            variant=variant,
            kind=kind,
            prompt=prompt,
            answer=answer.text,
            model=model,
            messages=messages,
            params=params,
            finish_reason=answer.finish_reason or "stop",
            prompt_tokens=answer.prompt_tokens or 0,
            completion_tokens=answer.completion_tokens or 0,
            created=time.time(),
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Entry:
        messages = d.get("messages")
        return cls(
            key=str(d["key"]),
            variant=int(d["variant"]),
            kind=d["kind"],
            prompt=str(d["prompt"]),
            answer=str(d["answer"]),
            model=str(d["model"]),
            messages=tuple((str(r), str(c)) for r, c in messages) if messages is not None else None,
            params=dict(d.get("params") or {}),
            finish_reason=str(d.get("finish_reason", "stop")),
            prompt_tokens=int(d.get("prompt_tokens", 0)),
            completion_tokens=int(d.get("completion_tokens", 0)),
            created=float(d.get("created", 0.0)),
            state=parse_state(d.get("state", "pending")),
            flags=_flags(d.get("flags") or []),
            pinned=_bool(d.get("pinned", False), "pinned"),
            history=_history(d.get("history") or []),
            checksum=str(d.get("checksum", "")),
        )


def parse_state(value: Any) -> ReviewState:
    """``value`` as a review state; ValueError if it is not one."""
    for state in REVIEW_STATES:
        if value == state:
            return state
    raise ValueError(f"state {value!r} is not one of {', '.join(REVIEW_STATES)}")


def _flags(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(f, str) for f in value):
        raise TypeError("flags must be a list of check names")
    return tuple(value)


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false")
    return value


def _history(value: Any) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(h, dict) for h in value):
        raise TypeError("history must be a list of objects")
    return tuple(dict(h) for h in value)


@dataclass(frozen=True, slots=True)
class PromptInfo:
    """A cached prompt as listings show it. In a DynamoDB catalogue, ``marks`` is the review
    of variants 0..N-1, one letter each (``comeapi.cache.serving``), empty in a catalogue
    written before review (all pending); other stores leave it empty."""

    key: str
    kind: EntryKind
    prompt: str
    model: str
    variants: int
    marks: str = ""


class ResponseStore(ABC):
    """A store of cached answers. Public methods validate, then call the ``_`` hooks."""

    #: Why the store cannot be used as it should right now (its file was deleted under a
    #: running server, say), for /status; None while all is well.
    problem: str | None = None

    def get(self, key: str, variant: int) -> Entry | None:
        if variant < 0:
            raise ValueError("variant must be >= 0")
        return self._get(key, variant)

    def put(self, entry: Entry) -> None:
        """Write one entry atomically (replacing the same key and variant)."""
        self.put_many([entry])

    def put_many(self, entries: Iterable[Entry]) -> int:
        """Write entries, each sealed with its checksum; returns how many were written."""
        return self._put_many(_checked(entries))

    def replace_all(self, entries: Iterable[Entry]) -> int:
        """Make the store hold exactly ``entries`` (atomically where the store can)."""
        return self._replace_all(_checked(entries))

    def entries(self) -> Iterator[Entry]:
        return self._entries()

    def prompts(self) -> list[PromptInfo]:
        return self._prompts()

    def load_index(self) -> dict[str, tuple[Entry, ...]]:
        """Every entry grouped by key, variants in ascending order, each checksum verified.

        What a server keeps in memory to answer hits without touching the store per request.
        A corrupt entry raises StoreError rather than being served.
        """
        index: dict[str, list[Entry]] = {}
        for entry in self.entries():
            entry.verify()
            index.setdefault(entry.key, []).append(entry)
        return {key: tuple(sorted(group, key=lambda e: e.variant)) for key, group in index.items()}

    def variants_by_key(self) -> dict[str, set[int]]:
        """The variant numbers present for each key (what warmup still has to fill)."""
        present: dict[str, set[int]] = {}
        for entry in self.entries():
            present.setdefault(entry.key, set()).add(entry.variant)
        return present

    def is_empty(self) -> bool:
        return next(iter(self.entries()), None) is None

    def record_hits(self, counts: Mapping[tuple[str, int], int]) -> None:  # noqa: B027
        """Add ``counts`` (key, variant) -> hits to the stored totals. Default: not kept."""

    def hit_counts(self) -> dict[tuple[str, int], int]:
        """Stored hit totals per (key, variant); empty where the store keeps none."""
        return {}

    def calibration(self) -> dict[str, Any] | None:
        """The similar-matching calibration kept with the answers (``similar.Calibration``
        as JSON), None when the store holds none: then no request is matched by meaning."""
        return None

    def set_calibration(self, doc: dict[str, Any] | None) -> None:
        """Keep ``doc`` as the store's calibration (None removes it); StoreError where the
        store cannot keep one."""
        raise StoreError(f"{type(self).__name__} cannot keep a calibration")

    def revision(self) -> int | None:
        """A number that changes whenever entries change (None: unknown), so a server can
        cheaply notice an import and reload its in-memory index."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def __enter__(self) -> ResponseStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def _get(self, key: str, variant: int) -> Entry | None: ...

    @abstractmethod
    def _put_many(self, entries: list[Entry]) -> int: ...

    @abstractmethod
    def _replace_all(self, entries: list[Entry]) -> int: ...

    @abstractmethod
    def _entries(self) -> Iterator[Entry]: ...

    @abstractmethod
    def _prompts(self) -> list[PromptInfo]: ...


def _checked(entries: Iterable[Entry]) -> list[Entry]:
    """Entries sealed (checksum filled in) and checked before any of them is written."""
    sealed = []
    for e in entries:
        if e.variant < 0:
            raise StoreError(f"entry {e.key}#{e.variant}: variant must be >= 0", code="invalid")
        if e.kind not in ("prompt", "chat") or (e.kind == "chat") != (e.messages is not None):
            raise StoreError(
                f"entry {e.key}#{e.variant}: kind {e.kind!r} does not match its messages",
                code="invalid",
            )
        if e.state not in REVIEW_STATES:
            raise StoreError(
                f"entry {e.key}#{e.variant}: unknown state {e.state!r}", code="invalid"
            )
        if list(e.flags) != sorted(set(e.flags)):
            raise StoreError(
                f"entry {e.key}#{e.variant}: flags must be sorted and distinct", code="invalid"
            )
        if e.pinned and e.state == "rejected":
            raise StoreError(
                f"entry {e.key}#{e.variant}: a rejected answer cannot be pinned", code="invalid"
            )
        e = e if e.checksum else e.sealed()
        e.verify()
        sealed.append(e)
    return sealed
