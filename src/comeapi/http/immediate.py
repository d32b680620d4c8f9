"""Immediate answers: an app answers some complete requests inside the HTTP server, before
any ASGI task, scope or message exists (the gateway's cache hits).

For a ``POST`` with a small ``Content-Length`` to one of the app's ``immediate_paths``, the
server (``http.protocol``) reads the whole body, then asks ``answer_now``; the bytes it
returns are written at once with status 200. Otherwise the app's ``answer_later``, if it
has one, may take the request as a task whose answer is written when it is ready (the
gateway's forwarded misses: no ASGI cycle either), or as ``Pending`` work that hands its
answer to ``request.reply`` (a forward done with callbacks: no task at all). Else the
request goes down the ASGI path as usual, with what the app noted on the request in
``scope[NOTE]``.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from uvicorn._types import ASGI3Application, Scope
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

RawHeaders = list[tuple[bytes, bytes]]
#: A later answer (``answer_later``): the status, header lines (as ``answer_now``'s) and body.
Later = tuple[int, bytes, bytes]
#: Where ``Pending`` work hands its answer: a ``Later``, or None to close the connection
#: unanswered (the client has gone).
Reply = Callable[[Later | None], None]
#: The scope key under which the ASGI path finds ``ImmediateRequest.note``.
NOTE = "comeapi.immediate"


class ImmediateRequest:
    """A complete request as ``answer_now`` sees it: header names are lower-case, the client
    is the one a trusted proxy forwarded (as the ASGI path's scope has it)."""

    __slots__ = ("body", "client", "headers", "note", "path", "reply")

    def __init__(self, path: str, headers: RawHeaders, body: bytes, client: tuple[str, int] | None):
        self.path = path
        self.headers = headers
        self.body = body
        self.client = client
        #: Set by the app for the ASGI path when it does not answer (``scope[NOTE]``).
        self.note: Any = None
        #: Set by the server before ``answer_later``: where ``Pending`` work answers.
        self.reply: Reply | None = None


class ImmediateAnswers(Protocol):
    """An ASGI app that can answer some complete requests before any ASGI task exists."""

    immediate_paths: frozenset[str]

    def answer_now(self, request: ImmediateRequest) -> tuple[bytes, bytes] | None:
        """Header lines (``name: value\\r\\n`` each, no Content-Length) and the body of a
        200, or None to take the ASGI path."""
        ...


class Pending(Protocol):
    """Work under way that calls ``request.reply`` exactly once (never from inside
    ``answer_later`` or ``cancel``). The server holds it as it holds a task: ``cancel()``
    when the connection is lost (the work stops, and replies None) or when its shutdown
    grace period is over (the work replies with an error)."""

    def cancel(self, msg: Any = None) -> bool: ...


#: An app's optional ``answer_later(request)``, asked when ``answer_now`` returned None:
#: work that makes the answer (a coroutine: the server runs it as a task, cancelled if the
#: connection is lost, and writes what it returns; or ``Pending`` work), or None to take
#: the ASGI path.
AnswerLater = Callable[[ImmediateRequest], Coroutine[Any, Any, Later] | Pending | None]


class Immediate:
    """An app's immediate answers as a server connection uses them."""

    def __init__(self, app: ImmediateAnswers, trusted: ProxyHeadersMiddleware | None):
        self.app = app
        #: The raw request target of each path (as sent, no query) -> the path.
        self.paths = {path.encode(): path for path in app.immediate_paths}
        self.later: AnswerLater | None = getattr(app, "answer_later", None)
        self._trusted = trusted

    @classmethod
    def of(cls, app: ASGI3Application) -> Immediate | None:
        """The immediate answers of ``app`` under uvicorn's wrapping; None when something
        else stands between them (CORS, say: its headers belong on every answer)."""
        trusted = None
        if isinstance(app, ProxyHeadersMiddleware):
            # uvicorn's own middleware in front of an app that does nothing: the client is
            # exactly what uvicorn's rewrite makes it.
            trusted = ProxyHeadersMiddleware(_scope_only)
            trusted.trusted_hosts = app.trusted_hosts
            app = app.app
        if isinstance(getattr(app, "immediate_paths", None), frozenset):
            return cls(app, trusted)  # type: ignore[arg-type]
        return None

    def trusts(self, client: tuple[str, int] | None) -> bool:
        """Whether X-Forwarded-For from this peer is believed (asked once a connection)."""
        return (
            self._trusted is not None
            and client is not None
            and (client[0] in self._trusted.trusted_hosts)
        )

    def forwarded_client(
        self, client: tuple[str, int] | None, headers: RawHeaders
    ) -> tuple[str, int] | None:
        """The client a trusted peer forwarded in ``headers`` (uvicorn's own rule)."""
        assert self._trusted is not None
        scope: dict[str, Any] = {"type": "http", "client": client, "headers": headers}
        step = self._trusted(scope, _scope_only_receive, _scope_only_send)  # type: ignore[arg-type]
        try:
            step.send(None)
        except StopIteration:
            forwarded: tuple[str, int] | None = scope["client"]
            return forwarded
        step.close()
        raise RuntimeError("uvicorn's ProxyHeadersMiddleware waited for something")


async def _scope_only(scope: Scope, receive: Any, send: Any) -> None:
    return None


async def _scope_only_receive() -> Any:
    raise RuntimeError("not for reading")


async def _scope_only_send(message: Any) -> None:
    raise RuntimeError("not for sending")
