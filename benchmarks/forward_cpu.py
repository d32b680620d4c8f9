"""Instructions per forwarded request in the gateway, counted by valgrind's callgrind: the
balancer's own CPU cost, whatever else runs on the machine.

    .venv/bin/python benchmarks/forward_cpu.py [--requests 400] [--baseline-src DIR] [--miss]

An instant stub backend (``balancer_overhead.py``'s) runs normally; the gateway
(``balancer_overhead.py --serve-gateway``, the ``fast`` client) runs under callgrind, once
for this checkout's ``src`` and once for ``--baseline-src`` (``git archive main src | tar -x
-C /tmp/before`` gives the code before a change). After a warm-up, the counters are zeroed
(``callgrind_control -z``), ``--requests`` requests are sent on one kept-alive connection,
and the counters are dumped: the figure is the dump's total over the requests. The request
is ``balancer_overhead.py``'s (POST /generate, ``max_tokens`` 1, ``Cache-Control:
no-cache``: the pool path); ``--miss`` sends a prompt the cache does not hold instead
(looked up, missed, forwarded, ``X-Cache: MISS``). Health probes are every 60 s here, so
none falls inside the measured stretch. The kernel's share of the socket calls is not
counted (callgrind sees user space only).
"""

from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from balancer_overhead import BODY, HEADERS, free_port, running, wait_gateway_ready
from machine import Load

REPO = Path(__file__).resolve().parent.parent
WARMUP = 50
MISS_HEADERS = {"Content-Type": "application/json"}


def post(conn: http.client.HTTPConnection, headers: dict[str, str]) -> None:
    conn.request("POST", "/generate", BODY, headers)
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise SystemExit(f"{response.status} {body[:200]!r}")


def instructions(src: Path, backend: str, requests: int, headers: dict[str, str]) -> float:
    """Instructions per request of a gateway running ``src`` under callgrind."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="comeapi-forward-cpu-") as tmp:
        out = Path(tmp) / "callgrind.out"
        argv = [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
            sys.executable, str(Path(__file__).parent / "balancer_overhead.py"),
            "--serve-gateway", str(port), "--via", "fast", "--backend-url", backend,
            "--store", f"sqlite:{tmp}/store.db",
        ]  # fmt: skip
        env = {
            **os.environ,
            "PYTHONPATH": f"{src}{os.pathsep}{Path(__file__).parent}",
            "COMEAPI_HEALTH_INTERVAL": "60",
        }
        url = f"http://127.0.0.1:{port}"
        with running(argv, url + "/health", timeout=600, env=env) as pid:
            wait_gateway_ready(url)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            for _ in range(WARMUP):
                post(conn, headers)
            target = str(pid)  # valgrind runs the program in its own process
            subprocess.run(["callgrind_control", "-z", target], check=True, capture_output=True)
            for _ in range(requests):
                post(conn, headers)
            subprocess.run(["callgrind_control", "-d", target], check=True, capture_output=True)
            conn.close()
            dumps = sorted(Path(tmp).glob("callgrind.out.*"))
            total = 0
            for line in dumps[-1].read_text().splitlines():
                if line.startswith("summary:"):
                    total = int(line.split()[1])
            return total / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--baseline-src", type=Path, help="an older checkout's src directory")
    parser.add_argument("--miss", action="store_true", help="a cache miss, not a no-cache bypass")
    args = parser.parse_args()
    headers = MISS_HEADERS if args.miss else HEADERS
    load = Load(own=1.0)
    versions = {"current": REPO / "src"}
    if args.baseline_src is not None:
        versions["baseline"] = args.baseline_src.resolve()
    backend_port = free_port()
    backend = f"http://127.0.0.1:{backend_port}"
    stub = [sys.executable, str(Path(__file__).parent / "balancer_overhead.py")]
    results = {}
    started = time.monotonic()
    with running([*stub, "--serve-stub", str(backend_port)], backend + "/health"):
        for name, src in versions.items():
            results[name] = instructions(src, backend, args.requests, headers)
    load.finish()
    what = "cache miss" if args.miss else "no-cache bypass"
    print(f"instructions per forwarded request ({what}, {args.requests} requests, callgrind):")
    for name, value in results.items():
        print(f"  {name:8} {value:11,.0f}")
    if "baseline" in results:
        ratio = results["current"] / results["baseline"]
        print(f"current/baseline = {ratio:.2f} (instruction counts: the load does not matter)")
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
