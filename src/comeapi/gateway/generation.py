"""The gateway's outermost ASGI app: the three generation routes, answered here.

Everything else (status pages, model lists, /metrics) goes on to the Starlette app. A cache
hit is the hot path, answered by the HTTP server itself through ``answer_now`` (or, where
something stands in front, such as CORS, by ``__call__``): the body's verdict
(``gateway.frontdoor``; a bad body is 400 whatever the cache holds), the lookup, the
pre-encoded reply (``cache.replies``), one count. No Request or Response object, no
middleware, no routing. A miss is forwarded through the pool, or refused with the known
prompts; a whole (not streamed) one inside the HTTP server too, through ``answer_later``
(the backend's answer written in one go, no ASGI cycle), a stream through ``__call__``.
When nothing but forwarding is to be done (no store, no paraphrase match) and a backend is
free now, the forward is done with callbacks (``gateway.direct``): the answer goes
to the client first, and the request log and metrics are written after it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Coroutine, Iterable
from functools import partial
from typing import Any

import anyio.to_thread
import orjson
from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from comeapi.balancer.pool import BackendPool
from comeapi.balancer.proxy import Forwarder, forward_headers
from comeapi.balancer.relay import Forwarded, UpstreamStream, header_lines
from comeapi.cache.key import uncacheable
from comeapi.cache.replies import HitReply, Replies
from comeapi.errors import ComeapiError, PromptNotCachedError, RequestError, StoreError
from comeapi.gateway.cache import Lookup, ResponseCache
from comeapi.gateway.direct import CLIENT_GONE, forward_soon
from comeapi.gateway.forced import (
    NO_STORE_HEADER,
    SECRET_HEADER,
    SLOT_HEADER,
    VARIANT_HEADER,
    ForcedVariants,
)
from comeapi.gateway.frontdoor import FrontDoor, Prepared
from comeapi.gateway.metrics import GatewayMetrics
from comeapi.gateway.ondemand import OnDemandBackends
from comeapi.gateway.requestlog import Miss, RequestLog, RequestRecord
from comeapi.http.auth import APIKeys
from comeapi.http.errors import error_response
from comeapi.http.immediate import NOTE, ImmediateRequest, Later, Pending
from comeapi.http.responses import read_asgi_body
from comeapi.protocol.requests import KINDS, GenerationRequest
from comeapi.settings import Settings

log = logging.getLogger("comeapi.gateway")

RawHeaders = Iterable[tuple[bytes, bytes]]
_CACHE_CONTROL = b"cache-control"
_VARIANT = VARIANT_HEADER.encode()
_SECRET = SECRET_HEADER.encode()
_HIT_HEADERS = frozenset({_CACHE_CONTROL, _VARIANT, _SECRET})
_CACHE_VARIANT = b"x-cache-variant"
_NO_STORE = NO_STORE_HEADER.lower().encode()


class GenerationRoutes:
    """The generation routes (``protocol.requests.KINDS``), in front of ``app``."""

    #: The paths ``answer_now`` may answer (``http.immediate.ImmediateAnswers``).
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
        self._keys_set = bool(self.keys)
        self._max_body = settings.max_body_bytes
        self._bypass_allowed = settings.on_miss == "forward"
        self.door = FrontDoor(settings.max_tokens_limit)
        self.replies = Replies()
        self.forced = ForcedVariants(
            cache.variant_secret if cache is not None else None,
            cache.variants if cache is not None else settings.variants,
        )

    @property
    def state(self) -> State:
        """The Starlette app's state (``state.gateway``), as if this were that app."""
        return self.app.state

    # --- inside the HTTP server, without an ASGI task: hits, and whole forwarded answers ---

    def answer_now(self, request: ImmediateRequest) -> tuple[bytes, bytes] | None:
        """A cache hit answered by the HTTP server itself, as soon as the whole request is
        read and before any ASGI task exists (``http.immediate``): the header lines and
        body of a 200, counted and recorded here as ``__call__`` would. None for anything
        else (an error, a miss, a bypass): the request then goes to ``answer_later`` (a miss
        or a bypass to forward) or the ASGI path, which find this verdict and lookup in
        ``request.note`` rather than repeating them, so a miss is counted once."""
        path, headers, body = request.path, request.headers, request.body
        if len(body) > self._max_body or (
            self._keys_set and self.keys.check_headers(path, headers) is not None
        ):
            return None
        started = time.perf_counter()
        try:
            prepared, lookup = self._verdict(path, headers, body)
        except ComeapiError:
            return None  # the ASGI path parses again and answers the error
        if lookup is None or lookup.entry is None:
            request.note = (prepared, lookup)
            return None
        assert self.cache is not None
        reply = self.replies.get(lookup.entry, prepared.format)
        payload = reply.body()
        self.door.remember(path, body, prepared)
        record = RequestRecord("POST", path, request.client)
        record.request = prepared.request
        record.outcome = reply
        seconds = time.perf_counter() - started
        self.metrics.observe(path, 200, seconds)
        self.requests.add(record, 200, seconds)
        if lookup.slot is not None:  # a stand-in for a slot a proxy fills (not the hot path)
            return reply.head + _slot_line(lookup.slot), payload
        return reply.head, payload

    def answer_later(
        self, request: ImmediateRequest
    ) -> Coroutine[Any, Any, Later] | Pending | None:
        """A whole (not streamed) request that ``answer_now`` found no answer for, forwarded
        (or refused) inside the HTTP server, without an ASGI cycle, a disconnect-watching
        task or Response objects: the coroutine returns the status, header lines and body
        to write, and is cancelled if the client goes away (which ends the backend's
        generation). None for the ASGI path: a stream (relayed as it comes), or a request
        ``answer_now`` reached no verdict on (an error or a refused key to answer)."""
        known = request.note
        if known is None or known[0].request.stream:
            return None
        request.note = None
        if request.reply is not None:
            soon = forward_soon(self, request, *known)
            if soon is not None:
                return soon
        return self._later(request, *known)

    async def _later(
        self, request: ImmediateRequest, prepared: Prepared, lookup: Lookup | None
    ) -> Later:
        started = time.perf_counter()
        record = RequestRecord("POST", request.path, request.client)
        record.request = prepared.request
        status = CLIENT_GONE  # unless an answer is made: cancelled, the client has gone
        try:
            response: Forwarded | UpstreamStream | Response
            try:
                response = await self._pass_on(
                    request.path, request.headers, request.body, prepared, record, lookup, None
                )
            except ComeapiError as exc:
                response = error_response(exc)
            except Exception:
                log.exception("unhandled error on POST %s", request.path)
                response = error_response(ComeapiError("internal server error"))
            status = response.status_code
            if isinstance(response, Forwarded):
                return status, header_lines(response.headers), response.body
            # An error (not a stream: streams take the ASGI path).
            return status, header_lines(response.raw_headers), bytes(response.body)
        finally:
            seconds = time.perf_counter() - started
            self.metrics.observe(request.path, status, seconds)
            self.requests.add(record, status, seconds)

    def _verdict(
        self, path: str, headers: RawHeaders, body: bytes
    ) -> tuple[Prepared, Lookup | None]:
        """The request ``body`` is (ComeapiError if none) and the cache's verdict on it:
        None when the request does not consult the cache (no cache, or Cache-Control:
        no-cache (warmup) while misses are forwarded; when they are rejected, no-cache must
        not become a way around the rule)."""
        cache = self.cache
        if cache is None:
            return self.door.prepare(path, body, None), None
        found: dict[bytes, bytes] = {}
        for pair in headers:  # a loop, not a comprehension: no function made per request
            if pair[0] in _HIT_HEADERS:
                found[pair[0]] = pair[1]
        if found and b"no-cache" in found.get(_CACHE_CONTROL, b"") and self._bypass_allowed:
            # Not looked up, so not keyed: the key is for lookups (and is the costly part).
            return self.door.prepare(path, body, None), None
        prepared = self.door.prepare(path, body, cache)
        forced = self.forced.read(found.get(_VARIANT), found.get(_SECRET, b"")) if found else None
        if prepared.key is None:
            return prepared, Lookup(None)
        return prepared, cache.lookup_key(prepared.key, forced)

    # --- the ASGI path ----------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = KINDS.get(scope["path"]) if scope["type"] == "http" else None
        if kind is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        record = RequestRecord.of(scope)
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
                response: Response | Forwarded | None = error_response(denied)
            elif scope["method"] != "POST":
                error = RequestError(f"method {scope['method']} not allowed on {scope['path']}")
                error.status = 405
                raise error
            else:
                raw = await read_asgi_body(scope, receive, self.settings.max_body_bytes)
                known = scope.pop(NOTE, None)
                if known is None:
                    known = self._verdict(scope["path"], scope["headers"], raw)
                prepared, lookup = known
                record.request = prepared.request
                response = await self._answer(scope, receive, send, prepared, raw, record, lookup)
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

    async def _answer(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        prepared: Prepared,
        raw: bytes,
        record: RequestRecord,
        lookup: Lookup | None,
    ) -> Response | Forwarded | UpstreamStream | None:
        """None once a hit is sent; otherwise the response to send."""
        if lookup is not None and lookup.entry is not None:
            reply = self.replies.get(lookup.entry, prepared.format)
            payload = reply.body()
            self.door.remember(scope["path"], raw, prepared)
            headers = _asgi_headers(reply, payload)
            if lookup.slot is not None:
                headers.append((SLOT_HEADER.encode(), str(lookup.slot).encode()))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
            record.outcome = reply
            return None
        return await self._pass_on(
            scope["path"], scope["headers"], raw, prepared, record, lookup, receive
        )

    async def _pass_on(
        self,
        path: str,
        headers: RawHeaders,
        raw: bytes,
        prepared: Prepared,
        record: RequestRecord,
        lookup: Lookup | None,
        receive: Receive | None,
    ) -> Forwarded | UpstreamStream:
        """A request the cache does not answer exactly (``lookup`` None: not looked up):
        answered as the known prompt it paraphrases, forwarded, or refused (ComeapiError).
        With ``receive`` (the ASGI path) a client that goes away ends the wait; without it
        (``answer_later``), the caller cancels the task when its client goes."""
        cache = self.cache
        request = prepared.request
        if cache is None or lookup is None:
            record.outcome = miss = Miss(looked_up=False)
            return await self._forward(path, headers, request, raw, miss, receive)
        # Only a prompt the store does not know at all: a known prompt's empty slot (which
        # a proxy asks to fill) is generated, not stood in for.
        unknown = lookup.key is not None and not cache.group(lookup.key)
        if unknown:
            similar = await self._similar(path, prepared, cache, record)
            if similar is not None:
                return similar
            if cache.similar is None:
                cache.missed.add(request)
        record.outcome = miss = Miss(looked_up=True, variant=lookup.forced_variant)
        return await self._miss(path, headers, request, raw, cache, lookup, miss, receive)

    async def _similar(
        self, path: str, prepared: Prepared, cache: ResponseCache, record: RequestRecord
    ) -> Forwarded | None:
        """An exact miss answered as the known prompt it paraphrases (``gateway.similar``),
        if one is accepted: a served variant of that prompt, whole (a stream's events too,
        as every hit), never stored under this request's key. Off the event loop: an
        embedding costs milliseconds."""
        if cache.similar is None:
            return None
        if uncacheable(prepared.request) is not None:
            return None
        model = prepared.request.model or cache.default_model
        explain = prepared.request not in cache.missed  # a first miss: name its nearest prompt
        hit, found = await anyio.to_thread.run_sync(
            partial(cache.similar.match, explain=explain), prepared.request, model
        )
        entry = cache.similar_hit(hit.key) if hit is not None else None
        if hit is None or entry is None:
            cache.missed.add(prepared.request, found.nearest, found.score, found.reason)
            return None
        reply = self.replies.get(entry, prepared.format)
        headers = [
            (n.lower().encode(), v.encode())
            for n, v in (*(h for h in reply.headers if h[0] != "X-Cache-Match"), *hit.headers())
        ]
        record.outcome = reply
        record.similar = hit
        return Forwarded(200, headers, reply.body(), path)

    async def _miss(
        self,
        path: str,
        headers: RawHeaders,
        request: GenerationRequest,
        raw: bytes,
        cache: ResponseCache,
        found: Lookup,
        miss: Miss,
        receive: Receive | None,
    ) -> Forwarded | UpstreamStream:
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
        response = await self._forward(path, headers, request, raw, miss, receive)
        response.set_header(b"x-cache", b"MISS")
        if forced is not None:
            response.set_header(_CACHE_VARIANT, b"%d" % forced)
        if not found.keep:
            response.set_header(_NO_STORE, b"1")
        fills = forced is not None or cache.store_misses
        if fills and found.key is not None and isinstance(response, Forwarded):
            await self._store(cache, found, request, response)
        return response

    async def _store(
        self, cache: ResponseCache, found: Lookup, request: GenerationRequest, response: Forwarded
    ) -> None:
        """Keep a generated answer. The client gets it whether or not the store takes it."""
        answer = response.answer  # read once: the request log reads the same
        if answer is None:
            return  # not a 200, or not JSON
        try:
            await cache.store_answer(found, request, answer)
        except StoreError as exc:
            self.metrics.store_failures.inc()
            log.warning("answer sent but not stored: %s", exc.message)

    async def _forward(
        self,
        path: str,
        headers: RawHeaders,
        request: GenerationRequest,
        raw: bytes,
        miss: Miss,
        receive: Receive | None,
    ) -> Forwarded | UpstreamStream:
        if self.on_demand is not None:
            self.on_demand.ensure_running()
        self.pool.check_model(request.model)
        miss.response = await self.forwarder.forward(
            path,
            raw,
            forward_headers(headers, self.settings.backend_api_key),
            model=request.model,
            stream=request.stream,
            receive=receive,
            report=miss,
        )
        return miss.response


def _asgi_headers(reply: HitReply, payload: bytes) -> list[tuple[bytes, bytes]]:
    headers = [(n.lower().encode(), v.encode()) for n, v in reply.headers]
    headers.append((b"content-length", str(len(payload)).encode()))
    return headers


def _slot_line(slot: int) -> bytes:
    return f"{SLOT_HEADER}: {slot}\r\n".encode()
