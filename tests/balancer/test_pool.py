"""BackendPool: picking, capacity, the FIFO wait queue and its limits."""

from __future__ import annotations

import asyncio

import pytest

from comeapi.balancer.backend import Backend
from comeapi.balancer.pool import BackendPool
from comeapi.errors import (
    ModelNotFoundError,
    QueueFullError,
    QueueTimeoutError,
    UnavailableError,
)

pytestmark = pytest.mark.anyio


def make_pool(
    count: int = 3,
    *,
    capacity: int = 1,
    models: frozenset[str] = frozenset({"m.gguf"}),
    **kw: object,
) -> BackendPool:
    pool = BackendPool([f"http://b{i}" for i in range(count)], **kw)  # type: ignore[arg-type]
    for backend in pool.backends:
        pool.mark_up(backend, capacity=capacity, models=models)
    return pool


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_round_robin_spreads_evenly() -> None:
    pool = make_pool(3)
    order = []
    for _ in range(30):
        backend = await pool.acquire()
        order.append(backend.url)
        pool.release(backend)
    assert order[:6] == ["http://b0", "http://b1", "http://b2"] * 2
    assert [b.served for b in pool.backends] == [10, 10, 10]


async def test_round_robin_fills_every_slot_once_before_queueing() -> None:
    pool = make_pool(3, capacity=2)
    taken = [await pool.acquire() for _ in range(6)]
    assert [b.in_flight for b in pool.backends] == [2, 2, 2]
    assert len({id(b) for b in taken}) == 3


async def test_least_outstanding_picks_the_least_loaded() -> None:
    pool = make_pool(3, capacity=4, routing="least-outstanding")
    b0, b1, b2 = pool.backends
    b0.in_flight, b1.in_flight, b2.in_flight = 3, 1, 2
    assert await pool.acquire() is b1
    assert await pool.acquire() is b2  # b1 and b2 both at 2 now: the tie goes round
    assert [b.in_flight for b in pool.backends] == [3, 2, 3]


async def test_least_outstanding_compares_load_relative_to_capacity() -> None:
    pool = make_pool(2, routing="least-outstanding")
    small, big = pool.backends
    pool.mark_up(big, capacity=8, models=frozenset({"m.gguf"}))
    big.in_flight = 3
    assert await pool.acquire() is small  # 0 of 1 busy beats 3 of 8
    assert await pool.acquire() is big  # small is full now


async def test_a_full_backend_never_gets_a_second_request() -> None:
    pool = make_pool(2)
    first, second = await pool.acquire(), await pool.acquire()
    assert {first.url, second.url} == {"http://b0", "http://b1"}
    waiting = asyncio.create_task(pool.acquire())
    await settle()
    assert not waiting.done()
    assert pool.queue_depth == 1
    assert all(b.in_flight == 1 for b in pool.backends)
    pool.release(second)
    assert await waiting is second
    assert second.in_flight == 1


async def test_the_queue_is_first_in_first_out() -> None:
    pool = make_pool(1)
    busy = await pool.acquire()
    order: list[int] = []

    async def wait(i: int) -> Backend:
        backend = await pool.acquire()
        order.append(i)
        return backend

    tasks = []
    for i in range(4):
        tasks.append(asyncio.create_task(wait(i)))
        await settle()
    for i in range(4):
        pool.release(busy)
        await settle()
        busy = tasks[i].result()  # the oldest waiter got the slot
    assert order == [0, 1, 2, 3]
    assert busy.in_flight == 1


async def test_a_full_queue_answers_503_with_retry_after() -> None:
    pool = make_pool(1, queue_size=2)
    await pool.acquire()
    queued = [asyncio.create_task(pool.acquire()) for _ in range(2)]
    await settle()
    with pytest.raises(QueueFullError) as caught:
        await pool.acquire()
    assert caught.value.status == 503
    assert caught.value.headers()["Retry-After"] == "1"
    assert caught.value.to_dict()["error"]["code"] == "queue_full"
    assert pool.queue_depth == 2
    for task in queued:
        task.cancel()


