"""SqliteStore: whole entries or nothing, with several processes, locks and read-only files."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from comeapi.cache.sqlite import SqliteStore, _row
from comeapi.cache.store import Entry
from comeapi.errors import StoreError, StoreUnavailableError
from tests.cache.factory import (
    chat_entry,
    file_hash,
    prompt_entry,
    reviewed,
    reviewed_entries,
    sample_entries,
)
from tests.helpers import Proc


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "cache.db"


def test_roundtrip_of_every_field(db: Path) -> None:
    entries = sample_entries(prompts=3, variants=5)
    with SqliteStore(db) as store:
        assert store.is_empty()
        assert store.put_many(entries) == 15
        assert sorted(store.entries(), key=lambda e: (e.key, e.variant)) == sorted(
            entries, key=lambda e: (e.key, e.variant)
        )
        chat = chat_entry("東京のおすすめは？", 2)
        assert store.get(chat.key, 2) == chat
        assert store.get(chat.key, 7) is None
        assert not store.is_empty()
    # A new connection (another process would be the same) sees the same data.
    with SqliteStore(db) as again:
        index = again.load_index()
        assert len(index) == 3
        assert all([e.variant for e in group] == [0, 1, 2, 3, 4] for group in index.values())
        infos = {p.key: p for p in again.prompts()}
        assert infos[chat.key].kind == "chat"
        assert infos[chat.key].prompt == "東京のおすすめは？"
        assert {p.variants for p in infos.values()} == {5}


def test_put_replaces_the_same_key_and_variant(db: Path) -> None:
    with SqliteStore(db) as store:
        store.put(prompt_entry("hi", 0, answer="old"))
        before = store.revision()
        store.put(prompt_entry("hi", 0, answer="new"))
        assert [e.answer for e in store.entries()] == ["new"]
        assert store.revision() == (before or 0) + 1
        assert store.variants_by_key() == {prompt_entry("hi", 0).key: {0}}


def test_hits_accumulate_across_calls_and_connections(db: Path) -> None:
    e = prompt_entry("hi", 0)
    with SqliteStore(db) as a, SqliteStore(db) as b:
        a.record_hits({(e.key, 0): 3, (e.key, 1): 0})
        b.record_hits({(e.key, 0): 2, (e.key, 4): 1})
        assert a.hit_counts() == {(e.key, 0): 5, (e.key, 4): 1}
        revision = a.revision()
        a.record_hits({(e.key, 0): 1})
        assert a.revision() == revision  # hits are not an entry change: no index reload


def test_a_failing_batch_writes_nothing(db: Path) -> None:
    with SqliteStore(db) as store:
        store.put_many(sample_entries(prompts=1, variants=2))
        before = sorted(e.checksum for e in store.entries())
    # A real SQLite failure half-way through the transaction (the 3rd row of 5).
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TRIGGER boom BEFORE INSERT ON entries WHEN NEW.answer = 'boom' "
            "BEGIN SELECT RAISE(ABORT, 'boom'); END"
        )
    batch = [prompt_entry(f"new {i}", 0, answer="boom" if i == 2 else "ok") for i in range(5)]
    with SqliteStore(db) as store:
        with pytest.raises(StoreError, match="boom"):
            store.put_many(batch)
        with pytest.raises(StoreError, match="boom"):
            store.replace_all(batch)
        assert sorted(e.checksum for e in store.entries()) == before


def test_invalid_entries_are_refused_before_writing(db: Path) -> None:
    good = prompt_entry("hi", 0)
    with SqliteStore(db) as store:
        with pytest.raises(StoreError, match="checksum"):
            store.put_many([good, replace(prompt_entry("hi", 1), answer="changed")])
        with pytest.raises(StoreError, match="variant"):
            store.put_many([good, replace(good, variant=-1, checksum="")])
        assert store.is_empty()


def test_a_corrupt_row_is_never_served(db: Path) -> None:
    with SqliteStore(db) as store:
        store.put_many(sample_entries(prompts=1, variants=2))
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE entries SET answer = 'tampered' WHERE variant = 1")
    with SqliteStore(db) as store, pytest.raises(StoreError, match="checksum"):
        store.load_index()


def test_review_fields_roundtrip(db: Path) -> None:
    entries = reviewed_entries()
    with SqliteStore(db) as store:
        store.put_many(entries)
    with SqliteStore(db) as again:
        assert list(again.entries()) == sorted(entries, key=lambda e: (e.key, e.variant))
        again.load_index()  # every checksum verifies


def test_a_rejected_answer_cannot_be_pinned(db: Path) -> None:
    with SqliteStore(db) as store, pytest.raises(StoreError, match="cannot be pinned"):
        store.put(reviewed(prompt_entry("hi", 0), state="rejected", pinned=True))


def test_a_tampered_state_is_never_served(db: Path) -> None:
    with SqliteStore(db) as store:
        store.put(reviewed(prompt_entry("hi", 0), state="rejected"))
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE entries SET state = 'approved'")
    with SqliteStore(db) as store, pytest.raises(StoreError, match="checksum"):
        store.load_index()


# The schema comeapi wrote before review (schema 1), verbatim.
SCHEMA_1 = """
CREATE TABLE entries (
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
    PRIMARY KEY (key, variant)
) WITHOUT ROWID;
CREATE TABLE hits (
    key     TEXT    NOT NULL,
    variant INTEGER NOT NULL,
    count   INTEGER NOT NULL,
    PRIMARY KEY (key, variant)
) WITHOUT ROWID;
CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO meta (name, value) VALUES ('revision', 7);
PRAGMA user_version = 1;
"""


def schema_1_store(path: Path, entries: list[Entry]) -> None:
    """A store as comeapi wrote it before review: schema 1, rows of 13 columns."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(SCHEMA_1)
        conn.executemany(
            "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [_row(e)[:13] for e in entries],
        )
        conn.execute("INSERT INTO hits VALUES (?, 0, 3)", (entries[0].key,))
        conn.commit()


