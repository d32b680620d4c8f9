"""The review API: read every answer the cache holds and change its review over HTTP, for the
dashboard's review page and for other tools.

    GET  /cache/answers                 {"serve_states", "answers": [...]} (cache/review.py)
    POST /cache/answers/{key}           {"action": "approve" | "reject"}: every variant
    POST /cache/answers/{key}/{variant} {"action": "approve" | "reject" | "pin" | "unpin"
                                         | "regenerate" | "edit", "text": "..." (edit)}

``key`` may be a unique prefix of the prompt's key. A change is one store write; the
in-memory index follows at once, so the next request is served by the new rule. Regenerate
asks the gateway's own healthy backends (``pool_regenerator``), as warmup would. These
routes need the API key when keys are set, like everything but /health and the page files.
Errors are OpenAI's shape: 404 ``answer_not_found``, 409 ``review_conflict``, 400 otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from comeapi.balancer.pool import BackendPool
from comeapi.cache import review
from comeapi.cache.checks import CheckPolicy
from comeapi.cache.generate import generate_variant, prompt_item
from comeapi.cache.store import Entry
from comeapi.errors import NotFoundError, RequestError, UnavailableError
from comeapi.gateway.cache import ResponseCache
from comeapi.gateway.ondemand import OnDemandBackends
from comeapi.http.responses import JSONResponse, read_body
from comeapi.models.tokens import TokenCounter
from comeapi.protocol.limits import MAX_BODY_BYTES
from comeapi.protocol.requests import decode_json
from comeapi.settings import Settings

LIST_PATH = "/cache/answers"

#: A new generation of an entry's prompt with the same parameters and the given seed.
Regenerate = Callable[[Entry, int], Awaitable[Entry]]


def pool_regenerator(
    pool: BackendPool, settings: Settings, on_demand: OnDemandBackends | None = None
) -> Regenerate:
    """Regenerate through the gateway's own healthy backends, with warmup's generation:
    the checks, and new seeds while they reject the answer (``comeapi.cache.generate``)."""
    policy = CheckPolicy.parse(settings.checks)

    async def regenerate(entry: Entry, seed: int) -> Entry:
        if on_demand is not None:
            on_demand.ensure_running()
        urls = [b.url for b in pool.healthy()]
        if not urls:
            raise UnavailableError(
                "no healthy backend to regenerate the answer with", retry_after=5
            )
        return await generate_variant(
            prompt_item(entry), entry.variant, seed, urls,
            policy=policy, retries=settings.check_retries, api_key=settings.backend_api_key,
            connect_timeout=settings.connect_timeout, request_timeout=settings.request_timeout,
        )  # fmt: skip

    return regenerate


class ReviewRoutes:
    """The review API over a gateway's ResponseCache."""

    def __init__(
        self,
        cache: ResponseCache | None,
        regenerate: Regenerate | None = None,
        policy: CheckPolicy | None = None,
        counter: TokenCounter | None = None,
    ):
        self.cache = cache
        self.regenerate = regenerate
        self.policy = policy
        self.counter = counter  # an edited text's tokens, for its usage

    def routes(self) -> list[Route]:
        return [
            Route(LIST_PATH, self.list_answers, methods=["GET"]),
            Route(LIST_PATH + "/{key}", self.change_prompt, methods=["POST"]),
            Route(LIST_PATH + "/{key}/{variant:int}", self.change_variant, methods=["POST"]),
        ]

    async def list_answers(self, request: Request) -> Response:
        cache = self._cache()
        answers = review.listing(cache.groups(), cache.serve_states)
        body = {"serve_states": sorted(cache.serve_states), "answers": answers}
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    async def change_prompt(self, request: Request) -> Response:
        return await self._change(request, None)

    async def change_variant(self, request: Request) -> Response:
        return await self._change(request, int(request.path_params["variant"]))

    async def _change(self, request: Request, variant: int | None) -> Response:
        cache = self._cache()
        action, text = _action(decode_json(await read_body(request, MAX_BODY_BYTES)), variant)
        # Another process (the CLI, a second worker) may have changed the store since the
        # index was loaded: start from what the store holds now.
        await cache.refresh()
        groups = cache.groups()
        key = review.find_key(groups, key=request.path_params["key"])
        chosen = review.pick(groups[key], variant)
        if action == "regenerate":
            changed = [await self._regenerated(chosen[0])]
        else:
            tokens = await self._tokens(chosen[0], action, text)
            changed = [
                review.change(e, action, text=text, policy=self.policy, tokens=tokens)
                for e in chosen
            ]
        await cache.put(changed)
        served = set(cache.served_variants(key))
        answers = [review.describe(e, served=e.variant in served) for e in changed]
        return JSONResponse({"answers": answers}, headers={"Cache-Control": "no-store"})

    async def _regenerated(self, entry: Entry) -> Entry:
        review.refuse_pinned(entry)  # before spending a generation on it
        if self.regenerate is None:
            raise UnavailableError("this gateway has no backends to regenerate answers with")
        fresh = await self.regenerate(entry, review.new_seed(entry))
        return review.regenerated(entry, fresh)

    async def _tokens(self, entry: Entry, action: review.Action, text: str | None) -> int | None:
        """An edited text's tokens (the variants of a prompt share its model), counted off
        the event loop: the first count of a model loads its vocabulary."""
        counter = self.counter
        if counter is None or action != "edit":  # no thread for the other actions
            return None
        return await asyncio.to_thread(review.edit_tokens, entry, action, text, counter.count)

    def _cache(self) -> ResponseCache:
        if self.cache is None:
            raise NotFoundError("this gateway runs without a response cache")
        return self.cache


def _action(body: Any, variant: int | None) -> tuple[review.Action, str | None]:
    if not isinstance(body, dict):
        raise RequestError("expected a JSON object with an action")
    allowed = review.ACTIONS if variant is not None else review.PROMPT_ACTIONS
    action = next((a for a in allowed if a == body.get("action")), None)
    if action is None:
        where = "a variant" if variant is not None else "every variant of a prompt"
        raise RequestError(
            f"action must be one of {', '.join(allowed)} for {where} (got {body.get('action')!r})",
            param="action",
        )
    text = body.get("text")
    if action == "edit" and not isinstance(text, str):
        raise RequestError("edit needs the new text as a string", param="text")
    return action, text if action == "edit" else None
