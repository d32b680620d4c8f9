"""The matcher: is a query one of the known prompts (of its model and kind), or none?

Known prompts are grouped in pools by kind and context (a chat's messages before its last
user message, the system message included, must be sent exactly; only the last user message
is compared by meaning). In its pool a query is embedded and compared with every labelled
text: the known prompts with their ``same:`` examples ("anchors" of that prompt) and the
``not:`` examples. It is matched to the prompt of its nearest anchor when

1. its nearest labelled text is not a ``not:`` example,
2. the guards (``guards.py``) find the same numbers, negation and content words, and
3. its similarity to that anchor reaches the prompt's calibrated threshold (a prompt the
   calibration left exact-only matches nothing).

``Pool.decide`` answers 1 and 2 for calibration too, leaving one labelled text out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from comeapi.cache.key import normalise
from comeapi.cache.store import EntryKind
from comeapi.errors import ConfigError
from comeapi.similar.calibration import Calibration, Messages, PromptCalibration
from comeapi.similar.engines import Embedder, Vectors
from comeapi.similar.guards import Vocabulary, refusal
from comeapi.similar.text import Features, features


@dataclass(frozen=True, slots=True)
class Match:
    """The outcome for one query. ``key`` is set only when it is answered as that prompt."""

    key: str | None
    nearest: str | None  # the nearest known prompt's text (also when refused)
    score: float  # cosine similarity to the nearest anchor of that prompt
    reason: str | None = None  # why it is not a match

    @property
    def hit(self) -> bool:
        return self.key is not None


@dataclass(frozen=True, slots=True)
class Decision:
    """What a pool makes of a query before any threshold: nearest prompt, score, refusal."""

    owner: int  # index into the pool's prompts
    score: float
    refused: str | None


class Pool:
    """The known prompts of one kind and context, with their labelled texts embedded."""

    def __init__(self, prompts: Sequence[PromptCalibration], vectors: dict[str, Vectors]):
        self.prompts = list(prompts)
        self.features = [features(p.text) for p in self.prompts]
        anchors = [(i, t) for i, p in enumerate(self.prompts) for t in (p.text, *p.same)]
        self.owner = np.array([i for i, _ in anchors], dtype=np.int64)
        self.anchor_texts = [t for _, t in anchors]
        self.anchors = _stack([vectors[t] for t in self.anchor_texts])
        self._anchor_features = [features(t) for t in self.anchor_texts]
        self.vocabularies = [self._vocabulary(i) for i in range(len(self.prompts))]
        # Near neighbours the guards cannot tell from their prompt ("What can I help you
        # with?"): a query nearer one of them than to any paraphrase is refused. The others
        # (a negation, another number or word) are refused by the guards already.
        self.near_texts = sorted(
            {
                t
                for i, p in enumerate(self.prompts)
                for t in p.not_
                if refusal(features(t), self.features[i], self.vocabularies[i]) is None
            }
        )
        self.near = _stack([vectors[t] for t in self.near_texts])

    def _vocabulary(self, index: int, leave_out: str | None = None) -> Vocabulary:
        return Vocabulary.of(
            f
            for o, t, f in zip(self.owner, self.anchor_texts, self._anchor_features, strict=True)
            if o == index and t != leave_out
        )

    def refusals(self, query: Features) -> list[str | None]:
        """Per prompt, why the guards refuse ``query`` (None: they let it through)."""
        return [refusal(query, f, v) for f, v in zip(self.features, self.vocabularies, strict=True)]

    def decide(self, vector: Vectors, query: Features, leave_out: str | None = None) -> Decision:
        """The nearest prompt and why it must be refused, if so. ``leave_out`` is a labelled
        text to ignore (calibration scores each labelled text against all the others)."""
        sims = self.anchors @ vector
        near = self.near @ vector if len(self.near_texts) else np.zeros(0, np.float32)
        if leave_out is not None:
            sims = np.where([t == leave_out for t in self.anchor_texts], -2.0, sims)
            near = np.where([t == leave_out for t in self.near_texts], -2.0, near)
        best = int(np.argmax(sims))
        owner, score = int(self.owner[best]), float(sims[best])
        if len(near) and float(near.max()) >= score:
            nearest_not = self.near_texts[int(np.argmax(near))]
            return Decision(owner, score, f"nearer the labelled near neighbour {nearest_not!r}")
        vocabulary = (
            self.vocabularies[owner] if leave_out is None else self._vocabulary(owner, leave_out)
        )
        refused = refusal(query, self.features[owner], vocabulary)
        if refused is None and query.yes_no and not self._anchor_features[best].yes_no:
            refused = "a yes/no question"  # the nearest paraphrase asks what, how or where
        return Decision(owner, score, refused)


class Matcher:
    """Classifies queries with a calibration and the engine it was fitted with."""

    def __init__(self, calibration: Calibration, embedder: Embedder):
        if embedder.name != calibration.engine:
            raise ConfigError(
                f"the calibration was fitted with {calibration.engine!r}, not {embedder.name!r}:"
                " recalibrate with this engine",
                param="calibration",
            )
        self.calibration = calibration
        self.embedder = embedder
        texts = sorted({t for p in calibration.prompts for t in (p.text, *p.same, *p.not_)})
        vectors = dict(zip(texts, embedder.embed(texts), strict=True))
        groups: dict[tuple[EntryKind, Messages], list[PromptCalibration]] = {}
        for p in calibration.prompts:
            groups.setdefault((p.kind, p.context), []).append(p)
        self.pools = {where: Pool(group, vectors) for where, group in groups.items()}
        # A query far longer than every labelled text is no paraphrase of one, and embedding
        # it costs time in proportion: refused unread.
        self.max_chars = 2 * max((len(t) for t in texts), default=0) + 64

    def match(self, text: str, kind: EntryKind, context: Messages = ()) -> Match:
        """``text``: the prompt, or a chat's last user message; ``context``: the chat's
        messages before it (role, content), as sent."""
        context = tuple((role, normalise(content)) for role, content in context)
        pool = self.pools.get((kind, context))
        if pool is None:
            return Match(None, None, 0.0, "no known prompt of this kind and context")
        text = normalise(text)
        if len(text) > self.max_chars:
            return Match(None, None, 0.0, f"longer than {self.max_chars} characters")
        query = features(text)
        refusals = pool.refusals(query)
        if all(refusals):  # no prompt could be matched: the embedding (~20 ms) is not needed
            return Match(None, None, 0.0, "every known prompt refused: " + str(refusals[0]))
        decision = pool.decide(self.embedder.embed([text])[0], query)
        known = pool.prompts[decision.owner]
        refused = decision.refused
        if refused is None and known.threshold is None:
            refused = "the prompt is exact-only: " + (known.reason or "not calibrated")
        elif refused is None and decision.score < (known.threshold or 0.0):
            refused = f"similarity {decision.score:.3f} below {known.threshold:.3f}"
        if refused is not None:
            return Match(None, known.text, decision.score, refused)
        return Match(known.key, known.text, decision.score)

    def nearest(
        self, text: str, kind: EntryKind, context: Messages = ()
    ) -> tuple[str, float] | None:
        """The known prompt nearest ``text`` and the score, guards aside (one embedding): what
        an operator is shown beside a missed query, never a reason to answer it."""
        context = tuple((role, normalise(content)) for role, content in context)
        pool = self.pools.get((kind, context))
        text = normalise(text)
        if pool is None or len(text) > self.max_chars or not len(pool.anchor_texts):
            return None
        sims = pool.anchors @ self.embedder.embed([text])[0]
        best = int(np.argmax(sims))
        return pool.prompts[int(pool.owner[best])].text, float(sims[best])


def _stack(rows: list[Vectors]) -> Vectors:
    if not rows:
        return np.zeros((0, 1), dtype=np.float32)
    return np.stack(rows).astype(np.float32)
