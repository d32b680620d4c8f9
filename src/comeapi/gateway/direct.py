"""The gateway's side of a forward done with callbacks (``balancer.direct``): which
generation requests may take it (``forward_soon``), and its end (``AnswerSoon``): the
answer written to the client first, then the request log and the metrics, off its path."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Protocol

from starlette.responses import Response

from comeapi.balancer.direct import DirectForward, Outcome
from comeapi.balancer.pool import BackendPool
from comeapi.balancer.proxy import Forwarder, forward_headers
from comeapi.balancer.relay import Forwarded
from comeapi.errors import ComeapiError
from comeapi.gateway.cache import Lookup, ResponseCache
from comeapi.gateway.forced import NO_STORE_HEADER
from comeapi.gateway.frontdoor import Prepared
from comeapi.gateway.metrics import GatewayMetrics
from comeapi.gateway.ondemand import OnDemandBackends
from comeapi.gateway.requestlog import Miss, RequestLog, RequestRecord
from comeapi.http.errors import error_response
from comeapi.http.immediate import ImmediateRequest
from comeapi.settings import Settings

log = logging.getLogger("comeapi.gateway")


class Routes(Protocol):
    """What a forward done with callbacks needs of the generation routes
    (``gateway.generation.GenerationRoutes``)."""

    settings: Settings
    pool: BackendPool
    forwarder: Forwarder
    metrics: GatewayMetrics
    requests: RequestLog
    cache: ResponseCache | None
    on_demand: OnDemandBackends | None


CLIENT_GONE = 499  # nginx's code for "client closed the request", for the metrics only
_NO_STORE = NO_STORE_HEADER.lower().encode()


def forward_soon(
    routes: Routes, request: ImmediateRequest, prepared: Prepared, lookup: Lookup | None
) -> DirectForward | None:
    """``routes._later`` with callbacks, where it would only forward (``_pass_on``: no slot
    to fill or answer to store, no paraphrase to look for, misses forwarded) and a backend
    can take the request now (``Forwarder.forward_soon``); None (nothing done) else."""
    cache = routes.cache
    looked_up = cache is not None and lookup is not None
    if (cache is not None and lookup is not None) and (
        lookup.forced_variant is not None
        or cache.store_misses
        or cache.similar is not None
        or routes.settings.on_miss != "forward"
        or not routes.pool.backends
    ):
        return None
    generation = prepared.request
    try:
        if routes.on_demand is not None:
            routes.on_demand.ensure_running()
        routes.pool.check_model(generation.model)
    except ComeapiError:
        return None  # the coroutine path answers the error
    record = RequestRecord("POST", request.path, request.client)
    record.request = generation
    record.outcome = miss = Miss(looked_up=looked_up)
    answer = AnswerSoon(routes, request, record, miss, None if lookup is None else lookup.keep)
    forward = routes.forwarder.forward_soon(
        request.path,
        request.body,
        forward_headers(request.headers, routes.settings.backend_api_key),
        model=generation.model,
        report=miss,
        done=answer,
    )
    if forward is None:
        return None
    if (
        cache is not None
        and lookup is not None
        and lookup.key is not None
        and not cache.group(lookup.key)
    ):
        cache.missed.add(generation)  # an unknown prompt (as ``_pass_on``)
    return forward


class AnswerSoon:
    """The end of ``forward_soon``: the answer written to the client, then the request log
    and the metrics (off the answer's path)."""

    __slots__ = ("keep", "miss", "record", "request", "routes", "started")

    def __init__(
        self,
        routes: Routes,
        request: ImmediateRequest,
        record: RequestRecord,
        miss: Miss,
        keep: bool | None,
    ):
        self.routes = routes
        self.request = request
        self.record = record
        self.miss = miss
        self.keep = keep  # the lookup's, for a looked-up miss; None: not looked up
        self.started = time.perf_counter()

    def __call__(self, outcome: Outcome) -> None:
        reply = self.request.reply
        assert reply is not None
        if outcome is None:
            status = CLIENT_GONE
            reply(None)
        else:
            if isinstance(outcome, Forwarded):
                response: Forwarded | Response = outcome
                self.miss.response = outcome
                if self.keep is not None:
                    outcome.set_header(b"x-cache", b"MISS")
                    if not self.keep:
                        outcome.set_header(_NO_STORE, b"1")
                lines, body = header_lines(outcome.headers), outcome.body
            else:
                if isinstance(outcome, ComeapiError):
                    response = error_response(outcome)
                else:
                    log.error("unhandled error on POST %s", self.request.path, exc_info=outcome)
                    response = error_response(ComeapiError("internal server error"))
                lines, body = header_lines(response.raw_headers), bytes(response.body)
            status = response.status_code
            reply((status, lines, body))
        routes = self.routes
        seconds = time.perf_counter() - self.started
        routes.metrics.observe(self.request.path, status, seconds)
        routes.requests.add(self.record, status, seconds)


def header_lines(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """``name: value\\r\\n`` lines, without Content-Length (the server writes its own)."""
    return b"".join(b"%s: %s\r\n" % pair for pair in headers if pair[0] != b"content-length")
