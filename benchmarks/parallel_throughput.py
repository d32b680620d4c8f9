"""ComeAPI's parallel test: N concurrent generations of 64 tokens through the gateway, one
backend vs a pool of backends, aggregate tokens/s side by side in one run.

    .venv/bin/python benchmarks/parallel_throughput.py [--concurrency 5] [--max-tokens 64]
        [--backends N] [--rounds 3]

Three set-ups, each behind its own ``comeapi serve``, measured in interleaved rounds (median):
  single/all-threads  one backend using every core (--threads = cores): the fair baseline
  single/1-thread     one backend with one thread (ComeAPI's per-backend setting)
  pool                N backends (default: one per core) with one thread each
ComeAPI measured 1.27x for its pool of 5 on 8 cores. The ratios are withheld when the
machine was busy (benchmarks/machine.py): each set-up's threads fill every core.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from comeapi.cli.bench import run_parallel
from machine import Load, add_summary_option  # benchmarks/machine.py (the script's folder)

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Write a long story about a lighthouse keeper who finds a map. Once upon a time,"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Launcher:
    """Starts comeapi processes (own process groups, logs in a temporary directory) and
    stops every one of them when the ``with`` block ends."""

    def __init__(self) -> None:
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        self._logs = tempfile.TemporaryDirectory()

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc, _ in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._logs.cleanup()

    def start(self, *args: str) -> None:
        path = Path(self._logs.name) / f"{len(self.procs)}-{args[0]}.log"
        argv = [sys.executable, "-m", "comeapi", *args, "--log-level", "warning"]
        with path.open("wb") as log:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
            )
        self.procs.append((proc, path))

    def check(self) -> None:
        for proc, path in self.procs:
            if proc.poll() is not None:
                raise SystemExit(f"{proc.args} exited:\n{path.read_text()[-2000:]}")


@dataclass
class Setup:
    name: str
    threads: int
    count: int
    gateway: str = ""
    runs: list[float] | None = None


def wait_ready(setups: list[Setup], launcher: Launcher) -> None:
    deadline = time.monotonic() + 300
    for setup in setups:
        while True:
            launcher.check()
            with contextlib.suppress(httpx.HTTPError):
                status = httpx.get(setup.gateway + "/status", timeout=2).json()
                if status["healthy_backends"] == setup.count:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"{setup.name}: backends not healthy after 300 s")
            time.sleep(0.2)


def main() -> None:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--backends", type=int, default=cores, help="pool size (default: cores)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model-dir", default=str(REPO / "models"))
    add_summary_option(parser)
    args = parser.parse_args()
    load = Load(own=float(cores))  # every set-up has as many threads as cores

    setups = [
        Setup("single/all-threads", threads=cores, count=1),
        Setup("single/1-thread", threads=1, count=1),
        Setup(f"pool of {args.backends}", threads=1, count=args.backends),
    ]
    with Launcher() as launcher:
        for setup in setups:
            urls = []
            for _ in range(setup.count):
                port = free_port()
                urls.append(f"http://127.0.0.1:{port}")
                launcher.start(
                    "backend", "--model-dir", args.model_dir, "--port", str(port),
                    "--threads", str(setup.threads), "--ctx", "512",
                )  # fmt: skip
            gateway_port = free_port()
            setup.gateway = f"http://127.0.0.1:{gateway_port}"
            launcher.start(
                "serve", "--port", str(gateway_port), "--health-interval", "2",
                *(arg for url in urls for arg in ("--backend", url)),
            )  # fmt: skip
        wait_ready(setups, launcher)
        for setup in setups:  # warm up: model pages in memory, first-request costs paid
            asyncio.run(run_parallel(setup.gateway, concurrency=setup.count, max_tokens=4))
        for setup in setups:
            setup.runs = []
        for _ in range(args.rounds):
            for setup in setups:
                result = asyncio.run(
                    run_parallel(
                        setup.gateway,
                        concurrency=args.concurrency,
                        max_tokens=args.max_tokens,
                        prompt=PROMPT,
                    )
                )
                if result.failed:
                    raise SystemExit(
                        f"{setup.name}: {result.failed} requests failed: {result.errors}"
                    )
                assert setup.runs is not None
                setup.runs.append(result.tokens_per_second)

    load.finish()
    print(
        f"{args.concurrency} concurrent x {args.max_tokens} tokens, {args.rounds} rounds "
        "(median aggregate tokens/s):"
    )
    medians = {s.name: statistics.median(s.runs or [0.0]) for s in setups}
    for setup in setups:
        runs = ", ".join(f"{r:.1f}" for r in setup.runs or [])
        print(f"  {setup.name:20s} {medians[setup.name]:7.1f} tokens/s   (runs: {runs})")
    all_threads, one_thread, pool = (medians[s.name] for s in setups)
    print(
        load.verdict(
            f"pool / single all-threads: {pool / all_threads:.2f}x, "
            f"pool / single 1-thread: {pool / one_thread:.2f}x"
        )
    )
    load.summarize(
        args.summary,
        name="parallel_throughput",
        what=f"ComeAPI's parallel test, {args.concurrency} concurrent x {args.max_tokens} tokens",
        headline=f"pool of {args.backends} single-thread backends {pool:.1f} tok/s vs one "
        f"backend {all_threads:.1f} tok/s (all threads): **{pool / all_threads:.2f}x** "
        f"(ComeAPI measured 1.27x); {pool / one_thread:.2f}x vs one single-thread backend",
    )


if __name__ == "__main__":
    main()
