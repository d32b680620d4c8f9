"""Forwards done with callbacks (``Forwarder.forward_soon``, ``balancer/direct.py``) over real
sockets to scripted backends: when they are taken, and that every failure before the answer
is complete goes on as the coroutine path would (retry elsewhere, or on a fresh connection),
with the slot, the connection and the backend's health accounted for."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from comeapi.balancer.direct import DirectForward, Outcome
from comeapi.balancer.health import HealthChecker
from comeapi.balancer.pool import BackendPool
from comeapi.balancer.proxy import Forwarder
from comeapi.balancer.relay import Forwarded, UpstreamStream
from comeapi.balancer.transport import FastUpstream
from comeapi.balancer.upstream import Timeouts
from comeapi.errors import UnavailableError
from tests.balancer.fakes import eventually
from tests.balancer.scripted import Backend, answer_of

pytestmark = pytest.mark.anyio

BODY = b'{"prompt": "hi", "max_tokens": 1}'
MISS = ((b"x-cache", b"MISS"),)  # a forward's ``set_headers``


@dataclass
class Env:
    backends: list[Backend]
    pool: BackendPool
    forwarder: Forwarder
    upstream: FastUpstream


@contextlib.asynccontextmanager
async def cluster(
    count: int = 2, *, read: float = 5.0, stall: float | None = None
) -> AsyncIterator[Env]:
    backends = [Backend(chr(ord("a") + i)) for i in range(count)]
    servers = []
    for backend in backends:
        server = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
        backend.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        servers.append(server)
    pool = BackendPool([b.url for b in backends])
    upstream = FastUpstream(Timeouts(connect=2.0, read=read, write=2.0, pool=2.0))
    async with httpx.AsyncClient() as client:
        health = HealthChecker(pool, client, interval=30.0, timeout=0.3)
        await health.start()
        assert all(b.healthy for b in pool.backends)
        try:
            yield Env(
                backends, pool, Forwarder(pool, health, upstream, stall_timeout=stall), upstream
            )
        finally:
            for backend in backends:
                backend.release.set()
            await health.stop()
            await upstream.aclose()
            for server in servers:
                server.close()


class Report:
    backend: str | None = None


class Outcomes:
    """Collects what ``done`` is told."""

    def __init__(self) -> None:
        self.future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self.calls = 0

    def __call__(self, outcome: Outcome) -> None:
        self.calls += 1
        self.future.set_result(outcome)

    async def get(self, seconds: float = 5.0) -> Outcome:
        return await asyncio.wait_for(asyncio.shield(self.future), seconds)


def soon(
    env: Env,
    done: Outcomes,
    report: Report | None = None,
    set_headers: tuple[tuple[bytes, bytes], ...] = (),
) -> DirectForward | None:
    return env.forwarder.forward_soon(
        "/generate", BODY, [(b"content-type", b"application/json")], model=None,
        report=report, done=done, set_headers=set_headers,
    )  # fmt: skip


async def by(forward: str, env: Env) -> Outcome | UpstreamStream:
    """One request forwarded with callbacks ("soon") or on the coroutine path."""
    if forward == "soon":
        done = Outcomes()
        assert soon(env, done) is not None
        return await done.get()
    return await env.forwarder.forward("/generate", BODY, [], model=None, stream=False)


async def warm(env: Env) -> None:
    """One request per backend on the coroutine path: each gets an idle connection."""
    for _ in env.backends:
        answer = await env.forwarder.forward("/generate", BODY, [], model=None, stream=False)
        assert isinstance(answer, Forwarded) and answer.status_code == 200


def in_flight(env: Env) -> int:
    return sum(b.in_flight for b in env.pool.backends)


async def test_an_idle_connection_and_a_free_backend_answer_without_a_task() -> None:
    async with cluster() as env:
        await warm(env)
        done, report = Outcomes(), Report()
        forward = soon(env, done, report)
        assert forward is not None
        answer = await done.get()
        assert isinstance(answer, Forwarded)
        assert answer.status_code == 200
        assert answer.body in (answer_of("a"), answer_of("b"))
        assert report.backend in {b.url for b in env.backends}
        assert done.calls == 1
        assert in_flight(env) == 0
        assert sum(b.served for b in env.pool.backends) == 3
        # The same two connections carried all three requests.
        assert [b.connections for b in env.backends] == [1, 1]
        assert env.upstream.connections(env.backends[0].url) == 1


async def test_without_an_idle_connection_nothing_is_done_and_the_turn_is_kept() -> None:
    async with cluster() as env:
        assert soon(env, Outcomes()) is None
        assert in_flight(env) == 0
        assert sum(b.generations for b in env.backends) == 0
        # The round-robin turn went back: the coroutine path takes the same first backend,
        # so every backend gets a connection (else one could starve of them).
        report = Report()
        await env.forwarder.forward("/generate", BODY, [], model=None, stream=False, report=report)
        assert report.backend == env.backends[0].url


async def test_a_full_pool_or_a_queue_goes_the_coroutine_way() -> None:
    async with cluster(1) as env:
        await warm(env)
        (backend,) = env.pool.backends
        backend.in_flight = backend.capacity  # busy
        assert soon(env, Outcomes()) is None
        assert backend.in_flight == backend.capacity
        backend.in_flight = 0
        env.forwarder.stopping = True  # shutting down: the coroutine path answers 503
        assert soon(env, Outcomes()) is None


async def test_a_failure_before_any_byte_moves_the_request_to_another_backend() -> None:
    async with cluster() as env:
        await warm(env)
        first = env.pool.backends[0]  # round robin: the next pick
        env.backends[0].script = ["garbage"]
        done, report = Outcomes(), Report()
        assert soon(env, done, report) is not None
        answer = await done.get()
        assert isinstance(answer, Forwarded) and answer.body == answer_of("b")
        assert report.backend == env.backends[1].url
        assert not first.healthy  # marked down, as the coroutine path does
        assert in_flight(env) == 0


@pytest.mark.parametrize("forward", ["soon", "coroutine"])
async def test_a_switch_of_protocols_no_request_asked_for_moves_the_request_on(
    forward: str,
) -> None:
    async with cluster() as env:
        await warm(env)
        first = env.pool.backends[0]  # round robin: the next pick
        env.backends[0].script = ["upgrade"]
        answer = await by(forward, env)
        assert isinstance(answer, Forwarded)
        assert (answer.status_code, answer.body) == (200, answer_of("b"))
        assert not first.healthy
        assert in_flight(env) == 0


async def test_a_kept_alive_connection_closed_unanswered_is_retried_on_a_fresh_one() -> None:
    async with cluster(1) as env:
        await warm(env)
        env.backends[0].drop_reused = True  # closes as our second request on it arrives
        done = Outcomes()
        assert soon(env, done) is not None
        answer = await done.get()
        assert isinstance(answer, Forwarded) and answer.status_code == 200
        assert env.backends[0].connections == 2
        assert env.pool.backends[0].healthy  # nothing was wrong with the backend
        assert in_flight(env) == 0


async def test_a_head_read_before_its_body_gives_the_whole_answer_with_the_headers_set() -> None:
    async with cluster(1) as env:
        await warm(env)
        env.backends[0].script = ["split"]
        done = Outcomes()
        assert soon(env, done, set_headers=MISS) is not None
        answer = await done.get()
        assert isinstance(answer, Forwarded) and answer.body == answer_of("a")
        assert answer.headers == [(b"content-type", b"application/json"), (b"x-cache", b"MISS")]
        assert answer.lines() == b"content-type: application/json\r\nx-cache: MISS\r\n"
        assert done.calls == 1 and in_flight(env) == 0
        assert env.upstream.connections(env.backends[0].url) == 1  # kept alive, reused
        again = Outcomes()
        assert soon(env, again) is not None
        assert isinstance(await again.get(), Forwarded)
        assert env.backends[0].connections == 1


async def test_a_connection_lost_after_the_head_moves_the_request_on_with_the_headers_set() -> None:
    async with cluster() as env:
        await warm(env)
        env.backends[0].script = ["head-drop"]  # a 200's head, then nothing
        done = Outcomes()
        assert soon(env, done, set_headers=MISS) is not None
        answer = await done.get()
        # Nothing had reached the client: the coroutine path answered, from the other one.
        assert isinstance(answer, Forwarded) and answer.body == answer_of("b")
        assert (b"x-cache", b"MISS") in answer.headers
        assert b"x-cache: MISS\r\n" in answer.lines()
        assert done.calls == 1 and in_flight(env) == 0


async def test_each_answers_head_is_made_from_its_own_headers() -> None:
    async with cluster(1) as env:
        sent = [(b"Date", b"Mon"), (b"Server", b"uvicorn"), (b"Content-Type", b"application/json")]
        first = env.forwarder.answer_head(200, list(sent), "/generate", MISS)
        assert first.headers == [(b"content-type", b"application/json"), (b"x-cache", b"MISS")]
        again = env.forwarder.answer_head(201, list(sent), "/generate", MISS)
        assert again.status_code == 201 and again.lines() == first.lines()
        again.set_header(b"x-extra", b"1")  # its own list: the next answer is unaffected
        assert b"x-extra" not in env.forwarder.answer_head(200, sent, "/generate", MISS).lines()
        # Another Date (a second later), other headers, other headers set.
        later = [(b"Date", b"Tue"), *sent[1:], (b"X-Request-Id", b"7")]
        assert env.forwarder.answer_head(200, later, "/generate", MISS).lines() == (
            b"content-type: application/json\r\nx-request-id: 7\r\nx-cache: MISS\r\n"
        )
        plain = env.forwarder.answer_head(200, later, "/generate", ())
        assert plain.lines() == b"content-type: application/json\r\nx-request-id: 7\r\n"


@pytest.mark.parametrize("forward", ["soon", "coroutine"])
async def test_bytes_after_a_complete_answer_do_not_change_it(
    forward: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with cluster(1) as env:
        await warm(env)
        env.backends[0].script = ["trailing"]
        answer = await by(forward, env)
        assert isinstance(answer, Forwarded)
        assert (answer.status_code, answer.body) == (200, answer_of("a"))
        assert answer.headers == [(b"content-type", b"application/json")]
        assert in_flight(env) == 0
        assert "sent bytes no request asked for: connection closed" in caplog.text
        # Closed, not kept: the next request goes over a new connection.
        assert soon(env, Outcomes()) is None
        assert env.upstream.connections(env.backends[0].url) == 0
        again = await env.forwarder.forward("/generate", BODY, [], model=None, stream=False)
        assert isinstance(again, Forwarded)
        assert (again.status_code, again.body) == (200, answer_of("a"))
        assert env.backends[0].connections == 2


async def test_an_idle_connection_that_receives_bytes_is_closed() -> None:
    async with cluster(1) as env:
        await warm(env)
        env.backends[0].script = ["late"]
        done = Outcomes()
        assert soon(env, done) is not None
        answer = await done.get()
        assert isinstance(answer, Forwarded) and answer.body == answer_of("a")
        (conn,) = next(iter(env.upstream._idle.values()))
        # As nginx does with its kept-alive upstream connections: bytes while idle end it.
        await eventually(lambda: conn.closed)
        assert soon(env, Outcomes()) is None  # no idle connection left to send on
        again = await env.forwarder.forward("/generate", BODY, [], model=None, stream=False)
        assert isinstance(again, Forwarded)
        assert (again.status_code, again.body) == (200, answer_of("a"))
        assert env.backends[0].connections == 2


@pytest.mark.parametrize("forward", ["soon", "coroutine"])
async def test_an_interim_response_is_passed_over(forward: str) -> None:
    async with cluster(1) as env:
        await warm(env)
        env.backends[0].script = ["hints"]
        answer = await by(forward, env)
        assert isinstance(answer, Forwarded)
        assert (answer.status_code, answer.body) == (200, answer_of("a"))
        assert answer.headers == [(b"content-type", b"application/json")]  # no link
        done = Outcomes()
        assert soon(env, done) is not None  # the connection is kept
        assert isinstance(await done.get(), Forwarded)
        assert env.backends[0].connections == 1


async def test_a_503_moves_the_request_to_another_backend() -> None:
    async with cluster() as env:
        await warm(env)
        env.backends[0].script = ["busy"]
        done = Outcomes()
        assert soon(env, done) is not None
        answer = await done.get()
        assert isinstance(answer, Forwarded) and answer.body == answer_of("b")
        assert env.pool.backends[0].healthy  # a full queue is not a failure
        assert in_flight(env) == 0


async def test_a_hung_backend_times_out_and_the_request_moves_on() -> None:
    async with cluster(read=0.3) as env:
        await warm(env)
        env.backends[0].script = ["hang"]
        done = Outcomes()
        started = asyncio.get_running_loop().time()
        assert soon(env, done) is not None
        answer = await done.get()
        took = asyncio.get_running_loop().time() - started
        assert isinstance(answer, Forwarded) and answer.body == answer_of("b")
        assert 0.3 <= took < 2.0  # the read timeout, noticed at most a quarter of it late
        assert not env.pool.backends[0].healthy
        await asyncio.wait_for(env.backends[0].closed_by_client.wait(), 2)
        assert in_flight(env) == 0


async def test_a_stalled_backend_that_misses_its_probe_is_left() -> None:
    async with cluster(stall=0.2) as env:
        await warm(env)
        env.backends[0].script = ["hang"]
        env.backends[0].health_hangs = True
        done = Outcomes()
        assert soon(env, done) is not None
        answer = await done.get()
        assert isinstance(answer, Forwarded) and answer.body == answer_of("b")
        assert not env.pool.backends[0].healthy
        assert in_flight(env) == 0


async def test_a_slow_backend_that_answers_its_probe_is_waited_for() -> None:
    async with cluster(stall=0.1) as env:
        await warm(env)
        env.backends[0].script = ["slow"]
        done = Outcomes()
        assert soon(env, done) is not None
        await asyncio.sleep(0.6)  # several stall periods, each probe answered
        assert not done.future.done()
        env.backends[0].release.set()
        answer = await done.get()
        assert isinstance(answer, Forwarded) and answer.body == answer_of("a")
        assert env.pool.backends[0].healthy


async def test_cancel_closes_the_upstream_connection_and_frees_the_slot() -> None:
    async with cluster(1) as env:
        await warm(env)
        env.backends[0].script = ["hang"]
        done = Outcomes()
        forward = soon(env, done)
        assert forward is not None
        await eventually(lambda: env.backends[0].generations == 2)
        assert forward.cancel()
        assert await done.get() is None  # the client has gone: nothing to answer
        await asyncio.wait_for(env.backends[0].closed_by_client.wait(), 2)
        assert in_flight(env) == 0
        assert env.upstream.connections(env.backends[0].url) == 0
        assert not forward.cancel()  # once


async def test_cancelled_by_a_shutdown_the_answer_is_a_503() -> None:
    async with cluster(1) as env:
        await warm(env)
        env.backends[0].script = ["hang"]
        done = Outcomes()
        forward = soon(env, done)
        assert forward is not None
        env.forwarder.stopping = True
        forward.cancel()
        answer = await done.get()
        assert isinstance(answer, UnavailableError)
        assert in_flight(env) == 0


async def test_cancel_after_a_fall_back_cancels_the_retry() -> None:
    async with cluster(1) as env:
        await warm(env)
        # The kept-alive connection is dropped unanswered: the coroutine path retries on a
        # fresh one, which hangs; cancelling while that path waits must end it too.
        env.backends[0].script = ["drop", "hang"]
        done = Outcomes()
        forward = soon(env, done)
        assert forward is not None
        await eventually(lambda: env.backends[0].generations == 3)
        assert forward.cancel()
        assert await done.get() is None
        assert in_flight(env) == 0
        await asyncio.wait_for(env.backends[0].closed_by_client.wait(), 2)


async def test_an_idle_connection_closing_unnoticed_is_not_used() -> None:
    async with cluster(1) as env:
        await warm(env)
        (conn,) = next(iter(env.upstream._idle.values()))
        assert conn.transport is not None
        conn.transport.close()  # as a backend's close begins, before connection_lost
        assert soon(env, Outcomes()) is None
        assert in_flight(env) == 0
        assert env.upstream.connections(env.backends[0].url) == 0
        answer = await env.forwarder.forward("/generate", BODY, [], model=None, stream=False)
        assert isinstance(answer, Forwarded) and answer.status_code == 200


async def test_a_done_that_fails_is_logged_and_the_connection_stays_usable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with cluster(1) as env:
        await warm(env)

        def broken(outcome: Outcome) -> None:
            raise RuntimeError("a bug in the caller")

        assert (
            env.forwarder.forward_soon("/generate", BODY, [], model=None, report=None, done=broken)
            is not None
        )
        await eventually(lambda: "answering a forwarded request failed" in caplog.text)
        assert in_flight(env) == 0
        done = Outcomes()
        assert soon(env, done) is not None  # the same kept-alive connection, still fine
        answer = await done.get()
        assert isinstance(answer, Forwarded) and answer.status_code == 200
        assert env.backends[0].connections == 1
