"""What the request log costs a cache hit: access log off, text and JSON, side by side.

    .venv/bin/python benchmarks/access_log_cost.py [--hits 20000] [--rounds 5] [--wrk]

In process: the gateway app (``create_app``) over a SQLite store holding the 50 shipped
answers is called directly, as uvicorn would call it, for the 10 shipped prompts in turn;
the figure is process CPU time per hit (no sockets, no HTTP parsing), the median of
``--rounds`` alternating rounds. Access lines go through the ``comeapi.access`` logger to a
StreamHandler on /dev/null: the formatting, the logging call and the write are counted, a
disk is not. With ``--wrk``, the same three modes as ``comeapi serve`` processes (stdout to
/dev/null) under ``wrk -t1 -c32``, alternating: requests per second and the server's CPU
time per request (from /proc). The load average is printed with each set: the machine is
shared, so read the differences within one run.

The record itself (made on every request, access log or not) is timed alone beside a plain
tuple appended to a deque, the least any record could cost. Run against a tree without the
request log (``PYTHONPATH=/path/to/other/src``), only the "off" row is measured. The
headline is withheld when the machine was busy (benchmarks/machine.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

from comeapi.balancer.pool import BackendPool
from comeapi.cache.open import open_store
from comeapi.gateway.app import create_app
from comeapi.gateway.cache import ResponseCache
from comeapi.settings import Settings, load_settings
from machine import Load, add_summary_option  # benchmarks/machine.py (the script's folder)
from nginx_vs_gateway import (
    SHIPPED_CACHE,
    WrkResult,
    free_port,
    lua_script,
    request_bodies,
    run_wrk,
    running,
    wait_port,
)

COMEAPI = [sys.executable, "-m", "comeapi"]
MODES = ("off", "text", "json") if "access_log" in Settings.model_fields else ("off",)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def quiet_access_log() -> None:
    """Access lines to /dev/null: counted up to the write, no disk and no terminal."""
    logger = logging.getLogger("comeapi.access")
    logger.handlers.clear()
    handler = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115 (lives as long)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


class Client:
    """Calls one ASGI app the way uvicorn does, without a socket."""

    def __init__(self, app: Any, bodies: list[tuple[str, str]]):
        self.app = app
        self.requests = []
        for route, body in bodies:
            raw = body.encode()
            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": route,
                "raw_path": route.encode(),
                "query_string": b"",
                "root_path": "",
                "headers": [
                    (b"host", b"127.0.0.1"),
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(raw)).encode()),
                ],
                "client": ("127.0.0.1", 50000),
                "server": ("127.0.0.1", 9000),
            }
            message = {"type": "http.request", "body": raw, "more_body": False}
            self.requests.append((scope, message))
        self.last_start: dict[str, Any] = {}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.last_start = message

    async def run(self, count: int, *, check: bool = False) -> None:
        requests = self.requests
        for i in range(count):
            scope, message = requests[i % len(requests)]

            async def receive(message: dict[str, Any] = message) -> dict[str, Any]:
                return message

            await self.app(scope, receive, self.send)
            if check:
                headers = dict(self.last_start["headers"])
                if self.last_start["status"] != 200 or headers.get(b"x-cache") != b"HIT":
                    raise SystemExit(f"not a hit: {self.last_start}")


def in_process(
    store_url: str, bodies: list[tuple[str, str]], args: argparse.Namespace
) -> dict[str, float]:
    """CPU microseconds per hit of each mode (median of the rounds)."""
    quiet_access_log()
    clients = {}
    for mode in MODES:
        extra = {"access_log": mode} if len(MODES) > 1 else {}
        settings = load_settings(None, store=store_url, **extra)
        cache = ResponseCache(open_store(store_url), variants=settings.variants)
        cache.reload()
        clients[mode] = Client(create_app(settings, BackendPool([]), cache), bodies)

    async def measure() -> dict[str, list[float]]:
        per_hit: dict[str, list[float]] = {mode: [] for mode in MODES}
        for client in clients.values():
            await client.run(len(bodies) * 3, check=True)
            await client.run(args.hits // 10)  # warm
        for _ in range(args.rounds):
            for mode, client in clients.items():
                started = time.process_time()
                await client.run(args.hits)
                per_hit[mode].append((time.process_time() - started) / args.hits * 1e6)
        return per_hit

    print(f"in process, {args.hits} hits x {args.rounds} rounds; load average before: {load()}")
    per_hit = asyncio.run(measure())
    print(f"load average after: {load()}")
    base = statistics.median(per_hit["off"])
    medians = {}
    for mode, values in per_hit.items():
        median = medians[mode] = statistics.median(values)
        rounds = " ".join(f"{v:.1f}" for v in values)
        print(
            f"  access log {mode:4}: {median:6.1f} us CPU per hit (median; rounds {rounds})"
            f"  {median - base:+.1f} us vs off"
        )
    return medians


def record_alone(args: argparse.Namespace) -> None:
    """The request log's own work per hit with the access log off: make the record, note the
    request and the hit, add it to the ring."""
    import timeit

    from comeapi.gateway.requestlog import RequestLog, RequestRecord

    log = RequestLog(200)
    scope = Client(None, [("/generate", "{}")]).requests[0][0]
    request, hit = object(), object()

    def one() -> None:
        record = RequestRecord(scope)
        record.request = request  # type: ignore[assignment]
        record.outcome = hit  # type: ignore[assignment]
        log.add(record, 200, 0.0001)

    ring: deque[tuple[Any, ...]] = deque(maxlen=200)

    def plain_tuple() -> None:  # the least a record could cost, for scale
        ring.append((time.time(), scope["method"], scope["path"], scope["client"], 200, 0.1))

    for name, func in (
        ("the record (make, fill, add)", one),
        ("a tuple into a deque", plain_tuple),
    ):
        best = min(timeit.repeat(func, number=args.hits, repeat=args.rounds)) / args.hits * 1e6
        print(f"  {name}: {best:.2f} us per request (best of {args.rounds})")


def with_wrk(
    store_url: str, base: Path, bodies: list[tuple[str, str]], args: Any
) -> dict[str, tuple[float, float]]:
    """Requests per second and server CPU microseconds per request of each mode (medians)."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (make system-deps)")
    script = base / "bodies.lua"
    script.write_text(lua_script(bodies))
    ports = {mode: free_port() for mode in MODES}
    servers = []
    for mode, port in ports.items():
        argv = [*COMEAPI, "serve", "--port", str(port)]
        argv += ["--store", store_url, "--log-level", "warning"]
        if len(MODES) > 1:
            argv += ["--access-log", mode]
        servers.append(running(argv, Path(os.devnull)))
    procs = [server.__enter__() for server in servers]
    try:
        for proc, port in zip(procs, ports.values(), strict=True):
            wait_port(port, proc)
        print(f"wrk -t1 -c{args.connections} -d{args.duration}s; load average before: {load()}")
        results: dict[str, list[WrkResult]] = {mode: [] for mode in MODES}
        for _ in range(args.rounds):
            for proc, (mode, port) in zip(procs, ports.items(), strict=True):
                url = f"http://127.0.0.1:{port}"
                results[mode].append(run_wrk(url, script, args, proc.pid))
        print(f"load average after: {load()}")
    finally:
        for server in reversed(servers):
            server.__exit__(None, None, None)
    base_cpu = statistics.median(r.cpu_us for r in results["off"])
    medians = {}
    for mode, runs in results.items():
        rps = statistics.median(r.requests_per_s for r in runs)
        cpu = statistics.median(r.cpu_us for r in runs)
        medians[mode] = (rps, cpu)
        errors = "; ".join(sorted({r.errors for r in runs if r.errors}))
        print(
            f"  access log {mode:4}: {rps:7.0f} req/s, server CPU {cpu:5.1f} us per request "
            f"(medians; {cpu - base_cpu:+.1f} us vs off){'  [' + errors + ']' if errors else ''}"
        )
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hits", type=int, default=20000, help="hits per round and mode")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--wrk", action="store_true", help="also measure comeapi serve + wrk")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    add_summary_option(parser)
    args = parser.parse_args()
    args.threads = 1
    # In process: this one thread; with --wrk the servers and wrk fill every CPU.
    machine = Load(own=float(os.cpu_count() or 1) if args.wrk else 1.0)
    base = Path(tempfile.mkdtemp(prefix="comeapi-access-log-"))
    try:
        store_url = f"sqlite:{base / 'store.db'}"
        subprocess.run(
            [*COMEAPI, "cache", "import", "--store", store_url, str(SHIPPED_CACHE)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        bodies = request_bodies()
        per_hit = in_process(store_url, bodies, args)
        if len(MODES) > 1:
            record_alone(args)
        served = with_wrk(store_url, base, bodies, args) if args.wrk else {}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    machine.finish()
    modes = " / ".join(per_hit)
    figures = f"{modes}: " + " / ".join(f"{us:.1f}" for us in per_hit.values())
    figures += " us CPU per hit"
    if served:
        figures += "; " + " / ".join(f"{rps:,.0f}" for rps, _ in served.values()) + " req/s, "
        figures += "server CPU " + " / ".join(f"{cpu:.1f}" for _, cpu in served.values())
        figures += " us per request"
    print(machine.verdict(figures))
    machine.summarize(
        args.summary,
        name="access_log_cost",
        what=f"access log per cache hit: {modes} (in process"
        + (f", and `comeapi serve` under `wrk -t1 -c{args.connections}`)" if served else ")"),
        headline=figures,
    )


if __name__ == "__main__":
    main()
