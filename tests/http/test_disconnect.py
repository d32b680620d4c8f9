"""DisconnectGuard: a client going away cancels the work, and only that."""

from __future__ import annotations

import asyncio

import pytest
from starlette.types import Message

from comeapi.http.disconnect import DisconnectGuard

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Client:
    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def receive(self) -> Message:
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def test_a_disconnect_cancels_the_work_and_is_swallowed() -> None:
    client = Client()
    reached_end = False
    async with DisconnectGuard(client.receive) as guard:
        asyncio.get_running_loop().call_later(0.01, client.gone.set)
        await asyncio.sleep(10)
        reached_end = True
    assert guard.disconnected
    assert not reached_end
    await asyncio.sleep(0)  # the task is not left with a pending cancellation
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_connected_client_is_left_alone() -> None:
    client = Client()
    async with DisconnectGuard(client.receive) as guard:
        await asyncio.sleep(0.01)
    assert not guard.disconnected
    client.gone.set()  # after the block: nothing may cancel us any more
    await asyncio.sleep(0.02)


async def test_other_cancellations_go_through() -> None:
    client = Client()

    async def work() -> None:
        async with DisconnectGuard(client.receive):
            await asyncio.sleep(10)

    task = asyncio.create_task(work())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
