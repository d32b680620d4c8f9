"""SerialEngine: one request at a time per process, with llama-cpp-python's ``Llama``.

Every llama.cpp call runs on one worker thread (a ``Llama`` is not thread-safe; llama.cpp
releases the GIL while it computes), and tokens reach the event loop through an asyncio.Queue.
A request's choices (``n``, several prompts) run one after another; the context keeps the
last prompt's cells, and the next prompt reuses their common prefix in whole chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import llama_cpp.llama_cpp as lib
import numpy as np

from comeapi.backend.decoding import (
    PREFILL_CHUNK,
    ChatTemplate,
    ChoiceText,
    completion_budget,
    prompt_logprobs,
    prompt_texts,
    reusable_prefix,
    tokenize_prompt,
)
from comeapi.backend.engine import Event, Finished, TextDelta, choice_count
from comeapi.backend.native import Entry, decode
from comeapi.backend.sampling import (
    Logits,
    LogprobReader,
    Sampler,
    SamplingParams,
    check_sampling,
    grammar_for,
)
from comeapi.errors import ComeapiError, ConfigError, ModelNotFoundError
from comeapi.models.catalogue import ModelFile, check_gguf, check_model_dir
from comeapi.protocol.requests import GenerationRequest
from comeapi.protocol.responses import TokenLogprob, Usage
from comeapi.settings import Settings

log = logging.getLogger("comeapi.backend")


@dataclass(slots=True)
class _Loaded:
    llama: llama_cpp.Llama
    template: ChatTemplate
    # The prompt whose cells the context holds (prefilled in PREFILL_CHUNK chunks from 0).
    prefilled: list[int] = field(default_factory=list)

    def logits(self) -> Logits:
        """The logits of the last token decoded (a view, valid until the next decode)."""
        row = lib.llama_get_logits_ith(self.llama.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(self.llama.n_vocab(),))

    def is_eog(self, token: int) -> bool:
        # The vocabulary is private in Llama, but it is the only way to ask this.
        return bool(lib.llama_vocab_is_eog(self.llama._model.vocab, token))


@dataclass(frozen=True, slots=True)
class _Prompt:
    text: str
    tokens: list[int]
    budget: int


class _Stream:
    """One generation's hand-off from the worker thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self.queue: asyncio.Queue[Event | ComeapiError] = asyncio.Queue()
        self.cancelled = threading.Event()

    def put(self, item: Event | ComeapiError) -> None:
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            self.cancelled.set()


