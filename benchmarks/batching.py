"""Continuous batching against the alternatives: N concurrent streams of T tokens each,
aggregate tokens/s and p50 time to first token, measured side by side in one run.

    .venv/bin/python benchmarks/batching.py [--llama-server PATH] [--rounds 3]
        [--concurrency 5] [--max-tokens 128] [--threads 2] [--model PATH] [--only abcd]

(a) comeapi backend --slots N     one model copy, continuous batching (BatchedEngine)
(b) comeapi serve over single-slot backends, one thread each (ComeAPI's design): as many
    backends as --threads (2 on a 2-core machine)
(c) python -m llama_cpp.server    llama-cpp-python's server (skipped if its extras are missing:
    pip install 'llama-cpp-python[server]==0.3.36')
(d) llama-server -np N            llama.cpp's C++ server, built separately (skipped unless
    --llama-server PATH or $LLAMA_SERVER names the binary; `make llama-server` builds one)

Every set-up gets the same model, context per request, thread budget and requests (OpenAI
/v1/completions, stream, temperature 0.8, seed i). Each request starts with a unique tag so
no server can reuse a cached prompt. Rounds are interleaved (a b c d, a b c d, ...) so a
burst of load on a shared machine hits every set-up alike; the table shows the median round
and the best round of each set-up, and the ratios of both. They are withheld when other
processes kept the machine busy, judged before the run and over each round, the benchmark's
own servers and streams left out (benchmarks/machine.py). ``--model`` is any GGUF file: (a)
and (b) serve it as their directory's default model.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
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
from typing import Any

import httpx
import orjson

from machine import Load, add_summary_option  # benchmarks/machine.py (the script's folder)

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "gemma-3-270m-q4_k_m.gguf"
PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a map. Once upon a time,",
    "The history of the printing press begins",
    "Here is a detailed recipe for a vegetable soup. First,",
    "Dear diary, today was the strangest day of my life because",
    "The old train station at the edge of town was",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Setup:
    key: str
    name: str
    url: str
    ready_path: str
    commands: list[list[str]] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    skipped: str = ""
    healthy_backends: int = 0  # for the balancer: wait until its backends are healthy


class Servers:
    """Starts every server in its own session, logs to a temporary directory, and stops
    them all (the whole process group, by PID) when the block ends."""

    def __init__(self) -> None:
        self._logs = tempfile.TemporaryDirectory(prefix="batching-bench-")
        self._all: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, setup: Setup, argv: list[str]) -> subprocess.Popen[bytes]:
        log = Path(self._logs.name) / f"{setup.key}-{len(self._all)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=REPO, start_new_session=True,
            )  # fmt: skip
        setup.commands.append(argv)
        setup.procs.append(proc)
        self._all.append((proc, log))
        return proc

    def check(self) -> None:
        for proc, log in self._all:
            if proc.poll() is not None:
                raise SystemExit(f"{proc.args} exited:\n{log.read_text(errors='replace')[-3000:]}")

    @contextlib.contextmanager
    def running(self) -> Iterator[Servers]:
        try:
            yield self
        finally:
            for proc, _ in self._all:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc, _ in self._all:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            self._logs.cleanup()


def comeapi(*args: str) -> list[str]:
    return [sys.executable, "-m", "comeapi", *args, "--log-level", "warning"]


def start_setups(args: argparse.Namespace, servers: Servers) -> list[Setup]:
    n, threads, ctx = args.concurrency, args.threads, str(args.ctx)
    model_dir, model = str(Path(args.model).parent), Path(args.model).name
    setups = []

    port = free_port()
    a = Setup("a", f"comeapi backend --slots {n}", f"http://127.0.0.1:{port}", "/health")
    if a.key in args.only:
        servers.start(a, comeapi(
            "backend", "--model-dir", model_dir, "--default-model", model, "--port", str(port),
            "--slots", str(n), "--threads", str(threads), "--ctx", ctx,
        ))  # fmt: skip
    setups.append(a)

    port = free_port()
    b = Setup("b", f"comeapi serve, {threads} backends x 1 thread", f"http://127.0.0.1:{port}",
              "/status", healthy_backends=threads)  # fmt: skip
    if b.key in args.only:
        backend_urls = []
        for _ in range(threads):
            backend_port = free_port()
            backend_urls.append(f"http://127.0.0.1:{backend_port}")
            servers.start(b, comeapi(
                "backend", "--model-dir", model_dir, "--default-model", model,
                "--port", str(backend_port), "--slots", "1", "--threads", "1", "--ctx", ctx,
            ))  # fmt: skip
        servers.start(b, comeapi(
            "serve", "--port", str(port), "--health-interval", "2", "--queue-size", str(4 * n),
            *(arg for url in backend_urls for arg in ("--backend", url)),
        ))  # fmt: skip
    setups.append(b)

    port = free_port()
    c = Setup("c", "python -m llama_cpp.server", f"http://127.0.0.1:{port}", "/v1/models")
    if c.key not in args.only:
        pass
    elif importlib.util.find_spec("fastapi") is None:
        c.skipped = "llama_cpp.server's extras are not installed (make bench installs them)"
    else:
        servers.start(c, [
            sys.executable, "-m", "llama_cpp.server", "--model", args.model,
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", ctx,
            "--n_threads", str(threads), "--n_threads_batch", str(threads),
            # By default a new request interrupts the running stream: queue them instead.
            "--interrupt_requests", "False",
        ])  # fmt: skip
    setups.append(c)

    port = free_port()
    d = Setup("d", f"llama-server -np {n}", f"http://127.0.0.1:{port}", "/health")
    if d.key not in args.only:
        pass
    elif not args.llama_server or not Path(args.llama_server).is_file():
        d.skipped = "no llama-server binary (--llama-server PATH, $LLAMA_SERVER; make llama-server)"
    else:
        servers.start(d, [
            args.llama_server, "-m", args.model, "--host", "127.0.0.1", "--port", str(port),
            "-np", str(n), "-c", str(n * args.ctx), "-t", str(threads), "-tb", str(threads),
        ])  # fmt: skip
    setups.append(d)
    for setup in setups:
        if setup.key not in args.only:
            setup.skipped = "left out (--only)"
    return setups


def wait_ready(setups: list[Setup], servers: Servers) -> None:
    deadline = time.monotonic() + 300
    for setup in (s for s in setups if not s.skipped):
        while True:
            servers.check()
            with contextlib.suppress(httpx.HTTPError, ValueError):
                r = httpx.get(setup.url + setup.ready_path, timeout=2)
                healthy = r.json().get("healthy_backends", 0) if setup.healthy_backends else 0
                if r.status_code == 200 and healthy >= setup.healthy_backends:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"{setup.name} not ready after 300 s")
            time.sleep(0.2)


async def one_stream(
    client: httpx.AsyncClient, url: str, prompt: str, seed: int, max_tokens: int
) -> tuple[int, float]:
    """(completion tokens, seconds to the first text) of one streamed completion."""
    body = {
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "top_k": 40,
        "top_p": 0.95, "seed": seed, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    started = time.perf_counter()
    first = 0.0
    chunks = 0
    usage: int | None = None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"{url}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event: dict[str, Any] = orjson.loads(line[6:])
            if "error" in event:
                raise SystemExit(f"{url}: {event['error']}")
            if event.get("usage"):
                usage = int(event["usage"]["completion_tokens"])
            if any(choice.get("text") for choice in event.get("choices") or []):
                chunks += 1
                first = first or time.perf_counter() - started
    # usage when the server reports it; else one chunk per token (llama_cpp.server).
    return (usage if usage is not None else chunks), first


async def run_round(setup: Setup, args: argparse.Namespace, tag: str) -> None:
    n = args.concurrency
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=n)) as client:
        started = time.perf_counter()
        gathered = asyncio.gather(*(
            one_stream(client, setup.url, f"[{tag}-{i}] {PROMPTS[i % len(PROMPTS)]}", i,
                       args.max_tokens)
            for i in range(n)
        ))  # fmt: skip
        try:
            results = await gathered
        except httpx.HTTPError as exc:
            raise SystemExit(f"({setup.key}) {setup.name}: {type(exc).__name__}: {exc}") from exc
        elapsed = time.perf_counter() - started
    tokens = sum(t for t, _ in results)
    setup.tokens.append(tokens)
    setup.rates.append(tokens / elapsed)
    setup.ttfts.extend(first for _, first in results)


def peak_rss_mb(procs: list[subprocess.Popen[bytes]]) -> float:
    """Sum of the processes' peak resident sets (VmHWM)."""
    total = 0
    for proc in procs:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--ctx", type=int, default=1024, help="context per request")
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER", ""))
    parser.add_argument("--only", default="abcd", help="the set-ups to run, e.g. ad")
    add_summary_option(parser)
    args = parser.parse_args()
    load = Load(own=float(args.threads))  # judged before anything starts

    servers = Servers()
    with servers.running():
        setups = start_setups(args, servers)
        wait_ready(setups, servers)
        live = [s for s in setups if not s.skipped]
        for setup in live:  # warm-up: model pages in memory, first-request costs paid
            asyncio.run(run_round(setup, argparse.Namespace(**{**vars(args), "max_tokens": 4}),
                                  "warmup"))  # fmt: skip
            setup.rates.clear(), setup.ttfts.clear(), setup.tokens.clear()
        load.between_rounds()  # start-up and warm-up: a stretch of their own
        for round_no in range(args.rounds):
            for setup in live:
                asyncio.run(run_round(setup, args, f"r{round_no}{setup.key}"))
                load.between_rounds()
        rss = {s.key: peak_rss_mb(s.procs) for s in live}
        load.finish()
        report(setups, args, rss, load)


