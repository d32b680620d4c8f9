"""How long a connection may take: read deadlines, the keep-alive limit, and half-open
connections when the server is full.

uvicorn times out only idle keep-alive connections: a client that connects and sends
nothing, or sends its headers or body a byte at a time, holds a connection for ever (a
reliability run held 2000). Here each request's headers get ``header_timeout`` from the
connection's opening or the request's first byte, its body ``body_timeout`` after the
headers (408), and a connection with nothing in flight is closed after ``keep_alive``
seconds. One timer per connection watches all three and is not re-armed per request: when
it fires it looks at what the connection is doing now and sleeps until that one's deadline.
So a request being answered (a miss taking minutes) is never cut by the keep-alive limit.

A client that keeps re-opening connections it never finishes could still fill the
connection table within the deadlines. ``HalfOpen`` knows, per client address, the
connections whose request head is not complete; when a connection arrives at a full
server, the address holding the most of them loses its oldest one, so one client cannot
keep everyone else out (nginx in front adds ``limit_conn`` per address: docs/operations.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Literal

Expired = Literal["header", "body", "idle"]


class ReadDeadlines:
    """The deadlines of one connection; ``expired`` is called with what ran out."""

    __slots__ = (
        "_headers_done_at",
        "_idle_since",
        "_loop",
        "_reading_since",
        "_timer",
        "body_timeout",
        "expired",
        "header_timeout",
        "keep_alive",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        expired: Callable[[Expired], None],
        *,
        header_timeout: float,
        body_timeout: float,
        keep_alive: float,
    ):
        self._loop = loop
        self.expired = expired
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.keep_alive = keep_alive
        self._timer: asyncio.TimerHandle | None = None
        now = loop.time()
        self._reading_since: float | None = now  # the first request's clock starts now
        self._headers_done_at: float | None = None
        self._idle_since: float | None = None
        self._arm_by(now + header_timeout)

    def request_started(self) -> None:
        """A request's first byte arrived."""
        if self._reading_since is None:
            self._reading_since = now = self._loop.time()
            self._arm_by(now + self.header_timeout)
        self._headers_done_at = self._idle_since = None

    def headers_read(self) -> None:
        self._headers_done_at = now = self._loop.time()
        self._arm_by(now + self.body_timeout)

    def request_read(self) -> None:
        """The whole request is in; it is being answered."""
        self._reading_since = self._headers_done_at = None

    def idle(self) -> None:
        """Every response is sent and no request is being read."""
        if self._reading_since is None:
            self._idle_since = now = self._loop.time()
            self._arm_by(now + self.keep_alive)

    @property
    def reading_headers(self) -> bool:
        return self._reading_since is not None and self._headers_done_at is None

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm_by(self, when: float) -> None:
        """Make sure the timer fires no later than ``when``."""
        timer = self._timer
        if timer is None or timer.when() > when:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if self._reading_since is not None:
            if self._headers_done_at is None:
                what: Expired = "header"
                deadline = self._reading_since + self.header_timeout
            else:
                what, deadline = "body", self._headers_done_at + self.body_timeout
        elif self._idle_since is not None:
            what, deadline = "idle", self._idle_since + self.keep_alive
        else:
            return  # a request is being answered: the next event arms the timer again
        if self._loop.time() < deadline:
            self._arm_by(deadline)  # the state changed since the timer was armed
        else:
            self.expired(what)


class HalfOpen:
    """One server's connections whose request head is not complete, by client address, in
    the order they became so."""

    def __init__(self) -> None:
        self._by_host: dict[str, dict[object, None]] = {}

    def add(self, host: str, connection: object) -> None:
        self._by_host.setdefault(host, {})[connection] = None

    def discard(self, host: str, connection: object) -> None:
        group = self._by_host.get(host)
        if group is not None:
            group.pop(connection, None)
            if not group:
                del self._by_host[host]

    def count(self, host: str) -> int:
        return len(self._by_host.get(host, ()))

    def oldest_of_the_greediest(self) -> object | None:
        """The oldest half-open connection of the address holding the most, if any."""
        if not self._by_host:
            return None
        group = max(self._by_host.values(), key=len)
        return next(iter(group))
