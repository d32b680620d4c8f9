"""The directory ``sam build`` packages for the cache function: the ``comeapi`` package (pure
Python; the runtime provides boto3) and a snapshot of the table (``snapshot.py``).

    comeapi aws package deploy/aws/build/CacheFunction --table comeapi-cache

The template's CodeUri points at that directory (docs/aws.md, "Deploy").
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import comeapi
from comeapi.errors import ConfigError
from comeapi.serverless.snapshot import SNAPSHOT_DIR, Snapshot, write_snapshot

if TYPE_CHECKING:
    from comeapi.cache.dynamo import DynamoStore

# sam build drops these anyway; compiled files for the runtime's Python are added after it.
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc")


def build_package(out: Path, store: DynamoStore | None) -> Snapshot | None:
    """Write the function package to ``out`` (replacing a package there), with a snapshot of
    ``store``'s table unless ``store`` is None. Built beside ``out`` and renamed into place,
    so a failed build (the table unreachable, say) leaves the previous package whole."""
    if out.exists() and not (out / "comeapi").is_dir():
        raise ConfigError(f"{out} exists and is not a function package: not replacing it")
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        shutil.copytree(Path(comeapi.__file__).parent, partial / "comeapi", ignore=IGNORED)
        snapshot = write_snapshot(store, partial / SNAPSHOT_DIR) if store is not None else None
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return snapshot
