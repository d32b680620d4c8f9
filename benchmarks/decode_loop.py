"""Where a step of the batched engine's decode loop goes, beside llama.cpp's own decode.

    .venv/bin/python benchmarks/decode_loop.py [--baseline-src DIR] [--rounds 3]
        [--concurrency 5] [--max-tokens 128] [--threads 2] [--model PATH] [--greedy]

In process, no HTTP: ``BatchedEngine`` runs ``--concurrency`` streamed completions of
``--max-tokens`` tokens at once (temperature 0.8, top-k 40, top-p 0.95, seeds 0..N-1, as
benchmarks/batching.py asks), consumed by asyncio tasks as the HTTP layer consumes them. Per
generated token it reports the CPU the decode thread spends *outside* ``llama_decode``
(sampling, text, the hand-off: the engine's own per-token work), the CPU of the event loop's
thread (receiving the events), and per step the wall time inside ``llama_decode`` against the
step's whole wall time. CPU time, unlike tokens/s, barely moves with the machine's load.

``--baseline-src`` runs an older checkout's ``src`` beside the current one, rounds
alternating, each in a child process of its own (both are the same package), so a change is
measured before and after in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from batching import PROMPTS  # benchmarks/batching.py: the same five streams
from machine import Load, add_summary_option  # benchmarks/machine.py (the script's folder)

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "gemma-3-270m-q4_k_m.gguf"
TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(tid: int) -> float:
    """User + system CPU seconds of thread ``tid`` of this process (clock ticks: 10 ms)."""
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class DecodeClock:
    """Wraps llama_cpp's ``llama_decode`` to add up the calls' wall and thread-CPU time."""

    def __init__(self) -> None:
        import llama_cpp.llama_cpp as lib

        self.calls = 0
        self.wall = 0.0
        self.cpu = 0.0
        inner = lib.llama_decode

        def timed(ctx: Any, batch: Any) -> int:
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return int(inner(ctx, batch))
            finally:
                self.cpu += time.thread_time() - cpu
                self.wall += time.perf_counter() - wall
                self.calls += 1

        lib.llama_decode = timed


async def measure(args: argparse.Namespace) -> dict[str, float]:
    """One child's figures: the best (least disturbed) of ``--repeats`` rounds."""
    from comeapi.backend.batched import BatchedEngine
    from comeapi.backend.engine import Finished
    from comeapi.protocol.requests import parse_request
    from comeapi.settings import load_settings

    clock = DecodeClock()
    model = Path(args.model)
    settings = load_settings(
        model_dir=model.parent, default_model=model.name, slots=args.concurrency,
        threads=args.threads, ctx=1024, log_level="warning",
    )  # fmt: skip
    engine = BatchedEngine(settings)
    await engine.start()
    decode_tid = next(t.native_id for t in threading.enumerate() if t.name == "comeapi-decode")
    assert decode_tid is not None

    async def stream(i: int, tag: str, max_tokens: int) -> int:
        body: dict[str, Any] = {
            "prompt": f"[{tag}-{i}] {PROMPTS[i % len(PROMPTS)]}", "max_tokens": max_tokens,
            "temperature": 0.0 if args.greedy else 0.8, "top_k": 40, "top_p": 0.95, "seed": i,
            "stream": True,
        }  # fmt: skip
        request = parse_request("completion", body, max_tokens_limit=4096)
        async for event in engine.generate(request, model.name):
            if isinstance(event, Finished):
                return event.usage.completion_tokens
        raise RuntimeError("no Finished event")

    async def one_round(tag: str, max_tokens: int) -> dict[str, float]:
        calls, wall_in, cpu_in = clock.calls, clock.wall, clock.cpu
        decode_cpu, loop_cpu = thread_cpu(decode_tid), time.thread_time()
        started = time.perf_counter()
        tokens = sum(
            await asyncio.gather(*(stream(i, tag, max_tokens) for i in range(args.concurrency)))
        )
        wall = time.perf_counter() - started
        outside = thread_cpu(decode_tid) - decode_cpu - (clock.cpu - cpu_in)
        steps = max(1, clock.calls - calls)
        return {
            "tokens": tokens,
            "tok_s": tokens / wall,
            "step_ms": wall / steps * 1e3,
            "decode_ms": (clock.wall - wall_in) / steps * 1e3,
            "engine_us": outside / tokens * 1e6,
            "loop_us": (time.thread_time() - loop_cpu) / tokens * 1e6,
        }

    try:
        await one_round("warmup", 4)
        rounds = [await one_round(f"r{r}", args.max_tokens) for r in range(args.repeats)]
    finally:
        await engine.close()
    # Least disturbed: the round whose engine CPU per token is lowest.
    return min(rounds, key=lambda r: r["engine_us"] + r["loop_us"])


