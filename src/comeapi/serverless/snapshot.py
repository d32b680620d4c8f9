"""The cache snapshot a function package carries, so that a cold Lambda answers a hit with no
AWS call and without loading boto3.

The directory ``comeapi-snapshot/`` at the package root holds two files:
  ``cache.tar.gz``   the entries, in the export archive format (``comeapi cache export``);
  ``snapshot.json``  the table it was taken from, that table's catalogue (revision, time of
                     writing, prompts with their variant counts and review marks) and the
                     archive's SHA-256.
``comeapi aws package`` takes it from the table itself, with consistent reads and the
catalogue read before and after the scan, so a snapshot is the table at one catalogue
revision. The table stays the source of truth: the function serves from a snapshot only
until it sees the table's catalogue differ (the freshness rule, in ``source.py``).

Every entry is kept, rejected ones too (the snapshot is the table); what is served is decided
by the function's ``serve_states`` from the marks, which must agree with the entries' review.
Version 2 added the marks; a version 1 snapshot (none) reads as all pending.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comeapi.cache.archive import read_archive, write_archive
from comeapi.cache.dynamo_items import Catalogue
from comeapi.cache.serving import marks
from comeapi.cache.store import Entry, PromptInfo
from comeapi.errors import ComeapiError, StoreError

if TYPE_CHECKING:
    from comeapi.cache.dynamo import DynamoStore

SNAPSHOT_DIR = "comeapi-snapshot"
ARCHIVE = "cache.tar.gz"
META = "snapshot.json"
FORMAT = "comeapi-lambda-snapshot"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)


class Snapshot:
    """The entries of one catalogue revision of ``table``, in memory; reads like the table
    (``catalogue()``, ``get(key, variant)``)."""

    def __init__(self, table: str, catalogue: Catalogue, entries: dict[tuple[str, int], Entry]):
        self.table = table
        self._catalogue = catalogue
        self._entries = entries

    @property
    def state(self) -> tuple[int, int]:
        """(revision, updated) of the catalogue it was taken at."""
        return self._catalogue.revision, self._catalogue.updated

    def catalogue(self) -> Catalogue:
        return self._catalogue

    def get(self, key: str, variant: int) -> Entry | None:
        return self._entries.get((key, variant))

    def __len__(self) -> int:
        return len(self._entries)


def package_dir() -> str:
    """Where a function package keeps its snapshot: beside the ``comeapi`` package, i.e.
    Lambda's task root (``/var/task``)."""
    import comeapi

    return os.path.join(os.path.dirname(os.path.dirname(comeapi.__file__)), SNAPSHOT_DIR)


