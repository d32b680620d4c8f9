"""What one decode step costs by its number of output rows, and with one padding output more.

    .venv/bin/python benchmarks/decode_rows.py [--rows 8] [--steps 16] [--repeats 4]
        [--threads 2] [--model PATH]

In process, no HTTP: one llama.cpp context with ``--rows`` KV streams (the batched
engine's ``NativeModel``), a short prompt in every stream, then decode steps of 1 to
``--rows`` sequences, one token each with its logits, every step undone after it (so all
run at the same positions). Rounds alternate the row counts; the figure is the median step.
Then 3 and 5 sequences with a padding row in the next stream, its logits on and off: what
``DecodeLoop`` does to an odd step (docs/batching.md, "Odd decode steps"), and whether the
real rows' logits stay the same bit for bit.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from comeapi.backend.native import Entry, NativeModel, quiet_llama_logs
from machine import Load  # benchmarks/machine.py (the script's folder)

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "gemma-3-270m-q4_k_m.gguf"
PROMPT_TOKENS = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16, help="steps per row count and round")
    parser.add_argument("--repeats", type=int, default=4, help="rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=str(MODEL))
    args = parser.parse_args()
    load = Load(own=float(args.threads))
    quiet_llama_logs(False)
    model = NativeModel(
        Path(args.model), n_seq=args.rows, ctx=1024, batch_size=128, threads=args.threads
    )
    try:
        for seq in range(args.rows):
            prompt = [Entry(100 + seq + i, i, seq, False) for i in range(PROMPT_TOKENS)]
            assert model.decode(prompt) == 0

        def step(n: int, pad: bool | None = None) -> list[Entry]:
            """n sequences' next tokens; ``pad``: a padding row in the next stream (after
            its prompt, as the engine places one), with (True) or without (False) its logits.
            """
            entries = [Entry(200 + s, PROMPT_TOKENS, s, True) for s in range(n)]
            if pad is not None:
                entries.append(Entry(model.pad_token, PROMPT_TOKENS, n, pad))
            return entries

        def timed(entries: list[Entry]) -> float:
            started = time.perf_counter()
            assert model.decode(entries) == 0
            elapsed = time.perf_counter() - started
            for e in entries:
                model.forget(e.seq, e.pos)
            return elapsed

        cases: dict[str, Callable[[], list[Entry]]] = {
            f"{n} rows": (lambda n=n: step(n)) for n in range(1, args.rows + 1)
        }
        for n in (3, 5):
            if n < args.rows:
                cases[f"{n} rows + padding row, logits off"] = lambda n=n: step(n, False)
                cases[f"{n} rows + padding row, logits on"] = lambda n=n: step(n, True)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, make in cases.items():
                times[name] += [timed(make()) for _ in range(args.steps)]

        def logits(entries: list[Entry], n: int) -> list[list[float]]:
            assert model.decode(entries) == 0
            rows = [model.logits(i).tolist() for i in range(n)]
            for e in entries:
                model.forget(e.seq, e.pos)
            return rows

        same = {n: logits(step(n, True), n) == logits(step(n), n) for n in (3, 5) if n < args.rows}
    finally:
        model.close()
    load.finish()
    print(f"model: {Path(args.model).name}; {args.threads} threads; median of "
          f"{args.repeats} x {args.steps} steps, rounds alternating")  # fmt: skip
    medians = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    for name, ms in medians.items():
        outputs = int(name.split()[0]) + (1 if "logits on" in name else 0)
        print(f"{name:38} {ms:7.2f} ms per step  {ms / outputs:6.2f} ms per output row")
    for n in (3, 5):
        key = f"{n} rows + padding row, logits on"
        if key in medians:
            print(f"{n} rows with one more output / {n} rows: "
                  f"{medians[key] / medians[f'{n} rows']:.2f}; "
                  f"real rows' logits the same bit for bit: {same[n]}")  # fmt: skip


if __name__ == "__main__":
    main()