def child_run(src: Path, args: argparse.Namespace) -> dict[str, float]:
    argv = [
        sys.executable, __file__, "--child", "--model", args.model,
        "--concurrency", str(args.concurrency), "--max-tokens", str(args.max_tokens),
        "--threads", str(args.threads), "--repeats", str(args.repeats),
        *(["--greedy"] if args.greedy else []),
    ]  # fmt: skip
    out = subprocess.run(
        argv,
        env={**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{Path(__file__).parent}"},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if out.returncode != 0:
        raise SystemExit(f"{src}: exit {out.returncode}\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=3, help="alternating child processes")
    parser.add_argument("--repeats", type=int, default=2, help="rounds inside each child")
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--greedy", action="store_true", help="temperature 0 instead of 0.8")
    parser.add_argument("--baseline-src", type=Path, help="an older checkout's src directory")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    add_summary_option(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(measure(args))))
        return

    load = Load(own=float(args.threads))
    versions = {"current": REPO / "src"}
    if args.baseline_src is not None:
        versions["baseline"] = args.baseline_src.resolve()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in versions}
    for _ in range(args.rounds):
        for name, src in versions.items():
            load.between_rounds()
            runs[name].append(child_run(src, args))
    load.finish()
    print(
        f"{args.concurrency} streams x {args.max_tokens} tokens, "
        f"{'greedy' if args.greedy else 'temperature 0.8'}, {args.threads} threads; "
        f"medians of {args.rounds} children (each the best of {args.repeats} rounds)"
    )
    print(
        f"  {'':8} {'engine CPU':>11} {'loop CPU':>9} {'step':>8} {'in decode':>10} "
        f"{'tok/s':>7}   (CPU per token, wall per step)"
    )
    medians: dict[str, dict[str, float]] = {}
    for name, values in runs.items():
        m = {k: statistics.median(v[k] for v in values) for k in values[0]}
        medians[name] = m
        print(
            f"  {name:8} {m['engine_us']:8.0f} us {m['loop_us']:6.0f} us {m['step_ms']:5.1f} ms "
            f"{m['decode_ms']:7.1f} ms {m['tok_s']:7.1f}"
        )
    current = medians["current"]
    headline = (
        f"per token: engine {current['engine_us']:.0f} us + event loop "
        f"{current['loop_us']:.0f} us CPU; per step {current['decode_ms']:.1f} of "
        f"{current['step_ms']:.1f} ms in llama_decode"
    )
    if "baseline" in medians:
        base = medians["baseline"]
        before = base["engine_us"] + base["loop_us"]
        after = current["engine_us"] + current["loop_us"]
        headline += f"; engine + loop CPU {after / before:.2f}x the baseline's {before:.0f} us"
    print(load.verdict(headline))
    load.summarize(
        args.summary,
        name="decode_loop",
        what=f"the batched engine's per-token CPU outside llama_decode, {args.concurrency} "
        f"streams x {args.max_tokens} tokens in process",
        headline=headline,
    )


if __name__ == "__main__":
    main()
