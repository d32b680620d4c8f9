"""CPU time of one forwarded request inside the gateway, without sockets: where it goes.

    .venv/bin/python benchmarks/forward_in_process.py [--forwards 5000] [--phases]

`comeapi serve`'s HTTP protocol is fed ``balancer_overhead.py``'s request (POST /generate,
``Cache-Control: no-cache``: the pool path) from memory on one keep-alive connection; the
upstream connection is a ``FastUpstream`` connection whose transport is memory too, and
answers each request one loop turn later with the stub backend's bytes. So the figure is
the Python of a forward (the HTTP parse, the verdict, the forward, the answer, the request
log and the metrics), not the kernel's socket work: the thread's CPU time per forward, the
best of 5 repeats. ``--phases`` also wraps the main steps and prints the wall time spent in
each per forward (nested: a step's time includes the steps it calls; wrapping adds about
0.3 us per step). Run ``PYTHONPATH=OTHER/src`` in front to measure another checkout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import json
import tempfile
import time
from collections.abc import Callable
from typing import Any

from balancer_overhead import BODY  # benchmarks/balancer_overhead.py (the script's folder)
from hit_in_process import MemoryTransport, _loop_factory
from machine import Load

REQUEST = (
    b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nAccept-Encoding: identity\r\n"
    b"Content-Length: %d\r\nContent-Type: application/json\r\nCache-Control: no-cache\r\n\r\n"
    % len(BODY)
) + BODY
ANSWER = json.dumps(
    {"response": "x", "model": "stub.gguf", "finish_reason": "length",
     "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}
).encode()  # fmt: skip
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ndate: Mon, 07 Dec 2026 06:00:00 GMT\r\nserver: uvicorn\r\n"
    b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(ANSWER)
) + ANSWER
REPEATS = 5
WARMUP = 300


class BackendTransport(MemoryTransport):
    """The upstream connection's transport: each request written is answered a turn later."""

    def __init__(self, loop: asyncio.AbstractEventLoop, answer: Callable[[bytes], None]):
        super().__init__()
        self.loop = loop
        self.answer = answer

    def write(self, data: Any) -> None:
        self.loop.call_soon(self.answer, RESPONSE)


def phases(spent: collections.Counter[str]) -> None:
    """Wrap the steps of a forward: ``spent[step]`` gathers their wall time (ns)."""
    from comeapi.balancer import proxy, transport
    from comeapi.gateway import direct, frontdoor, generation, metrics, requestlog
    from comeapi.http.protocol import HttpProtocol

    steps = [
        (HttpProtocol, "data_received", "request leg (HttpProtocol.data_received)"),
        (HttpProtocol, "_answer_now", "  after the HTTP parse (_answer_now)"),
        (generation.GenerationRoutes, "_verdict", "    the body's verdict"),
        (frontdoor.FrontDoor, "prepare", "      JSON + validation (FrontDoor.prepare)"),
        (proxy.Forwarder, "forward_soon", "    Forwarder.forward_soon"),
        (transport.FastUpstream, "send_now", "      FastUpstream.send_now (the write)"),
        (
            transport.UpstreamConnection,
            "data_received",
            "answer leg (UpstreamConnection.data_received)",
        ),
        (direct.AnswerSoon, "__call__", "  the gateway's end (AnswerSoon)"),
        (HttpProtocol, "_reply_later", "    the client's write (_reply_later)"),
        (requestlog.RequestLog, "add", "    request log (after the write)"),
        (metrics.GatewayMetrics, "observe", "    metrics (after the write)"),
    ]
    for owner, name, label in steps:
        spent[label] = 0  # printed in this order
        original = getattr(owner, name)

        def timed(*args: Any, _f: Any = original, _label: str = label, **kw: Any) -> Any:
            started = time.perf_counter_ns()
            try:
                return _f(*args, **kw)
            finally:
                spent[_label] += time.perf_counter_ns() - started

        setattr(owner, name, functools.wraps(original)(timed))


async def measure(store: str, forwards: int) -> list[float]:
    """CPU microseconds per forward, once per repeat."""
    from uvicorn.server import ServerState

    from comeapi.balancer.pool import BackendPool
    from comeapi.balancer.transport import FastUpstream, UpstreamConnection, _target
    from comeapi.balancer.upstream import Timeouts
    from comeapi.gateway.app import create_app
    from comeapi.gateway.server import build_cache, uvicorn_config
    from comeapi.settings import load_settings

    loop = asyncio.get_running_loop()
    settings = load_settings(None, store=store, log_level="warning")
    url = "http://127.0.0.1:9"
    pool = BackendPool.from_settings(settings, [url])
    pool.mark_up(pool.backends[0], capacity=1, models=frozenset({"stub.gguf"}))
    upstream = FastUpstream(Timeouts(connect=2.0, read=600.0, write=600.0, pool=600.0))
    # One kept-alive connection, idle in the pool as after a first request.
    conn = UpstreamConnection()
    conn.connection_made(BackendTransport(loop, conn.data_received))
    conn.used = True
    origin = _target(url + "/generate")[0]
    upstream._idle[origin] = [conn]
    upstream._open[origin] = 1
    app = create_app(settings, pool, build_cache(settings), upstream=upstream)
    config = uvicorn_config(settings, app)
    config.load()
    protocol = config.http_protocol_class(  # type: ignore[call-arg]
        config=config, server_state=ServerState(), app_state={}, _loop=loop
    )
    client = MemoryTransport()
    protocol.connection_made(client)

    async def one() -> None:
        before = len(client.out)
        conn.idle_since = time.monotonic()  # never idle long enough to expire
        protocol.data_received(REQUEST)
        while len(client.out) == before:  # noqa: ASYNC110
            await asyncio.sleep(0)

    for _ in range(WARMUP):
        await one()
    results = []
    for _ in range(REPEATS):
        client.out.clear()
        started = time.thread_time()
        for _ in range(forwards):
            await one()
        results.append((time.thread_time() - started) / forwards * 1e6)
        if client.out.count(b"HTTP/1.1 200 OK") != forwards:
            raise SystemExit(f"not every request was forwarded: {bytes(client.out[:300])!r}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forwards", type=int, default=5000, help="forwards per repeat")
    parser.add_argument("--phases", action="store_true", help="wall time per step, too")
    args = parser.parse_args()
    load = Load(own=1.0)
    spent: collections.Counter[str] = collections.Counter()
    if args.phases:
        phases(spent)
    with (
        tempfile.TemporaryDirectory(prefix="comeapi-forward-") as tmp,
        asyncio.Runner(loop_factory=_loop_factory()) as runner,
    ):
        results = runner.run(measure(f"sqlite:{tmp}/store.db", args.forwards))
    load.finish()
    shown = ", ".join(f"{r:.1f}" for r in results)
    print(f"CPU per forwarded request: {min(results):.1f} us (best of {REPEATS}: {shown})")
    total = WARMUP + REPEATS * args.forwards
    for label, ns in spent.items():
        print(f"  {ns / total / 1000:6.1f} us  {label}")
    print(load.verdict(f"{min(results):.1f} us CPU per forward"))


if __name__ == "__main__":
    main()
