"""The embedded response store: one SQLite file, safe for several processes.

Each write is one transaction, so a reader (another gateway worker, ``comeapi cache ls``)
sees an entry whole or not at all, and a writer killed mid-way leaves what was there.
Open one ``SqliteStore`` per process (after forking): a connection must not cross a fork.

Rollback journal, not WAL: WAL's ``-shm`` index is a shared memory map, and a process whose
map is cut short dies with SIGBUS (measured: ``truncate -s 0 cache.db-shm`` under a running
gateway killed it, exit 135). Without it, a damaged or unwritable file is an error message.
The gateway reads the store only to reload it, so WAL's readers-never-wait buys little here.
A file deleted or replaced under a running process is noticed on its next query (device and
inode compared): a replaced one is reopened, a deleted one reported (``problem``).

Schema 2 added the review columns (state, flags, pinned, history); a schema 1 store is
upgraded in place when first opened, its entries becoming ``pending`` (their checksums still
hold: see ``comeapi.cache.store``).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from comeapi.cache.store import Entry, PromptInfo, ResponseStore
from comeapi.errors import StoreError, StoreUnavailableError

log = logging.getLogger("comeapi.cache")

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key               TEXT    NOT NULL,
    variant           INTEGER NOT NULL CHECK (variant >= 0),
    kind              TEXT    NOT NULL CHECK (kind IN ('prompt', 'chat')),
    prompt            TEXT    NOT NULL,
    messages          TEXT,
    answer            TEXT    NOT NULL,
    model             TEXT    NOT NULL,
    params            TEXT    NOT NULL,
    finish_reason     TEXT    NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    created           REAL    NOT NULL,
    checksum          TEXT    NOT NULL,
    state             TEXT    NOT NULL DEFAULT 'pending'
                      CHECK (state IN ('pending', 'approved', 'rejected')),
    flags             TEXT    NOT NULL DEFAULT '[]',
    pinned            INTEGER NOT NULL DEFAULT 0 CHECK (pinned IN (0, 1)),
    history           TEXT    NOT NULL DEFAULT '[]',
    PRIMARY KEY (key, variant)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hits (
    key     TEXT    NOT NULL,
    variant INTEGER NOT NULL,
    count   INTEGER NOT NULL,
    PRIMARY KEY (key, variant)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0);
"""
# Schema 1 -> 2: the review columns, with the defaults every older entry reads as.
_UPGRADE_1_TO_2 = """
ALTER TABLE entries ADD COLUMN state TEXT NOT NULL DEFAULT 'pending'
    CHECK (state IN ('pending', 'approved', 'rejected'));
ALTER TABLE entries ADD COLUMN flags TEXT NOT NULL DEFAULT '[]';
ALTER TABLE entries ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0 CHECK (pinned IN (0, 1));
ALTER TABLE entries ADD COLUMN history TEXT NOT NULL DEFAULT '[]';
"""

_COLUMNS = (
    "key, variant, kind, prompt, messages, answer, model, params, finish_reason, "
    "prompt_tokens, completion_tokens, created, checksum, state, flags, pinned, history"
)
_INSERT = f"INSERT OR REPLACE INTO entries ({_COLUMNS}) VALUES ({', '.join('?' * 17)})"
# The calibration (one JSON document) has its own table, made when first written: schema 2
# stays as it was, so an older comeapi still opens a calibrated store and ignores it.
_CALIBRATION_TABLE = (
    "CREATE TABLE IF NOT EXISTS calibration "
    "(id INTEGER PRIMARY KEY CHECK (id = 1), doc TEXT NOT NULL)"
)
_HAS_CALIBRATION = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'calibration'"
_BUMP = "UPDATE meta SET value = value + 1 WHERE name = 'revision'"


