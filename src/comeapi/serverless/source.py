"""Where the Lambda function reads its answers, and how it keeps them fresh: the DynamoDB
table (``TableSource``), or the snapshot the package carries until the table moves past it
(``SnapshotSource``). The handler only routes: it asks a source for the catalogue (listings,
the default model) and to ``pick`` an answer of a key.

Shaped like powertools' idempotency persistence layer: the base class's ``pick`` calls small
hooks each source implements, and the table's side is an injected ``DynamoStore`` (a boto3
client made by the caller, or on first use) whose botocore errors ``cache.dynamo`` turns into
StoreErrors; a table that cannot be reached is one too, in time (``deadline``).

Freshness: the table is the source of truth. Its catalogue is kept ``catalogue_ttl`` seconds;
a key it does not list makes it look again at once, at most every ``miss_refresh`` seconds (a
prompt pushed a moment ago). A snapshot is the table at one catalogue revision: it answers
until the table's catalogue (revision, time of writing) is seen to differ, then the table
does. It looks after its first answer and then at most every ``catalogue_ttl``, in a
background thread, so that no hit waits for boto3; a miss looks at once (at most every
``miss_refresh``), since a prompt pushed after the package was built is not in the snapshot.

What is served: the catalogue's review marks under ``serve_states`` (``cache.serving``),
worked out once per catalogue read. An entry read must still be in one of those states (the
catalogue may lag a push); if it is not, the catalogue is read again, from the table.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from comeapi.cache.dynamo_items import Catalogue
from comeapi.cache.serving import DEFAULT_SERVE_STATES
from comeapi.cache.store import Entry
from comeapi.serverless.config import FunctionConfig
from comeapi.serverless.deadline import FIRST_CALL_SECONDS, TableDeadline
from comeapi.serverless.snapshot import Snapshot, packaged_snapshot

if TYPE_CHECKING:
    from comeapi.cache.dynamo import DynamoStore

log = logging.getLogger(__name__)

CHECK_DELAY = 0.05  # s between an answer and the background revision check it starts
T = TypeVar("T")


def open_source(config: FunctionConfig, client: Any = None) -> AnswerSource:
    """The source ``config`` describes: the package's snapshot backed by the table, or the
    table alone (SNAPSHOT=off, or no usable snapshot). ``client``: the DynamoDB client
    (default: one made for DYNAMODB_ENDPOINT_URL, at init without a snapshot, else when
    the table is first needed, so that a hit from the snapshot never loads boto3)."""

    def make_store() -> DynamoStore:
        from comeapi.cache.dynamo import DynamoStore, make_client

        made = client or make_client(endpoint_url=config.dynamodb_endpoint_url)
        return DynamoStore(made, config.table_name)

    snapshot = (
        packaged_snapshot(config.table_name, config.snapshot_dir)
        if config.snapshot == "auto"
        else None
    )
    table = TableSource(
        make_store if snapshot is not None else make_store(),
        catalogue_ttl=config.catalogue_ttl,
        serve_states=config.serve_states,
    )
    return table if snapshot is None else SnapshotSource(snapshot, table)


class AnswerSource(ABC):
    """What the handler reads: ``catalogue()`` and ``served()`` for listings, ``pick`` for a
    request, ``answered()`` after each answer."""

    def __init__(self, serve_states: Collection[str]):
        self.serve_states = frozenset(serve_states)

    @property
    @abstractmethod
    def answers_from(self) -> str:
        """``table`` or ``snapshot``, for /status."""

    @abstractmethod
    def catalogue(self) -> Catalogue:
        """The catalogue in use, read again when it is due."""

    @abstractmethod
    def served(self) -> Mapping[str, tuple[int, ...]]:
        """The variants of each key that may be picked, from the catalogue in use."""

    @abstractmethod
    def variants(self, key: str, *, look_again: bool) -> tuple[int, ...]:
        """``key``'s served variants; ``look_again``: when there are none, look for a newer
        catalogue first (if one has not been looked for lately)."""

    @abstractmethod
    def get(self, key: str, variant: int) -> Entry | None: ...

    @abstractmethod
    def reread(self) -> None:
        """Read the catalogue again, from the table: an entry said it is out of date."""

    @abstractmethod
    def answered(self) -> None:
        """After each answer, hit, miss or error alike."""

    def pick(self, key: str, choose: Callable[[int], int]) -> Entry | None:
        """A servable answer of ``key``, ``choose(n)`` picking one of its n served variants;
        None when it has none (a miss)."""
        tried = -1
        for attempt in range(2):
            variants = self.variants(key, look_again=attempt == 0)
            if tried in variants:  # the catalogue still lists it: take another one
                variants = tuple(v for v in variants if v != tried)
            if not variants:
                return None
            tried = variants[choose(len(variants))]
            entry = self.get(key, tried)
            if entry is not None and entry.state in self.serve_states:
                return entry
            self.reread()  # pushed over since the catalogue was read
        return None


class TableSource(AnswerSource):
    """The table. ``store`` is the table, or a function that makes it: then boto3 is loaded
    only when the table is first needed."""

    def __init__(
        self,
        store: DynamoStore | Callable[[], DynamoStore],
        *,
        catalogue_ttl: float = 60.0,
        miss_refresh: float = 5.0,
        serve_states: Collection[str] = DEFAULT_SERVE_STATES,
        first_call_seconds: float = FIRST_CALL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__(serve_states)
        if callable(store):
            self._store: DynamoStore | None = None
            self._make_store = store
        else:
            self._store, self._make_store = store, lambda: store
        self._store_lock = threading.Lock()
        self.catalogue_ttl = catalogue_ttl
        self.miss_refresh = miss_refresh
        self.clock = clock
        self._deadline = TableDeadline("the DynamoDB table", first_call_seconds)
        self._catalogue: Catalogue | None = None
        self._served: dict[str, tuple[int, ...]] = {}
        self._loaded_at = 0.0

    @property
    def answers_from(self) -> str:
        return "table"

    @property
    def store(self) -> DynamoStore:
        """The table, its client made on first use (this is where boto3 gets imported)."""
        if self._store is None:
            with self._store_lock:
                if self._store is None:
                    self._store = self._make_store()
        return self._store

    def catalogue(self) -> Catalogue:
        if self._catalogue is None or self.clock() - self._loaded_at > self.catalogue_ttl:
            return self.load()
        return self._catalogue

    def served(self) -> Mapping[str, tuple[int, ...]]:
        return self._served

    def variants(self, key: str, *, look_again: bool) -> tuple[int, ...]:
        now = self.clock()
        self.catalogue()
        variants = self._served.get(key, ())
        if variants or not look_again:
            return variants
        if now - self._loaded_at > self.miss_refresh:  # a prompt pushed a moment ago?
            self.load()
        return self._served.get(key, ())

    def get(self, key: str, variant: int) -> Entry | None:
        return self._call(lambda store: store.get(key, variant))

    def reread(self) -> None:
        self.load()

    def answered(self) -> None:
        pass  # nothing to check: the table is the source of truth

    def load(self) -> Catalogue:
        """Read the table's catalogue now and answer from it."""
        catalogue = self.read_catalogue()
        self._catalogue, self._served = catalogue, catalogue.served(self.serve_states)
        self._loaded_at = self.clock()
        return catalogue

    def read_catalogue(self) -> Catalogue:
        """The table's catalogue now, without answering from it (a snapshot's check)."""
        return self._call(lambda store: store.catalogue())

    def _call(self, read: Callable[[DynamoStore], T]) -> T:
        store = self.store
        return self._deadline.run(lambda: read(store))


