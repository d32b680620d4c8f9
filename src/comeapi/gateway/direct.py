"""The gateway's side of a forward done with callbacks (``balancer.direct``): which
generation requests may take it (``forward_soon``), and its end (``AnswerSoon``): the
answer written to the client first, then the request log and the metrics, off its path."""

from __future__ import annotations

import logging
import time
from typing import Protocol

from comeapi.balancer.direct import DirectForward, Outcome
from comeapi.balancer.pool import BackendPool
from comeapi.balancer.proxy import Forwarder, forward_headers
from comeapi.balancer.relay import Forwarded, header_lines
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
# The headers a forwarded answer gets (``Forwarder.forward_soon``'s ``set_headers``): a miss
# says so, and whether a proxy's cache may keep the answer.
_NOT_LOOKED_UP: tuple[tuple[bytes, bytes], ...] = ()
_MISS = ((b"x-cache", b"MISS"),)
_MISS_NO_STORE = (*_MISS, (_NO_STORE, b"1"))


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
        if generation.model is not None:
            routes.pool.check_model(generation.model)
    except ComeapiError:
        return None  # the coroutine path answers the error
    miss = Miss(looked_up=looked_up)
    answer = AnswerSoon(routes, request, miss)
    keep = None if lookup is None else lookup.keep
    forward = routes.forwarder.forward_soon(
        request.path,
        request.body,
        forward_headers(request.headers, routes.settings.backend_api_key),
        model=generation.model,
        report=miss,
        done=answer,
        set_headers=_NOT_LOOKED_UP if keep is None else _MISS if keep else _MISS_NO_STORE,
    )
    if forward is None:
        return None
    # The request is on its way: what follows runs while the backend reads it.
    answer.record = record = RequestRecord("POST", request.path, request.client)
    record.request = generation
    record.outcome = miss
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

    __slots__ = ("miss", "record", "reply", "request", "routes", "started")

    #: Set by ``forward_soon`` once the request is on its way (before any answer can come).
    record: RequestRecord

    def __init__(self, routes: Routes, request: ImmediateRequest, miss: Miss):
        self.routes = routes
        self.request = request
        assert request.reply is not None  # set before ``answer_later``
        self.reply = request.reply
        self.miss = miss
        self.started = time.perf_counter()

    def __call__(self, outcome: Outcome) -> None:
        reply = self.reply
        if isinstance(outcome, Forwarded):  # ``set_headers`` set, its lines made
            status = outcome.status_code
            reply((status, outcome.lines(), outcome.body))  # the client's answer first
            self.miss.response = outcome
        elif outcome is None:
            status = CLIENT_GONE
            reply(None)
        else:
            if isinstance(outcome, ComeapiError):
                response = error_response(outcome)
            else:
                log.error("unhandled error on POST %s", self.request.path, exc_info=outcome)
                response = error_response(ComeapiError("internal server error"))
            status = response.status_code
            reply((status, header_lines(response.raw_headers), bytes(response.body)))
        routes = self.routes
        seconds = time.perf_counter() - self.started
        routes.metrics.observe(self.request.path, status, seconds)
        routes.requests.add(self.record, status, seconds)
