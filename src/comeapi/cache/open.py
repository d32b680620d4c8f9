"""Open a response store from its URL, the value of the ``store`` setting.

sqlite:PATH                                   a file (relative to the working directory);
                                              missing parent directories are created
dynamodb:TABLE[?region=R&endpoint_url=URL]    an Amazon DynamoDB table
"""

from __future__ import annotations

from pathlib import Path

from comeapi.cache.store import ResponseStore
from comeapi.errors import ConfigError, StoreError


def open_store(url: str, *, timeout: float = 5.0) -> ResponseStore:
    """The store ``url`` names; ConfigError (naming the ``store`` setting) for a bad URL."""
    scheme, sep, rest = url.partition(":")
    if sep and scheme == "sqlite":
        return _open_sqlite(url, rest, timeout)
    if sep and scheme == "dynamodb":
        if not rest.partition("?")[0]:
            raise ConfigError(f"store {url!r}: dynamodb: needs a table name", param="store")
        # Imported only when asked for: boto3 is slow to import.
        from comeapi.cache.dynamo import DynamoStore

        return DynamoStore.from_url(url)
    raise ConfigError(
        f"store {url!r}: expected sqlite:PATH or dynamodb:TABLE[?region=..&endpoint_url=..]"
        " (set by --store, COMEAPI_STORE or 'store' in the config file)",
        param="store",
    )


def _open_sqlite(url: str, rest: str, timeout: float) -> ResponseStore:
    from comeapi.cache.sqlite import SqliteStore

    # sqlite:///abs/path (the SQLAlchemy spelling) means /abs/path too.
    path = Path(rest[2:] if rest.startswith("///") else rest).expanduser()
    if not rest or path.is_dir():
        raise ConfigError(f"store {url!r}: sqlite: needs a file path", param="store")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"store {url!r}: cannot create {path.parent}: {exc}") from exc
    return SqliteStore(path, timeout=timeout)