async def test_queue_size_zero_refuses_at_once() -> None:
    pool = make_pool(1, queue_size=0)
    await pool.acquire()
    with pytest.raises(QueueFullError):
        await pool.acquire()


async def test_waiting_past_the_timeout_answers_503() -> None:
    pool = make_pool(1, queue_timeout=0.05)
    await pool.acquire()
    with pytest.raises(QueueTimeoutError) as caught:
        await pool.acquire()
    assert caught.value.status == 503
    assert "Retry-After" in caught.value.headers()
    assert pool.queue_depth == 0


async def test_all_backends_down_fails_without_waiting() -> None:
    pool = make_pool(2)
    for backend in pool.backends:
        pool.mark_down(backend, "connection refused")
    task = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)  # one step: it must be decided without any wait
    assert task.done()
    with pytest.raises(UnavailableError) as caught:
        task.result()
    assert caught.value.status == 503
    assert "connection refused" in caught.value.message
    assert pool.queue_depth == 0


async def test_waiters_fail_when_the_last_backend_goes_down() -> None:
    pool = make_pool(1)
    busy = await pool.acquire()
    waiting = asyncio.create_task(pool.acquire())
    await settle()
    pool.mark_down(busy, "connection refused")
    with pytest.raises(UnavailableError):
        await waiting
    pool.release(busy, served=False)
    assert busy.in_flight == 0


async def test_a_recovered_backend_serves_the_queue() -> None:
    pool = make_pool(2)
    b1 = pool.backends[1]
    pool.mark_down(b1, "connection refused")
    await pool.acquire()
    waiting = asyncio.create_task(pool.acquire())
    await settle()
    pool.mark_up(b1, capacity=1, models=frozenset({"m.gguf"}))
    assert await waiting is b1


async def test_a_cancelled_waiter_leaks_no_slot() -> None:
    pool = make_pool(1)
    busy = await pool.acquire()
    waiting = asyncio.create_task(pool.acquire())
    await settle()
    waiting.cancel()
    await settle()
    pool.release(busy)
    assert pool.queue_depth == 0
    assert busy.in_flight == 0


async def test_excluded_backends_are_not_picked() -> None:
    pool = make_pool(3)
    b0, b1, b2 = pool.backends
    for _ in range(6):
        backend = await pool.acquire(exclude=[b0, b2])
        assert backend is b1
        pool.release(backend)
    with pytest.raises(UnavailableError):
        await pool.acquire(exclude=pool.backends)


async def test_requests_naming_a_model_go_only_to_backends_having_it() -> None:
    pool = BackendPool(["http://a", "http://b"])
    a, b = pool.backends
    pool.mark_up(a, capacity=4, models=frozenset({"small.gguf"}))
    pool.mark_up(b, capacity=4, models=frozenset({"small.gguf", "big.gguf"}))
    for name in ("big.gguf", "big", "big.gguf"):
        assert await pool.acquire(name) is b
    picked = [await pool.acquire("small.gguf") for _ in range(2)]
    assert a in picked
    pool.check_model("small")
    pool.check_model(None)
    with pytest.raises(ModelNotFoundError) as caught:
        pool.check_model("huge.gguf")
    assert caught.value.status == 404
    assert caught.value.to_dict()["error"]["available_models"] == ["big.gguf", "small.gguf"]


async def test_nothing_is_refused_as_unknown_before_any_backend_reported() -> None:
    pool = BackendPool(["http://a"])
    pool.check_model("anything.gguf")  # no list yet: the request gets a 503, not a 404
    with pytest.raises(UnavailableError):
        await pool.acquire("anything.gguf")


def test_summary_counts_healthy_capacity_only() -> None:
    pool = make_pool(3, capacity=2)
    pool.mark_down(pool.backends[0], "timeout")
    assert pool.summary() == {
        "total_backends": 3,
        "healthy_backends": 2,
        "in_flight": 0,
        "capacity": 4,
        "queue_depth": 0,
    }


def test_duplicate_urls_are_one_backend() -> None:
    pool = BackendPool(["http://a/", "http://a", "http://b"])
    assert [b.url for b in pool.backends] == ["http://a", "http://b"]
    assert isinstance(pool.backends[0], Backend)
