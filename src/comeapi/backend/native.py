"""llama.cpp's low-level API for the batched engine: one model, one context of S KV streams.

Every method except the tokenizer's runs on the decode thread only; llama.cpp releases the
GIL inside each call, so the event loop keeps running while a batch is decoded.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp.llama_cpp as lib
import numpy as np

from comeapi.backend.sampling import Logits
from comeapi.backend.vocab import special_tokens
from comeapi.errors import ConfigError

_backend_ready = False


def init_backend() -> None:
    """llama.cpp's backends, initialised once per process (before any model is loaded)."""
    global _backend_ready
    if not _backend_ready:
        lib.llama_backend_init()
        _backend_ready = True


@dataclass(frozen=True, slots=True)
class Entry:
    """One token of a batch: its id, position and KV stream (sequence), and whether its
    logits are wanted."""

    token: int
    pos: int
    seq: int
    logits: bool


def load_vocab(path: Path) -> Any:
    """The vocabulary of the GGUF at ``path`` alone (``vocab_only``: no weights), or None
    when llama.cpp cannot read the file. The model it belongs to is never freed: callers
    keep it for the process (``comeapi.models.tokens``)."""
    init_backend()
    params = lib.llama_model_default_params()
    params.vocab_only = True
    model = lib.llama_model_load_from_file(str(path).encode(), params)
    return lib.llama_model_get_vocab(model) if model else None


def tokenize(vocab: Any, text: bytes, *, add_bos: bool, special: bool) -> list[int]:
    """``text``'s tokens in ``vocab`` (a BOS first with ``add_bos``; special-token names
    parsed as such with ``special``, else read as text)."""
    size = len(text) + 8
    for _ in range(2):
        buf = (lib.llama_token * size)()
        n = lib.llama_tokenize(vocab, text, len(text), buf, size, add_bos, special)
        if n >= 0:
            return list(buf[:n])
        size = -n  # too small: -n tokens are needed
    raise RuntimeError(f"tokenization failed ({n})")


class Tokenizer:
    """The part of ``llama_cpp.Llama`` that ``comeapi.backend.decoding`` uses (metadata,
    tokenize, detokenize, BOS/EOS), over the vocabulary of an already loaded model.

    Thread-safe: the vocabulary is read-only once loaded.
    """

    def __init__(self, model: Any, vocab: Any):
        self._vocab = vocab
        self.metadata = _metadata(model)
        self.special = special_tokens(vocab)  # never sampled (comeapi.backend.vocab)

    def token_bos(self) -> int:
        return int(lib.llama_vocab_bos(self._vocab))

    def token_eos(self) -> int:
        return int(lib.llama_vocab_eos(self._vocab))

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return tokenize(self._vocab, text, add_bos=add_bos, special=special)

    def piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = lib.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lib.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        return b"".join(self.piece(t, special) for t in tokens)

    def is_eog(self, token: int) -> bool:
        return bool(lib.llama_vocab_is_eog(self._vocab, token))

    @property
    def vocab(self) -> Any:
        return self._vocab

    @property
    def n_vocab(self) -> int:
        return int(lib.llama_vocab_n_tokens(self._vocab))


