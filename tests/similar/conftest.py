"""The real engine calibrated once on the shipped labelled lists, for the tests that need it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from comeapi.cache.prompts import PromptSet, load_prompt_set
from comeapi.similar import Calibration, Matcher, calibrate, open_embedder
from comeapi.similar.engines import DEFAULT_ENGINE

REPO = Path(__file__).resolve().parents[2]
LABELLED = REPO / "examples" / "requirements-prompts.yaml"
HELDOUT = Path(__file__).with_name("heldout.yaml")


@dataclass(frozen=True)
class Calibrated:
    labelled: PromptSet
    calibration: Calibration
    matcher: Matcher


@pytest.fixture(scope="session")
def calibrated() -> Calibrated:
    labelled = load_prompt_set(LABELLED)
    embedder = open_embedder(DEFAULT_ENGINE)
    calibration = calibrate(labelled.items, embedder)
    return Calibrated(labelled, calibration, Matcher(calibration, embedder))
