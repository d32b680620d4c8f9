"""The backend's HTTP app: ComeAPI's API and OpenAI's, in front of one inference engine.

``/health`` and the status routes read plain counters only, so they answer at once even
while a generation holds the engine. A request beyond capacity waits its turn in a small
queue (``backend_queue``); beyond that it gets 503 with Retry-After. With ``api_keys`` every
route but ``/health`` needs ``Authorization: Bearer <key>``; ``/metrics`` is Prometheus'.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from comeapi.backend.engine import Engine, Event, Finished, TextDelta, choice_count, total_usage
from comeapi.backend.metrics import BackendMetrics, MeteredEngine
from comeapi.backend.refusals import refuse_unsupported
from comeapi.errors import ComeapiError, QueueFullError, UnavailableError
from comeapi.http.auth import APIKeyMiddleware
from comeapi.http.cors import cors_middleware
from comeapi.http.errors import EXCEPTION_HANDLERS
from comeapi.http.metrics import CONTENT_TYPE, MetricsMiddleware
from comeapi.http.responses import JSONResponse, read_body
from comeapi.models.catalogue import ModelFile, check_model_dir, resolve
from comeapi.protocol.health import health_document, new_instance_id
from comeapi.protocol.requests import KINDS, GenerationRequest, decode_json, parse_request
from comeapi.protocol.responses import (
    Choice,
    StreamEncoder,
    TokenLogprob,
    Usage,
    answer_body,
    sse_error,
)
from comeapi.settings import Settings

T = TypeVar("T")
log = logging.getLogger("comeapi.backend")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CLIENT_GONE = 499  # nginx's code for "client closed the request"; nobody reads it


def create_app(settings: Settings, engine: Engine, *, instance: str | None = None) -> Starlette:
    """The app; ``instance`` (random when not given) identifies this process in /health, so a
    supervisor can tell its own backend from another one holding the port."""
    models, default = check_model_dir(settings)
    if settings.slots > 1:
        # The batched engine serves its one model; advertising the others would make a
        # balancer route requests for them here.
        models = [default]
    metrics = BackendMetrics(engine)
    api = BackendAPI(
        settings, MeteredEngine(engine, metrics), models, default, instance or new_instance_id()
    )

    async def metrics_route(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    routes = [
        Route("/", api.status),
        Route("/status", api.status),
        Route("/health", api.health),
        Route("/metrics", metrics_route),
        Route("/models", api.list_models),
        Route("/models/{model:path}", api.openai_model),
        Route("/v1/models", api.openai_models),
        Route("/v1/models/{model:path}", api.openai_model),
        *(Route(path, api.generate, methods=["POST"]) for path in KINDS),
    ]
    middleware = [
        Middleware(MetricsMiddleware, metrics=metrics, routes=[r.path for r in routes]),
        # Preflights are answered before the key check; none without --cors-origin.
        *cors_middleware(settings.cors_origins),
        Middleware(APIKeyMiddleware, keys=settings.api_keys),
    ]
    return Starlette(routes=routes, middleware=middleware, exception_handlers=EXCEPTION_HANDLERS)


class BackendAPI:
    """Route handlers over one engine; state is the engine's counters and an admission count."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        models: list[ModelFile],
        default: ModelFile,
        instance: str,
    ):
        self._settings = settings
        self._engine = engine
        self._models = models
        self._default = default
        self._instance = instance
        self._admitted = 0

    # --- status ---------------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        capacity, in_flight = self._engine.capacity, self._engine.in_flight
        return {
            "capacity": capacity,
            "in_flight": in_flight,
            "available": max(0, capacity - in_flight),
            "models": [m.name for m in self._models],
            "loaded_models": self._engine.loaded_models(),
        }

    async def health(self, request: Request) -> Response:
        engine = self._engine
        status, body = health_document(
            ready=engine.ready,
            capacity=engine.capacity,
            in_flight=engine.in_flight,
            models=[m.name for m in self._models],
            loaded_models=engine.loaded_models(),
            instance=self._instance,
        )
        return JSONResponse(body, status_code=status)

    async def status(self, request: Request) -> Response:
        load = self._load()
        state = "busy" if load["in_flight"] else "idle"
        if not self._engine.ready:
            state = "loading"
        body = {"message": "ComeAPI Backend", "status": state, "default_model": self._default.name}
        return JSONResponse({**body, **load})

    async def list_models(self, request: Request) -> Response:
        """``GET /models``: OpenAI's list (for SDKs whose base_url lacks /v1) and ComeAPI's
        ``models`` in one body; each client reads its own keys."""
        return JSONResponse(
            {
                "object": "list",
                "data": [_openai_model(m) for m in self._models],
                "models": [{"name": m.name, "size_mb": m.size_mb} for m in self._models],
            }
        )

    async def openai_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_openai_model(m) for m in self._models]})

    async def openai_model(self, request: Request) -> Response:
        model = resolve(self._models, request.path_params["model"])
        return JSONResponse(_openai_model(model))

    # --- generation -----------------------------------------------------------------------

    async def generate(self, request: Request) -> Response:
        kind = KINDS[request.url.path]
        try:
            raw = await read_body(request, self._settings.max_body_bytes)
        except ClientDisconnect:
            return Response(status_code=CLIENT_GONE)
        body = decode_json(raw)
        gen = parse_request(kind, body, max_tokens_limit=self._settings.max_tokens_limit)
        refuse_unsupported(gen, body)
        model = resolve(self._models, gen.model, self._default.name)
        release = self._admit()
        try:
            events = self._engine.generate(gen, model.name)
            if gen.stream:
                # The first event decides the status: bad input (context length) is a 400,
                # not an error event inside a 200 stream.
                first = await _unless_disconnected(request, _first(events))
                if first is None:
                    return Response(status_code=CLIENT_GONE)
                chunks = _sse_chunks(gen, model.name, first, events)
                response: Response = EventStream(chunks, events, release)
                release = _noop  # the stream releases when it ends
                return response
            result = await _unless_disconnected(request, _collect(gen, events))
            if result is None:
                return Response(status_code=CLIENT_GONE)
            choices, usage = result
            return JSONResponse(answer_body(kind, model=model.name, choices=choices, usage=usage))
        finally:
            release()

    def _admit(self) -> Callable[[], None]:
        """Count the request in, or refuse it when the waiting queue is full."""
        if not self._engine.ready:
            raise UnavailableError("the model is still loading", retry_after=2, code="loading")
        limit = self._engine.capacity + self._settings.backend_queue
        if self._admitted >= limit:
            raise QueueFullError(
                f"backend busy: {self._admitted} requests running or waiting (limit {limit})"
            )
        self._admitted += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._admitted -= 1

        return release


