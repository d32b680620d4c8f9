"""Single-backend figures: start-up time (process start to /health 200) and single-request
generation speed (tokens/s) on the bundled model.

    .venv/bin/python benchmarks/backend_single.py [--tokens 128] [--runs 3] [-- BACKEND FLAGS]

Everything after ``--`` is passed to ``comeapi backend`` (e.g. ``-- --threads 2``). The
figures are withheld when the machine was busy (benchmarks/machine.py): the backend's
threads are its own load.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from machine import Load, add_summary_option  # benchmarks/machine.py (the script's folder)

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Write a long story about a lighthouse keeper who finds a map. Once upon a time,"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model-dir", default=str(REPO / "models"))
    parser.add_argument("backend_flags", nargs="*")
    add_summary_option(parser)
    args = parser.parse_args()
    load = Load(own=float(backend_threads(args.backend_flags)))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        sys.executable, "-m", "comeapi", "backend",
        "--model-dir", args.model_dir, "--port", str(port), *args.backend_flags,
    ]  # fmt: skip
    with tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            startup = wait_healthy(proc, url, started)
            speeds, first_tokens = [], []
            with httpx.Client(base_url=url, timeout=300) as client:
                client.post("/generate", json={"prompt": "Hi", "max_tokens": 4})  # warm up
                for run in range(args.runs):
                    tps, ttft = measure(client, args.tokens, seed=run)
                    speeds.append(tps)
                    first_tokens.append(ttft)
        finally:
            proc.terminate()
            proc.wait(30)

    load.finish()
    print(f"command: {' '.join(argv[1:])}")
    print(f"start-up (process start -> /health 200): {startup:.2f} s")
    print(
        f"single request, {args.tokens} tokens, {args.runs} runs: "
        f"median {statistics.median(speeds):.1f} tokens/s "
        f"(min {min(speeds):.1f}, max {max(speeds):.1f}); "
        f"median time to first token {statistics.median(first_tokens) * 1000:.0f} ms"
    )
    figures = (
        f"{statistics.median(speeds):.1f} tok/s, first token "
        f"{statistics.median(first_tokens) * 1000:.0f} ms, start-up to `/health` 200 in "
        f"{startup:.2f} s"
    )
    print(load.verdict(figures))
    flags = " ".join(args.backend_flags)
    load.summarize(
        args.summary,
        name="backend_single",
        what=f"one backend, one request of {args.tokens} tokens"
        + (f" (`{flags}`)" if flags else ""),
        headline=figures,
    )


def backend_threads(flags: list[str]) -> int:
    """The threads the backend decodes with: ``--threads N`` among its flags, else every
    CPU (the most its default uses)."""
    for i, flag in enumerate(flags):
        if flag == "--threads" and i + 1 < len(flags):
            return int(flags[i + 1])
        if flag.startswith("--threads="):
            return int(flag.split("=", 1)[1])
    return os.cpu_count() or 1


def wait_healthy(proc: subprocess.Popen[bytes], url: str, started: float) -> float:
    while time.perf_counter() - started < 300:
        if proc.poll() is not None:
            raise SystemExit(f"backend exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.01)
    raise SystemExit("backend not healthy after 300 s")


def measure(client: httpx.Client, tokens: int, seed: int) -> tuple[float, float]:
    """Tokens/s over the whole request (client side), and the time to the first token."""
    body = {"prompt": PROMPT, "max_tokens": tokens, "seed": seed, "stream": True}
    started = time.perf_counter()
    first = 0.0
    usage = None
    with client.stream("POST", "/generate", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            if not first:
                first = time.perf_counter() - started
            if '"done":true' in line:
                usage = httpx.Response(200, content=line[6:]).json()["usage"]
    elapsed = time.perf_counter() - started
    assert usage is not None, "no final chunk"
    return usage["completion_tokens"] / elapsed, first


if __name__ == "__main__":
    main()
