"""CORS on the gateway's hit path: CPU time of one cache hit through the whole ASGI app,
without --cors-origin, with it for a client that sends no Origin (curl, SDKs), and with it
for a browser's request; the last with Starlette's stock CORSMiddleware too, which
comeapi.http.cors replaces on actual answers. In-process (no sockets), rounds interleaved so
every case sees the same machine.

    .venv/bin/python benchmarks/cors_overhead.py [--hits 10000] [--rounds 10]

Without --cors-origin the CORS middleware is not installed at all, so the first figure is
the hit path as it was before CORS existed. The headline is withheld when the machine was
busy (benchmarks/machine.py).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from starlette.middleware.cors import CORSMiddleware as StarletteCORS

from comeapi.balancer.pool import BackendPool
from comeapi.cache.key import prompt_key
from comeapi.cache.sqlite import SqliteStore
from comeapi.cache.store import Entry
from comeapi.gateway.app import create_app
from comeapi.gateway.cache import ResponseCache
from comeapi.http.cors import ALLOW_HEADERS, ALLOW_METHODS, EXPOSE_HEADERS
from comeapi.settings import load_settings
from machine import Load, add_summary_option  # benchmarks/machine.py (the script's folder)

MODEL = "gemma-3-270m-q4_k_m.gguf"
ORIGIN = "https://app.example"
BODY = orjson.dumps({"prompt": "cached"})


def make_app(db: Path, origins: list[str], *, stock: bool = False) -> Any:
    """The gateway app; with ``stock`` the same without CORS, wrapped in Starlette's own."""
    settings = load_settings(None, cors_origins=[] if stock else origins, log_level="warning")
    store = SqliteStore(db)
    cache = ResponseCache(store, variants=3, default_model=MODEL)
    app = create_app(settings, BackendPool.from_settings(settings, []), cache)
    if not stock:
        return app
    wrapped = StarletteCORS(
        app,
        allow_origins=origins,
        allow_methods=ALLOW_METHODS,
        allow_headers=ALLOW_HEADERS,
        expose_headers=EXPOSE_HEADERS,
    )
    wrapped.state = app.state  # type: ignore[attr-defined]
    return wrapped


def scope(origin: bool) -> dict[str, Any]:
    headers = [(b"host", b"gateway"), (b"content-type", b"application/json")]
    if origin:
        headers.append((b"origin", ORIGIN.encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/generate",
        "raw_path": b"/generate",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 9000),
    }


async def hits(app: Any, request: dict[str, Any], n: int) -> float:
    """Microseconds per hit over ``n`` hits."""
    sent: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            sent.append(message["status"])

    # CPU time of this process, not wall time: other work on the machine does not count.
    started = time.process_time()
    for _ in range(n):
        await app(request, receive, send)
    elapsed = time.process_time() - started
    assert set(sent) == {200}, set(sent)
    return elapsed / n * 1e6


async def main(n: int, rounds: int) -> dict[str, float]:
    """CPU microseconds per hit of each case (median of the rounds)."""
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "cache.db"
        with SqliteStore(db) as store:
            store.put_many(
                Entry(prompt_key("cached", MODEL), v, "prompt", "cached", f"answer {v}", MODEL)
                for v in range(3)
            )
        cases = {
            "no --cors-origin": (make_app(db, []), scope(origin=False)),
            "--cors-origin, request without Origin": (make_app(db, [ORIGIN]), scope(False)),
            "--cors-origin, browser request (Origin)": (make_app(db, [ORIGIN]), scope(True)),
            "  the same, Starlette's stock middleware": (
                make_app(db, [ORIGIN], stock=True),
                scope(True),
            ),
        }
        for app, _ in cases.values():
            await app.state.gateway.startup()
        results: dict[str, list[float]] = {name: [] for name in cases}
        try:
            for app, request in cases.values():
                await hits(app, request, n // 10)  # warm up
            for _ in range(rounds):
                for name, (app, request) in cases.items():
                    results[name].append(await hits(app, request, n))
        finally:
            for app, _ in cases.values():
                await app.state.gateway.shutdown()
    base = statistics.median(results["no --cors-origin"])
    print(f"cache hit through the gateway's ASGI app: CPU us per hit, median of {rounds} rounds")
    medians = {}
    for name, values in results.items():
        median = medians[name] = statistics.median(values)
        print(f"  {name:42s} {median:7.1f} us/hit  (+{median - base:5.1f} us)")
    return medians


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hits", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=10)
    add_summary_option(parser)
    args = parser.parse_args()
    load = Load(own=1.0)  # one thread calls the app
    medians = list(asyncio.run(main(args.hits, args.rounds)).values())
    load.finish()
    figures = (
        f"{medians[0]:.1f} us per hit without CORS; with `--cors-origin` "
        f"{medians[1] - medians[0]:+.1f} us (no Origin), {medians[2] - medians[0]:+.1f} us "
        f"(browser), Starlette's stock middleware {medians[3] - medians[0]:+.1f} us"
    )
    print(load.verdict(figures))
    load.summarize(
        args.summary,
        name="cors_overhead",
        what="CORS on a cache hit, in process: CPU per hit without `--cors-origin`, and what "
        "it adds",
        headline=figures,
    )
