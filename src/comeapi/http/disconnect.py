"""Noticing, while a request is being answered, that its client has gone away."""

from __future__ import annotations

import asyncio
from types import TracebackType

from starlette.types import Message, Receive


class DisconnectGuard:
    """Cancel the enclosed work when the client disconnects, and swallow that cancellation.

    After the request body has been read, the next ``receive()`` returns only when the
    client goes away (or the response is complete), so one small task can wait for it.
    """

    def __init__(self, receive: Receive):
        self._receive = receive
        self._task: asyncio.Task[object] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.disconnected = False

    async def __aenter__(self) -> DisconnectGuard:
        self._task = asyncio.current_task()
        self._watcher = asyncio.create_task(self._watch())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._watcher is not None and self._task is not None
        watcher, self._watcher = self._watcher, None
        watcher.cancel()
        if self.disconnected and exc_type is asyncio.CancelledError:
            self._task.uncancel()
            return True
        return False

    async def _watch(self) -> None:
        message: Message = await self._receive()
        while message["type"] != "http.disconnect":
            message = await self._receive()
        if self._watcher is not None and self._task is not None:
            self.disconnected = True
            self._task.cancel()