def report(setups: list[Setup], args: argparse.Namespace, rss: dict[str, float],
           load: Load) -> None:  # fmt: skip
    model_mb = Path(args.model).stat().st_size / 2**20
    print(f"model: {model_mb:.0f} MB")
    print(f"{args.concurrency} concurrent streams x {args.max_tokens} tokens, {args.rounds} "
          f"interleaved rounds, medians; {args.threads} threads per set-up")  # fmt: skip
    header = f"{'set-up':42s} {'tok/s':>7s} {'best':>7s} {'p50 TTFT':>9s} {'tokens':>7s}"
    print(f"{header} {'peak RSS':>9s}")
    medians: dict[str, float] = {}
    bests: dict[str, float] = {}
    for s in setups:
        label = f"({s.key}) {s.name}"
        if s.skipped:
            print(f"{label:42s} skipped: {s.skipped}")
            continue
        medians[s.key], bests[s.key] = statistics.median(s.rates), max(s.rates)
        ttft = statistics.median(s.ttfts)
        tokens = statistics.median(s.tokens)
        print(f"{label:42s} {medians[s.key]:7.1f} {bests[s.key]:7.1f} {ttft * 1000:7.0f}ms "
              f"{tokens:7.0f} {rss[s.key]:6.0f} MB   rounds: "
              f"{', '.join(f'{r:.1f}' for r in s.rates)}")  # fmt: skip
    by_key = {s.key: s for s in setups}
    for other, goal in (("d", 1.0), ("b", 1.5)):
        if "a" in medians and other in medians:
            ratios = (
                f"(a)/({other}) = {medians['a'] / medians[other]:.2f} median, "
                f"{paired(by_key['a'], by_key[other]):.2f} paired by round, "
                f"{bests['a'] / bests[other]:.2f} best  (goal >= {goal})"
            )
            if other == "d":
                ttft_a, ttft_d = (statistics.median(by_key[k].ttfts) * 1000 for k in "ad")
                ratios += f"; p50 first token (a) {ttft_a:.0f} ms vs (d) {ttft_d:.0f} ms"
                ratios += " (goal: (a) <= (d))"
            print(load.verdict(ratios))
    if "a" in rss:
        print(f"peak RSS of (a): {rss['a']:.0f} MB = {rss['a'] / model_mb:.2f} x the model file")
    print("commands:")
    for s in setups:
        for argv in s.commands:
            shown = [Path(a).name if a == sys.executable else a for a in argv]
            print(f"  ({s.key}) {' '.join(shown)}")
    load.summarize(
        args.summary,
        name="batching",
        what=f"continuous batching, {args.concurrency} concurrent x {args.max_tokens} tokens: "
        f"(a) `backend --slots {args.concurrency}`, (b) balancer over {args.threads} "
        f"single-slot backends, (c) `llama_cpp.server`, (d) `llama-server -np {args.concurrency}`",
        headline=headline(setups, medians, rss),
        notes="; ".join(f"({s.key}) not run: {s.skipped}" for s in setups if s.skipped),
    )


