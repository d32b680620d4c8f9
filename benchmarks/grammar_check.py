"""What one grammar check costs: llama.cpp's JSON grammar applied to 64, 4,096 and every
token of the bundled model's vocabulary (why the sampler checks a shortlist first).

    .venv/bin/python benchmarks/grammar_check.py [--runs 3]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from pathlib import Path

import llama_cpp
import llama_cpp.llama_cpp as lib
import numpy as np
from llama_cpp.llama_grammar import JSON_GBNF

from machine import Load, add_summary_option  # benchmarks/machine.py (the script's folder)

REPO = Path(__file__).resolve().parent.parent
TOKEN_DATA = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default=str(REPO / "models" / "gemma-3-270m-q4_k_m.gguf"))
    add_summary_option(parser)
    args = parser.parse_args()
    load = Load(own=1.0)  # one thread checks
    llama = llama_cpp.Llama(args.model, vocab_only=True, verbose=False)
    vocab, n_vocab = llama._model.vocab, llama.n_vocab()
    grammar = lib.llama_sampler_init_grammar(vocab, JSON_GBNF.encode(), b"root")
    rng = np.random.default_rng(0)
    print("| candidates | one check (median) |\n|---:|---:|")
    medians: dict[int, float] = {}
    for size in (64, 4096, n_vocab):
        times = []
        for _ in range(args.runs):
            candidates = np.zeros(size, dtype=TOKEN_DATA)
            candidates["id"] = rng.permutation(n_vocab)[:size]
            array = lib.llama_token_data_array(
                data=candidates.ctypes.data_as(lib.llama_token_data_p),
                size=size,
                selected=-1,
                sorted=False,
            )
            started = time.perf_counter()
            lib.llama_sampler_apply(grammar, ctypes.byref(array))
            times.append(time.perf_counter() - started)
        medians[size] = statistics.median(times)
        print(f"| {size:,} | {medians[size] * 1000:.2f} ms |")
    lib.llama_sampler_free(grammar)
    llama.close()
    load.finish()
    figures = ", ".join(f"{size:,}: {t * 1000:.2f} ms" for size, t in medians.items())
    print(load.verdict(f"one check by candidates, median of {args.runs}: {figures}"))
    load.summarize(
        args.summary,
        name="grammar_check",
        what="one JSON-grammar check by candidate count (64, 4,096, the whole vocabulary)",
        headline=figures,
    )


if __name__ == "__main__":
    main()