class SqliteStore(ResponseStore):
    """Entries in ``path``; ``timeout`` is how long a write waits for another writer (s)."""

    def __init__(self, path: str | Path, *, timeout: float = 5.0):
        self.path = Path(path)
        self.timeout = timeout
        self.read_only = False
        self._lock = threading.Lock()
        self._conn = self._connect()
        self._file = _identity(self.path)
        self._reopened = False
        self._revision: int | None = None

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    # --- hooks ----------------------------------------------------------------------------

    def _get(self, key: str, variant: int) -> Entry | None:
        rows = self._query(
            f"SELECT {_COLUMNS} FROM entries WHERE key = ? AND variant = ?", (key, variant)
        )
        return _entry(rows[0]) if rows else None

    def _put_many(self, entries: list[Entry]) -> int:
        rows = [_row(e) for e in entries]
        with self._write("write entries") as conn:
            conn.executemany(_INSERT, rows)
            conn.execute(_BUMP)
        return len(rows)

    def _replace_all(self, entries: list[Entry]) -> int:
        rows = [_row(e) for e in entries]
        with self._write("replace all entries") as conn:
            conn.execute("DELETE FROM entries")
            conn.executemany(_INSERT, rows)
            conn.execute(_BUMP)
        return len(rows)

    def _entries(self) -> Iterator[Entry]:
        # One statement is one snapshot: a concurrent writer's transaction is all in or out.
        rows = self._query(f"SELECT {_COLUMNS} FROM entries ORDER BY key, variant")
        return iter([_entry(r) for r in rows])

    def _prompts(self) -> list[PromptInfo]:
        # kind, prompt and model are the same in every row of a key.
        rows = self._query(
            "SELECT key, kind, prompt, model, COUNT(*) FROM entries "
            "GROUP BY key ORDER BY MIN(created), key"
        )
        return [PromptInfo(r[0], r[1], r[2], r[3], int(r[4])) for r in rows]

    # --- faster paths than the defaults -------------------------------------------------

    def variants_by_key(self) -> dict[str, set[int]]:
        present: dict[str, set[int]] = {}
        for key, variant in self._query("SELECT key, variant FROM entries"):
            present.setdefault(key, set()).add(int(variant))
        return present

    def is_empty(self) -> bool:
        return not self._query("SELECT 1 FROM entries LIMIT 1")

    def record_hits(self, counts: Mapping[tuple[str, int], int]) -> None:
        rows = [(key, variant, n) for (key, variant), n in counts.items() if n > 0]
        if not rows:
            return
        with self._write("record hits") as conn:
            conn.executemany(
                "INSERT INTO hits (key, variant, count) VALUES (?, ?, ?) "
                "ON CONFLICT (key, variant) DO UPDATE SET count = count + excluded.count",
                rows,
            )

    def hit_counts(self) -> dict[tuple[str, int], int]:
        rows = self._query("SELECT key, variant, count FROM hits")
        return {(key, int(variant)): int(count) for key, variant, count in rows}

    def calibration(self) -> dict[str, Any] | None:
        if not self._query(_HAS_CALIBRATION):  # a store never calibrated (or an older one)
            return None
        rows = self._query("SELECT doc FROM calibration WHERE id = 1")
        if not rows:
            return None
        doc: dict[str, Any] = json.loads(rows[0][0])
        return doc

    def set_calibration(self, doc: dict[str, Any] | None) -> None:
        with self._write("write the calibration") as conn:
            conn.execute(_CALIBRATION_TABLE)
            if doc is None:
                conn.execute("DELETE FROM calibration")
            else:
                text = json.dumps(doc, ensure_ascii=False, sort_keys=True)
                conn.execute("INSERT OR REPLACE INTO calibration (id, doc) VALUES (1, ?)", (text,))
            conn.execute(_BUMP)  # a running gateway reloads it with the answers

    def revision(self) -> int | None:
        rows = self._query("SELECT value FROM meta WHERE name = 'revision'")
        if self.problem is not None:  # deleted: keep what is loaded, say so in the meantime
            return self._revision
        if self._reopened:  # another file: its counter says nothing about what is loaded
            self._reopened = False
            return None
        self._revision = int(rows[0][0]) if rows else 0
        return self._revision

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- plumbing -------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if not self.path.parent.is_dir():
            raise StoreError(f"store {self.path}: directory {self.path.parent} does not exist")
        with self._translate("open the store"):
            conn = sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
        try:
            with self._translate("open the store"):
                self._prepare(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA mmap_size=0")  # plain reads: nothing mapped that could shrink
        try:
            # A store made by an older comeapi is in WAL mode: switch it back (this needs
            # the only connection; with others open it stays WAL until they close).
            mode = conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorname", "") != "SQLITE_READONLY":
                raise
            # A read-only file still serves reads; every write will say why it cannot.
            self.read_only = True
        else:
            if mode != "delete":
                log.warning(
                    "store %s stays in %s mode while other processes use it", self.path, mode
                )
        conn.execute("PRAGMA synchronous=FULL")  # a rollback journal needs FULL to be durable
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"store {self.path} has schema version {version}, newer than this comeapi "
                f"understands ({SCHEMA_VERSION}): upgrade comeapi",
                code="store_incompatible",
            )
        if version == SCHEMA_VERSION:
            return
        what = "initialise it" if version == 0 else f"upgrade it from schema {version}"
        if self.read_only:
            raise StoreError(
                f"store {self.path} is read-only: cannot {what}", code="store_read_only"
            )
        with self._translate(what):
            self._migrate(conn)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Create the schema, or upgrade an older one, in one transaction."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Read again under the write lock: another process may have upgraded it meanwhile.
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            script = _UPGRADE_1_TO_2 if version == 1 else _SCHEMA if version == 0 else ""
            # Not executescript: it would commit the transaction we just opened.
            for statement in filter(str.strip, script.split(";")):
                conn.execute(statement)
            if version == 1:
                log.info("store %s: upgraded to schema %d (review state)", self.path, 2)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock, self._translate("read"):
            self._check_file()
            return self._conn.execute(sql, params).fetchall()

    @contextmanager
    def _write(self, action: str) -> Iterator[sqlite3.Connection]:
        if self.read_only:
            raise StoreError(
                f"store {self.path} is read-only: cannot {action}", code="store_read_only"
            )
        with self._lock, self._translate(action):
            self._check_file()
            if self.problem is not None:  # writing into a deleted file would lose it
                raise StoreError(f"{self.problem}: cannot {action}", code="store_gone")
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")  # take the write lock now, not half-way through
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _check_file(self) -> None:
        """Notice the file being deleted or replaced (with the lock held)."""
        now = _identity(self.path)
        if now == self._file:
            return
        if now is None:
            if self.problem is None:
                self.problem = (
                    f"store {self.path} was deleted while in use (restore it, or import into "
                    "it again)"
                )
                log.error("%s; serving the answers already loaded", self.problem)
            return
        log.warning("store %s was replaced by another file: reopening it", self.path)
        old, self._conn = self._conn, self._connect()
        old.close()
        self._file = now
        self._reopened = True
        if self.problem is not None:
            log.warning("store %s is back", self.path)
            self.problem = None

    @contextmanager
    def _translate(self, action: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise _store_error(self.path, action, exc, self.timeout) from exc
        except OverflowError as exc:  # a number SQLite cannot store (over 2^63)
            raise StoreError(f"store {self.path}: cannot {action}: {exc}") from exc


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file ``path`` names now (device, inode), or None when there is none."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def _store_error(path: Path, action: str, exc: sqlite3.Error, timeout: float) -> StoreError:
    name = getattr(exc, "sqlite_errorname", "")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        # Transient: the other writer will finish, so callers may retry.
        return StoreUnavailableError(
            f"store {path} is locked by another writer (waited {timeout:g}s): cannot {action}",
            code="store_locked",
        )
    if name.startswith("SQLITE_READONLY"):
        return StoreError(
            f"store {path} is read-only (file or directory not writable): cannot {action}",
            code="store_read_only",
        )
    if name.startswith("SQLITE_CANTOPEN"):
        return StoreError(
            f"cannot open store {path}: is its directory writable and the path a file?",
            code="store_unavailable",
        )
    if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
        return StoreError(
            f"store {path} is not a valid SQLite database ({exc})", code="store_corrupt"
        )
    if name.startswith("SQLITE_FULL"):
        return StoreError(f"store {path}: disk full, cannot {action}", code="store_full")
    return StoreError(f"store {path}: cannot {action}: {exc}")


def _row(e: Entry) -> tuple[Any, ...]:
    messages = None
    if e.messages is not None:
        messages = json.dumps([list(m) for m in e.messages], ensure_ascii=False)
    return (
        e.key,
        e.variant,
        e.kind,
        e.prompt,
        messages,
        e.answer,
        e.model,
        json.dumps(e.params, ensure_ascii=False, sort_keys=True),
        e.finish_reason,
        e.prompt_tokens,
        e.completion_tokens,
        e.created,
        e.checksum,
        e.state,
        json.dumps(list(e.flags), ensure_ascii=False),
        int(e.pinned),
        json.dumps(list(e.history), ensure_ascii=False, sort_keys=True),
    )


def _entry(r: tuple[Any, ...]) -> Entry:
    return Entry(
        key=r[0],
        variant=int(r[1]),
        kind=r[2],
        prompt=r[3],
        messages=tuple((str(m[0]), str(m[1])) for m in json.loads(r[4]))
        if r[4] is not None
        else None,
        answer=r[5],
        model=r[6],
        params=json.loads(r[7]),
        finish_reason=r[8],
        prompt_tokens=int(r[9]),
        completion_tokens=int(r[10]),
        created=float(r[11]),
        checksum=r[12],
        state=r[13],
        flags=tuple(json.loads(r[14])),
        pinned=bool(r[15]),
        history=tuple(json.loads(r[16])),
    )
