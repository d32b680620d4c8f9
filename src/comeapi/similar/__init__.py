"""Similar matching: a query that misses the exact key may be answered as a known prompt.

Opt-in and bounded: per known prompt a threshold is fitted from labelled examples (``same:``
and ``not:`` in the prompt set) so that the false-hit rate's 95% upper bound stays within the
operator's setting, and guards refuse queries whose numbers, negation or content words differ.
Modules: ``text`` and ``guards`` (what is compared), ``engines`` (embeddings), ``bound``
(Clopper-Pearson), ``calibrate`` and ``calibration`` (fitting, and its storable result),
``matcher`` (classifying a query). docs/cache.md, "Matching", explains it in plain words.
"""

from comeapi.similar.bound import upper_bound
from comeapi.similar.calibrate import DEFAULT_MAX_FALSE_HITS, calibrate
from comeapi.similar.calibration import Calibration, PromptCalibration
from comeapi.similar.engines import DEFAULT_ENGINE, Embedder, open_embedder
from comeapi.similar.matcher import Match, Matcher

__all__ = [
    "DEFAULT_ENGINE",
    "DEFAULT_MAX_FALSE_HITS",
    "Calibration",
    "Embedder",
    "Match",
    "Matcher",
    "PromptCalibration",
    "calibrate",
    "open_embedder",
    "upper_bound",
]
