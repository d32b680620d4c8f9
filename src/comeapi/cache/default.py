"""The shipped default cache: 10 prompts x 5 answers of the bundled model, in the package.

``comeapi serve`` and ``comeapi cache ...`` with the default store fill it from
``data/default-cache.jsonl`` on first use, so a fresh clone serves the cache at once; its
header carries the calibration of the shipped prompt set's labelled lists, so ``--match
similar`` answers paraphrases at once too.
Regenerate the file as docs/cache.md ("The shipped default") describes.
"""

from __future__ import annotations

import importlib.resources
import logging
from pathlib import Path

from comeapi.cache.archive import read_calibration, read_jsonl
from comeapi.cache.open import open_store
from comeapi.cache.store import Entry, ResponseStore
from comeapi.settings import Settings, default_store

log = logging.getLogger("comeapi.cache")

SHIPPED_CACHE = "default-cache.jsonl"


def shipped_cache_path() -> Path:
    return Path(str(importlib.resources.files("comeapi") / "data" / SHIPPED_CACHE))


def shipped_entries() -> list[Entry]:
    """The shipped entries, every checksum and key verified (ArchiveError otherwise)."""
    return read_jsonl(shipped_cache_path())


def ensure_default_store(settings: Settings, store: ResponseStore | None = None) -> int:
    """Seed the default store from the shipped data when it is empty; returns entries added.

    Only the default store (``settings.store == default_store()``) is seeded: a store the user
    configured holds what the user put there. Seeding twice at once (several workers) is
    harmless: both write the same entries.
    """
    if settings.store != default_store():
        return 0
    own = store is None
    target = store if store is not None else open_store(settings.store)
    try:
        if not target.is_empty():
            return 0
        if not shipped_cache_path().is_file():
            log.warning("no shipped cache at %s: the default store stays empty", SHIPPED_CACHE)
            return 0
        added = target.put_many(shipped_entries())
        calibration = read_calibration(shipped_cache_path())
        if calibration is not None:  # --match similar answers paraphrases out of the box
            target.set_calibration(calibration)
        log.info("filled the default store %s with %d shipped answers", settings.store, added)
        return added
    finally:
        if own:
            target.close()


def open_configured_store(settings: Settings) -> ResponseStore:
    """The store ``settings.store`` names, seeded first if it is the empty default store."""
    store = open_store(settings.store)
    try:
        ensure_default_store(settings, store)
    except BaseException:
        store.close()
        raise
    return store
