"""Calibration: a threshold per known prompt, from labelled examples and the operator's bound.

Every labelled text (every prompt's ``same:`` and ``not:``) is sent, as a query of each pool's
kind and context, to a matcher that holds every other labelled text (leave-one-out), and its
nearest prompt, score and any refusal are recorded. For prompt P, the negatives are all labelled
texts that are not P's paraphrases (P's ``not:`` and every other prompt's examples). P's
threshold is the lowest that lets so few negatives through that the one-sided upper bound of
the false-hit rate (Clopper-Pearson, 95%) stays within ``max_false_hits``, plus a ``margin``
(negatives not yet seen sit a little above the ones that were); when no negative comes that
near, it is the score above which nine tenths of the ``same:`` examples nearest to P lie, less
the margin. A prompt without ``same:`` examples, or with too few negatives for any bound that
low (299 for 1%), stays exact-only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from comeapi.cache.prompts import PromptItem
from comeapi.similar.bound import upper_bound
from comeapi.similar.calibration import Calibration, Messages, PromptCalibration
from comeapi.similar.engines import Embedder
from comeapi.similar.matcher import Decision, Pool
from comeapi.similar.text import features

DEFAULT_MAX_FALSE_HITS = 0.01
DEFAULT_MARGIN = 0.01
# With no negative near a prompt, its threshold is where the lowest tenth of its paraphrases'
# scores begins: the guards decide below the negatives, but a query scoring under nearly every
# known paraphrase is not taken on the guards alone.
PARAPHRASE_QUANTILE = 0.1


def calibrate(
    items: Sequence[PromptItem],
    embedder: Embedder,
    max_false_hits: float = DEFAULT_MAX_FALSE_HITS,
    confidence: float = 0.95,
    margin: float = DEFAULT_MARGIN,
) -> Calibration:
    if not 0.0 < max_false_hits < 1.0:
        raise ValueError(f"max_false_hits must be in (0, 1) (got {max_false_hits})")
    drafts = [_draft(item) for item in items]
    labelled = sorted({t for d in drafts for t in (*d.same, *d.not_)})
    texts = sorted({*labelled, *(d.text for d in drafts)})
    vectors = dict(zip(texts, embedder.embed(texts), strict=True))
    query_features = {t: features(t) for t in labelled}

    groups: dict[tuple[str, Messages], list[PromptCalibration]] = {}
    for d in drafts:
        groups.setdefault((d.kind, d.context), []).append(d)
    fitted: dict[str, PromptCalibration] = {}
    for group in groups.values():
        pool = Pool(group, vectors)
        decisions = {t: pool.decide(vectors[t], query_features[t], leave_out=t) for t in labelled}
        for index, draft in enumerate(group):
            fitted[draft.key] = _fit(
                draft, index, decisions, labelled, max_false_hits, confidence, margin
            )
    return Calibration(
        embedder.name, max_false_hits, confidence, tuple(fitted[d.key] for d in drafts)
    )


def _draft(item: PromptItem) -> PromptCalibration:
    """The item as the matcher sees it, not yet fitted."""
    if item.messages is None:
        context: Messages = ()
        text = item.prompt
    else:
        context, (role, text) = item.messages[:-1], item.messages[-1]
        if role != "user":  # a chat that ends with the assistant is not a question to match
            return PromptCalibration(
                item.key, item.kind, item.messages, "", (), (), None, 0, 0, 0, 1.0,
                "the chat does not end with a user message",
            )  # fmt: skip
    return PromptCalibration(
        item.key, item.kind, context, text, item.same, item.not_, None, 0, 0, 0, 1.0
    )


def _fit(
    draft: PromptCalibration,
    index: int,
    decisions: dict[str, Decision],
    labelled: list[str],
    max_false_hits: float,
    confidence: float,
    margin: float,
) -> PromptCalibration:
    if draft.reason:
        return draft
    own = set(draft.same)
    negatives = [t for t in labelled if t not in own and t != draft.text]
    n = len(negatives)

    def accepted(texts: Sequence[str]) -> list[float]:
        out = []
        for t in texts:
            d = decisions[t]
            if d.owner == index and d.refused is None:
                out.append(d.score)
        return sorted(out, reverse=True)

    positive_scores, negative_scores = accepted(draft.same), accepted(negatives)
    # How low a paraphrase of this prompt scores, refused by a guard or not: the evidence of
    # where paraphrases end, when no negative comes near.
    paraphrase_scores = [decisions[t].score for t in draft.same if decisions[t].owner == index]
    if not draft.same:
        return replace(draft, negatives=n, reason="no labelled paraphrases (same:)")
    best = upper_bound(0, n, confidence) if n else 1.0
    if best > max_false_hits:
        return replace(
            draft,
            negatives=n,
            bound=best,
            reason=f"{n} labelled negatives cannot bound the false-hit rate under "
            f"{max_false_hits:.2%} (at best {best:.2%}): label more examples",
        )
    allowed = 0  # the most false hits whose bound is within the setting (the bound grows with k)
    while allowed < n and upper_bound(allowed + 1, n, confidence) <= max_false_hits:
        allowed += 1
    if allowed < len(negative_scores):
        threshold = negative_scores[allowed] + margin
    elif paraphrase_scores:  # no negative gets near: where the paraphrases' scores lie
        low = sorted(paraphrase_scores)[int(len(paraphrase_scores) * PARAPHRASE_QUANTILE)]
        threshold = low - margin
    else:
        threshold = 1.0
    false_hits = sum(s >= threshold for s in negative_scores)
    served = sum(s >= threshold for s in positive_scores)
    result = replace(
        draft,
        threshold=round(threshold, 6),
        served=served,
        negatives=n,
        false_hits=false_hits,
        bound=upper_bound(false_hits, n, confidence),
    )
    if served == 0:
        return replace(result, threshold=None, reason="no labelled paraphrase is served")
    return result
