"""CPU time of one cache hit inside the gateway's HTTP server, without sockets.

    .venv/bin/python benchmarks/hit_in_process.py [--baseline-src DIR] [--hits 5000] [--rounds 5]
    .venv/bin/python benchmarks/hit_in_process.py --instructions [--baseline-src DIR]

uvicorn's protocol, as `comeapi serve` configures it, is fed the ten shipped prompts' requests
from memory on one keep-alive connection, over the 50 shipped answers imported into a fresh
SQLite store; the figure is the thread's CPU time per hit (HTTP parsing, the gateway's work
and the response, not the kernel's socket work). ``--baseline-src`` runs an older checkout's
``src`` beside the current one, each round alternating, so a change to the hit path is
measured before and after in one run. Each measurement is a child process of its own
(``--child``), since both versions are the same package.

``--instructions`` counts instead of timing, for a machine too busy to time on: each
version's child runs under valgrind's callgrind at two numbers of hits, and the difference
of the instructions executed, over the difference of hits, is the instructions per hit
(start-up, imports and the store's load cancel out). Slow (valgrind is ~50x), but the same
on a loaded machine as on a quiet one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import Load, add_summary_option  # benchmarks/machine.py (the script's folder)

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "src" / "comeapi" / "data" / "default-cache.jsonl"


class MemoryTransport(asyncio.Transport):
    """Keeps what the protocol writes; the peer is 127.0.0.1."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False

    def write(self, data: Any) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def request_bytes() -> list[bytes]:
    from nginx_vs_gateway import request_bodies

    out = []
    for route, body in request_bodies():
        data = body.encode()
        head = f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        out.append(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return out


async def measure(store: str, hits: int, repeats: int) -> list[float]:
    """CPU microseconds per hit, once per repeat, in this process."""
    from uvicorn.lifespan.on import LifespanOn
    from uvicorn.server import ServerState

    from comeapi.balancer.pool import BackendPool
    from comeapi.gateway.app import create_app
    from comeapi.gateway.server import build_cache, uvicorn_config
    from comeapi.settings import load_settings

    settings = load_settings(None, store=store, log_level="warning")
    pool = BackendPool.from_settings(settings, ["http://127.0.0.1:9"])
    config = uvicorn_config(settings, create_app(settings, pool, build_cache(settings)))
    config.load()
    lifespan = LifespanOn(config)
    await lifespan.startup()
    protocol = config.http_protocol_class(  # type: ignore[call-arg]
        config=config,
        server_state=ServerState(),
        app_state={},
        _loop=asyncio.get_running_loop(),
    )
    transport = MemoryTransport()
    protocol.connection_made(transport)
    requests = request_bytes()

    async def one(data: bytes) -> None:
        before = len(transport.out)
        protocol.data_received(data)
        # The ASGI path answers from a task, on a later turn of the loop: give it turns.
        while b"x-cache: HIT" not in transport.out[before:]:  # noqa: ASYNC110
            await asyncio.sleep(0)

    for data in requests * 20:  # warm up
        await one(data)
    results = []
    for _ in range(repeats):
        transport.out.clear()
        started = time.thread_time()
        for i in range(hits):
            await one(requests[i % len(requests)])
        results.append((time.thread_time() - started) / hits * 1e6)
        if transport.out.count(b"HTTP/1.1 200 OK") != hits:
            raise SystemExit("not every request was a hit")
    protocol.connection_lost(None)
    await lifespan.shutdown()
    return results


def child_run(src: Path, store: str, hits: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", store, "--hits", str(hits)],
        env={**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{Path(__file__).parent}"},
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return float(json.loads(out.stdout.splitlines()[-1])["us"])


def instructions(src: Path, store: str, hits: tuple[int, int]) -> float:
    """Instructions per hit under callgrind: the child at two hit counts, differenced."""
    counts = []
    for n in hits:
        valgrind = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
        out = subprocess.run(
            [*valgrind, sys.executable, __file__, "--child", store, "--hits", str(n)],
            env={**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{Path(__file__).parent}"},
            capture_output=True,
            text=True,
            timeout=7200,
            check=True,
        )
        collected = next(line for line in out.stderr.splitlines() if "Collected :" in line)
        counts.append(int(collected.split()[-1]))
    # The child measures 3 repeats of `hits` each.
    return (counts[1] - counts[0]) / (3 * (hits[1] - hits[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hits", type=int, default=5000, help="hits per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="alternating measurements")
    parser.add_argument("--baseline-src", type=Path, help="an older checkout's src directory")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions per hit under valgrind instead of timing (slow)",
    )
    parser.add_argument("--child", metavar="STORE", help=argparse.SUPPRESS)
    add_summary_option(parser)
    args = parser.parse_args()
    if args.child:
        # The best of three in one process: the least disturbed by the rest of the machine.
        print(json.dumps({"us": min(asyncio.run(measure(args.child, args.hits, 3)))}))
        return

    load = Load(own=1.0)
    versions = {"current": REPO / "src"}
    if args.baseline_src is not None:
        versions["baseline"] = args.baseline_src.resolve()
    with tempfile.TemporaryDirectory(prefix="comeapi-hit-bench-") as tmp:
        # A store per version, imported by that version: an older comeapi may not open a
        # store of a newer schema.
        stores = {}
        for name, src in versions.items():
            stores[name] = f"sqlite:{Path(tmp) / name / 'store.db'}"
            (Path(tmp) / name).mkdir()
            importer = [sys.executable, "-m", "comeapi", "cache", "import"]
            subprocess.run(
                [*importer, "--store", stores[name], str(SHIPPED)],
                check=True,
                capture_output=True,
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(src)},
                timeout=120,
            )
        if args.instructions:
            per_hit = {
                name: instructions(src, stores[name], (500, 2500)) for name, src in versions.items()
            }
            for name, count in per_hit.items():
                print(f"  {name:8} {count:,.0f} instructions per hit")
            if "baseline" in per_hit:
                ratio = per_hit["current"] / per_hit["baseline"]
                print(f"current/baseline = {ratio:.3f} (instructions per hit, callgrind)")
            return
        runs: dict[str, list[float]] = {name: [] for name in versions}
        for _ in range(args.rounds):
            for name, src in versions.items():
                runs[name].append(child_run(src, stores[name], args.hits))
    load.finish()
    for name, values in runs.items():
        shown = ", ".join(f"{v:.1f}" for v in values)
        print(f"  {name:8} median {statistics.median(values):6.1f} us CPU per hit ({shown})")
    current = statistics.median(runs["current"])
    headline = f"{current:.1f} us CPU per hit"
    if "baseline" in runs:
        baseline = statistics.median(runs["baseline"])
        headline += f", {current / baseline:.2f}x the baseline's {baseline:.1f} us"
    print(load.verdict(headline))
    load.summarize(
        args.summary,
        name="hit_in_process",
        what="one cache hit inside `comeapi serve`'s HTTP server (uvicorn's protocol fed from "
        "memory, the 10 shipped prompts), CPU time",
        headline=headline,
    )


if __name__ == "__main__":
    main()
