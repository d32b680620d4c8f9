"""Balancer overhead: latency of POST /generate (max_tokens=1) straight to a backend and
through the gateway forwarding with each HTTP client, interleaved in one run.

    .venv/bin/python benchmarks/balancer_overhead.py [--rounds 400] [--backend stub|real|both]
        [--transports fast,aiohttp,httpx]

One gateway process per transport runs in front of the same backend; every round sends one
request to the backend directly and one through each gateway, in a rotating order, so all
see the same machine. ``added`` is a gateway's latency less the direct request's of the
same round; its median is the figure. The gateway's CPU time per forwarded request comes
from /proc. ``stub`` is a backend that answers at once (the gateway's own cost, without
inference noise); ``real`` is ``comeapi backend --threads 1`` with the bundled model.

The clients: ``fast`` is the hand-written HTTP/1.1 client on httptools (FastUpstream),
``aiohttp`` is aiohttp's ClientSession, ``httpx`` is httpx's default transport (httpcore).
``nginx`` is the peer (DESIGN.md, ../shared/anchors): nginx's ``proxy_pass`` to the same
backend through an upstream with keepalive connections, one worker, in the same rounds.
``relay`` is Python's floor: the gateway's event loop (uvloop) relaying bytes verbatim
between the client's connection and one kept-alive connection to the backend, nothing
parsed, checked or counted: what any Python forward costs before it does any work.
Goal (issue 21): the gateway's added p50 <= 1.5x nginx's, with the stub and a real backend
(``--no-nginx``: issue 14's absolute goals, 0.3 ms stub, 0.5 ms real).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from comeapi.balancer.upstream import HttpxUpstream, Timeouts, Upstream
from comeapi.settings import Settings
from machine import (  # benchmarks/machine.py (the script's folder)
    Load,
    add_summary_option,
    process_cpu_seconds,
)

REPO = Path(__file__).resolve().parent.parent
BODY = b'{"prompt": "Hi", "max_tokens": 1, "temperature": 0}'
# The gateway has a response cache in front of the pool: measure the pool path.
HEADERS = {"Content-Type": "application/json", "Cache-Control": "no-cache"}
TRANSPORTS = ("fast", "aiohttp", "httpx")
NGINX = "nginx"  # the peer: nginx's proxy_pass
RELAY = "relay"  # the floor: bytes relayed verbatim by a bare uvloop protocol
GOAL_VS_NGINX = 1.5  # issue 21: the gateway's added p50 <= 1.5x nginx proxy_pass's
WARMUP = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running(
    argv: list[str], ready_url: str, timeout: float = 300.0, env: dict[str, str] | None = None
) -> Iterator[int]:
    """Run ``argv`` in its own process group until the block ends; wait for ``ready_url``.
    Yields the process id."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True, env=env
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise SystemExit(f"{argv} exited:\n{log.read().decode(errors='replace')}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(ready_url, timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit(f"{ready_url} not ready after {timeout} s")
                time.sleep(0.1)
            yield proc.pid
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_gateway_ready(url: str) -> None:
    deadline = time.monotonic() + 60
    while httpx.get(url + "/status", timeout=2).json()["healthy_backends"] < 1:
        if time.monotonic() > deadline:
            raise SystemExit(f"the gateway {url} never saw its backend healthy")
        time.sleep(0.1)


@dataclass
class Target:
    """A URL to POST at, over one kept-alive connection, and what it measured."""

    name: str
    port: int
    pid: int | None = None  # the gateway's, for its CPU time
    times: list[float] = field(default_factory=list)
    cpu: float = 0.0
    conn: http.client.HTTPConnection | None = None

    def post(self) -> float:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        started = time.perf_counter()
        self.conn.request("POST", "/generate", BODY, HEADERS)
        response = self.conn.getresponse()
        body = response.read()
        elapsed = time.perf_counter() - started
        if response.status != 200:
            raise SystemExit(f"{self.name}: {response.status} {body[:200]!r}")
        return elapsed


def measure(targets: list[Target], rounds: int) -> None:
    """``rounds`` rounds of one request to each target, in a rotating order."""
    # Warm-up in rounds too: a connection left idle while the others warm up would pass
    # the backend's keep-alive timeout (5 s) on a slow machine, and break at its next use.
    for _ in range(WARMUP):
        for target in targets:
            target.post()
    cpu_before = {t.name: process_cpu_seconds(t.pid) for t in targets if t.pid is not None}
    for i in range(rounds):
        shift = i % len(targets)
        for target in targets[shift:] + targets[:shift]:
            target.times.append(target.post())
    for target in targets:
        if target.pid is not None:
            target.cpu = (process_cpu_seconds(target.pid) - cpu_before[target.name]) / rounds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(kind: str, targets: list[Target]) -> dict[str, float]:
    """Print the table; returns each gateway's median added latency (ms)."""
    direct = targets[0]
    print(f"\n{kind} backend, {len(direct.times)} interleaved rounds:")
    print(
        f"  {'':<16}{'p50':>9}{'p99':>9}   {'added p50':>10}{'added p99':>10}"
        f"{'paired med':>11}{'CPU/req':>10}"
    )
    d50, d99 = percentile(direct.times, 0.5) * 1e3, percentile(direct.times, 0.99) * 1e3
    print(f"  {'direct':<16}{d50:8.3f} {d99:8.3f}")
    added: dict[str, float] = {}
    for target in targets[1:]:
        g50, g99 = percentile(target.times, 0.5) * 1e3, percentile(target.times, 0.99) * 1e3
        # Round i through the gateway ran right next to direct round i: their difference
        # cancels most of the machine's drift.
        paired = statistics.median(g - d for d, g in zip(direct.times, target.times, strict=True))
        added[target.name] = paired * 1e3
        print(
            f"  {'via ' + target.name:<16}{g50:8.3f} {g99:8.3f}   {g50 - d50:+9.3f} "
            f"{g99 - d99:+9.3f} {paired * 1e3:+10.3f} {target.cpu * 1e3:8.3f} ms"
        )
    return added


def nginx_proxy(base: Path, port: int, backend_port: int) -> list[str]:
    """nginx in front of the backend with ``proxy_pass`` to a keepalive upstream."""
    base.mkdir(parents=True)
    conf = f"""
worker_processes 1;
pid {base}/nginx.pid;
error_log {base}/error.log warn;
daemon off;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {base}/cb; proxy_temp_path {base}/px; fastcgi_temp_path {base}/fc;
    uwsgi_temp_path {base}/uw; scgi_temp_path {base}/sc;
    upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
    (base / "nginx.conf").write_text(conf)
    return ["nginx", "-p", f"{base}/", "-c", str(base / "nginx.conf"), "-e", f"{base}/error.log"]


def run(
    kind: str, transports: list[str], rounds: int, model_dir: str, tmp: str, nginx: bool
) -> dict[str, float]:
    backend_port = free_port()
    backend = f"http://127.0.0.1:{backend_port}"
    if kind == "real":
        backend_argv = [
            sys.executable, "-m", "comeapi", "backend", "--model-dir", model_dir,
            "--port", str(backend_port), "--threads", "1", "--log-level", "warning",
        ]  # fmt: skip
    else:
        backend_argv = [sys.executable, __file__, "--serve-stub", str(backend_port)]
    targets = [Target("direct", backend_port)]
    with contextlib.ExitStack() as stack:
        stack.enter_context(running(backend_argv, backend + "/health"))
        if nginx:
            # The peer: nginx's proxy_pass to the same backend, as its users configure it
            # (an upstream with keepalive connections, one worker like the gateway).
            port = free_port()
            argv = nginx_proxy(Path(tmp) / f"nginx-{kind}", port, backend_port)
            pid = stack.enter_context(running(argv, f"http://127.0.0.1:{port}/health"))
            targets.append(Target(NGINX, port, pid))
        port = free_port()
        argv = [sys.executable, __file__, "--serve-relay", str(port), "--backend-url", backend]
        pid = stack.enter_context(running(argv, f"http://127.0.0.1:{port}/health"))
        targets.append(Target(RELAY, port, pid))
        for name in transports:
            port = free_port()
            argv = [
                sys.executable, __file__, "--serve-gateway", str(port), "--via", name,
                "--backend-url", backend, "--store", f"sqlite:{tmp}/{kind}-{name}.db",
            ]  # fmt: skip
            pid = stack.enter_context(running(argv, f"http://127.0.0.1:{port}/health"))
            wait_gateway_ready(f"http://127.0.0.1:{port}")
            targets.append(Target(name, port, pid))
        measure(targets, rounds)
    return report(kind, targets)


def make_upstream(name: str, settings: Settings) -> Upstream:
    """The client the gateway forwards with."""
    timeouts = Timeouts(
        connect=settings.connect_timeout,
        read=settings.request_timeout,
        write=settings.request_timeout,
        pool=settings.connect_timeout,
    )
    if name == "fast":
        from comeapi.balancer.transport import FastUpstream

        return FastUpstream(timeouts)
    if name == "aiohttp":
        from aiohttp_upstream import AiohttpUpstream  # benchmarks/aiohttp_upstream.py

        return AiohttpUpstream(timeouts)
    if name == "httpx":
        return HttpxUpstream(
            httpx.AsyncHTTPTransport(limits=httpx.Limits(keepalive_expiry=4.0)), timeouts
        )
    raise SystemExit(f"unknown transport {name}")


def serve_gateway(port: int, via: str, backend: str, store: str) -> None:
    """``comeapi serve`` (same app, same server and event loop) forwarding through ``via``."""
    from comeapi.balancer.pool import BackendPool
    from comeapi.gateway.app import create_app
    from comeapi.gateway.server import build_cache, gateway_server
    from comeapi.gateway.server import run as run_loop

    settings = Settings(port=port, backends=[backend], log_level="warning", store=store)

    async def main() -> None:
        pool = BackendPool.from_settings(settings)
        upstream = make_upstream(via, settings)
        app = create_app(settings, pool, build_cache(settings), upstream=upstream)
        await gateway_server(settings, app).serve()

    run_loop(main())


def serve_relay(port: int, backend: str) -> None:
    """The floor: each client connection relayed byte for byte to a connection of its own
    to the backend (opened with it, kept alive with it), on the gateway's event loop."""
    import asyncio

    from comeapi.gateway.server import run as run_loop

    url = httpx.URL(backend)
    host, backend_port = url.host, url.port or 80

    class Back(asyncio.Protocol):
        def __init__(self, client: asyncio.Transport):
            self.client = client

        def data_received(self, data: bytes) -> None:
            self.client.write(data)

        def connection_lost(self, exc: Exception | None) -> None:
            self.client.close()

    class Front(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.held: list[bytes] = []
            self.back: asyncio.Transport | None = None
            self.connecting = asyncio.ensure_future(self._connect())

        async def _connect(self) -> None:
            loop = asyncio.get_running_loop()
            back, _ = await loop.create_connection(lambda: Back(self.transport), host, backend_port)
            self.back = back
            for data in self.held:
                back.write(data)
            self.held.clear()

        def data_received(self, data: bytes) -> None:
            if self.back is None:
                self.held.append(data)
            else:
                self.back.write(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.back is not None:
                self.back.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Front, "127.0.0.1", port)
        await server.serve_forever()

    run_loop(main())


def serve_stub(port: int) -> None:
    """A backend that answers instantly: /health per the contract, /generate a fixed body."""
    import orjson
    import uvicorn

    health = orjson.dumps(
        {"status": "ok", "capacity": 1, "in_flight": 0, "available": 1,
         "models": ["stub.gguf"], "loaded_models": ["stub.gguf"]}
    )  # fmt: skip
    answer = orjson.dumps(
        {"response": "x", "model": "stub.gguf", "finish_reason": "length",
         "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}
    )  # fmt: skip
    json_header = [(b"content-type", b"application/json")]

    async def app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def,type-arg]
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        body = health if scope["path"] == "/health" else answer
        await send({"type": "http.response.start", "status": 200, "headers": json_header})
        await send({"type": "http.response.body", "body": body})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", "--requests", type=int, default=400, dest="rounds")
    parser.add_argument("--backend", choices=["real", "stub", "both"], default="both")
    parser.add_argument("--transports", default=",".join(TRANSPORTS))
    parser.add_argument("--model-dir", default=str(REPO / "models"))
    parser.add_argument("--no-nginx", action="store_true", help="leave out nginx's proxy_pass")
    parser.add_argument("--serve-stub", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-gateway", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-relay", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--via", help=argparse.SUPPRESS)
    parser.add_argument("--backend-url", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    add_summary_option(parser)
    args = parser.parse_args()
    if args.serve_stub:
        serve_stub(args.serve_stub)
        return
    if args.serve_gateway:
        serve_gateway(args.serve_gateway, args.via, args.backend_url, args.store)
        return
    if args.serve_relay:
        serve_relay(args.serve_relay, args.backend_url)
        return
    transports = [t for t in args.transports.split(",") if t]
    # The client, a gateway and the backend take turns: about one CPU busy at a time.
    load = Load(own=1.0)
    added: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("stub", "real") if args.backend == "both" else (args.backend,):
            nginx = shutil.which("nginx") is not None and not args.no_nginx
            added[kind] = run(kind, transports, args.rounds, args.model_dir, tmp, nginx)
    load.finish()
    print()
    for kind, figures in added.items():
        print(load.verdict(headline(kind, figures)))
    load.summarize(
        args.summary,
        name="balancer_overhead",
        what="balancer overhead, `/generate` with `max_tokens=1`, direct vs through the "
        "gateway (per HTTP client) and through nginx `proxy_pass`: added p50",
        headline="; ".join(headline(kind, figures) for kind, figures in added.items()),
    )


def headline(kind: str, figures: dict[str, float]) -> str:
    """One backend's added p50 per client and nginx's; the goal is the gateway's own client
    (``fast``, or the best one measured) against nginx's proxy_pass (issue 21), or the
    absolute goal of issue 14 when nginx was not run."""
    gateways = {k: v for k, v in figures.items() if k not in (NGINX, RELAY)}
    judged = gateways.get("fast", min(gateways.values()))
    clients = ", ".join(f"{name} {value:+.3f} ms" for name, value in figures.items())
    if NGINX in figures and figures[NGINX] > 0:
        ratio = judged / figures[NGINX]
        met = ratio <= GOAL_VS_NGINX
        return (
            f"{kind} backend: {clients}; gateway/nginx proxy_pass {ratio:.2f}x "
            f"(goal <= {GOAL_VS_NGINX}): {'met' if met else 'NOT met'}"
        )
    goal = {"stub": 0.3, "real": 0.5}[kind]
    return (
        f"{kind} backend: {clients} (goal <= {goal} ms: {'met' if judged <= goal else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
