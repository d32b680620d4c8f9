"""Balancer overhead: latency of POST /generate (max_tokens=1) straight to a backend vs
through ``comeapi serve``, requests interleaved in one run so both see the same machine.

    .venv/bin/python benchmarks/balancer_overhead.py [--requests 400] [--backend real|stub|both]

``real`` is ``comeapi backend`` with the bundled model (what users see); ``stub`` is a
backend that answers at once (a tiny uvicorn app in this file), so the difference is the
gateway's own cost without inference noise. Goal: <= 0.5 ms added at p50.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
BODY = {"prompt": "Hi", "max_tokens": 1, "temperature": 0}
# The gateway may have a response cache in front of the pool: measure the pool path.
HEADERS = {"Cache-Control": "no-cache"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running(argv: list[str], ready_url: str, timeout: float = 300.0) -> Iterator[None]:
    """Run ``argv`` in its own process group until the block ends; wait for ``ready_url``."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
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
            yield
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
            raise SystemExit("the gateway never saw its backend healthy")
        time.sleep(0.1)


def measure(direct: str, gateway: str, requests: int) -> tuple[list[float], list[float]]:
    """Latencies (s) of ``requests`` POSTs to each, alternating, on keep-alive connections."""
    times: dict[str, list[float]] = {direct: [], gateway: []}
    with (
        httpx.Client(timeout=60, headers=HEADERS) as a,
        httpx.Client(timeout=60, headers=HEADERS) as b,
    ):
        clients = {direct: a, gateway: b}
        for url, client in clients.items():  # warm up connections, caches, the model
            for _ in range(20):
                client.post(url + "/generate", json=BODY).raise_for_status()
        for i in range(requests):
            order = (direct, gateway) if i % 2 == 0 else (gateway, direct)
            for url in order:
                started = time.perf_counter()
                response = clients[url].post(url + "/generate", json=BODY)
                elapsed = time.perf_counter() - started
                response.raise_for_status()
                times[url].append(elapsed)
    return times[direct], times[gateway]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(kind: str, direct: list[float], through: list[float]) -> None:
    rows = []
    for name, q in (("p50", 0.50), ("p90", 0.90), ("p99", 0.99)):
        d, g = percentile(direct, q) * 1000, percentile(through, q) * 1000
        rows.append(
            f"  {name}: direct {d:8.3f} ms   through gateway {g:8.3f} ms   added {g - d:+.3f} ms"
        )
    mean_added = (statistics.fmean(through) - statistics.fmean(direct)) * 1000
    # Request i through the gateway ran right next to direct request i: their difference
    # cancels most of the machine's drift.
    paired = statistics.median(g - d for d, g in zip(direct, through, strict=True)) * 1000
    print(f"{kind} backend, {len(direct)} requests each (interleaved):")
    print("\n".join(rows))
    print(f"  mean added: {mean_added:+.3f} ms   median of paired differences: {paired:+.3f} ms")


def run(kind: str, requests: int, model_dir: str) -> None:
    backend_port, gateway_port = free_port(), free_port()
    backend = f"http://127.0.0.1:{backend_port}"
    gateway = f"http://127.0.0.1:{gateway_port}"
    if kind == "real":
        backend_argv = [
            sys.executable, "-m", "comeapi", "backend", "--model-dir", model_dir,
            "--port", str(backend_port), "--threads", "1", "--log-level", "warning",
        ]  # fmt: skip
    else:
        backend_argv = [sys.executable, __file__, "--serve-stub", str(backend_port)]
    gateway_argv = [
        sys.executable, "-m", "comeapi", "serve", "--port", str(gateway_port),
        "--backend", backend, "--log-level", "warning",
    ]  # fmt: skip
    with running(backend_argv, backend + "/health"), running(gateway_argv, gateway + "/health"):
        wait_gateway_ready(gateway)
        direct, through = measure(backend, gateway, requests)
    report(kind, direct, through)


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
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--backend", choices=["real", "stub", "both"], default="both")
    parser.add_argument("--model-dir", default=str(REPO / "models"))
    parser.add_argument("--serve-stub", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_stub:
        serve_stub(args.serve_stub)
        return
    print(f"cpus: {os.cpu_count()}  load average: {os.getloadavg()[0]:.2f}")
    for kind in ("stub", "real") if args.backend == "both" else (args.backend,):
        run(kind, args.requests, args.model_dir)


if __name__ == "__main__":
    main()
