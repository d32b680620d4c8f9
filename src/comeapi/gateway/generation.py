"""The gateway's outermost ASGI app: the three generation routes, answered here.

Everything else (status pages, model lists, /metrics) goes on to the Starlette app. A cache
hit is the hot path: check the key, read the body, parse it (a bad body is 400 whatever the
cache holds), look it up, send pre-encoded bytes, count it; no Request or Response object,
no middleware, no routing. A miss is forwarded through the pool, or refused with the known
prompts.
"""

from __future__ import annotations

import logging
import time

import orjson
from starlette.applications import Starlette
from starlette.datastructures import Headers, State
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from comeapi.balancer.pool import BackendPool
from comeapi.balancer.proxy import Forwarder, forward_headers
from comeapi.cache.key import uncacheable
from comeapi.errors import ComeapiError, PromptNotCachedError, RequestError, StoreError
from comeapi.gateway.cache import (
    NO_STORE_HEADER,
    SECRET_HEADER,
    VARIANT_HEADER,
    Lookup,
    ResponseCache,
)
from comeapi.gateway.metrics import GatewayMetrics
from comeapi.gateway.ondemand import OnDemandBackends
from comeapi.gateway.requestlog import Miss, RequestLog, RequestRecord
from comeapi.http.auth import APIKeys, auth_error_response
from comeapi.http.errors import error_response
from comeapi.http.responses import read_asgi_body
from comeapi.protocol.requests import KINDS, GenerationRequest, decode_json, parse_request
from comeapi.settings import Settings

log = logging.getLogger("comeapi.gateway")

CLIENT_GONE = 499  # nginx's code for "client closed the request", for the metrics only
_CACHE_CONTROL = b"cache-control"
_HIT_HEADERS = frozenset({_CACHE_CONTROL, VARIANT_HEADER.encode(), SECRET_HEADER.encode()})
# The parse and lookup ``answer_now`` did for a request it left to the ASGI path.
_PREPARED = "comeapi.prepared"


