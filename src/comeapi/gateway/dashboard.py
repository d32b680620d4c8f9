"""``/dashboard``: one page for operators, shipped as package data (no build step, nothing
loaded from elsewhere), that polls ``/dashboard/data`` once a second.

The page and its script are public and hold no data; ``/dashboard/data`` needs the API key
when keys are set. The page asks for the key once, keeps it in sessionStorage and sends it
as ``Authorization: Bearer``, so a key never appears in a URL.
"""

from __future__ import annotations

import importlib.resources
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from comeapi.balancer.pool import BackendPool
from comeapi.gateway.cache import ResponseCache
from comeapi.gateway.cache_status import cache_status
from comeapi.gateway.metrics import GatewayMetrics
from comeapi.gateway.ondemand import OnDemandBackends
from comeapi.gateway.requestlog import RequestLog
from comeapi.gateway.review import LIST_PATH
from comeapi.http.responses import JSONResponse
from comeapi.settings import Settings

DATA_PATH = "/dashboard/data"
#: The page's files: path -> (file in comeapi/data, content type).
PAGE_FILES = {
    "/dashboard": ("dashboard.html", "text/html; charset=utf-8"),
    "/dashboard/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
#: Paths that need no key: the page's files, which carry no data.
PAGE_PATHS = frozenset(PAGE_FILES)
#: Paths kept out of the recent-requests table (the page's own polling; its review list).
UNLISTED_PATHS = frozenset({*PAGE_FILES, DATA_PATH, LIST_PATH})
#: Prompts listed in the hits table at most (the most hit ones).
MAX_PROMPTS = 100
DEFAULT_ROWS = 50

_PAGE_HEADERS = {
    # The page loads its own script and style and talks to its own origin, nothing else.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class Dashboard:
    """The page's routes, and the snapshot of the gateway it polls."""

    def __init__(
        self,
        settings: Settings,
        pool: BackendPool,
        metrics: GatewayMetrics,
        requests: RequestLog,
        cache: ResponseCache | None = None,
        on_demand: OnDemandBackends | None = None,
    ):
        self.settings = settings
        self.pool = pool
        self.metrics = metrics
        self.requests = requests
        self.cache = cache
        self.on_demand = on_demand
        data = importlib.resources.files("comeapi") / "data"
        self.files = {
            path: ((data / name).read_bytes(), media_type)
            for path, (name, media_type) in PAGE_FILES.items()
        }

    def routes(self) -> list[Route]:
        return [
            *(Route(path, self.page_file) for path in PAGE_FILES),
            Route(DATA_PATH, self.data),
        ]

    async def page_file(self, request: Request) -> Response:
        body, media_type = self.files[request.url.path]
        return Response(body, media_type=media_type, headers=_PAGE_HEADERS)

    async def data(self, request: Request) -> Response:
        try:
            rows = int(request.query_params.get("rows", DEFAULT_ROWS))
        except ValueError:
            rows = DEFAULT_ROWS
        return JSONResponse(self.snapshot(rows), headers={"Cache-Control": "no-store"})

    def snapshot(self, rows: int = DEFAULT_ROWS) -> dict[str, Any]:
        """Everything the page shows, read now."""
        pool = self.pool
        tokens = self.metrics.registry.get_sample_value("comeapi_tokens_generated_total")
        return {
            "time": time.time(),
            "started": self.requests.started,
            "access_log": self.settings.access_log,
            "pool": pool.summary(),
            "routing": pool.routing,
            "queue": {
                "depth": pool.queue_depth,
                "limit": pool.queue_size,
                "timeout": pool.queue_timeout,
            },
            "backends": [b.to_dict() for b in pool.backends],
            "on_demand": self.on_demand.status() if self.on_demand is not None else None,
            "cache": self._cache(),
            "tokens_generated": int(tokens or 0),
            "requests": {
                "total": self.requests.total,
                "kept": self.requests.recent.maxlen,
                "recent": list(self.requests.latest(max(0, min(rows, 1000)))),
            },
        }

    def _cache(self) -> dict[str, Any] | None:
        if self.cache is None:
            return None
        status = cache_status(self.cache)
        prompts = status.pop("by_prompt")
        shown = sorted(prompts, key=lambda p: -p["hits"])[:MAX_PROMPTS]
        status["prompts_shown"] = sorted(shown, key=lambda p: p["prompt"])
        return status
