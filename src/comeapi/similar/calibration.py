"""A calibration: per known prompt, its labelled examples, threshold and measured error.

A plain value that turns into JSON and back (``to_dict``/``from_dict``), so that a store can
keep it beside the answers and every tier that serves them can carry it: it holds everything
a ``Matcher`` needs besides the embedding engine, which it names (thresholds are only valid for
the engine that fitted them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from comeapi.cache.store import EntryKind
from comeapi.errors import ConfigError

FORMAT_VERSION = 1
Messages = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class PromptCalibration:
    """One known prompt: what was fitted and what it was measured to do (leave-one-out)."""

    key: str
    kind: EntryKind
    context: Messages  # a chat's messages before the last user message (system included)
    text: str  # the prompt, or the chat's last user message
    same: tuple[str, ...]
    not_: tuple[str, ...]
    threshold: float | None  # None: exact-only
    served: int  # `same:` examples matched to this prompt at the threshold
    negatives: int  # labelled examples that need another answer (`not:` and every other's)
    false_hits: int  # of those, matched to this prompt at the threshold
    bound: float  # one-sided upper bound of false_hits / negatives at `confidence`
    reason: str = ""  # why the prompt stays exact-only

    @property
    def enabled(self) -> bool:
        return self.threshold is not None

    @property
    def served_share(self) -> float:
        return self.served / len(self.same) if self.same else 0.0


@dataclass(frozen=True, slots=True)
class Calibration:
    engine: str  # Embedder.name
    max_false_hits: float
    confidence: float
    prompts: tuple[PromptCalibration, ...]

    def by_key(self) -> dict[str, PromptCalibration]:
        return {p.key: p for p in self.prompts}

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": FORMAT_VERSION,
            "engine": self.engine,
            "max_false_hits": self.max_false_hits,
            "confidence": self.confidence,
            "prompts": [
                {
                    "key": p.key,
                    "kind": p.kind,
                    "context": [list(m) for m in p.context],
                    "text": p.text,
                    "same": list(p.same),
                    "not": list(p.not_),
                    "threshold": p.threshold,
                    "served": p.served,
                    "negatives": p.negatives,
                    "false_hits": p.false_hits,
                    "bound": p.bound,
                    "reason": p.reason,
                }
                for p in self.prompts
            ],
        }

    @classmethod
    def from_dict(cls, data: Any) -> Calibration:
        """The calibration ``to_dict`` wrote; ConfigError naming what is wrong otherwise."""
        try:
            if data["v"] != FORMAT_VERSION:
                raise ConfigError(
                    f"calibration format {data['v']!r} is not {FORMAT_VERSION}: recalibrate",
                    param="calibration",
                )
            prompts = tuple(
                PromptCalibration(
                    key=str(p["key"]),
                    kind=_kind(p["kind"]),
                    context=tuple((str(r), str(c)) for r, c in p["context"]),
                    text=str(p["text"]),
                    same=tuple(map(str, p["same"])),
                    not_=tuple(map(str, p["not"])),
                    threshold=None if p["threshold"] is None else float(p["threshold"]),
                    served=int(p["served"]),
                    negatives=int(p["negatives"]),
                    false_hits=int(p["false_hits"]),
                    bound=float(p["bound"]),
                    reason=str(p["reason"]),
                )
                for p in data["prompts"]
            )
            return cls(
                str(data["engine"]),
                float(data["max_false_hits"]),
                float(data["confidence"]),
                prompts,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"calibration is malformed: {exc!r}", param="calibration") from exc


def _kind(value: Any) -> EntryKind:
    if value not in ("prompt", "chat"):
        raise ValueError(f"kind must be 'prompt' or 'chat' (got {value!r})")
    kind: EntryKind = value
    return kind
