"""A backend's ``GET /health`` document: what it says, read in one place.

The backend writes it (``health_document``); the balancer's health checker, warmup and the
backend supervisor read it (``read_health``), so "is this backend ready, how many requests
does it take, which models, which process is it" has one answer everywhere::

    200 {"status": "ok", "capacity": 2, "in_flight": 0, "available": 2,
         "models": ["m.gguf"], "loaded_models": ["m.gguf"], "instance": "3f9c0a..."}
    503 {"status": "loading", ...}    the model is still loading: alive, not ready

Probes go through ``probe_client`` and ``get_health``, so they survive what keep-alive does
to them (a connection the backend closes just as a probe reuses it).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal

import httpx

HealthState = Literal["ok", "loading", "bad"]

#: Seconds a comeapi client keeps an idle connection to a backend: less than the 5 s after
#: which comeapi's servers (uvicorn's ``timeout_keep_alive``), and llama-server, close one,
#: so a request is rarely written into a connection the server is closing.
KEEPALIVE_EXPIRY = 4.0


@dataclass(frozen=True, slots=True)
class Health:
    """One answer to ``GET /health``. ``state`` is "ok" (takes requests), "loading" (alive,
    not ready yet) or "bad" (anything else; ``reason`` says what)."""

    state: HealthState
    reason: str | None = None
    #: Requests it takes at once (None: not said, e.g. a gateway).
    capacity: int | None = None
    in_flight: int | None = None
    #: GGUF files it can serve (None: not said).
    models: frozenset[str] | None = None
    loaded_models: tuple[str, ...] = ()
    #: Random per backend process start (None: not said).
    instance: str | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ok"


def new_instance_id() -> str:
    """A random id for one backend process start."""
    return secrets.token_hex(8)


def health_document(
    *,
    ready: bool,
    capacity: int,
    in_flight: int,
    models: list[str],
    loaded_models: list[str],
    instance: str,
) -> tuple[int, dict[str, Any]]:
    """The backend's side: the status code and body of its ``/health``."""
    body = {
        "status": "ok" if ready else "loading",
        "capacity": capacity,
        "in_flight": in_flight,
        "available": max(0, capacity - in_flight),
        "models": models,
        "loaded_models": loaded_models,
        "instance": instance,
    }
    return (200 if ready else 503), body


def read_health(status_code: int, content: bytes) -> Health:
    """What a ``/health`` answer says; never raises, whatever the body."""
    try:
        data = json.loads(content)
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        data = {}
    status = data.get("status")
    models = data.get("models")
    loaded = data.get("loaded_models")
    instance = data.get("instance")
    fields: dict[str, Any] = {
        "capacity": _count(data.get("capacity"), minimum=1),
        "in_flight": _count(data.get("in_flight"), minimum=0),
        "models": frozenset(m for m in models if isinstance(m, str))
        if isinstance(models, list)
        else None,
        "loaded_models": tuple(m for m in loaded if isinstance(m, str))
        if isinstance(loaded, list)
        else (),
        "instance": instance if isinstance(instance, str) and instance else None,
    }
    if status_code == 200 and status == "ok":
        return Health("ok", **fields)
    if status_code == 503 and status == "loading":
        return Health("loading", "loading", **fields)
    shown = f" {status}" if isinstance(status, str) and status else ""
    return Health("bad", f"/health answered {status_code}{shown}"[:200], **fields)


def _count(value: Any, *, minimum: int) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return value
    return None


def probe_client(
    timeout: float, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """An httpx client for /health probes: httpx's default limits, idle connections closed
    after ``KEEPALIVE_EXPIRY``."""
    limits = httpx.Limits(
        max_connections=100, max_keepalive_connections=20, keepalive_expiry=KEEPALIVE_EXPIRY
    )
    return httpx.AsyncClient(transport=transport, timeout=timeout, limits=limits)


async def get_health(client: httpx.AsyncClient, base_url: str) -> httpx.Response:
    """``GET base_url/health``. A connection closed without an answer is asked again once,
    on a new connection: most likely a kept-alive one whose idle timeout on the backend
    ended as the probe was written (uvicorn's 5 s meets a 5 s probe interval), which says
    nothing about the backend. httpx has dropped that connection by then."""
    url = f"{base_url}/health"
    try:
        return await client.get(url)
    except (httpx.RemoteProtocolError, httpx.ReadError):
        return await client.get(url)
