"""The three generation routes as one plain ASGI app, ahead of Starlette's router.

Every request is parsed once (``parse_request``: a bad body is 400 whatever the cache holds),
then looked up. A hit is the hot path: parse, key, pick, send pre-encoded bytes, with no
Request/Response objects and no routing in between. A miss is forwarded through the pool, or
refused with the known prompts.
"""

from __future__ import annotations

import logging

import orjson
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from comeapi.balancer.pool import BackendPool
from comeapi.balancer.proxy import Forwarder, forward_headers
from comeapi.cache.key import uncacheable
from comeapi.errors import ComeapiError, PromptNotCachedError, RequestError, StoreError
from comeapi.gateway.cache import Lookup, ResponseCache
from comeapi.gateway.metrics import GatewayMetrics
from comeapi.gateway.ondemand import OnDemandBackends
from comeapi.http.errors import error_response
from comeapi.http.responses import read_asgi_body
from comeapi.protocol.requests import KINDS, GenerationRequest, decode_json, parse_request
from comeapi.settings import Settings

log = logging.getLogger("comeapi.gateway")


class GenerationRoutes:
    """ASGI middleware answering POST /generate, /v1/completions, /v1/chat/completions."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        settings: Settings,
        pool: BackendPool,
        forwarder: Forwarder,
        metrics: GatewayMetrics,
        cache: ResponseCache | None = None,
        on_demand: OnDemandBackends | None = None,
    ):
        self.app = app
        self.settings = settings
        self.pool = pool
        self.forwarder = forwarder
        self.metrics = metrics
        self.cache = cache
        self.on_demand = on_demand

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = KINDS.get(scope["path"]) if scope["type"] == "http" else None
        if kind is None:
            await self.app(scope, receive, send)
            return
        try:
            if scope["method"] != "POST":
                error = RequestError(f"method {scope['method']} not allowed on {scope['path']}")
                error.status = 405
                raise error
            raw = await read_asgi_body(scope, receive, self.settings.max_body_bytes)
            request = parse_request(
                kind, decode_json(raw), max_tokens_limit=self.settings.max_tokens_limit
            )
            response = await self._answer(scope, receive, send, request, raw)
        except ClientDisconnect:
            return
        except ComeapiError as exc:
            response = error_response(exc)
        if response is not None:
            await response(scope, receive, send)

    async def _answer(
        self, scope: Scope, receive: Receive, send: Send, request: GenerationRequest, raw: bytes
    ) -> Response | None:
        headers = Headers(scope=scope)
        cache = self.cache
        # Cache-Control: no-cache (warmup) skips the lookup, unless misses are rejected:
        # then it must not become a way around the rule.
        bypass = "no-cache" in headers.get("cache-control", "")
        if cache is None or (bypass and self.settings.on_miss == "forward"):
            return await self._forward(scope, receive, request, raw, headers)
        found = cache.lookup(request, headers)
        hit = found.hit
        if hit is not None:
            await send({"type": "http.response.start", "status": 200, "headers": hit.headers})
            await send({"type": "http.response.body", "body": hit.body})
            return None
        return await self._miss(scope, receive, request, raw, headers, cache, found)

    async def _miss(
        self,
        scope: Scope,
        receive: Receive,
        request: GenerationRequest,
        raw: bytes,
        headers: Headers,
        cache: ResponseCache,
        found: Lookup,
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
        response = await self._forward(scope, receive, request, raw, headers)
        response.headers["X-Cache"] = "MISS"
        if forced is not None:
            response.headers["X-Cache-Variant"] = str(forced)
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
        self,
        scope: Scope,
        receive: Receive,
        request: GenerationRequest,
        raw: bytes,
        headers: Headers,
    ) -> Response:
        if self.on_demand is not None:
            self.on_demand.ensure_running()
        self.pool.check_model(request.model)
        return await self.forwarder.forward(
            scope["path"],
            raw,
            forward_headers(headers, self.settings.backend_api_key),
            model=request.model,
            stream=request.stream,
            receive=receive,
        )
