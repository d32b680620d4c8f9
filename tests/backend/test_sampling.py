"""The shared sampler with the bundled model's real vocabulary: bias, penalties (OpenAI's
formula), grammars (the shortlist gives what a whole-vocabulary check gives), log
probabilities; on a context's logits row it picks what it picks from the same logits copied."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest

from comeapi.backend import sampling
from comeapi.backend.native import Entry, NativeModel
from comeapi.backend.sampling import LogprobReader, Sampler, SamplingParams, grammar_for
from comeapi.errors import RequestError
from comeapi.protocol.requests import ResponseFormat
from tests.helpers import BUNDLED_MODEL


@pytest.fixture(scope="module")
def llama(model_dir: Path) -> Iterator[llama_cpp.Llama]:
    llama = llama_cpp.Llama(str(model_dir / BUNDLED_MODEL), vocab_only=True, verbose=False)
    yield llama
    llama.close()


def make(llama: llama_cpp.Llama, **fields: Any) -> Sampler:
    params = {"temperature": 0.0, "top_k": 40, "top_p": 1.0, "seed": 1, **fields}
    return Sampler(llama._model.vocab, llama.n_vocab(), SamplingParams(**params))


def is_eog(llama: llama_cpp.Llama) -> Any:
    return lambda token: bool(llama_cpp.llama_vocab_is_eog(llama._model.vocab, token))


def logits(llama: llama_cpp.Llama, seed: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.random.default_rng(seed).normal(0, 3, llama.n_vocab()).astype(np.float32)


def test_greedy_bias_and_penalties(llama: llama_cpp.Llama) -> None:
    row = logits(llama, 0)
    best = int(np.argmax(row))
    assert make(llama).sample(row, is_eog(llama)) == best
    banned = make(llama, logit_bias=((best, -100.0),)).sample(row, is_eog(llama))
    assert banned != best and banned == int(np.argsort(row)[-2])
    penalised = make(llama, frequency_penalty=2.0, presence_penalty=2.0)
    first = penalised.sample(row, is_eog(llama))
    assert first == best  # nothing generated yet: nothing to penalise
    # best - 4 ranks below the runner-up once generated (the gap is under 4 here).
    gap = float(row[best] - np.sort(row)[-2])
    assert gap < 4.0
    assert penalised.sample(row, is_eog(llama)) != best


def test_bias_and_penalties_follow_openais_formula(llama: llama_cpp.Llama) -> None:
    """Greedy over fresh random logits each step: the token is the argmax of the logits plus
    the bias, less count x frequency_penalty + presence_penalty for every token generated."""
    bias = {100: -1.0, 500: 0.0, 900: 1.0}
    params = {"logit_bias": tuple(bias.items()), "frequency_penalty": 1.5}
    sampler = make(llama, presence_penalty=0.7, **params)
    counts: dict[int, int] = {}
    hot = np.zeros(llama.n_vocab(), dtype=np.float32)
    hot[list(bias)] = 30.0  # the biased tokens stay the likeliest, so they repeat
    for step in range(10):
        row = logits(llama, 100 + step) + hot
        expected = row.astype(np.float64)
        for token, value in bias.items():
            expected[token] += value
        for token, count in counts.items():
            expected[token] -= count * 1.5 + 0.7
        token = sampler.sample(row, is_eog(llama))
        assert token == int(np.argmax(expected)), f"step {step}"
        counts[token] = counts.get(token, 0) + 1
    assert max(counts.values()) >= 2  # the penalties had something to count
    sampler.close()


@pytest.fixture(scope="module")
def native(model_dir: Path) -> Iterator[NativeModel]:
    model = NativeModel(model_dir / BUNDLED_MODEL, n_seq=2, ctx=128, batch_size=128, threads=2)
    yield model
    model.close()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_context_row_samples_what_its_copy_in_numpy_samples(
    native: NativeModel, temperature: float
) -> None:
    """``sample_at`` (the chain over llama.cpp's row, in C) and ``sample`` (the row copied
    into numpy) are the same sampler: same tokens step after step, seeded, with bias and
    penalties that count what was generated."""
    tokenizer = native.tokenizer
    params = SamplingParams(
        temperature=temperature, top_k=40, top_p=0.95, seed=7,
        logit_bias=((tokenizer.tokenize(b" the", add_bos=False)[0], 2.0),),
        presence_penalty=0.5, frequency_penalty=0.5,
    )  # fmt: skip
    in_c, in_numpy = (Sampler(tokenizer.vocab, tokenizer.n_vocab, params) for _ in range(2))
    prompt = tokenizer.tokenize(b"Once upon a time, in a land far away,", add_bos=True)
    native.forget(0)
    assert native.decode([Entry(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)]) == 0
    index, tokens = len(prompt) - 1, []
    for pos in range(len(prompt), len(prompt) + 12):
        copied = native.logits(index).copy()
        token = in_c.sample_at(native.ctx, index, tokenizer.is_eog)
        assert np.array_equal(native.logits(index), copied)  # penalised in place, put back
        assert in_numpy.sample(copied, tokenizer.is_eog) == token
        tokens.append(token)
        assert native.decode([Entry(token, pos, 0, True)]) == 0
        index = 0
    assert len(set(tokens)) > 3  # a real continuation, not one token over and over
    in_c.close(), in_numpy.close()


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_the_grammar_shortlist_samples_what_a_whole_vocabulary_check_does(
    llama: llama_cpp.Llama, temperature: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    grammar = grammar_for(ResponseFormat("json_object"))
    quick = make(llama, temperature=temperature, grammar=grammar)
    monkeypatch.setattr(sampling, "_GRAMMAR_SHORTLISTS", ())  # every step checks everything
    thorough = make(llama, temperature=temperature, grammar=grammar)
    text = b""
    for step in range(12):
        row = logits(llama, step)
        token = quick.sample(row, is_eog(llama))
        assert thorough.sample(row, is_eog(llama)) == token
        text += llama.detokenize([token])
    assert text.lstrip().startswith(b"{")  # random logits, yet the grammar holds


def test_a_schema_the_converter_cannot_take_is_a_400() -> None:
    # As the request parser builds it: the param names where the schema was.
    bad = ResponseFormat(
        "json_schema", {"type": "wizard"}, "x", param="response_format.json_schema.schema"
    )
    with pytest.raises(RequestError) as info:
        grammar_for(bad)
    assert info.value.param == "response_format.json_schema.schema"
    assert grammar_for(None) is None


def test_logprobs_are_a_log_softmax_with_sorted_alternatives(llama: llama_cpp.Llama) -> None:
    row = logits(llama, 3)
    reader = LogprobReader(lambda t: bytes(llama.detokenize([t], special=True)), top=5)
    token = int(np.argsort(row)[-3])
    entry = reader.read(row, token)
    z = np.exp(row.astype(np.float64) - row.max()).sum()
    assert entry.logprob == pytest.approx(float(row[token] - row.max()) - math.log(z), abs=1e-5)
    assert [t for t, _, _ in entry.top][2] == entry.token  # the third most likely
    values = [lp for _, _, lp in entry.top]
    assert values == sorted(values, reverse=True) and len(values) == 5
    assert sum(math.exp(v) for v in values) < 1
    assert all(raw.decode("utf-8", errors="replace") == t for t, raw, _ in entry.top)
