"""The Lambda handler: an API Gateway event in, the cached answer out, from the snapshot the
function package carries or from the DynamoDB table.

A plain handler, no web framework: cold start is the cost that matters. With a snapshot
(``snapshot.py``) a hit needs the standard library and comeapi's light modules only; boto3 is
imported when the function must talk to AWS: a miss, the on-demand backend, the revision
check. Without one, the table's client is built at init, as any Python Lambda would.

Freshness: the table is the source of truth. A snapshot is the table at one catalogue
revision; a container answers from it until it sees the table's catalogue (revision, time of
writing) differ, and from the table after that. It looks after its first answer and then at
most every CATALOGUE_TTL seconds, in a background thread, so no hit waits for boto3; a miss
looks at once (at most every 5 s), since a prompt pushed after the package was built is not
in the snapshot.

Requests are parsed by ``comeapi.protocol.requests`` and keyed by ``comeapi.cache.key``, as on
the gateway and in nginx.

What is served: the catalogue's review marks under SERVE_STATES (``comeapi.cache.serving``),
worked out once per catalogue read; an entry read from the table must still be in one of
those states (the catalogue may lag a push), else the catalogue is read again.

Environment: TABLE_NAME (required), DEFAULT_MODEL, ON_MISS (``reject`` or ``start-backend``,
see ``ondemand``), API_KEYS (comma-separated bearer tokens; empty: open), CATALOGUE_TTL (s),
MAX_TOKENS_LIMIT (as the gateway's ``max_tokens_limit``, default 2048), SNAPSHOT (``auto``: the
package's snapshot if it has one, ``off``: the table only), SERVE_STATES (as the gateway's
``serve_states``: ``approved`` or ``approved,pending``, the default).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from comeapi.cache.dynamo_items import Catalogue
from comeapi.cache.key import choose_default_model, lookup_key, uncacheable
from comeapi.cache.replies import AnswerFormat, HitReply
from comeapi.cache.serving import DEFAULT_SERVE_STATES, parse_serve_states
from comeapi.cache.store import Entry
from comeapi.errors import (
    ComeapiError,
    ConfigError,
    ModelNotFoundError,
    NotFoundError,
    PayloadTooLargeError,
    PromptNotCachedError,
    RequestError,
)
from comeapi.models.bundled import BUNDLED_MODEL
from comeapi.protocol.auth import BearerKeys
from comeapi.protocol.requests import KINDS, GenerationRequest, decode_json, parse_request
from comeapi.serverless.events import HttpRequest, Reply, parse_event, to_result
from comeapi.serverless.snapshot import Snapshot, snapshot_from_env

if TYPE_CHECKING:
    from comeapi.cache.dynamo import DynamoStore

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 1024
MAX_TOKENS_LIMIT = 2048
CHECK_DELAY = 0.05  # s between an answer and the background revision check it starts
JSON = "application/json"


# What answers a prompt the cache does not hold (e.g. a backend started on demand).
MissHandler = Callable[[HttpRequest], Reply]


class Reader(Protocol):
    """Where answers are read: the table (``DynamoStore``) or a ``Snapshot`` of it."""

    def catalogue(self) -> Catalogue: ...

    def get(self, key: str, variant: int) -> Entry | None: ...


class ServerlessApp:
    """Routes one API Gateway event. Keeps the catalogue between invocations of a warm
    container (the table's is read again after ``catalogue_ttl``), so a hit costs one
    GetItem, or nothing with a snapshot.

    ``store`` is the table, or a function that makes it: then boto3 is loaded only when the
    table is first needed. ``background`` runs revision checks in a thread (False: inline,
    for tests that want the check done when the call returns).
    """

    def __init__(
        self,
        store: DynamoStore | Callable[[], DynamoStore],
        *,
        snapshot: Snapshot | None = None,
        default_model: str | None = None,
        max_tokens_limit: int = MAX_TOKENS_LIMIT,
        on_miss: MissHandler | None = None,
        api_keys: tuple[str, ...] = (),
        catalogue_ttl: float = 60.0,
        miss_refresh: float = 5.0,
        serve_states: Collection[str] = DEFAULT_SERVE_STATES,
        background: bool = True,
        randbelow: Callable[[int], int] = secrets.randbelow,
        clock: Callable[[], float] = time.monotonic,
    ):
        if callable(store):
            self._store: DynamoStore | None = None
            self._make_store = store
        else:
            self._store, self._make_store = store, lambda: store
        self._store_lock = threading.Lock()
        self.snapshot = snapshot
        self.configured_model = default_model
        self.default_model = choose_default_model(default_model, (), BUNDLED_MODEL)
        self.max_tokens_limit = max_tokens_limit
        self.on_miss = on_miss
        self.keys = BearerKeys(api_keys)
        self.catalogue_ttl = catalogue_ttl
        self.miss_refresh = miss_refresh
        self._randbelow = randbelow
        self._clock = clock
        self.background = background
        self.serve_states = frozenset(serve_states)
        self._catalogue: Catalogue | None = None
        self._variants: dict[str, tuple[int, ...]] = {}  # what may be picked, per key
        self._loaded_at = 0.0
        self._checked_at: float | None = None  # when the table last confirmed the snapshot
        self._check: threading.Thread | None = None
        self._stale = False  # set by a revision check: drop the snapshot before the next read

    @property
    def store(self) -> DynamoStore:
        """The table, its client made on first use (this is where boto3 gets imported)."""
        if self._store is None:
            with self._store_lock:
                if self._store is None:
                    self._store = self._make_store()
        return self._store

    @classmethod
    def from_env(cls, environ: Mapping[str, str], client: Any = None) -> ServerlessApp:
        table = environ.get("TABLE_NAME")
        if not table:
            raise ConfigError("TABLE_NAME is not set: the DynamoDB table holding the cache")
        snapshot = snapshot_from_env(environ, table)

        def make_store() -> DynamoStore:
            from comeapi.cache.dynamo import DynamoStore, make_client

            made = client or make_client(endpoint_url=environ.get("DYNAMODB_ENDPOINT_URL") or None)
            return DynamoStore(made, table)

        on_miss: MissHandler | None = None
        mode = environ.get("ON_MISS", "reject")
        if mode == "start-backend":
            from comeapi.serverless.ondemand import OnDemandBackend

            on_miss = OnDemandBackend.from_env(environ)
        elif mode != "reject":
            raise ConfigError(f"ON_MISS={mode!r}: expected reject or start-backend")
        try:
            ttl = float(environ.get("CATALOGUE_TTL", "60"))
        except ValueError:
            raise ConfigError("CATALOGUE_TTL must be a number of seconds") from None
        limit = environ.get("MAX_TOKENS_LIMIT", str(MAX_TOKENS_LIMIT))
        if not limit.isdigit() or int(limit) < 1:
            raise ConfigError("MAX_TOKENS_LIMIT must be a positive whole number")
        keys = tuple(k.strip() for k in environ.get("API_KEYS", "").split(",") if k.strip())
        try:
            serve = parse_serve_states(environ.get("SERVE_STATES") or DEFAULT_SERVE_STATES)
        except ValueError as exc:
            raise ConfigError(f"SERVE_STATES: {exc}") from None
        return cls(
            # Without a snapshot every request needs the table: make its client now, at init.
            make_store if snapshot is not None else make_store(),
            snapshot=snapshot,
            default_model=environ.get("DEFAULT_MODEL") or None,
            max_tokens_limit=int(limit),
            on_miss=on_miss,
            api_keys=keys,
            catalogue_ttl=ttl,
            serve_states=serve,
        )

    def __call__(self, event: dict[str, Any], context: Any = None) -> dict[str, Any]:
        try:
            reply = self.handle(parse_event(event))
        except ComeapiError as exc:
            reply = error_reply(exc)
        except Exception:
            log.exception("unhandled error")
            reply = error_reply(ComeapiError("internal error", code="internal_error"))
        if self.snapshot is not None:
            self._schedule_check()
        return to_result(reply)

    def handle(self, request: HttpRequest) -> Reply:
        denied = self.keys.check(request.headers.get("authorization")) if self.keys else None
        if denied is not None:
            raise denied
        kind = KINDS.get(request.path)
        if kind is not None and request.method == "POST":
            if len(request.body) > MAX_BODY_BYTES:
                raise PayloadTooLargeError(f"request body is over {MAX_BODY_BYTES} bytes")
            body = decode_json(request.body)
            parsed = parse_request(kind, body, max_tokens_limit=self.max_tokens_limit)
            return self._answer(request, parsed)
        if request.method == "GET" and request.path in ("/", "/status", "/models", "/v1/models"):
            return self._info(request.path)
        prefix, _, name = request.path.rpartition("/")
        if request.method == "GET" and prefix in ("/models", "/v1/models") and name:
            return self._model(name)
        raise NotFoundError(f"no route {request.method} {request.path}")

    def _answer(self, request: HttpRequest, parsed: GenerationRequest) -> Reply:
        param = uncacheable(parsed)
        if param is not None:
            if self.on_miss is not None:
                return self.on_miss(request)
            raise RequestError(
                f"{param}: a cached answer cannot carry this, and this function answers "
                "from its cache only",
                param=param,
                code="not_cacheable",
            )
        if self._stale:
            self._drop_snapshot()
        if self._catalogue is None:
            self._load_catalogue()  # the default model may depend on what is cached
        key = lookup_key(parsed, self.default_model)
        tried = -1
        for attempt in range(2):
            variants = self._variants_of(key, refresh_on_miss=attempt == 0)
            if tried in variants:  # the catalogue still lists it: take another one
                variants = tuple(v for v in variants if v != tried)
            if not variants:
                return self._miss(request)
            tried = variants[self._randbelow(len(variants))]
            entry = self._reader().get(key, tried)
            if entry is not None and entry.state in self.serve_states:
                return _hit(parsed, entry)
            # Pushed over since we read the catalogue: read it again (from the table).
            self._drop_snapshot()
            self._load_catalogue()
        return self._miss(request)

    def _reader(self) -> Reader:
        return self.snapshot if self.snapshot is not None else self.store

    def _miss(self, request: HttpRequest) -> Reply:
        if self.on_miss is not None:
            return self.on_miss(request)
        assert self._catalogue is not None
        served = self._variants
        raise PromptNotCachedError([p.prompt for p in self._catalogue.prompts if p.key in served])

    def _variants_of(self, key: str, *, refresh_on_miss: bool) -> tuple[int, ...]:
        now = self._clock()
        if self._catalogue is None or (
            self.snapshot is None and now - self._loaded_at > self.catalogue_ttl
        ):
            self._load_catalogue()
        variants = self._variants.get(key, ())
        if variants or not refresh_on_miss:
            return variants
        # A prompt pushed a moment ago: look again, but at most every miss_refresh seconds.
        if self.snapshot is not None:
            if self._checked_at is None or now - self._checked_at > self.miss_refresh:
                self._check_snapshot()
                if self._stale:
                    self._drop_snapshot()
                    self._load_catalogue()
        elif now - self._loaded_at > self.miss_refresh:
            self._load_catalogue()
        return self._variants.get(key, ())

    def _load_catalogue(self) -> None:
        self._catalogue = self._reader().catalogue()
        self._variants = self._catalogue.served(self.serve_states)
        self._loaded_at = self._clock()
        models = (p.model for p in self._catalogue.prompts)
        self.default_model = choose_default_model(self.configured_model, models, BUNDLED_MODEL)

    def _models(self) -> list[str]:
        assert self._catalogue is not None
        return sorted({p.model for p in self._catalogue.prompts} | {self.default_model})

    def _model(self, name: str) -> Reply:
        self._current_catalogue()
        models = self._models()
        for model in models:
            if name in (model, model.removesuffix(".gguf")):
                return json_reply(200, _openai_model(model))
        raise ModelNotFoundError(name, models)

    # --- the snapshot's freshness ---------------------------------------------------------

    def _check_snapshot(self) -> None:
        """Compare the snapshot with the table's catalogue; mark it stale if they differ."""
        snapshot = self.snapshot
        if snapshot is None:
            return
        table = self.store.catalogue()
        self._checked_at = self._clock()
        if (table.revision, table.updated) != snapshot.state:
            log.warning(
                "table %s is at revision %d, the snapshot at %d: answering from the table",
                snapshot.table,
                table.revision,
                snapshot.state[0],
            )
            self._stale = True

    def _schedule_check(self) -> None:
        """After an answer: check the snapshot if it is due (first after the cold answer,
        then every catalogue_ttl), in a thread so that no request waits for boto3."""
        due = self._checked_at is None or self._clock() - self._checked_at > self.catalogue_ttl
        if not due or self._stale or (self._check is not None and self._check.is_alive()):
            return
        if not self.background:
            self._checked_safely()
            return
        self._check = threading.Thread(target=self._check_later, name="snapshot-check")
        self._check.daemon = True
        self._check.start()

    def _check_later(self) -> None:
        # Let the runtime send this answer first: it needs the GIL, and importing boto3
        # would hold it in 5 ms slices. (Lambda freezes the sleep with the container.)
        time.sleep(CHECK_DELAY)
        self._checked_safely()

    def _checked_safely(self) -> None:
        try:
            self._check_snapshot()
        except Exception as exc:  # a failed check is tried again later; the snapshot stays
            self._checked_at = self._clock()
            log.warning(
                "snapshot revision check failed, retrying in %gs: %s", self.catalogue_ttl, exc
            )

    def _drop_snapshot(self) -> None:
        if self.snapshot is not None:
            self.snapshot = None
            self._catalogue = None
        self._stale = False

    def _current_catalogue(self) -> Catalogue:
        """The catalogue the listings show: the snapshot's while it is fresh, else the
        table's, read again after catalogue_ttl."""
        if self._stale:
            self._drop_snapshot()
        if self._catalogue is None or (
            self.snapshot is None and self._clock() - self._loaded_at > self.catalogue_ttl
        ):
            self._load_catalogue()
        assert self._catalogue is not None
        return self._catalogue

    def _info(self, path: str) -> Reply:
        catalogue = self._current_catalogue()
        prompts = catalogue.prompts
        data = [_openai_model(m) for m in self._models()]
        if path == "/v1/models":
            return json_reply(200, {"object": "list", "data": data})
        if path == "/models":
            # OpenAI's list for SDKs whose base_url lacks /v1, and ComeAPI's keys.
            return json_reply(
                200,
                {
                    "object": "list",
                    "data": data,
                    "models": self._models(),
                    "default_model": self.default_model,
                },
            )
        status = {
            "mode": "serverless",
            "cached_prompts": len(prompts),
            "cached_answers": sum(p.variants for p in prompts),
            "served_answers": sum(len(v) for v in self._variants.values()),
            "serve_states": sorted(self.serve_states),
            "on_miss": "start-backend" if self.on_miss is not None else "reject",
            "answers_from": "snapshot" if self.snapshot is not None else "table",
            "catalogue_revision": catalogue.revision,
        }
        return json_reply(200, {"message": "ComeAPI (serverless)", "status": status})


def _openai_model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "comeapi"}


