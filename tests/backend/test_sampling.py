"""The shared sampler with the bundled model's real vocabulary: bias, penalties, grammars
(the shortlist gives what a whole-vocabulary check gives), log probabilities."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest

from comeapi.backend import sampling
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
    bad = ResponseFormat("json_schema", {"type": "wizard"}, "x")
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