class GenerationRoutes:
    """The generation routes (``protocol.requests.KINDS``), in front of ``app``."""

    #: The paths ``answer_now`` may answer (``http.server.ImmediateAnswers``).
    immediate_paths = frozenset(KINDS)

    def __init__(
        self,
        app: Starlette,
        *,
        settings: Settings,
        pool: BackendPool,
        forwarder: Forwarder,
        metrics: GatewayMetrics,
        requests: RequestLog,
        cache: ResponseCache | None = None,
        on_demand: OnDemandBackends | None = None,
    ):
        self.app = app
        self.settings = settings
        self.pool = pool
        self.forwarder = forwarder
        self.metrics = metrics
        self.requests = requests
        self.cache = cache
        self.on_demand = on_demand
        self.keys = APIKeys(settings.api_keys)

    @property
    def state(self) -> State:
        """The Starlette app's state (``state.gateway``), as if this were that app."""
        return self.app.state

    def answer_now(
        self, scope: Scope, body: bytes
    ) -> tuple[list[tuple[bytes, bytes]], bytes] | None:
        """A cache hit answered by the HTTP server itself, as soon as the whole request is
        read and before any ASGI task exists (``http.server.GuardedHttpToolsProtocol``):
        the headers and body to send with status 200, counted and recorded here as
        ``__call__`` would. None for anything else (an error, a miss, a bypass): the request
        then takes the ASGI path, which finds this parse and lookup in ``scope`` rather than
        repeating them, so a miss is counted once."""
        cache = self.cache
        if (
            cache is None
            or scope["method"] != "POST"
            or len(body) > self.settings.max_body_bytes
            or self.keys.check(scope) is not None
        ):
            return None
        started = time.perf_counter()
        try:
            request = parse_request(
                KINDS[scope["path"]],
                decode_json(body),
                max_tokens_limit=self.settings.max_tokens_limit,
            )
            lookup = self._lookup(scope, request, cache)
        except ComeapiError:
            return None  # the ASGI path parses again and answers the error
        if lookup is None or lookup.hit is None:
            scope[_PREPARED] = (request, lookup)
            return None
        hit = lookup.hit
        record = RequestRecord(scope)
        record.request = request
        record.outcome = hit
        seconds = time.perf_counter() - started
        self.metrics.observe(scope["path"], 200, seconds)
        self.requests.add(record, 200, seconds)
        return hit.headers, hit.body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = KINDS.get(scope["path"]) if scope["type"] == "http" else None
        if kind is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        record = RequestRecord(scope)
        status = 500
        try:
            status = await self._route(scope, receive, send, record)
        finally:
            seconds = time.perf_counter() - started
            self.metrics.observe(scope["path"], status, seconds)
            self.requests.add(record, status, seconds)

    async def _route(
        self, scope: Scope, receive: Receive, send: Send, record: RequestRecord
    ) -> int:
        """Answer one generation request; returns the status sent."""
        try:
            denied = self.keys.check(scope)
            if denied is not None:
                response: Response | None = auth_error_response(denied)
            elif scope["method"] != "POST":
                error = RequestError(f"method {scope['method']} not allowed on {scope['path']}")
                error.status = 405
                raise error
            else:
                raw = await read_asgi_body(scope, receive, self.settings.max_body_bytes)
                prepared = scope.pop(_PREPARED, None)
                if prepared is None:
                    record.request = request = parse_request(
                        KINDS[scope["path"]],
                        decode_json(raw),
                        max_tokens_limit=self.settings.max_tokens_limit,
                    )
                    lookup = self._lookup(scope, request, self.cache)
                else:
                    request, lookup = prepared
                    record.request = request
                response = await self._answer(scope, receive, send, request, raw, record, lookup)
                if response is None:
                    return 200
        except ClientDisconnect:
            return CLIENT_GONE
        except ComeapiError as exc:
            response = error_response(exc)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            response = error_response(ComeapiError("internal server error"))
        assert response is not None
        await response(scope, receive, send)
        return response.status_code

    def _lookup(
        self, scope: Scope, request: GenerationRequest, cache: ResponseCache | None
    ) -> Lookup | None:
        """The cache's verdict, or None when the request does not consult the cache: no
        cache, or Cache-Control: no-cache (warmup) while misses are forwarded (when they are
        rejected, no-cache must not become a way around the rule)."""
        if cache is None:
            return None
        found = {k: v for k, v in scope["headers"] if k in _HIT_HEADERS}
        bypass = b"no-cache" in found.get(_CACHE_CONTROL, b"")
        if bypass and self.settings.on_miss == "forward":
            return None
        forced = cache.forced_variant(
            found.get(VARIANT_HEADER.encode()), found.get(SECRET_HEADER.encode(), b"")
        )
        return cache.lookup(request, forced)

    async def _answer(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        request: GenerationRequest,
        raw: bytes,
        record: RequestRecord,
        lookup: Lookup | None,
    ) -> Response | None:
        """None once a hit is sent; otherwise the response to send."""
        cache = self.cache
        if cache is None or lookup is None:
            record.outcome = miss = Miss(looked_up=False)
            return await self._forward(scope, receive, request, raw, miss)
        hit = lookup.hit
        if hit is not None:
            await send({"type": "http.response.start", "status": 200, "headers": hit.headers})
            await send({"type": "http.response.body", "body": hit.body})
            record.outcome = hit
            return None
        record.outcome = miss = Miss(looked_up=True, variant=lookup.forced_variant)
        return await self._miss(scope, receive, request, raw, cache, lookup, miss)

    async def _miss(
        self,
        scope: Scope,
        receive: Receive,
        request: GenerationRequest,
        raw: bytes,
        cache: ResponseCache,
        found: Lookup,
        miss: Miss,
    ) -> Response:
        forced = found.forced_variant
        if forced is None and (self.settings.on_miss == "reject" or not self.pool.backends):
            param = uncacheable(request)
            if param is not None:
                raise RequestError(
                    f"{param}: a cached answer cannot carry this, and this server answers "
                    "from its cache only",
                    param=param,
                    code="not_cacheable",
                )
            raise PromptNotCachedError(cache.known_prompts())
        if forced is not None:
            # The slot nginx chose is generated with its own seed, as warmup would.
            raw = orjson.dumps({**orjson.loads(raw), "seed": forced})
        response = await self._forward(scope, receive, request, raw, miss)
        response.headers["X-Cache"] = "MISS"
        if forced is not None:
            response.headers["X-Cache-Variant"] = str(forced)
        if not found.keep:
            response.headers[NO_STORE_HEADER] = "1"
        fills = forced is not None or cache.store_misses
        if fills and found.key is not None and response.status_code == 200 and not request.stream:
            await self._store(cache, found, request, response)
        return response

    async def _store(
        self, cache: ResponseCache, found: Lookup, request: GenerationRequest, response: Response
    ) -> None:
        """Keep a generated answer. The client gets it whether or not the store takes it."""
        try:
            answer = orjson.loads(response.body)
            await cache.store_answer(found, request, answer)
        except orjson.JSONDecodeError:
            return
        except StoreError as exc:
            self.metrics.store_failures.inc()
            log.warning("answer sent but not stored: %s", exc.message)

    async def _forward(
        self, scope: Scope, receive: Receive, request: GenerationRequest, raw: bytes, miss: Miss
    ) -> Response:
        if self.on_demand is not None:
            self.on_demand.ensure_running()
        self.pool.check_model(request.model)
        miss.response = await self.forwarder.forward(
            scope["path"],
            raw,
            forward_headers(Headers(scope=scope), self.settings.backend_api_key),
            model=request.model,
            stream=request.stream,
            receive=receive,
            report=miss,
        )
        return miss.response
