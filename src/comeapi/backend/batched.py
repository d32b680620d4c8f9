"""BatchedEngine: up to S sequences decoded together (continuous batching) on one model copy.

The model and its S KV streams live in one llama.cpp context driven by one decode thread
(``comeapi.backend.slots``); a request is one sequence per choice, and streams its choices'
text to its asyncio consumer. One model per engine: the default GGUF of the models directory.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator

from comeapi.backend.decoding import (
    PREFILL_CHUNK,
    ChatTemplate,
    completion_budget,
    prompt_texts,
    tokenize_prompt,
)
from comeapi.backend.engine import Event, Finished
from comeapi.backend.native import NativeModel, quiet_llama_logs
from comeapi.backend.sampling import LogprobReader, SamplingParams, check_sampling, grammar_for
from comeapi.backend.slots import EVEN_OUTPUTS_FROM, DecodeLoop, Item, Sequence
from comeapi.errors import ComeapiError, ModelNotFoundError, UnavailableError
from comeapi.models.catalogue import check_model_dir
from comeapi.protocol.requests import GenerationRequest
from comeapi.settings import Settings

# The batch size (rows) from which llama.cpp's CPU backend takes its tiled K-quant kernel
# (ggml-cpu/tiled/tiled.cpp, ggml_tiled_min_batch).
TILED_FROM_ROWS = 8


class _Channel:
    """One generation's events, handed over by the decode loop a step at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[list[Item]] = asyncio.Queue()

    def deliver(self, items: list[Item]) -> None:
        self.queue.put_nowait(items)


class BatchedEngine:
    """The ``Engine`` with ``settings.slots`` slots over one model copy.

    ``capacity`` is the slot count; requests beyond it wait in FIFO order inside the engine.
    Each slot has ``settings.ctx`` tokens of context: prompt + max_tokens must fit in it.
    """

    def __init__(self, settings: Settings):
        _, default = check_model_dir(settings)
        self._settings = settings
        self._file = default
        self._slots = settings.slots
        self._model: NativeModel | None = None
        self._template: ChatTemplate | None = None
        self._decoder: DecodeLoop | None = None
        self._in_flight = 0
        self._closed = False
        # Held while a prompt is tokenized off the event loop, so close() never frees the
        # vocabulary under it.
        self._model_lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self._slots

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def ready(self) -> bool:
        return self._decoder is not None and self._decoder.failed is None

    @property
    def context_per_slot(self) -> int:
        """Tokens of context each request has: ``ctx`` (llama.cpp may round its own up)."""
        if self._model is None:
            return self._settings.ctx
        return min(self._model.n_ctx_seq, self._settings.ctx)

    def loaded_models(self) -> list[str]:
        return [self._file.name] if self._model is not None else []

    async def start(self) -> None:
        quiet_llama_logs(self._settings.log_level == "debug")
        # A lone sequence may need a padding stream; from 3 slots a spare stream takes the
        # padding row that makes an odd decode step even (``slots.pairs_are_cheaper``).
        n_seq = self._slots + 1 if self._slots >= EVEN_OUTPUTS_FROM else max(self._slots, 2)
        if n_seq >= TILED_FROM_ROWS:
            # llama.cpp's CPU backend multiplies K-quant matrices with its tiled kernel from
            # 8 rows on, which rounds differently from the kernel for fewer rows: a decode
            # batch of 8+ rows (streams) would change the sequences' greedy text. With fewer
            # streams only a prompt's own prefill reaches 8 rows, the same whatever runs
            # beside it. Read once per process, at the first product: before the model is
            # loaded.
            os.environ.setdefault("GGML_CPU_TILED_MM", "0")
        threads = self._settings.threads or len(os.sched_getaffinity(0))
        model = await asyncio.to_thread(
            NativeModel,
            self._file.path,
            n_seq=n_seq,
            ctx=self._settings.ctx,
            batch_size=max(PREFILL_CHUNK, n_seq),
            threads=threads,
            n_gpu_layers=self._settings.n_gpu_layers,
        )
        self._model = model
        self._template = ChatTemplate(model.tokenizer)
        decoder = DecodeLoop(model, self._slots)
        decoder.start()
        self._decoder = decoder

    async def generate(self, request: GenerationRequest, model_name: str) -> AsyncIterator[Event]:
        if model_name not in (self._file.name, self._file.name.removesuffix(".gguf")):
            # One model per batched backend: run another backend for another model.
            raise ModelNotFoundError(model_name, [self._file.name])
        decoder = self._decoder
        if decoder is None or not self.ready:
            if self._closed or decoder is not None:
                raise UnavailableError("the backend is shutting down", retry_after=2)
            raise UnavailableError("the model is still loading", retry_after=2, code="loading")
        self._in_flight += 1
        seqs: list[Sequence] = []
        try:
            channel = _Channel(asyncio.get_running_loop())
            seqs = await asyncio.to_thread(self._sequences, request, channel)
            decoder.submit(*seqs)
            left = len(seqs)
            while left:
                for item in await channel.queue.get():
                    if isinstance(item, ComeapiError):
                        raise item
                    yield item
                    if isinstance(item, Finished):
                        left -= 1
        finally:
            # Also when the consumer stops early (client gone): the slots are freed before
            # the next decode step.
            for seq in seqs:
                decoder.cancel(seq)
            self._in_flight -= 1

    def _sequences(self, request: GenerationRequest, channel: _Channel) -> list[Sequence]:
        """One sequence per choice (off the event loop): the prompts rendered and tokenized;
        RequestError / ContextLengthError for what cannot run."""
        with self._model_lock:
            if self._model is None or self._template is None:
                raise UnavailableError("the backend is shutting down", retry_after=2)
            tokenizer = self._model.tokenizer
            texts = prompt_texts(self._template, request)
            prompts = [tokenize_prompt(tokenizer, text) for text in texts]
            budgets = [completion_budget(request, len(p), self.context_per_slot) for p in prompts]
            grammar = grammar_for(request.response_format)
            check_sampling(
                tokenizer.vocab,
                tokenizer.n_vocab,
                SamplingParams.of(request, 0, grammar),
                tokenizer.special,
            )
        reader = None
        if request.logprobs:
            reader = LogprobReader(
                lambda t: tokenizer.detokenize([t], special=True), request.top_logprobs
            )
        seqs: list[Sequence] = []
        for p, (text, tokens, budget) in enumerate(zip(texts, prompts, budgets, strict=True)):
            leader: Sequence | None = None
            for j in range(request.n):
                index = p * request.n + j
                seq = Sequence(
                    prompt=tokens,
                    budget=budget,
                    sampling=SamplingParams.of(request, index, grammar),
                    sink=channel,
                    index=index,
                    stop=request.stop,
                    echo=text if request.echo else None,
                    logprobs=reader,
                    score_prompt=request.echo and request.logprobs,
                    leader=leader,
                    label=self._file.name,
                )
                leader = leader or seq
                seqs.append(seq)
        return seqs

    async def close(self) -> None:
        """Stop every generation (they end with 503 "shutting down") and free the model."""
        self._closed = True
        decoder, self._decoder = self._decoder, None
        if decoder is not None:
            await asyncio.to_thread(decoder.stop)
        await asyncio.to_thread(self._free_model)

    def _free_model(self) -> None:
        with self._model_lock:
            model, self._model = self._model, None
            if model is not None:
                model.close()