def load_snapshot(directory: str) -> Snapshot | None:
    """The snapshot in ``directory``; None if there is none; StoreError (code ``corrupt``),
    or ArchiveError from the archive's reader, if it is there but does not verify: the
    archive's SHA-256, every entry's checksum and key, one entry per variant listed."""
    meta_path = os.path.join(directory, META)
    try:
        with open(meta_path, "rb") as fh:
            meta = json.loads(fh.read())
        with open(os.path.join(directory, ARCHIVE), "rb") as fh:
            archive_sha256 = hashlib.sha256(fh.read()).hexdigest()
    except FileNotFoundError:
        if os.path.exists(meta_path):
            raise _corrupt(directory, f"{ARCHIVE} is missing") from None
        return None
    except (OSError, ValueError) as exc:
        raise _corrupt(directory, f"cannot read it ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _corrupt(directory, f"{META} is not a {FORMAT} file")
    if meta.get("version") not in READ_VERSIONS or type(meta.get("version")) is not int:
        raise _corrupt(directory, f"format version {meta.get('version')!r} is not 1 or 2")
    if meta.get("archive_sha256") != archive_sha256:
        raise _corrupt(directory, f"{ARCHIVE} does not match its SHA-256 in {META}")
    try:
        catalogue = _catalogue(meta["catalogue"])
        table = str(meta["table"])
    except (KeyError, TypeError, ValueError) as exc:
        raise _corrupt(directory, f"{META} is malformed ({exc!r})") from None
    entries = {(e.key, e.variant): e for e in read_archive(Path(directory, ARCHIVE))}
    missing = _missing(catalogue, entries)
    if missing:
        raise _corrupt(directory, f"the catalogue lists {missing}, which the archive lacks")
    for p in catalogue.prompts:
        if p.marks and p.marks != marks(entries[(p.key, v)] for v in range(p.variants)):
            raise _corrupt(directory, f"the review marks of {p.key} differ from its entries")
    return Snapshot(table, catalogue, entries)


def packaged_snapshot(table: str, directory: str | None = None) -> Snapshot | None:
    """The snapshot of ``table`` in ``directory`` (default: the package's). One that does
    not verify, or is of another table, is logged and left unused: the table answers."""
    directory = directory or package_dir()
    try:
        snapshot = load_snapshot(directory)
    except ComeapiError as exc:
        logging.getLogger(__name__).error("not using the cache snapshot: %s", exc.message)
        return None
    if snapshot is not None and snapshot.table != table:
        logging.getLogger(__name__).error(
            "not using the cache snapshot: it is of table %s, not %s", snapshot.table, table
        )
        return None
    return snapshot


def write_snapshot(store: DynamoStore, directory: Path, *, attempts: int = 3) -> Snapshot:
    """Take the snapshot of ``store``'s table into ``directory`` (replacing one there)."""
    for _ in range(attempts):
        before = store.catalogue(consistent=True)
        entries = {(e.key, e.variant): e for e in store.entries()}
        if store.catalogue(consistent=True) == before:
            break
    else:
        raise StoreError(
            f"table {store.table} changed during each of {attempts} scans; a push is running? "
            "Package again when it is done",
            code="conflict",
        )
    if not before.prompts:
        raise StoreError(
            f"table {store.table} has no cached prompts: push the cache first "
            "(comeapi cache push dynamodb), or package with --no-snapshot",
            code="empty",
        )
    missing = _missing(before, entries)
    if missing:
        raise StoreError(f"table {store.table}: the catalogue lists {missing}, not in the table")
    # Only what the catalogue lists can be picked; a variant past a gap would be dead weight.
    wanted = {(p.key, v) for p in before.prompts for v in range(p.variants)}
    kept = [e for k, e in entries.items() if k in wanted]
    # The marks from the entries themselves (a table written before review has none).
    prompts = tuple(
        replace(p, marks=marks(entries[(p.key, v)] for v in range(p.variants)))
        for p in before.prompts
    )
    catalogue = Catalogue(before.revision, prompts, before.updated)
    directory.mkdir(parents=True, exist_ok=True)
    archive = directory / ARCHIVE
    write_archive(kept, archive)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "table": store.table,
        "archive_sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
        "catalogue": {
            "revision": catalogue.revision,
            "updated": catalogue.updated,
            "prompts": [
                {"key": p.key, "kind": p.kind, "prompt": p.prompt, "model": p.model,
                 "variants": p.variants, "marks": p.marks}
                for p in sorted(catalogue.prompts, key=lambda p: p.key)
            ],
        },
    }  # fmt: skip
    text = json.dumps(meta, ensure_ascii=False, indent=2, sort_keys=True) + "\n"
    (directory / META).write_text(text, encoding="utf-8")
    return Snapshot(store.table, catalogue, {(e.key, e.variant): e for e in kept})


def _catalogue(doc: dict[str, Any]) -> Catalogue:
    prompts = tuple(
        PromptInfo(
            key=str(p["key"]),
            kind=p["kind"],
            prompt=str(p["prompt"]),
            model=str(p["model"]),
            variants=int(p["variants"]),
            marks=str(p.get("marks", "")),
        )
        for p in doc["prompts"]
    )
    return Catalogue(int(doc["revision"]), prompts, int(doc["updated"]))


def _missing(catalogue: Catalogue, entries: dict[tuple[str, int], Entry]) -> str | None:
    for p in catalogue.prompts:
        for v in range(p.variants):
            if (p.key, v) not in entries:
                return f"{p.key}#{v}"
    return None


def _corrupt(directory: str, why: str) -> StoreError:
    return StoreError(f"cache snapshot {directory}: {why}", code="corrupt")
