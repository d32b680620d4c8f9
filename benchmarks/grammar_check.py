"""What one grammar check costs: llama.cpp's JSON grammar applied to 64, 4,096 and every
token of the bundled model's vocabulary (why the sampler checks a shortlist first).

    .venv/bin/python benchmarks/grammar_check.py [--runs 3]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time
from pathlib import Path

import llama_cpp
import llama_cpp.llama_cpp as lib
import numpy as np
from llama_cpp.llama_grammar import JSON_GBNF

REPO = Path(__file__).resolve().parent.parent
TOKEN_DATA = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default=str(REPO / "models" / "gemma-3-270m-q4_k_m.gguf"))
    args = parser.parse_args()
    print(f"cpus: {os.cpu_count()}  load average at start: {os.getloadavg()[0]:.2f}")
    llama = llama_cpp.Llama(args.model, vocab_only=True, verbose=False)
    vocab, n_vocab = llama._model.vocab, llama.n_vocab()
    grammar = lib.llama_sampler_init_grammar(vocab, JSON_GBNF.encode(), b"root")
    rng = np.random.default_rng(0)
    print("| candidates | one check (median) |\n|---:|---:|")
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
        print(f"| {size:,} | {statistics.median(times) * 1000:.2f} ms |")
    lib.llama_sampler_free(grammar)
    llama.close()


if __name__ == "__main__":
    main()