class NativeModel:
    """A GGUF model loaded once, and a context with ``n_seq`` KV streams of ``ctx`` tokens.

    Streams are not unified (``kv_unified=False``): each sequence attends only to its own
    stream, so a sequence's numbers never depend on what the other slots hold. Weights are
    not repacked (``use_extra_bufts=False``): the repacked Q4_K kernels quantize a row
    differently depending on where it falls in the batch (groups of 4 rows vs the rest),
    which made greedy text depend on the other requests (see docs/batching.md).
    """

    def __init__(
        self,
        path: Path,
        *,
        n_seq: int,
        ctx: int,
        batch_size: int,
        threads: int,
        n_gpu_layers: int = 0,
    ):
        init_backend()
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        mparams.use_extra_bufts = False
        model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise ConfigError(f"model file {path} cannot be loaded by llama.cpp")
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = ctx * n_seq
        cparams.n_seq_max = n_seq
        cparams.n_batch = batch_size
        cparams.n_ubatch = batch_size
        # One output per sequence at most (a decode step); the graph's logits buffer is
        # sized by this (262,144 floats per output for Gemma 3), not by the batch size.
        cparams.n_outputs_max = n_seq
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = False
        cparams.swa_full = False  # sliding-window layers keep only their window (memory)
        cparams.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
        context = lib.llama_init_from_model(model, cparams)
        if not context:
            lib.llama_model_free(model)
            raise ConfigError(f"llama.cpp cannot create a context of {n_seq} x {ctx} tokens")
        self._model = model
        self.ctx = context
        self._memory = lib.llama_get_memory(context)
        self.n_seq = n_seq
        self.n_ctx_seq = int(lib.llama_n_ctx_seq(context))
        self.batch_size = batch_size
        self._batch = lib.llama_batch_init(batch_size, 0, 1)
        self.tokenizer = Tokenizer(model, lib.llama_model_get_vocab(model))
        bos = self.tokenizer.token_bos()
        self.pad_token = bos if bos >= 0 else 0

    def decode(self, entries: Sequence[Entry]) -> int:
        """Decode one batch; llama_decode's return code (0 is success). At most ``n_seq``
        entries may ask for logits (the context's output buffer holds no more)."""
        if not 0 < len(entries) <= self.batch_size:
            raise ValueError(f"batch of {len(entries)} tokens (limit {self.batch_size})")
        if sum(e.logits for e in entries) > self.n_seq:
            raise ValueError(f"more than {self.n_seq} outputs in one batch")
        return decode(self.ctx, self._batch, entries)

    def logits(self, index: int) -> Logits:
        """The logits of batch entry ``index`` of the last decode (a view: valid until the
        next decode)."""
        row = lib.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(row, shape=(self.tokenizer.n_vocab,))

    def forget(self, seq: int, from_pos: int = 0) -> None:
        """Drop stream ``seq``'s KV cells from position ``from_pos`` on (0: all of them)."""
        lib.llama_memory_seq_rm(self._memory, seq, from_pos, -1)

    def copy(self, source: int, target: int) -> None:
        """Make stream ``target`` a copy of stream ``source`` (every cell, at the same cell
        indices; llama.cpp copies the buffer at the start of the next decode)."""
        lib.llama_memory_seq_cp(self._memory, source, target, -1, -1)

    def kv_tokens(self, seq: int) -> int:
        """How many positions stream ``seq`` holds (0 when it is empty)."""
        return int(lib.llama_memory_seq_pos_max(self._memory, seq)) + 1

    def first_position(self, seq: int) -> int:
        """The lowest position stream ``seq`` still holds in every layer (-1 when empty):
        above 0 once sliding-window layers have overwritten early cells."""
        return int(lib.llama_memory_seq_pos_min(self._memory, seq))

    def close(self) -> None:
        if self._batch is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if self.ctx:
            lib.llama_free(self.ctx)
            self.ctx = None
        if self._model:
            lib.llama_model_free(self._model)
            self._model = None


def decode(ctx: Any, batch: Any, entries: Sequence[Entry]) -> int:
    """Fill ``batch`` (from llama_batch_init) with ``entries`` and decode it in ``ctx``."""
    for i, e in enumerate(entries):
        batch.token[i] = e.token
        batch.pos[i] = e.pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = e.seq
        batch.logits[i] = e.logits
    batch.n_tokens = len(entries)
    return int(lib.llama_decode(ctx, batch))


def quiet_llama_logs(verbose: bool) -> None:
    """llama.cpp logs through llama-cpp-python's logger; keep its load chatter out."""
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)


def _metadata(model: Any) -> dict[str, str]:
    """The GGUF's key/value metadata as strings (what ``Llama.metadata`` holds)."""
    count = lib.llama_model_meta_count(model)
    return {
        _meta_string(lib.llama_model_meta_key_by_index, model, i): _meta_string(
            lib.llama_model_meta_val_str_by_index, model, i
        )
        for i in range(count)
    }


def _meta_string(read: Any, model: Any, index: int) -> str:
    size = 256
    while True:
        buf = ctypes.create_string_buffer(size)
        n = int(read(model, index, buf, size))
        if n < size:  # snprintf-like: the full length, or -1
            return buf.value.decode("utf-8", errors="replace") if n > 0 else ""
        size = n + 1
