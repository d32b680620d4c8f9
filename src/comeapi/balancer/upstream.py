"""The forwarder's view of an HTTP client: POST a body to a backend, then read the status,
the headers and the body chunk by chunk as it arrives.

Whatever client sits behind it, failures are httpx's exception classes (``ConnectError``,
``ReadTimeout``, ``PoolTimeout``...): they are the vocabulary of failover, stall detection and
``describe()``, and the health prober (an ``httpx.AsyncClient``) raises the same ones. Tests
drive the forwarder through ``HttpxUpstream(httpx.MockTransport(...))``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import httpx


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds each phase of an exchange may take (None: no limit)."""

    connect: float | None  # opening the TCP (and TLS) connection
    read: float | None  # waiting for the response head, or between two body chunks
    write: float | None  # handing the request to the network
    pool: float | None  # waiting for a free connection when the per-backend cap is reached


class UpstreamResponse(Protocol):
    """A backend's answer whose body has not been read yet."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Sequence[tuple[bytes, bytes]]: ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as sent, chunk by chunk as it arrives; may be iterated once."""
        ...

    async def aclose(self) -> None:
        """Done with it: a fully read body leaves the connection for reuse, an unfinished
        one closes it, so the backend notices its client is gone and stops generating."""
        ...


class Upstream(Protocol):
    async def post(
        self, url: str, body: bytes, headers: Sequence[tuple[bytes, bytes]]
    ) -> UpstreamResponse:
        """Send ``body`` to ``url`` with ``headers`` (raw name and value pairs; the client
        adds Host and Content-Length); returns once the response head has arrived."""
        ...

    async def aclose(self) -> None: ...


class HttpxUpstream:
    """Any httpx transport behind the ``Upstream`` interface (tests use ``MockTransport``)."""

    def __init__(self, transport: httpx.AsyncBaseTransport, timeouts: Timeouts):
        self.transport = transport
        self._extensions = {
            "timeout": {
                "connect": timeouts.connect,
                "read": timeouts.read,
                "write": timeouts.write,
                "pool": timeouts.pool,
            }
        }

    async def post(
        self, url: str, body: bytes, headers: Sequence[tuple[bytes, bytes]]
    ) -> _HttpxResponse:
        request = httpx.Request(
            "POST", url, headers=headers, content=body, extensions=self._extensions
        )
        return _HttpxResponse(await self.transport.handle_async_request(request))

    async def aclose(self) -> None:
        await self.transport.aclose()


class _HttpxResponse:
    def __init__(self, response: httpx.Response):
        self.response = response
        self.status = response.status_code
        self.headers = response.headers.raw

    def chunks(self) -> AsyncIterator[bytes]:
        if self.response.is_stream_consumed:  # built in memory (MockTransport handlers)
            return _once(self.response.content)
        return self.response.aiter_raw()

    async def aclose(self) -> None:
        await self.response.aclose()


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body
