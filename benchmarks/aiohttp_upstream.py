"""aiohttp's client as the forwarder's ``Upstream``, for benchmarks/balancer_overhead.py:
keep-alive connections, at most ``max_connections`` per backend, every timeout, aiohttp's
errors translated to httpx's. The gateway forwards with ``FastUpstream`` instead, because it
measured faster (docs/balancer.md); this is the library it is measured against."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import httpx
import yarl
from aiohttp.abc import AbstractStreamWriter

from comeapi.balancer.upstream import Timeouts
from comeapi.protocol.health import KEEPALIVE_EXPIRY

# The pool never sends a backend more requests than its capacity (slots <= 64); the cap
# only stops a runaway from opening sockets without bound.
MAX_CONNECTIONS_PER_BACKEND = 64


class WriteTimedOut(TimeoutError):
    """The request body could not be handed to the network in time (aiohttp has no write
    timeout of its own)."""


class AiohttpUpstream:
    def __init__(
        self,
        timeouts: Timeouts,
        *,
        max_connections: int = MAX_CONNECTIONS_PER_BACKEND,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
    ):
        self.timeouts = timeouts
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        connect, pool = timeouts.connect, timeouts.pool
        # aiohttp's ``connect`` covers the wait for a pooled connection and the connecting.
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=None if connect is None or pool is None else connect + pool,
            sock_connect=connect,
            sock_read=timeouts.read,
        )
        self._session: aiohttp.ClientSession | None = None  # made inside the event loop
        self._urls: dict[str, yarl.URL] = {}

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=self.max_connections, keepalive_timeout=self.keepalive_expiry
        )
        return aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # bodies are relayed byte for byte
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        )

    async def post(
        self, url: str, body: bytes, raw_headers: Sequence[tuple[bytes, bytes]]
    ) -> _Response:
        # aiohttp takes str headers: decoding them is part of its cost.
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw_headers}
        session = self._session
        if session is None:
            session = self._session = self._open()
        target = self._urls.get(url)
        if target is None:
            target = self._urls[url] = yarl.URL(url)
        data: Any = body
        if self.timeouts.write is not None:
            data = _TimedBody(body, self.timeouts.write)
        try:
            response = await session.post(
                target, data=data, headers=headers, timeout=self._timeout, allow_redirects=False
            )
        except aiohttp.ConnectionTimeoutError as exc:
            raise httpx.ConnectTimeout(f"{target.host}:{target.port}: {exc}") from exc
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(f"{target.host}:{target.port}: {exc.strerror}") from exc
        except (TimeoutError, aiohttp.SocketTimeoutError) as exc:
            if isinstance(exc, WriteTimedOut):
                raise httpx.WriteTimeout(str(exc)) from exc
            raise httpx.ReadTimeout("timed out waiting for the backend") from exc
        except aiohttp.ServerDisconnectedError as exc:
            raise httpx.RemoteProtocolError(
                f"server disconnected without a response: {exc}"
            ) from exc
        except aiohttp.ClientResponseError as exc:
            raise httpx.RemoteProtocolError(f"malformed response: {exc.message}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise httpx.WriteError(f"sending the request failed: {exc}") from exc
        return _Response(response)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _TimedBody(aiohttp.BytesPayload):
    """The request body, written within ``timeout`` seconds."""

    def __init__(self, value: bytes, timeout: float):
        super().__init__(value, content_type=None)
        self._timeout = timeout

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await super().write_with_length(writer, content_length)
        except TimeoutError:
            raise WriteTimedOut(
                f"the request body was not sent within {self._timeout:g} s"
            ) from None


class _Response:
    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse):
        self._response = response
        self.status = response.status
        self.headers = response.raw_headers

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.SocketTimeoutError) as exc:
            raise httpx.ReadTimeout("timed out waiting for the backend") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise httpx.ReadError(f"connection closed mid-response: {exc}") from exc

    async def aclose(self) -> None:
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()
