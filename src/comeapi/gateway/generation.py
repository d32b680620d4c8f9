"""The three generation routes as one plain ASGI app, ahead of Starlette's router.

A cache hit is the hot path: read the body, key it, pick a variant, send pre-encoded bytes,
with no Request/Response objects and no routing in between. A miss is validated (a malformed
request never reaches a backend) and forwarded through the pool, or refused with the known
prompts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from comeapi.balancer.proxy import forward_headers
from comeapi.errors import (
    ComeapiError,
    PromptNotCachedError,
    RequestError,
)
from comeapi.gateway.cache import Lookup, ResponseCache
from comeapi.http.errors import error_response
from comeapi.http.responses import read_asgi_body
from comeapi.protocol.requests import KINDS, Kind, decode_json, parse_request

if TYPE_CHECKING:
    from comeapi.gateway.app import Gateway


class GenerationRoutes:
    """ASGI middleware answering POST /generate, /v1/completions, /v1/chat/completions."""

    def __init__(self, app: ASGIApp, gateway: Gateway):
        self.app = app
        self.gateway = gateway
        self.settings = gateway.settings

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
            response = await self._answer(scope, receive, send, kind, raw)
        except ClientDisconnect:
            return
        except ComeapiError as exc:
            response = error_response(exc)
        if response is not None:
            await response(scope, receive, send)

    async def _answer(
        self, scope: Scope, receive: Receive, send: Send, kind: Kind, raw: bytes
    ) -> Response | None:
        body = decode_json(raw)
        headers = Headers(scope=scope)
        cache = self.gateway.cache
        # Cache-Control: no-cache (warmup) skips the lookup, unless misses are rejected:
        # then it must not become a way around the rule.
        bypass = "no-cache" in headers.get("cache-control", "")
        if cache is None or (bypass and self.settings.on_miss == "forward"):
            return await self._forward(scope, receive, kind, raw, body, headers)
        found = cache.lookup(kind, body, headers)
        hit = found.hit
        if hit is not None:
            await send({"type": "http.response.start", "status": 200, "headers": hit.headers})
            await send({"type": "http.response.body", "body": hit.body})
            return None
        return await self._miss(scope, receive, kind, raw, body, headers, cache, found)

    async def _miss(
        self,
        scope: Scope,
        receive: Receive,
        kind: Kind,
        raw: bytes,
        body: dict[str, Any],
        headers: Headers,
        cache: ResponseCache,
        found: Lookup,
    ) -> Response:
        forced = found.forced_variant
        rejects = self.settings.on_miss == "reject" or not self.gateway.pool.backends
        if forced is None and rejects:
            parse_request(kind, body, max_tokens_limit=self.settings.max_tokens_limit)
            raise PromptNotCachedError(cache.known_prompts())
        if forced is not None:
            # The slot nginx chose is generated with its own seed, as warmup would.
            body = {**body, "seed": forced}
            raw = orjson.dumps(body)
        response = await self._forward(scope, receive, kind, raw, body, headers)
        response.headers["X-Cache"] = "MISS"
        if forced is not None:
            response.headers["X-Cache-Variant"] = str(forced)
        fills = forced is not None or cache.store_misses
        if fills and response.status_code == 200 and not body.get("stream"):
            try:
                answer = orjson.loads(response.body)
            except orjson.JSONDecodeError:
                return response
            await cache.store_answer(found, kind, body, answer)
        return response

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        kind: Kind,
        raw: bytes,
        body: dict[str, Any],
        headers: Headers,
    ) -> Response:
        gateway = self.gateway
        parsed = parse_request(kind, body, max_tokens_limit=self.settings.max_tokens_limit)
        if gateway.on_demand is not None:
            gateway.on_demand.ensure_running()
        gateway.pool.check_model(parsed.model)
        return await gateway.forwarder.forward(
            scope["path"],
            raw,
            forward_headers(headers),
            model=parsed.model,
            stream=parsed.stream,
            receive=receive,
        )
