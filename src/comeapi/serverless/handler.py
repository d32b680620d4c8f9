"""The Lambda handler: an API Gateway event in, the cached answer out, from the snapshot the
function package carries or from the DynamoDB table.

A plain handler, no web framework: cold start is the cost that matters. With a snapshot
(``snapshot.py``) a hit needs the standard library and comeapi's light modules only; boto3 is
imported when the function must talk to AWS: a miss, the on-demand backend, the revision
check. Without one, the table's client is built at init, as any Python Lambda would.

The handler routes. What it answers from, and how that stays fresh, is its ``AnswerSource``
(``source.py``: the table, or the snapshot until the table moves past it); how it is
configured, ``FunctionConfig`` (``config.py``: every environment variable, read once); who
may call, ``protocol.auth`` (the gateway's rule). Requests are parsed by
``comeapi.protocol.requests`` and keyed by ``comeapi.cache.key``, as on the gateway and in
nginx; a hit is encoded by ``cache.replies.HitReply``, as on the gateway.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from typing import Any

from comeapi.cache.dynamo_items import Catalogue
from comeapi.cache.key import choose_default_model, lookup_key, uncacheable
from comeapi.cache.replies import AnswerFormat, HitReply
from comeapi.cache.store import Entry
from comeapi.errors import (
    ComeapiError,
    ModelNotFoundError,
    NotFoundError,
    PayloadTooLargeError,
    PromptNotCachedError,
    RequestError,
)
from comeapi.models.bundled import BUNDLED_MODEL
from comeapi.protocol.auth import BearerKeys
from comeapi.protocol.limits import MAX_BODY_BYTES, MAX_TOKENS_LIMIT
from comeapi.protocol.requests import KINDS, GenerationRequest, decode_json, parse_request
from comeapi.serverless.config import FunctionConfig, init_in_lambda
from comeapi.serverless.events import HttpRequest, Reply, parse_event, to_result
from comeapi.serverless.source import AnswerSource, open_source

log = logging.getLogger(__name__)

JSON = "application/json"


# What answers a prompt the cache does not hold (e.g. a backend started on demand).
MissHandler = Callable[[HttpRequest], Reply]


class ServerlessApp:
    """Routes one API Gateway event to ``source``. A warm container keeps the app, and with
    it the source's catalogue (so a hit costs one GetItem, or nothing with a snapshot)."""

    def __init__(
        self,
        source: AnswerSource,
        *,
        default_model: str | None = None,
        max_tokens_limit: int = MAX_TOKENS_LIMIT,
        on_miss: MissHandler | None = None,
        api_keys: tuple[str, ...] = (),
        randbelow: Callable[[int], int] = secrets.randbelow,
    ):
        self.source = source
        self.configured_model = default_model
        self.default_model = choose_default_model(default_model, (), BUNDLED_MODEL)
        self.max_tokens_limit = max_tokens_limit
        self.on_miss = on_miss
        self.keys = BearerKeys(api_keys)
        self._randbelow = randbelow
        self._models_of: Catalogue | None = None  # the catalogue default_model was chosen by

    @classmethod
    def from_config(cls, config: FunctionConfig, client: Any = None) -> ServerlessApp:
        """The app ``config`` describes; ``client``: the DynamoDB client to use (default:
        one made for ``config.dynamodb_endpoint_url``)."""
        on_miss: MissHandler | None = None
        if config.backend is not None:
            from comeapi.serverless.ondemand import OnDemandBackend

            on_miss = OnDemandBackend.from_config(config.backend)
        return cls(
            open_source(config, client),
            default_model=config.default_model,
            max_tokens_limit=config.max_tokens_limit,
            on_miss=on_miss,
            api_keys=config.api_keys,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str], client: Any = None) -> ServerlessApp:
        return cls.from_config(FunctionConfig.from_env(environ), client)

    def __call__(self, event: dict[str, Any], context: Any = None) -> dict[str, Any]:
        try:
            reply = self.handle(parse_event(event))
        except ComeapiError as exc:
            reply = error_reply(exc)
        except Exception:
            log.exception("unhandled error")
            reply = error_reply(ComeapiError("internal error", code="internal_error"))
        self.source.answered()
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
        self._catalogue()  # the default model may depend on what is cached
        entry = self.source.pick(lookup_key(parsed, self.default_model), self._randbelow)
        if entry is not None:
            return _hit(parsed, entry)
        if self.on_miss is not None:
            return self.on_miss(request)
        served = self.source.served()
        prompts = self.source.catalogue().prompts
        raise PromptNotCachedError([p.prompt for p in prompts if p.key in served])

    def _catalogue(self) -> Catalogue:
        """The source's catalogue, and the default model it implies."""
        catalogue = self.source.catalogue()
        if catalogue is not self._models_of:
            models = (p.model for p in catalogue.prompts)
            self.default_model = choose_default_model(self.configured_model, models, BUNDLED_MODEL)
            self._models_of = catalogue
        return catalogue

    def _models(self, catalogue: Catalogue) -> list[str]:
        return sorted({p.model for p in catalogue.prompts} | {self.default_model})

    def _model(self, name: str) -> Reply:
        models = self._models(self._catalogue())
        for model in models:
            if name in (model, model.removesuffix(".gguf")):
                return json_reply(200, _openai_model(model))
        raise ModelNotFoundError(name, models)

    def _info(self, path: str) -> Reply:
        catalogue = self._catalogue()
        prompts = catalogue.prompts
        models = self._models(catalogue)
        data = [_openai_model(m) for m in models]
        if path == "/v1/models":
            return json_reply(200, {"object": "list", "data": data})
        if path == "/models":
            # OpenAI's list for SDKs whose base_url lacks /v1, and ComeAPI's keys.
            return json_reply(
                200,
                {
                    "object": "list",
                    "data": data,
                    "models": models,
                    "default_model": self.default_model,
                },
            )
        status = {
            "mode": "serverless",
            "cached_prompts": len(prompts),
            "cached_answers": sum(p.variants for p in prompts),
            "served_answers": sum(len(v) for v in self.source.served().values()),
            "serve_states": sorted(self.source.serve_states),
            "on_miss": "start-backend" if self.on_miss is not None else "reject",
            "answers_from": self.source.answers_from,
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


if init_in_lambda(os.environ):
    _lambda_init()
