"""Choosing each next token, the same way in both engines, and the log probabilities of it.

A ``Sampler`` is one choice's: presence/frequency penalties on the few logits they touch,
then llama.cpp's chain: logit bias, the model's special tokens masked out
(``comeapi.backend.vocab``), then greedy at temperature 0, else top-k, top-p, min-p,
temperature and a seeded draw. The batched engine runs the chain on a row of the context's
logits inside llama.cpp (``sample_at``: no per-token copy of the vocabulary into Python); a
grammar (JSON mode, JSON schemas) needs the candidates in Python, and so do logits the
serial engine hands over.
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
    # The request field the grammar came from, named when llama.cpp cannot parse it.
    grammar_param: str = "response_format"

    @classmethod
    def of(cls, request: GenerationRequest, index: int, grammar: str | None) -> SamplingParams:
        """Choice ``index``'s parameters: a seeded request's choice i draws with seed + i."""
        seed = random.getrandbits(32) if request.seed is None else request.seed + index
        constraint = request.response_format
        return cls(
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            seed=seed % _SEED_SPAN,
            logit_bias=request.logit_bias,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            grammar=grammar,
            grammar_param=constraint.param if constraint is not None else "response_format",
        )


def grammar_for(response_format: ResponseFormat | None) -> str | None:
    """The GBNF grammar for a ``response_format`` (the request's own ``grammar``,
    llama.cpp's JSON grammar, or its JSON-schema converter's output), or None for free
    text. A schema the converter cannot take is a 400 naming where it was."""
    if response_format is None:
        return None
    if response_format.grammar is not None:
        return response_format.grammar  # parsed (and refused by name) with the vocabulary
    if response_format.schema is None:
        return JSON_GBNF
    param = response_format.param
    try:
        return str(json_schema_to_gbnf(json.dumps(response_format.schema)))
    except Exception as exc:  # the converter raises bare exceptions for what it cannot do
        raise RequestError(
            f"{param}: cannot be turned into a grammar: {exc}", param=param
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
        lib.llama_sampler_free(_grammar(vocab, params.grammar, params.grammar_param))


class Sampler:
    """Samples one choice's tokens: from a context's logits row (``sample_at``) or from
    logits in a numpy array (``sample``; the serial engine, the tests).

    The presence/frequency penalties are subtracted here, from the few logits of the tokens
    generated so far (OpenAI's formula), not by llama.cpp's penalties sampler, which looks
    every candidate up in a hash map: 1,231 us per token with it, 265 us penalised here,
    251 us without penalties (llama_sampler_sample at temperature 0.8 over Gemma 3's 262,144
    tokens, 600 tokens counted, best of 15 x 40 calls, thread CPU, load 5; docs/batching.md).
    """

    def __init__(
        self, vocab: Any, n_vocab: int, params: SamplingParams, special: TokenIds | None = None
    ):
        self._params = params
        self._n_vocab = n_vocab
        self._greedy = params.temperature == 0
        # How many allowed candidates the chain looks at: top-k (1 when greedy), or all.
        self._needed = 1 if self._greedy else params.top_k
        self._cur: npt.NDArray[Any] | None = None  # the whole vocabulary, when a row is copied
        self._penalised = params.presence_penalty != 0 or params.frequency_penalty != 0
        self._counts: Counter[int] = Counter()
        # First: the only part that can fail (a grammar llama.cpp cannot parse).
        self._grammar = None
        if params.grammar is not None:
            self._grammar = _grammar(vocab, params.grammar, params.grammar_param)
        bias = []
        if params.logit_bias:
            biases = (lib.llama_logit_bias * len(params.logit_bias))(
                *(lib.llama_logit_bias(token, value) for token, value in params.logit_bias)
            )
            bias.append(lib.llama_sampler_init_logit_bias(n_vocab, len(biases), biases))
        if special is not None and len(special):
            # After the request's bias: nothing a request sends brings them back. llama.cpp
            # applies a bias by index while the candidates are in id order: O(len(special)).
            never = _never(special.tobytes())
            bias.append(lib.llama_sampler_init_logit_bias(n_vocab, len(never), never))
        if self._greedy:
            select = [lib.llama_sampler_init_greedy()]
        else:
            select = [
                lib.llama_sampler_init_top_k(params.top_k),
                lib.llama_sampler_init_top_p(params.top_p, 1),
                lib.llama_sampler_init_min_p(MIN_P, 1),
                lib.llama_sampler_init_temp(params.temperature),
                lib.llama_sampler_init_dist(params.seed),
            ]
        if self._grammar is None:
            self._bias = None
            self._chain = _chain([*bias, *select])
        else:
            # The grammar checks candidates in between: the bias comes first.
            self._bias = _chain(bias) if bias else None
            self._chain = _chain(select)

    def sample_at(self, ctx: Any, index: int, is_eog: Callable[[int], bool]) -> int:
        """The next token from output row ``index`` of ``ctx``'s last decode: the chain runs
        on the row inside llama.cpp, no copy of the vocabulary (but with a grammar)."""
        if self._grammar is None and not self._counts:
            token = int(lib.llama_sampler_sample(self._chain, ctx, index))
        else:
            row = lib.llama_get_logits_ith(ctx, index)
            logits = np.ctypeslib.as_array(row, shape=(self._n_vocab,))
            if self._grammar is not None:
                return self.sample(logits, is_eog)
            # Penalised in place, and put back: the row may be read again (logprobs of the
            # raw logits, another choice of the same prompt).
            ids, penalties = self._penalties()
            saved = logits[ids]
            logits[ids] = saved - penalties
            try:
                token = int(lib.llama_sampler_sample(self._chain, ctx, index))
            finally:
                logits[ids] = saved
        if self._penalised:
            self._counts[token] += 1
        return token

    def sample(self, logits: Logits, is_eog: Callable[[int], bool]) -> int:
        """The next token. The grammar (if any) moves on with it unless it ends generation."""
        if self._cur is None:
            self._cur = np.empty(self._n_vocab, dtype=_TOKEN_DATA)
        cur = self._cur
        cur["id"] = _ids(self._n_vocab)  # the samplers reorder the array in place
        cur["logit"] = logits
        cur["p"] = 0.0
        if self._counts:
            ids, penalties = self._penalties()
            cur["logit"][ids] = logits[ids] - penalties  # the same numbers as sample_at's
        if self._grammar is None:
            token = self._apply(self._chain, cur)
        else:
            if self._bias is not None:
                self._apply(self._bias, cur, select=False)  # in place, nothing reordered
            token = self._constrained()
            if not is_eog(token):
                lib.llama_sampler_accept(self._grammar, token)
        if self._penalised:
            self._counts[token] += 1
        return token

    def _penalties(self) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float32]]:
        """The tokens generated so far and what each loses: count x frequency_penalty +
        presence_penalty."""
        ids = np.fromiter(self._counts.keys(), dtype=np.intp, count=len(self._counts))
        counts = np.fromiter(self._counts.values(), dtype=np.float32, count=len(ids))
        p = self._params
        penalties: npt.NDArray[np.float32] = counts * np.float32(p.frequency_penalty) + np.float32(
            p.presence_penalty
        )
        return ids, penalties

    def close(self) -> None:
        for sampler in (self._chain, self._bias, self._grammar):
            if sampler is not None:
                lib.llama_sampler_free(sampler)
        self._chain = self._bias = self._grammar = None

    def _constrained(self) -> int:
        """Sample among the tokens the grammar allows (the chain sees exactly the
        candidates it would see after checking the whole vocabulary)."""
        cur = self._cur
        assert cur is not None
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


@functools.lru_cache(maxsize=4)
def _never(special: bytes) -> Any:
    """A model's special tokens as llama.cpp logit biases of -inf, made once per model (7 ms
    for Gemma 3's 6,000-odd tokens; llama.cpp copies the array into each sampler)."""
    ids = np.frombuffer(special, dtype=np.intp)
    return (lib.llama_logit_bias * len(ids))(
        *(lib.llama_logit_bias(int(token), -math.inf) for token in ids)
    )


def _chain(samplers: list[Any]) -> Any:
    """A llama.cpp chain that owns ``samplers`` (freed with it)."""
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    for sampler in samplers:
        lib.llama_sampler_chain_add(chain, sampler)
    return chain


def _grammar(vocab: Any, grammar: str, param: str) -> Any:
    sampler = lib.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if not sampler:
        what = "this GBNF grammar (a root rule, defined rules, no left recursion)"
        if param != "grammar":
            what = "the grammar made from it"
        raise RequestError(f"{param}: llama.cpp cannot parse {what}", param=param)
    return sampler
