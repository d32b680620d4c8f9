"""Shared-prefix reuse: time to first token of a chat whose ~400-token system prompt an
earlier request already computed, against the same request with a system prompt nobody
computed before (same length), on both engines in one run.

    .venv/bin/python benchmarks/prefix_reuse.py [--rounds 2] [--requests 5] [--threads 1]

Each engine is one `comeapi backend` (`--slots 1`: serial; `--slots 3`: batched). A round is
a block of requests sharing the system prompt (the first one computes it and is not counted),
then a block whose system prompts each start with their own tag (nothing to reuse). The
ratio is median(shared) / median(unshared); goal <= 0.3. The load average is printed at the
start and the end; the ratios are withheld when the machine was busy (benchmarks/machine.py;
the backend's --threads are the run's own load).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from machine import Load, add_summary_option  # benchmarks/machine.py (the script's folder)

REPO = Path(__file__).resolve().parent.parent
MODEL = "gemma-3-270m-q4_k_m.gguf"
RULES = " ".join(f"Rule {i}: answer item {i} with care and {i * 3} words." for i in range(23))
QUESTIONS = [
    "What is the capital of France?",
    "Name a red fruit.",
    "How many legs has a spider?",
    "What colour is the sky?",
    "Which planet is the largest?",
    "What do bees make?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def first_token(client: httpx.Client, system: str, question: str) -> tuple[float, int]:
    """Seconds to the first streamed text, and the prompt's tokens."""
    body = {
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    ttft = 0.0
    prompt_tokens = 0
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk: dict[str, Any] = orjson.loads(line[6:])
            if not ttft and any(c["delta"].get("content") for c in chunk["choices"]):
                ttft = time.perf_counter() - started
            if chunk.get("usage"):
                prompt_tokens = chunk["usage"]["prompt_tokens"]
    return ttft, prompt_tokens


def measure(url: str, rounds: int, requests: int) -> tuple[list[float], list[float], int]:
    shared: list[float] = []
    unshared: list[float] = []
    tokens = 0
    system = "You are a careful assistant. " + RULES
    with httpx.Client(base_url=url, timeout=600) as client:
        first_token(client, "Warm-up.", "Hi")
        for r in range(rounds):
            first_token(client, system, "Hello!")  # computes the shared prefix: not counted
            for i in range(requests):
                ttft, tokens = first_token(client, system, QUESTIONS[i % len(QUESTIONS)])
                shared.append(ttft)
            for i in range(requests):
                tag = f"Session {r:02d}{i:02d}. You are a careful assistant. "
                ttft, _ = first_token(client, tag + RULES, QUESTIONS[i % len(QUESTIONS)])
                unshared.append(ttft)
    return shared, unshared, tokens


def run_engine(args: argparse.Namespace, slots: int) -> tuple[list[float], list[float], int]:
    port = free_port()
    argv = [
        sys.executable, "-m", "comeapi", "backend", "--model-dir", args.model_dir,
        "--port", str(port), "--slots", str(slots), "--threads", str(args.threads),
        "--ctx", "1024",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    sys.exit(f"backend did not start:\n{log.read().decode()[-2000:]}")
                time.sleep(0.2)
            return measure(url, args.rounds, args.requests)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model-dir", default=str(REPO / "models"))
    add_summary_option(parser)
    args = parser.parse_args()
    load = Load(own=float(args.threads))
    results = {}
    for name, slots in (("serial (--slots 1)", 1), ("batched (--slots 3)", 3)):
        results[name] = run_engine(args, slots)
    load.finish()
    print("\n| engine | prompt tokens | first token, shared prefix | unshared | ratio |")
    print("|---|---:|---:|---:|---:|")
    ratios = []
    for name, (shared, unshared, tokens) in results.items():
        a, b = statistics.median(shared), statistics.median(unshared)
        ratio = f"{a / b:.2f}" if load.quiet else "withheld (load)"
        print(f"| {name} | {tokens} | {a * 1000:.0f} ms | {b * 1000:.0f} ms | {ratio} |")
        ratios.append(f"{name.split()[0]} {a * 1000:.0f} vs {b * 1000:.0f} ms, **{a / b:.2f}**")
    figures = "; ".join(ratios) + " (goal <= 0.3)"
    print("\n" + load.verdict(figures.replace("**", "")))
    load.summarize(
        args.summary,
        name="prefix_reuse",
        what="time to first token with a ~400-token shared system prompt already computed vs "
        "one nobody computed (serial and batched engines)",
        headline=figures,
    )


if __name__ == "__main__":
    main()
