"""What the gateway's cache holds and how it is used, as /status and the dashboard show it."""

from __future__ import annotations

from typing import Any

from comeapi.cache.serving import marks
from comeapi.gateway.cache import ResponseCache

MISSED_SHOWN = 20


def cache_status(cache: ResponseCache) -> dict[str, Any]:
    """Prompts, answers, hits and misses (with the ratio), the store's problem if any, and
    each prompt's hits by variant."""
    similar = cache.similar.status() if cache.similar is not None else None
    calibrated = {p["key"]: p for p in similar["prompts"]} if similar is not None else {}
    prompts = []
    for key, group in cache.groups().items():
        if not group:
            continue
        hits = {e.variant: cache.hit_count(key, e.variant) for e in group}
        prompts.append(
            {
                "key": key,
                "prompt": group[0].prompt,
                "kind": group[0].kind,
                "model": group[0].model,
                "variants": len(group),
                "served_variants": list(cache.served_variants(key)),
                "marks": marks(group),
                "hits": sum(hits.values()),
                "hits_by_variant": {str(v): n for v, n in sorted(hits.items())},
            }
        )
        if similar is not None:  # whether paraphrases get this prompt's answers, and why not
            prompts[-1]["similar"] = _similar_of(calibrated.get(key))
    looked_up = cache.hits + cache.misses
    return {
        "prompts": len(prompts),
        "answers": cache.answer_count(),
        "served_answers": cache.served_count(),
        "serve_states": sorted(cache.serve_states),
        "variants_per_prompt": cache.variants,
        "hits": cache.hits,
        "misses": cache.misses,
        "hit_ratio": round(cache.hits / looked_up, 4) if looked_up else None,
        "store_problem": cache.store.problem or cache.problem,
        "match": "exact" if similar is None else "similar",
        "similar_hits": cache.similar_hits,
        "similar": None
        if similar is None
        else {k: v for k, v in similar.items() if k != "prompts"},
        "by_prompt": sorted(prompts, key=lambda p: p["prompt"]),
        # The queries missed most often, with the nearest prompt (--match similar): what to
        # label next (``comeapi cache misses``, ``comeapi cache label``).
        "missed": cache.missed.top(MISSED_SHOWN),
        "missed_tracked": len(cache.missed),
    }


def _similar_of(calibrated: dict[str, Any] | None) -> dict[str, Any]:
    if calibrated is None:
        return {"similar": False, "reason": "not in the store's calibration (no labelled examples)"}
    return {k: v for k, v in calibrated.items() if k not in ("prompt", "key")}
