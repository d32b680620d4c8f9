"""CPU time of one cache hit inside the gateway's HTTP server, without sockets.

    .venv/bin/python benchmarks/hit_in_process.py [--baseline-src DIR] [--hits 5000] [--rounds 5]
    .venv/bin/python benchmarks/hit_in_process.py --callgrind --hits 1000 [--baseline-src DIR]

uvicorn's protocol, as `comeapi serve` configures it, is fed the ten shipped prompts' requests
from memory on one keep-alive connection, over the 50 shipped answers imported into a fresh
SQLite store; the figure is the thread's CPU time per hit (HTTP parsing, the gateway's work
and the response, not the kernel's socket work). ``--baseline-src`` runs an older checkout's
``src`` beside the current one, each round alternating, so a change to the hit path is
measured before and after in one run. Each measurement is a child process of its own
(``--child``), since both versions are the same package. ``--callgrind`` counts instructions
per hit instead (valgrind's callgrind; independent of what else runs on the machine).
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

from baseline import import_shipped  # benchmarks/baseline.py (the script's folder)
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


def child_instructions(src: Path, store: str, hits: int) -> float:
    """Instructions per hit under callgrind (independent of the machine's load): the run
    with 3x ``hits`` less the run with ``hits``, over 2x ``hits``."""
    collected = []
    for n in (hits, 3 * hits):
        argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
        argv += [sys.executable, __file__, "--child", store, "--hits", str(n), "--repeats", "1"]
        out = subprocess.run(
            argv,
            env={**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{Path(__file__).parent}"},
            capture_output=True,
            text=True,
            timeout=3600,
            check=True,
        )
        collected.append(int(out.stderr.rsplit("Collected : ", 1)[1].split()[0]))
    return (collected[1] - collected[0]) / (2 * hits)


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


def _loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hits", type=int, default=5000, help="hits per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="alternating measurements")
    parser.add_argument("--baseline-src", type=Path, help="an older checkout's src directory")
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="instructions per hit under valgrind's callgrind instead of CPU time (slow: "
        "about 5 minutes a version with --hits 1000)",
    )
    parser.add_argument("--child", metavar="STORE", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    add_summary_option(parser)
    args = parser.parse_args()
    if args.child:
        # The best of three in one process: the least disturbed by the rest of the machine.
        # On uvloop, as `comeapi serve` runs (its timers and tasks cost less than asyncio's).
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            us = min(runner.run(measure(args.child, args.hits, args.repeats)))
        print(json.dumps({"us": us}))
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
            import_shipped(src, stores[name], SHIPPED, Path(tmp) / name)
        runs: dict[str, list[float]] = {name: [] for name in versions}
        if args.callgrind:
            for name, src in versions.items():
                runs[name].append(child_instructions(src, stores[name], args.hits))
            load.finish()
            for name, values in runs.items():
                print(f"  {name:8} {values[0]:9,.0f} instructions per hit")
            if "baseline" in runs:
                ratio = runs["current"][0] / runs["baseline"][0]
                print(
                    f"current/baseline = {ratio:.2f} (instruction counts: the load does not matter)"
                )
            return
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