def test_a_schema_1_store_is_upgraded_and_its_entries_become_pending(db: Path) -> None:
    entries = sample_entries(prompts=2, variants=3)
    schema_1_store(db, entries)
    with SqliteStore(db) as store:
        index = store.load_index()  # every old checksum still verifies
        loaded = [e for group in index.values() for e in group]
        assert sorted(loaded, key=lambda e: (e.key, e.variant)) == sorted(
            entries, key=lambda e: (e.key, e.variant)
        )
        assert {(e.state, e.flags, e.pinned, e.history) for e in loaded} == {
            ("pending", (), False, ())
        }
        assert store.revision() == 7  # the upgrade changes no answer
        assert store.hit_counts() == {(entries[0].key, 0): 3}
        store.put(reviewed(entries[0], state="approved"))
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    with SqliteStore(db) as again:
        assert again.get(entries[0].key, 0) == reviewed(entries[0], state="approved")


def test_a_read_only_schema_1_store_says_it_needs_upgrading(db: Path) -> None:
    schema_1_store(db, sample_entries(prompts=1, variants=1))
    before = file_hash(db)
    with read_only(db), pytest.raises(StoreError, match="cannot upgrade it from schema 1"):
        SqliteStore(db)
    assert file_hash(db) == before


WRITER = """
import sys
from comeapi.cache.sqlite import SqliteStore
from tests.cache.factory import prompt_entry
store = SqliteStore(sys.argv[1], timeout=30)
g = 0
while True:
    g += 1
    store.put_many(
        [prompt_entry(f"p{i}", v, answer=f"gen {g}") for i in range(10) for v in range(5)]
    )
"""


def test_a_concurrent_reader_never_sees_half_a_write(db: Path, spawn: Callable[..., Proc]) -> None:
    SqliteStore(db).close()
    writer = spawn([sys.executable, "-c", WRITER, str(db)], name="writer")
    reader = SqliteStore(db)
    seen: set[str] = set()
    deadline = time.monotonic() + 60
    while len(seen) < 5 and time.monotonic() < deadline:
        assert writer.popen.poll() is None, writer.log()
        index = reader.load_index()  # also verifies every checksum
        if not index:
            continue
        answers = {e.answer for group in index.values() for e in group}
        assert len(answers) == 1, f"a read mixed two writes: {answers}"
        assert sum(len(group) for group in index.values()) == 50
        seen |= answers
    reader.close()
    assert len(seen) >= 5, f"the writer made too little progress: {writer.log()}"


KILLED_WRITER = """
import sys
from comeapi.cache.sqlite import SqliteStore
from tests.cache.factory import prompt_entry
store = SqliteStore(sys.argv[1], timeout=30)
g = 0
while True:
    store.put_many([prompt_entry(f"batch {g} item {i}", 0, answer="x" * 2000) for i in range(200)])
    g += 1
"""