class SnapshotSource(AnswerSource):
    """The package's snapshot of ``table``'s table, then ``table`` once they differ.
    ``background``: revision checks in a thread (False: inline, for tests that want the
    check done when the call returns)."""

    def __init__(self, snapshot: Snapshot, table: TableSource, *, background: bool = True):
        super().__init__(table.serve_states)
        self.snapshot: Snapshot | None = snapshot
        self.table = table
        self.background = background
        self._catalogue: Catalogue | None = None
        self._served: dict[str, tuple[int, ...]] = {}
        self._checked_at: float | None = None  # when the table last confirmed the snapshot
        self._check: threading.Thread | None = None
        self._stale = False  # set by a revision check: drop the snapshot before the next read

    @property
    def answers_from(self) -> str:
        return "snapshot" if self.snapshot is not None else "table"

    def catalogue(self) -> Catalogue:
        if self._current() is None:
            return self.table.catalogue()
        return self._load() if self._catalogue is None else self._catalogue

    def served(self) -> Mapping[str, tuple[int, ...]]:
        return self._served if self.snapshot is not None else self.table.served()

    def variants(self, key: str, *, look_again: bool) -> tuple[int, ...]:
        if self._current() is None:
            return self.table.variants(key, look_again=look_again)
        if self._catalogue is None:
            self._load()
        variants = self._served.get(key, ())
        if variants or not look_again:
            return variants
        # A prompt pushed after the package was built: ask the table at most every
        # miss_refresh seconds whether the snapshot is still its current revision.
        checked = self._checked_at
        if checked is None or self.table.clock() - checked > self.table.miss_refresh:
            self._check_table()
            if self._stale:
                self.reread()
                return self.table.served().get(key, ())
        return variants

    def get(self, key: str, variant: int) -> Entry | None:
        snapshot = self.snapshot
        return snapshot.get(key, variant) if snapshot is not None else self.table.get(key, variant)

    def reread(self) -> None:
        self._drop()
        self.table.load()

    def answered(self) -> None:
        """Check the snapshot if it is due (first after the cold answer, then every
        catalogue_ttl), in a thread so that no request waits for boto3."""
        if self.snapshot is None or self._stale:
            return
        checked = self._checked_at
        if checked is not None and self.table.clock() - checked <= self.table.catalogue_ttl:
            return
        if self._check is not None and self._check.is_alive():
            return
        if not self.background:
            self._checked_safely()
            return
        self._check = threading.Thread(target=self._check_later, name="snapshot-check")
        self._check.daemon = True
        self._check.start()

    def _current(self) -> Snapshot | None:
        """The snapshot, unless a check found it stale (then it is dropped now)."""
        if self._stale:
            self._drop()
        return self.snapshot

    def _load(self) -> Catalogue:
        assert self.snapshot is not None
        catalogue = self.snapshot.catalogue()
        self._catalogue, self._served = catalogue, catalogue.served(self.serve_states)
        return catalogue

    def _drop(self) -> None:
        self.snapshot = None
        self._catalogue = None
        self._stale = False

    def _check_table(self) -> None:
        """Compare the snapshot with the table's catalogue; mark it stale if they differ."""
        snapshot = self.snapshot
        if snapshot is None:
            return
        table = self.table.read_catalogue()
        self._checked_at = self.table.clock()
        if (table.revision, table.updated) != snapshot.state:
            log.warning(
                "table %s is at revision %d, the snapshot at %d: answering from the table",
                snapshot.table,
                table.revision,
                snapshot.state[0],
            )
            self._stale = True

    def _check_later(self) -> None:
        # Let the runtime send this answer first: it needs the GIL, and importing boto3
        # would hold it in 5 ms slices. (Lambda freezes the sleep with the container.)
        time.sleep(CHECK_DELAY)
        self._checked_safely()

    def _checked_safely(self) -> None:
        try:
            self._check_table()
        except Exception as exc:  # a failed check is tried again later; the snapshot stays
            self._checked_at = self.table.clock()
            log.warning(
                "snapshot revision check failed, retrying in %gs: %s",
                self.table.catalogue_ttl,
                exc,
            )
