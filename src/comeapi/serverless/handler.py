"""The Lambda handler: an API Gateway event in, one DynamoDB GetItem, the cached answer out.

A plain handler, no web framework: cold start is the cost that matters, so this module
imports boto3, the standard library and comeapi's light modules only (no pydantic,
starlette, orjson or click; ``python -X importtime -c "import comeapi.serverless.handler"``).

Requests are parsed by ``comeapi.protocol.requests`` and keyed by ``comeapi.cache.key``, as on
the gateway and in nginx.

Environment: TABLE_NAME (required), DEFAULT_MODEL, ON_MISS (``reject`` or ``start-backend``,
see ``ondemand``), API_KEYS (comma-separated bearer tokens; empty: open), CATALOGUE_TTL (s),
MAX_TOKENS_LIMIT (as the gateway's ``max_tokens_limit``, default 2048).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from comeapi.cache.dynamo import DynamoStore, make_client
from comeapi.cache.dynamo_items import Catalogue
from comeapi.cache.key import choose_default_model, lookup_key, uncacheable
from comeapi.cache.replies import hit_body, hit_stream
from comeapi.cache.store import Entry
from comeapi.errors import (
    AuthenticationError,
    ComeapiError,
    ConfigError,
    ModelNotFoundError,
    NotFoundError,
    PayloadTooLargeError,
    PromptNotCachedError,
    RequestError,
)
from comeapi.models.bundled import BUNDLED_MODEL
from comeapi.protocol.requests import KINDS, GenerationRequest, decode_json, parse_request
from comeapi.serverless.events import HttpRequest, Reply, parse_event, to_result

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 1024
MAX_TOKENS_LIMIT = 2048
JSON = "application/json"


# What answers a prompt the cache does not hold (e.g. a backend started on demand).
MissHandler = Callable[[HttpRequest], Reply]


class ServerlessApp:
    """Routes one API Gateway event. Keeps the catalogue between invocations of a warm
    container (refreshed after ``catalogue_ttl``), so a hit costs one GetItem."""

    def __init__(
        self,
        store: DynamoStore,
        *,
        default_model: str | None = None,
        max_tokens_limit: int = MAX_TOKENS_LIMIT,
        on_miss: MissHandler | None = None,
        api_keys: tuple[str, ...] = (),
        catalogue_ttl: float = 60.0,
        miss_refresh: float = 5.0,
        randbelow: Callable[[int], int] = secrets.randbelow,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store = store
        self.configured_model = default_model
        self.default_model = choose_default_model(default_model, (), BUNDLED_MODEL)
        self.max_tokens_limit = max_tokens_limit
        self.on_miss = on_miss
        self.api_keys = tuple(k.encode() for k in api_keys)
        self.catalogue_ttl = catalogue_ttl
        self.miss_refresh = miss_refresh
        self._randbelow = randbelow
        self._clock = clock
        self._catalogue: Catalogue | None = None
        self._variants: dict[str, int] = {}
        self._loaded_at = 0.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str], client: Any = None) -> ServerlessApp:
        table = environ.get("TABLE_NAME")
        if not table:
            raise ConfigError("TABLE_NAME is not set: the DynamoDB table holding the cache")
        if client is None:
            client = make_client(endpoint_url=environ.get("DYNAMODB_ENDPOINT_URL") or None)
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
        return cls(
            DynamoStore(client, table),
            default_model=environ.get("DEFAULT_MODEL") or None,
            max_tokens_limit=int(limit),
            on_miss=on_miss,
            api_keys=keys,
            catalogue_ttl=ttl,
        )

    def __call__(self, event: dict[str, Any], context: Any = None) -> dict[str, Any]:
        try:
            reply = self.handle(parse_event(event))
        except ComeapiError as exc:
            reply = error_reply(exc)
        except Exception:
            log.exception("unhandled error")
            reply = error_reply(ComeapiError("internal error", code="internal_error"))
        return to_result(reply)

    def handle(self, request: HttpRequest) -> Reply:
        if self.api_keys:
            self._authenticate(request)
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
        if self._catalogue is None:
            self._load_catalogue()  # the default model may depend on what is cached
        key = lookup_key(parsed, self.default_model)
        for attempt in range(2):
            n = self._variants_of(key, refresh_on_miss=attempt == 0)
            if not n:
                return self._miss(request)
            variant = self._randbelow(n)
            entry = self.store.get(key, variant)
            if entry is not None:
                return _hit(parsed, entry, variant)
            self._load_catalogue()  # pushed over since we read the catalogue: read it again
        return self._miss(request)

    def _miss(self, request: HttpRequest) -> Reply:
        if self.on_miss is not None:
            return self.on_miss(request)
        assert self._catalogue is not None
        raise PromptNotCachedError([p.prompt for p in self._catalogue.prompts])

    def _variants_of(self, key: str, *, refresh_on_miss: bool) -> int:
        now = self._clock()
        if self._catalogue is None or now - self._loaded_at > self.catalogue_ttl:
            self._load_catalogue()
        n = self._variants.get(key, 0)
        # A prompt pushed a moment ago: look again, but at most every miss_refresh seconds.
        if not n and refresh_on_miss and now - self._loaded_at > self.miss_refresh:
            self._load_catalogue()
            n = self._variants.get(key, 0)
        return n

    def _load_catalogue(self) -> None:
        self._catalogue = self.store.catalogue()
        self._variants = self._catalogue.variants()
        self._loaded_at = self._clock()
        models = (p.model for p in self._catalogue.prompts)
        self.default_model = choose_default_model(self.configured_model, models, BUNDLED_MODEL)

    def _models(self) -> list[str]:
        assert self._catalogue is not None
        return sorted({p.model for p in self._catalogue.prompts} | {self.default_model})

    def _model(self, name: str) -> Reply:
        if self._catalogue is None or self._clock() - self._loaded_at > self.catalogue_ttl:
            self._load_catalogue()
        models = self._models()
        for model in models:
            if name in (model, model.removesuffix(".gguf")):
                return json_reply(200, _openai_model(model))
        raise ModelNotFoundError(name, models)

    def _authenticate(self, request: HttpRequest) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        if scheme.lower() != "bearer" or not any(
            hmac.compare_digest(given, k) for k in self.api_keys
        ):
            raise AuthenticationError("missing or wrong API key (Authorization: Bearer KEY)")

    def _info(self, path: str) -> Reply:
        if self._catalogue is None or self._clock() - self._loaded_at > self.catalogue_ttl:
            self._load_catalogue()
        assert self._catalogue is not None
        prompts = self._catalogue.prompts
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
            "on_miss": "start-backend" if self.on_miss is not None else "reject",
        }
        return json_reply(200, {"message": "ComeAPI (serverless)", "status": status})


def _openai_model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "comeapi"}


def _hit(request: GenerationRequest, entry: Entry, variant: int) -> Reply:
    headers = {"X-Cache": "HIT", "X-Cache-Variant": str(variant)}
    if request.stream:
        # API Gateway buffers a Lambda's answer, so the whole stream goes as one SSE body.
        headers.update({"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        return Reply(200, hit_stream(request, entry).decode("utf-8"), headers)
    return json_reply(200, hit_body(request.kind, entry), headers)


def json_reply(status: int, body: Any, headers: dict[str, str] | None = None) -> Reply:
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return Reply(status, text, {"Content-Type": JSON, **(headers or {})})


def error_reply(exc: ComeapiError) -> Reply:
    """Every error in the gateway's shape: OpenAI's ``{"error": {...}}`` plus its headers."""
    return json_reply(exc.status, exc.to_dict(), exc.headers())


@functools.cache
def default_app() -> ServerlessApp:
    """The app this container serves, built once: its boto3 client is reused across calls."""
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

    Building the client allocates only long-lived objects (botocore's service model), so the
    cyclic GC is paused meanwhile: a full collection landing there costs ~35 ms of a ~200 ms
    cold start and finds ~700 garbage objects among ~60,000 (benchmarks/lambda_coldstart.py).
    Freezing what init made also keeps it out of every later collection. A bad setting is not
    fatal here: it becomes a JSON error on each request (functools.cache keeps no failures).
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