def paired(a: Setup, other: Setup) -> float:
    """The median of the rounds' ratios: rounds run back to back, so each pair met the same
    moment of the machine."""
    return statistics.median(x / y for x, y in zip(a.rates, other.rates, strict=True))


def headline(setups: list[Setup], medians: dict[str, float], rss: dict[str, float]) -> str:
    """The median tokens/s of each set-up that ran, (a)'s ratios against (d) and (b), first
    token and memory of (a) against (b)."""
    rates = ", ".join(f"({s.key}) {medians[s.key]:.1f}" for s in setups if s.key in medians)
    parts = [f"{rates} tok/s"]
    for other, goal, bold in (("d", 1.0, "**"), ("b", 1.5, "")):
        if "a" in medians and other in medians:
            ratio = medians["a"] / medians[other]
            parts.append(f"{bold}(a)/({other}) {ratio:.2f}{bold} (goal >= {goal})")
    ttft = {s.key: statistics.median(s.ttfts) for s in setups if s.ttfts}
    if "a" in ttft and "d" in ttft:
        parts.append(
            f"p50 first token (a) {ttft['a'] * 1000:.0f} ms vs (d) {ttft['d'] * 1000:.0f} ms"
        )
    if "a" in ttft and "b" in ttft:
        parts.append(f"p50 first token (a) {ttft['a'] * 1000:.0f} ms vs (b) {ttft['b']:.1f} s")
    if "a" in rss and "b" in rss:
        parts.append(f"peak RSS (a) {rss['a']:.0f} MB vs (b) {rss['b']:.0f} MB")
    return "; ".join(parts)


if __name__ == "__main__":
    main()