class SerialEngine:
    """The ``Engine`` for one request at a time (capacity 1); others wait their turn."""

    def __init__(self, settings: Settings):
        self._settings = settings
        models, default = check_model_dir(settings)
        self._models = {m.name: m for m in models}
        self._default = default
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        self._turn = asyncio.Lock()
        self._streams: set[_Stream] = set()
        self._in_flight = 0
        self._ready = False
        # Touched only on the worker thread; the event loop reads the snapshot below.
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()
        self._loaded_names: tuple[str, ...] = ()

    @property
    def capacity(self) -> int:
        return 1

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def ready(self) -> bool:
        return self._ready

    def loaded_models(self) -> list[str]:
        return list(self._loaded_names)

    async def start(self) -> None:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load, self._default)
        self._ready = True
        log.info("model %s loaded in %.2fs", self._default.name, time.perf_counter() - started)

    async def generate(self, request: GenerationRequest, model_name: str) -> AsyncIterator[Event]:
        model = self._models.get(model_name)
        if model is None:
            raise ModelNotFoundError(model_name, sorted(self._models))
        self._in_flight += 1
        stream: _Stream | None = None
        left = choice_count(request)
        try:
            async with self._turn:
                stream = _Stream(asyncio.get_running_loop())
                self._streams.add(stream)
                self._executor.submit(self._run, stream, request, model)
                while left:
                    item = await stream.queue.get()
                    if isinstance(item, ComeapiError):
                        raise item
                    yield item
                    if isinstance(item, Finished):
                        left -= 1
        finally:
            # Runs when the consumer closes us early too (client gone): the worker sees the
            # flag before its next token, and the next request may queue behind it at once.
            if stream is not None:
                stream.cancelled.set()
                self._streams.discard(stream)
            self._in_flight -= 1

    async def close(self) -> None:
        for stream in self._streams:
            stream.cancelled.set()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(RuntimeError):  # already shut down
            await loop.run_in_executor(self._executor, self._unload_all)
        self._executor.shutdown(wait=False)
        self._ready = False

    # --- the worker thread ---------------------------------------------------------------

    def _run(self, stream: _Stream, request: GenerationRequest, model: ModelFile) -> None:
        if stream.cancelled.is_set():  # the client left while waiting for its turn
            return
        try:
            for event in self._events(stream, request, model):
                stream.put(event)
        except ComeapiError as exc:
            stream.put(exc)
        except Exception as exc:
            log.exception("generation failed")
            stream.put(ComeapiError(f"generation failed: {exc}"))

    def _events(
        self, stream: _Stream, request: GenerationRequest, model: ModelFile
    ) -> Iterator[Event]:
        loaded = self._load(model)
        llama = loaded.llama
        # llama.cpp may round the context up (128 -> 256) while llama-cpp-python's token
        # buffer keeps the size asked for: the smaller one is the real limit.
        n_ctx = min(llama.n_ctx(), self._settings.ctx)
        prompts = []
        for text in prompt_texts(loaded.template, request):
            tokens = tokenize_prompt(llama, text)
            prompts.append(_Prompt(text, tokens, completion_budget(request, len(tokens), n_ctx)))
        grammar = grammar_for(request.response_format)
        vocab = llama._model.vocab
        check_sampling(vocab, llama.n_vocab(), SamplingParams.of(request, 0, grammar))
        reader = None
        if request.logprobs:
            reader = LogprobReader(
                lambda t: bytes(llama.detokenize([t], special=True)), request.top_logprobs
            )
        for p, prompt in enumerate(prompts):
            echoed: list[TokenLogprob] = []
            if request.echo and reader is not None:
                echoed = self._score(loaded, prompt.tokens, reader)
            first: Logits | None = None
            for j in range(request.n):
                index = p * request.n + j
                if j == 0:
                    first = self._prefill(loaded, prompt.tokens)
                    if request.n > 1:
                        first = first.copy()  # the next choices start from the same logits
                else:
                    llama.n_tokens = len(prompt.tokens)  # the prompt's cells stay
                assert first is not None
                if request.echo:
                    yield TextDelta(prompt.text, index, tuple(echoed))
                params = SamplingParams.of(request, index, grammar)
                yield from self._choice(
                    stream, loaded, request, prompt, index, params, reader, first
                )
                if stream.cancelled.is_set():
                    return

    def _choice(
        self,
        stream: _Stream,
        loaded: _Loaded,
        request: GenerationRequest,
        prompt: _Prompt,
        index: int,
        params: SamplingParams,
        reader: LogprobReader | None,
        logits: Logits,
    ) -> Iterator[Event]:
        """One choice, from the logits of its prompt's last token."""
        llama = loaded.llama
        sampler = Sampler(llama._model.vocab, llama.n_vocab(), params)
        text = ChoiceText(request.stop, base=len(prompt.text) if request.echo else 0)
        started = time.perf_counter()
        generated = 0
        reason = "length"
        try:
            while True:
                if stream.cancelled.is_set():
                    log.info("generation stopped after %d tokens: client gone", generated)
                    return
                token = sampler.sample(logits, loaded.is_eog)
                if loaded.is_eog(token):
                    reason = "stop"
                    break
                generated += 1
                entry = reader.read(logits, token) if reader is not None else None
                piece, entries = text.feed(llama.detokenize([token]), entry)
                if piece or entries:
                    yield TextDelta(piece, index, tuple(entries))
                if text.stopped or generated >= prompt.budget:
                    break
                llama.eval([token])
                logits = loaded.logits()
        finally:
            sampler.close()
        tail, entries = text.finish()
        if tail or entries:
            yield TextDelta(tail, index, tuple(entries))
        if text.stopped:
            reason = "stop"
        elapsed = time.perf_counter() - started
        log.info(
            "%s: choice %d: %d prompt + %d tokens in %.2fs (%.1f tokens/s), %s",
            llama.model_path,
            index,
            len(prompt.tokens),
            generated,
            elapsed,
            generated / elapsed if elapsed > 0 else 0.0,
            reason,
        )
        yield Finished(reason, Usage(len(prompt.tokens), generated), index)

    def _prefill(self, loaded: _Loaded, tokens: list[int]) -> Logits:
        """Compute the prompt's cells, keeping whole chunks shared with the last prompt
        (exactly the cells a fresh prefill computes), and return its last logits."""
        llama = loaded.llama
        keep = reusable_prefix(loaded.prefilled, tokens)
        loaded.prefilled = []
        llama.n_tokens = keep  # eval() drops every cell from here on first
        llama.eval(tokens[keep:])
        loaded.prefilled = list(tokens)
        if keep:
            log.debug("prompt of %d tokens: %d reused", len(tokens), keep)
        return loaded.logits()

    def _score(
        self, loaded: _Loaded, tokens: list[int], reader: LogprobReader
    ) -> list[TokenLogprob]:
        """The log probability of each prompt token given the ones before it (echo with
        logprobs): one pass with every position's logits, whose cells are then dropped."""
        llama = loaded.llama
        loaded.prefilled = []
        llama.n_tokens = 0
        entries: list[TokenLogprob | None] = [None]
        batch: Any = lib.llama_batch_init(PREFILL_CHUNK, 0, 1)
        try:
            lib.llama_memory_seq_rm(lib.llama_get_memory(llama.ctx), -1, 0, -1)
            for start in range(0, len(tokens), PREFILL_CHUNK):
                chunk = tokens[start : start + PREFILL_CHUNK]
                if decode(
                    llama.ctx, batch, [Entry(t, start + j, 0, True) for j, t in enumerate(chunk)]
                ):
                    raise ComeapiError("llama_decode failed while scoring the prompt")
                for j in range(len(chunk)):
                    if start + j + 1 < len(tokens):
                        row = lib.llama_get_logits_ith(llama.ctx, j)
                        logits = np.ctypeslib.as_array(row, shape=(llama.n_vocab(),))
                        entries.append(reader.read(logits, tokens[start + j + 1]))
        finally:
            lib.llama_batch_free(batch)
            lib.llama_memory_seq_rm(lib.llama_get_memory(llama.ctx), -1, 0, -1)
        return prompt_logprobs(llama, tokens, entries)

    def _load(self, model: ModelFile) -> _Loaded:
        loaded = self._loaded.get(model.name)
        if loaded is not None:
            self._loaded.move_to_end(model.name)
            self._loaded_names = tuple(self._loaded)
            return loaded
        # Evict first so memory never holds more than the cap. This thread is the only one
        # that generates, so the evicted model is not generating.
        while len(self._loaded) >= self._settings.max_loaded_models:
            name, old = self._loaded.popitem(last=False)
            self._loaded_names = tuple(self._loaded)
            old.llama.close()
            log.info(
                "model %s unloaded (max_loaded_models=%d)", name, self._settings.max_loaded_models
            )
        check_gguf(model.path)
        try:
            llama = llama_cpp.Llama(
                model_path=str(model.path),
                n_ctx=self._settings.ctx,
                # One thread count for prompt and generation: llama.cpp's default batch
                # threads (every core) spin against each other when cores are shared.
                n_threads=self._settings.threads,
                n_threads_batch=self._settings.threads,
                # Prompts are computed in the batched engine's chunks: a reused prefix keeps
                # whole chunks, and the rest is computed as a fresh prefill would.
                n_batch=PREFILL_CHUNK,
                n_ubatch=PREFILL_CHUNK,
                n_gpu_layers=self._settings.n_gpu_layers,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(f"model file {model.path} cannot be loaded: {exc}") from exc
        loaded = _Loaded(llama, ChatTemplate(llama))
        self._loaded[model.name] = loaded
        self._loaded_names = tuple(self._loaded)
        log.info("model %s loaded (chat template: %s)", model.name, loaded.template.name)
        return loaded

    def _unload_all(self) -> None:
        while self._loaded:
            _, old = self._loaded.popitem(last=False)
            old.llama.close()
        self._loaded_names = ()
