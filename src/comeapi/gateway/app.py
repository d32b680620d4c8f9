"""The gateway's HTTP app: ComeAPI's and OpenAI's routes in front of the backend pool.

A generation request is read (413 over the size limit), decoded and looked up in the
response cache; a hit is answered at once. A miss is validated (a malformed request never
reaches a backend), checked against the models the backends have, and forwarded through the
pool, or answered 404 with the known prompts when misses are rejected or no backend exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Collection
from typing import Any

import anyio.to_thread
import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from comeapi.balancer.health import HealthChecker
from comeapi.balancer.pool import BackendPool
from comeapi.balancer.proxy import Forwarder, forward_headers
from comeapi.balancer.transport import default_upstream
from comeapi.balancer.upstream import HttpxUpstream, Timeouts, Upstream
from comeapi.cache.checks import CheckPolicy
from comeapi.errors import ModelNotFoundError
from comeapi.gateway.cache import ResponseCache
from comeapi.gateway.cache_status import cache_status
from comeapi.gateway.dashboard import PAGE_PATHS, UNLISTED_PATHS, Dashboard
from comeapi.gateway.generation import GenerationRoutes
from comeapi.gateway.metrics import GatewayMetrics
from comeapi.gateway.ondemand import OnDemandBackends, pool_supervisor
from comeapi.gateway.requestlog import RequestLog, RequestLogMiddleware
from comeapi.gateway.review import ReviewRoutes, pool_regenerator
from comeapi.http.auth import PUBLIC_PATHS, APIKeyMiddleware
from comeapi.http.cors import CORSMiddleware
from comeapi.http.errors import EXCEPTION_HANDLERS
from comeapi.http.metrics import CONTENT_TYPE, MetricsMiddleware
from comeapi.http.responses import JSONResponse
from comeapi.models.tokens import TokenCounter
from comeapi.protocol.health import probe_client
from comeapi.settings import Settings

log = logging.getLogger("comeapi.gateway")


class Gateway:
    """The gateway's parts and its route handlers."""

    def __init__(
        self,
        settings: Settings,
        pool: BackendPool,
        cache: ResponseCache | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        upstream: Upstream | None = None,
    ):
        self.settings = settings
        self.pool = pool
        self.cache = cache
        timeouts = Timeouts(
            connect=settings.connect_timeout,
            read=settings.request_timeout,
            write=settings.request_timeout,
            pool=settings.connect_timeout,
        )
        if upstream is None:
            upstream = (
                default_upstream(timeouts)
                if transport is None
                else HttpxUpstream(transport, timeouts)
            )
        self.upstream = upstream
        # Probes and model lists: httpx's own client; speed does not matter there.
        self.probe_client = probe_client(settings.health_timeout, transport)
        self.health = HealthChecker(
            pool,
            self.probe_client,
            interval=settings.health_interval,
            timeout=settings.health_timeout,
        )
        self.metrics = GatewayMetrics(pool, cache)
        self.requests = RequestLog(settings.request_log_size, settings.access_log)
        self.forwarder = Forwarder(
            pool,
            self.health,
            self.upstream,
            stall_timeout=settings.stall_timeout,
            observer=self.metrics,
        )
        self._cache_task: asyncio.Task[None] | None = None
        self.on_demand: OnDemandBackends | None = None
        if settings.on_demand:
            self.on_demand = OnDemandBackends(
                lambda: pool_supervisor(settings),
                pool,
                self.health,
                idle_timeout=settings.idle_timeout,
            )

    async def _refresh_cache(self) -> None:
        """Pick up imports and warmups made by other processes; write hit counts."""
        assert self.cache is not None
        while True:
            await asyncio.sleep(self.settings.cache_refresh)
            await self.cache.refresh()  # says what fails, once (``cache.problem``)

    async def startup(self) -> None:
        if self.cache is not None:
            await anyio.to_thread.run_sync(self.cache.reload)
            self._cache_task = asyncio.create_task(self._refresh_cache())
        await self.health.start()
        if self.on_demand is not None:
            self.on_demand.start_idle_watch()

    async def shutdown(self) -> None:
        if self.on_demand is not None:
            await self.on_demand.close()
        if self._cache_task is not None:
            self._cache_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cache_task
        if self.cache is not None:
            await self.cache.flush_hits()
            self.cache.store.close()
        await self.health.stop()
        self.pool.close()
        await self.probe_client.aclose()
        await self.upstream.aclose()

    # --- ComeAPI's status routes ---------------------------------------------------------

    async def root(self, request: Request) -> Response:
        status = self.pool.summary()
        if self.cache is not None:
            status["cached_prompts"] = len(self.cache.known_prompts())
        return JSONResponse({"message": "ComeAPI Load Balancer", "status": status})

    async def health_route(self, request: Request) -> Response:
        summary = self.pool.summary()
        # The gateway itself is up either way; "degraded" tells that no backend is.
        status = "ok" if summary["healthy_backends"] else "degraded"
        return JSONResponse({"status": status, **summary})

    async def status(self, request: Request) -> Response:
        return JSONResponse(
            {
                **self.pool.summary(),
                "routing": self.pool.routing,
                "queue_size": self.pool.queue_size,
                "backends": [b.to_dict() for b in self.pool.backends],
                "cache": cache_status(self.cache) if self.cache is not None else None,
                "on_demand": self.on_demand.status() if self.on_demand is not None else None,
            }
        )

    async def metrics_route(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    # --- model lists: the union of the backends' ------------------------------------------

    async def models(self, request: Request) -> Response:
        """``GET /models``: OpenAI's list (``object``, ``data``: SDKs whose base_url lacks
        /v1) and ComeAPI's ``models`` in one body; each client reads its own keys."""
        comeapi, openai = await asyncio.gather(
            self._comeapi_model_list(request), self._openai_model_list(request)
        )
        return JSONResponse({"object": "list", "data": openai, "models": comeapi})

    async def _comeapi_model_list(self, request: Request) -> list[dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for answer in await self._ask_backends("/models", request):
            for item in answer.get("models") or []:
                if isinstance(item, dict) and isinstance(item.get("name"), str):
                    found.setdefault(item["name"], item)
        for name in self._local_models():
            found.setdefault(name, {"name": name, "size_mb": None})
        return [found[name] for name in sorted(found)]

    async def openai_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": await self._openai_model_list(request)})

    async def openai_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        models = await self._openai_model_list(request)
        for model in models:
            if name in (model["id"], model["id"].removesuffix(".gguf")):
                return JSONResponse(model)
        raise ModelNotFoundError(name, [m["id"] for m in models])

    async def _openai_model_list(self, request: Request) -> list[dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for answer in await self._ask_backends("/v1/models", request):
            for item in answer.get("data") or []:
                if isinstance(item, dict) and isinstance(item.get("id"), str):
                    found.setdefault(item["id"], item)
        for name in self._local_models():
            found.setdefault(
                name, {"id": name, "object": "model", "created": 0, "owned_by": "comeapi"}
            )
        return [found[name] for name in sorted(found)]

    def _local_models(self) -> set[str]:
        """Models known without asking: the backends' (from /health) and the cached ones."""
        names = set(self.pool.known_models())
        if self.cache is not None:
            names |= self.cache.models()
        return names

    async def _ask_backends(self, path: str, request: Request) -> list[dict[str, Any]]:
        headers = forward_headers(request.headers.raw, self.settings.backend_api_key)

        async def ask(url: str) -> dict[str, Any]:
            try:
                response = await self.probe_client.get(url + path, headers=headers)
                data = response.json() if response.status_code == 200 else {}
            except (httpx.HTTPError, ValueError):
                return {}
            return data if isinstance(data, dict) else {}

        return await asyncio.gather(*(ask(b.url) for b in self.pool.healthy()))


def create_app(
    settings: Settings,
    pool: BackendPool,
    cache: ResponseCache | None = None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    upstream: Upstream | None = None,
) -> GatewayApp:
    """The gateway app: [CORS,] the generation routes in front of a Starlette app for the rest.
    ``transport`` replaces the network (tests use httpx.MockTransport); ``upstream`` only the
    client requests are forwarded with (benchmarks/balancer_overhead.py compares them)."""
    gateway = Gateway(settings, pool, cache, transport=transport, upstream=upstream)
    routes = [
        Route("/", gateway.root),
        Route("/health", gateway.health_route),
        Route("/status", gateway.status),
        Route("/metrics", gateway.metrics_route),
        Route("/models", gateway.models),
        Route("/models/{model:path}", gateway.openai_model),
        Route("/v1/models", gateway.openai_models),
        Route("/v1/models/{model:path}", gateway.openai_model),
    ]
    dashboard = Dashboard(
        settings, pool, gateway.metrics, gateway.requests, cache, gateway.on_demand
    )
    routes += dashboard.routes()
    regenerate = pool_regenerator(pool, settings, gateway.on_demand)
    policy = CheckPolicy.parse(settings.checks)
    counter = TokenCounter(settings.model_dir)
    routes += ReviewRoutes(cache, regenerate, policy, counter).routes()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.startup()
        try:
            yield
        finally:
            await gateway.shutdown()

    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(RequestLogMiddleware, log=gateway.requests, unlisted=UNLISTED_PATHS),
            Middleware(MetricsMiddleware, metrics=gateway.metrics, routes=[r.path for r in routes]),
            Middleware(APIKeyMiddleware, keys=settings.api_keys, public=PUBLIC_PATHS | PAGE_PATHS),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    generation = GenerationRoutes(
        app,
        settings=settings,
        pool=pool,
        forwarder=gateway.forwarder,
        metrics=gateway.metrics,
        requests=gateway.requests,
        cache=cache,
        on_demand=gateway.on_demand,
    )
    if not settings.cors_origins:
        return generation  # no CORS layer at all on the hit path
    return CORSGateway(generation, settings.cors_origins)


class CORSGateway(CORSMiddleware):
    """CORS in front of the whole gateway, generation routes included (they answer before
    the Starlette app's middleware); preflights are answered before any key check. Only
    built with --cors-origin."""

    def __init__(self, app: GenerationRoutes, origins: Collection[str]):
        super().__init__(app, allow_origins=origins)
        self.state = app.state


# What create_app returns: both have the Starlette app's ``state`` (``state.gateway``).
GatewayApp = GenerationRoutes | CORSGateway