def _hit(request: GenerationRequest, entry: Entry) -> Reply:
    # API Gateway buffers a Lambda's answer, so a stream goes whole, as one SSE body.
    reply = HitReply(AnswerFormat.of(request), entry)
    return Reply(200, reply.body().decode("utf-8"), dict(reply.headers))


def json_reply(status: int, body: Any, headers: dict[str, str] | None = None) -> Reply:
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return Reply(status, text, {"Content-Type": JSON, **(headers or {})})


def error_reply(exc: ComeapiError) -> Reply:
    """Every error in the gateway's shape: OpenAI's ``{"error": {...}}`` plus its headers."""
    return json_reply(exc.status, exc.to_dict(), exc.headers())


@functools.cache
def default_app() -> ServerlessApp:
    """The app this container serves, built once: its snapshot and boto3 client are reused
    across calls."""
    return ServerlessApp.from_env(os.environ)


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """The Lambda entry point (``comeapi.serverless.handler.handler``)."""
    try:
        app = default_app()
    except ComeapiError as exc:
        log.error("cannot start: %s", exc.message)
        return to_result(error_reply(exc))
    return app(event, context)


def _lambda_init() -> None:
    """Build the app during Lambda's init phase rather than in the first request.

    Init allocates only long-lived objects (the snapshot's entries, or botocore's service
    model), so the cyclic GC is paused meanwhile: a full collection landing in client creation
    costs ~35 ms of a ~200 ms cold start and finds ~700 garbage objects among ~60,000
    (benchmarks/lambda_coldstart.py). Freezing what init made also keeps it out of every later
    collection. A bad setting is not fatal here: it becomes a JSON error on each request
    (functools.cache keeps no failures).
    """
    gc.disable()
    try:
        with contextlib.suppress(ComeapiError):
            default_app()
    finally:
        gc.freeze()
        gc.enable()


if os.environ.get("AWS_LAMBDA_FUNCTION_NAME") and os.environ.get("TABLE_NAME"):
    _lambda_init()
