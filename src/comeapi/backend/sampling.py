"""Choosing each next token, the same way in both engines, and the log probabilities of it.

A ``Sampler`` is one choice's: logit bias and presence/frequency penalties (numpy, over the
whole vocabulary), the model's special tokens masked out (``comeapi.backend.vocab``), an
optional grammar (JSON mode, JSON schemas), then llama.cpp's chain (greedy at temperature 0,
else top-k, top-p, min-p, temperature and a seeded draw).
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import llama_cpp.llama_cpp as lib
import numpy as np
import numpy.typing as npt
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from comeapi.backend.vocab import TokenIds, token_text
from comeapi.errors import RequestError
from comeapi.protocol.requests import GenerationRequest, ResponseFormat
from comeapi.protocol.responses import TokenLogprob

Logits = npt.NDArray[np.float32]

# min_p as llama-cpp-python's Llama.generate() applies it.
MIN_P = 0.05
# llama.cpp draws a random seed for this value; seeds are folded below it.
_SEED_SPAN = lib.LLAMA_DEFAULT_SEED
_TOKEN_DATA = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)
# One grammar check costs 91 ms over Gemma 3's 262,144 tokens on this machine, 1.7 ms over
# 4,096 and 0.09 ms over 64 (benchmarks/grammar_check.py): the most likely candidates are
# checked first, the whole vocabulary only when too few of them are allowed
# (tests/backend/test_sampling.py: the same tokens as a whole-vocabulary check).
_GRAMMAR_SHORTLISTS = (64, 4096)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """What one choice's sampler does. ``seed`` is this choice's own."""

    temperature: float
    top_k: int
    top_p: float
    seed: int
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    grammar: str | None = None

    @classmethod
    def of(cls, request: GenerationRequest, index: int, grammar: str | None) -> SamplingParams:
        """Choice ``index``'s parameters: a seeded request's choice i draws with seed + i."""
        seed = random.getrandbits(32) if request.seed is None else request.seed + index
        return cls(
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            seed=seed % _SEED_SPAN,
            logit_bias=request.logit_bias,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            grammar=grammar,
        )


def grammar_for(response_format: ResponseFormat | None) -> str | None:
    """The GBNF grammar for a ``response_format`` (llama.cpp's JSON grammar, or its
    JSON-schema converter's output), or None for free text."""
    if response_format is None:
        return None
    if response_format.type == "json_object" or response_format.schema is None:
        return JSON_GBNF
    try:
        return str(json_schema_to_gbnf(json.dumps(response_format.schema)))
    except Exception as exc:  # the converter raises bare exceptions for what it cannot do
        raise RequestError(
            f"response_format.json_schema.schema: cannot be turned into a grammar: {exc}",
            param="response_format.json_schema.schema",
        ) from None


def check_sampling(
    vocab: Any, n_vocab: int, params: SamplingParams, special: TokenIds | None = None
) -> None:
    """RequestError (400) for what a sampler could not take: token ids outside the
    vocabulary, a positive bias on a special token (never sampled: the bias could not do
    what it asks), a grammar llama.cpp cannot parse."""
    never = set(special.tolist()) if special is not None and params.logit_bias else set()
    for token, bias in params.logit_bias:
        if token >= n_vocab:
            raise RequestError(
                f"logit_bias: token {token} is not in this model's vocabulary of {n_vocab}",
                param="logit_bias",
            )
        if bias > 0 and token in never:
            raise RequestError(
                f"logit_bias: token {token} ({token_text(vocab, token)}) is a special token, "
                "which comeapi never generates",
                param="logit_bias",
            )
    if params.grammar is not None:
        lib.llama_sampler_free(_grammar(vocab, params.grammar))


class Sampler:
    """Samples one choice's tokens from logits (a numpy view of llama.cpp's row)."""

    def __init__(
        self, vocab: Any, n_vocab: int, params: SamplingParams, special: TokenIds | None = None
    ):
        self._params = params
        # Masked after the bias and penalties: nothing a request sends brings them back.
        self._special = special if special is not None else np.empty(0, dtype=np.intp)
        self._cur = np.empty(n_vocab, dtype=_TOKEN_DATA)
        self._ids = _ids(n_vocab)
        self._bias_ids = np.array([t for t, _ in params.logit_bias], dtype=np.intp)
        self._bias = np.array([b for _, b in params.logit_bias], dtype=np.float32)
        self._penalised = params.presence_penalty != 0 or params.frequency_penalty != 0
        self._counts: Counter[int] = Counter()
        self._greedy = params.temperature == 0
        # How many allowed candidates the chain looks at: top-k (1 when greedy), or all.
        self._needed = 1 if self._greedy else params.top_k
        self._chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        self._grammar = _grammar(vocab, params.grammar) if params.grammar is not None else None
        add = functools.partial(lib.llama_sampler_chain_add, self._chain)
        if self._greedy:
            add(lib.llama_sampler_init_greedy())
        else:
            add(lib.llama_sampler_init_top_k(params.top_k))
            add(lib.llama_sampler_init_top_p(params.top_p, 1))
            add(lib.llama_sampler_init_min_p(MIN_P, 1))
            add(lib.llama_sampler_init_temp(params.temperature))
            add(lib.llama_sampler_init_dist(params.seed))

    def sample(self, logits: Logits, is_eog: Callable[[int], bool]) -> int:
        """The next token. The grammar (if any) moves on with it unless it ends generation."""
        cur = self._cur
        cur["id"] = self._ids
        cur["logit"] = logits
        cur["p"] = 0.0
        if len(self._bias_ids):
            cur["logit"][self._bias_ids] += self._bias
        if self._counts:
            ids = np.fromiter(self._counts.keys(), dtype=np.intp, count=len(self._counts))
            counts = np.fromiter(self._counts.values(), dtype=np.float32, count=len(ids))
            p = self._params
            cur["logit"][ids] -= counts * p.frequency_penalty + p.presence_penalty
        if len(self._special):
            cur["logit"][self._special] = -np.inf
        token = self._apply(self._chain, cur) if self._grammar is None else self._constrained()
        if self._penalised:
            self._counts[token] += 1
        if self._grammar is not None and not is_eog(token):
            lib.llama_sampler_accept(self._grammar, token)
        return token

    def close(self) -> None:
        for sampler in (self._chain, self._grammar):
            if sampler is not None:
                lib.llama_sampler_free(sampler)
        self._chain = self._grammar = None

    def _constrained(self) -> int:
        """Sample among the tokens the grammar allows (the chain sees exactly the
        candidates it would see after checking the whole vocabulary)."""
        cur = self._cur
        if self._greedy:
            best = int(np.argmax(cur["logit"]))
            if self._allowed(cur[best : best + 1].copy()).size:
                return best
        for size in (*_GRAMMAR_SHORTLISTS, len(cur)):
            if size < len(cur):
                shortlist = cur[np.argpartition(-cur["logit"], size)[:size]]
            else:
                shortlist = cur.copy()
            allowed = self._allowed(shortlist)
            if size == len(cur) or (self._needed > 0 and allowed.size >= self._needed):
                if allowed.size == 0:
                    raise RuntimeError("the grammar allows no token")
                # Best first, ties by id: the chain sees the same array from any shortlist.
                allowed = allowed[np.lexsort((allowed["id"], -allowed["logit"]))]
                return self._apply(self._chain, allowed)
        raise AssertionError("unreachable")

    def _allowed(self, candidates: npt.NDArray[Any]) -> npt.NDArray[Any]:
        self._apply(self._grammar, candidates, select=False)
        allowed: npt.NDArray[Any] = candidates[np.isfinite(candidates["logit"])]
        return allowed

    @staticmethod
    def _apply(sampler: Any, candidates: npt.NDArray[Any], select: bool = True) -> int:
        candidates = np.ascontiguousarray(candidates)
        array = lib.llama_token_data_array(
            data=candidates.ctypes.data_as(lib.llama_token_data_p),
            size=len(candidates),
            selected=-1,
            sorted=False,
        )
        lib.llama_sampler_apply(sampler, ctypes.byref(array))
        if not select:
            return -1
        # The samplers may reorder and shrink the array; "selected" indexes what they left.
        chosen = ctypes.cast(array.data, ctypes.POINTER(lib.llama_token_data))[array.selected]
        return int(chosen.id)


class LogprobReader:
    """The log probability of a token under the model's distribution (log-softmax of the raw
    logits, before bias, penalties, grammar and temperature), and the ``top`` most likely
    tokens, with their text as OpenAI shows them."""

    def __init__(self, piece: Callable[[int], bytes], top: int):
        self._piece = functools.lru_cache(maxsize=4096)(piece)
        self._top = top

    def read(self, logits: Logits, token: int) -> TokenLogprob:
        log_z = _log_sum_exp(logits)
        top: tuple[tuple[str, bytes, float], ...] = ()
        if self._top:
            ids = np.argpartition(-logits, self._top)[: self._top]
            ids = ids[np.argsort(-logits[ids], kind="stable")]
            top = tuple(self._named(int(i), float(logits[i]) - log_z) for i in ids)
        name, raw, logprob = self._named(token, float(logits[token]) - log_z)
        return TokenLogprob(name, raw, logprob, top)

    def _named(self, token: int, logprob: float) -> tuple[str, bytes, float]:
        raw = self._piece(token)
        return raw.decode("utf-8", errors="replace"), raw, logprob


def _log_sum_exp(logits: Logits) -> float:
    top = float(logits.max())
    return top + math.log(float(np.exp(logits.astype(np.float64) - top).sum()))


@functools.cache
def _ids(n_vocab: int) -> npt.NDArray[np.intc]:
    return np.arange(n_vocab, dtype=np.intc)


def _grammar(vocab: Any, grammar: str) -> Any:
    sampler = lib.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if not sampler:
        raise RequestError(
            "response_format: llama.cpp cannot parse the grammar made from it",
            param="response_format",
        )
    return sampler