def _noop() -> None:
    pass


def _openai_model(m: ModelFile) -> dict[str, Any]:
    return {
        "id": m.name,
        "object": "model",
        "created": int(m.path.stat().st_mtime) if m.path.exists() else 0,
        "owned_by": "comeapi",
        "size_mb": m.size_mb,
    }


async def _first(events: AsyncIterator[Event]) -> Event:
    try:
        return await anext(events)
    except StopAsyncIteration:
        raise ComeapiError("the engine ended without an answer") from None


async def _collect(
    gen: GenerationRequest, events: AsyncIterator[Event]
) -> tuple[list[Choice], Usage]:
    """Every choice's text (and log probabilities), in index order, and the usage."""
    count = choice_count(gen)
    pieces: list[list[str]] = [[] for _ in range(count)]
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(count)]
    finished: dict[int, Finished] = {}
    try:
        async for event in events:
            if isinstance(event, TextDelta):
                pieces[event.index].append(event.text)
                logprobs[event.index].extend(event.logprobs)
            else:
                finished[event.index] = event
                if len(finished) == count:
                    break
    finally:
        await _aclose(events)
    if len(finished) < count:
        raise ComeapiError("the engine ended without an answer")
    choices = [
        Choice(
            i,
            "".join(pieces[i]),
            finished[i].reason,
            tuple(logprobs[i]) if gen.logprobs else None,
        )
        for i in range(count)
    ]
    return choices, total_usage(gen, finished.values())


async def _sse_chunks(
    gen: GenerationRequest, model: str, first: Event, events: AsyncIterator[Event]
) -> AsyncIterator[bytes]:
    """The stream of every choice: each opens (chat), sends its pieces and stops; the usage
    chunk and [DONE] follow the last one."""
    encoder = StreamEncoder(gen.kind, model, include_usage=gen.include_usage)
    count = choice_count(gen)
    opening = b"".join(encoder.start(i) for i in range(count))
    if opening:
        yield opening
    finished: list[Finished] = []
    event = first
    try:
        while True:
            if isinstance(event, Finished):
                finished.append(event)
                yield encoder.stop(event.reason, event.index)
                if len(finished) == count:
                    yield encoder.end(total_usage(gen, finished), event.reason)
                    return
            else:
                logprobs = event.logprobs if gen.logprobs else None
                yield encoder.delta(event.text, event.index, logprobs)
            event = await anext(events)
    except StopAsyncIteration:
        yield sse_error(ComeapiError("the engine ended without an answer"))
    except ComeapiError as exc:
        yield sse_error(exc)
    except Exception:
        log.exception("stream failed")
        yield sse_error(ComeapiError("internal server error"))


class EventStream(StreamingResponse):
    """SSE that always ends its generation (and frees capacity), even when the client leaves
    before the first byte and the chunk iterator never starts."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        events: AsyncIterator[Event],
        release: Callable[[], None],
    ):
        super().__init__(chunks, media_type="text/event-stream", headers=SSE_HEADERS)
        self._events = events
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await _aclose(self._events)
            self._release()


async def _aclose(events: AsyncIterator[Any]) -> None:
    if isinstance(events, AsyncGenerator):
        await events.aclose()


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T | None:
    """``work``'s result, or None if the client disconnected first (``work`` is cancelled,
    which closes its generation)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return None
    return task.result()


async def _disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