def test_a_writer_killed_mid_write_leaves_whole_batches(
    db: Path, spawn: Callable[..., Proc]
) -> None:
    SqliteStore(db).close()
    writer = spawn([sys.executable, "-c", KILLED_WRITER, str(db)], name="writer")
    with SqliteStore(db) as store:
        deadline = time.monotonic() + 60
        while (store.revision() or 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(writer.pid, signal.SIGKILL)
        writer.popen.wait(10)
    with SqliteStore(db) as store:
        batches = Counter(e.prompt.split(" item ")[0] for e in store.entries())
    assert len(batches) >= 3
    assert set(batches.values()) == {200}, batches
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_locked_store_fails_clearly_and_writes_nothing(db: Path) -> None:
    with SqliteStore(db) as store:
        store.put(prompt_entry("hi", 0))
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer, mid-transaction
    blocker.execute("UPDATE meta SET value = value + 1 WHERE name = 'revision'")
    try:
        with SqliteStore(db, timeout=0.2) as store:
            started = time.monotonic()
            with pytest.raises(StoreUnavailableError, match="locked") as info:
                store.put_many([prompt_entry("hi", 1), prompt_entry("other", 0)])
            assert info.value.code == "store_locked"
            assert time.monotonic() - started < 10
            with pytest.raises(StoreError, match="locked"):
                store.record_hits({(prompt_entry("hi", 0).key, 0): 1})
            # A writer mid-transaction does not block readers (only its commit, briefly).
            assert [e.variant for e in store.entries()] == [0]
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    with SqliteStore(db) as store:
        assert [e.variant for e in store.entries()] == [0]


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Make ``path`` unwritable even for root (chattr +i), or by mode for other users."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"running as root and chattr +i is not available: {done.stderr!r}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_read_only_file_reads_but_refuses_writes(db: Path) -> None:
    with SqliteStore(db) as store:
        store.put_many(sample_entries(prompts=1, variants=3))
    before = file_hash(db)
    with read_only(db), SqliteStore(db) as store:
        assert len(store.load_index()) == 1  # still serves
        with pytest.raises(StoreError, match="read-only") as info:
            store.put_many([prompt_entry("new", 0), prompt_entry("new", 1)])
        assert info.value.code == "store_read_only"
        with pytest.raises(StoreError, match="read-only"):
            store.replace_all([])
    assert file_hash(db) == before


def test_a_new_store_in_a_read_only_directory_fails_clearly(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    with read_only(folder), pytest.raises(StoreError, match="cannot open store"):
        SqliteStore(folder / "cache.db")
    assert list(folder.iterdir()) == []


def test_not_a_database_and_newer_schema_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a valid SQLite database"):
        SqliteStore(junk)
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="newer than this comeapi"):
        SqliteStore(newer)


def test_missing_directory_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        SqliteStore(tmp_path / "nope" / "cache.db")


# --- the file changing under a running process ---------------------------------------------


def test_a_replaced_file_is_reopened_and_reloaded(tmp_path: Path) -> None:
    db = tmp_path / "cache.db"
    with SqliteStore(db) as store:
        store.put(prompt_entry("old", 0))
        first = store.revision()
        with SqliteStore(tmp_path / "new.db") as other:
            other.put_many([prompt_entry("new", 0), prompt_entry("new", 1)])
        os.replace(tmp_path / "new.db", db)  # what an import elsewhere by rename does
        assert store.revision() is None  # "reload": another file, its counter means nothing
        assert sorted(e.prompt for e in store.entries()) == ["new", "new"]
        assert store.revision() is not None and store.problem is None
        store.put(prompt_entry("newer", 0))  # writes go to the new file
    assert first is not None
    with SqliteStore(db) as check:
        assert sorted(e.prompt for e in check.entries()) == ["new", "new", "newer"]


def test_a_deleted_file_is_reported_and_never_written_to(tmp_path: Path) -> None:
    db = tmp_path / "cache.db"
    with SqliteStore(db) as store:
        store.put(prompt_entry("kept", 0))
        loaded = store.revision()
        db.unlink()
        assert store.revision() == loaded  # keep serving what is loaded: no reload
        assert store.problem is not None and "was deleted while in use" in store.problem
        with pytest.raises(StoreError, match="deleted") as info:
            store.record_hits({(prompt_entry("kept", 0).key, 0): 3})
        assert info.value.code == "store_gone"
        with SqliteStore(db) as fresh:  # the operator imports into the path again
            fresh.put(prompt_entry("back", 0))
        assert store.revision() is None and store.problem is None
        assert [e.prompt for e in store.entries()] == ["back"]


def test_no_shared_memory_file_so_no_sigbus(tmp_path: Path) -> None:
    """Fault: an unwritable (or cut) -shm file killed the gateway with SIGBUS. Nothing is
    mapped from it any more: a process keeps working whatever happens to such a file."""
    db = tmp_path / "cache.db"
    script = f"""
import os, sys
from comeapi.cache.sqlite import SqliteStore
from tests.cache.factory import prompt_entry
store = SqliteStore({str(db)!r})
store.put(prompt_entry("a", 0))
shm = {str(db)!r} + "-shm"
with open(shm, "wb"):
    pass  # cut to nothing (WAL's index was mapped from this file)
os.chmod(shm, 0o444)
store.put(prompt_entry("a", 1))
print(store.revision(), len(list(store.entries())))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert done.stdout.split() == ["2", "2"]
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_an_old_wal_store_is_switched_to_a_rollback_journal(tmp_path: Path) -> None:
    db = tmp_path / "cache.db"
    with SqliteStore(db) as store:
        store.put(prompt_entry("a", 0))
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    with SqliteStore(db) as store:
        assert [e.prompt for e in store.entries()] == ["a"]
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_a_number_sqlite_cannot_hold_is_a_store_error(db: Path) -> None:
    with SqliteStore(db) as store:
        huge = replace(prompt_entry("a", 0), prompt_tokens=2**70).sealed()
        with pytest.raises(StoreError, match="cannot write entries"):
            store.put(huge)
        assert store.is_empty()
