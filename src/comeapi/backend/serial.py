"""SerialEngine: one generation at a time per process, with llama-cpp-python's ``Llama``.

Every llama.cpp call runs on one worker thread (a ``Llama`` is not thread-safe; llama.cpp
releases the GIL while it computes), and tokens reach the event loop through an asyncio.Queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import llama_cpp

from comeapi.backend.decoding import ChatTemplate, TextAssembler, completion_budget, prompt_tokens
from comeapi.backend.engine import Event, Finished, TextDelta
from comeapi.errors import ComeapiError, ConfigError, ModelNotFoundError
from comeapi.models.catalogue import ModelFile, check_gguf, check_model_dir
from comeapi.protocol.requests import GenerationRequest
from comeapi.protocol.responses import Usage
from comeapi.settings import Settings

log = logging.getLogger("comeapi.backend")


@dataclass(slots=True)
class _Loaded:
    llama: llama_cpp.Llama
    template: ChatTemplate


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
        try:
            async with self._turn:
                stream = _Stream(asyncio.get_running_loop())
                self._streams.add(stream)
                self._executor.submit(self._run, stream, request, model)
                while True:
                    item = await stream.queue.get()
                    if isinstance(item, ComeapiError):
                        raise item
                    yield item
                    if isinstance(item, Finished):
                        return
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
        tokens = prompt_tokens(llama, loaded.template, request)
        # llama.cpp may round the context up (128 -> 256) while llama-cpp-python's token
        # buffer keeps the size asked for: the smaller one is the real limit.
        n_ctx = min(llama.n_ctx(), self._settings.ctx)
        budget = completion_budget(request, len(tokens), n_ctx)
        if request.seed is not None:
            # Reusing a cached prompt prefix changes the logits in the last bits, which is
            # enough to change a sample: a seeded request evaluates its whole prompt afresh.
            llama.reset()  # type: ignore[no-untyped-call]
            llama.set_seed(request.seed)
        else:
            llama.set_seed(random.getrandbits(32))
        text = TextAssembler(request.stop)
        vocab = llama._model.vocab  # private, but the only way to ask "end of generation?"
        started = time.perf_counter()
        generated = 0
        reason = "length"
        tokens_iter = llama.generate(
            tokens, top_k=request.top_k, top_p=request.top_p, temp=request.temperature
        )
        with contextlib.closing(tokens_iter):
            for token in tokens_iter:
                if stream.cancelled.is_set():
                    log.info("generation stopped after %d tokens: client gone", generated)
                    return
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    reason = "stop"
                    break
                generated += 1
                piece = text.feed(llama.detokenize([token]))
                if piece:
                    yield TextDelta(piece)
                if text.stopped:
                    reason = "stop"
                    break
                if generated >= budget:
                    break
        tail = text.flush()
        if tail:
            yield TextDelta(tail)
        if text.stopped:
            reason = "stop"
        elapsed = time.perf_counter() - started
        log.info(
            "%s: %d prompt + %d tokens in %.2fs (%.1f tokens/s), %s",
            model.name,
            len(tokens),
            generated,
            elapsed,
            generated / elapsed if elapsed > 0 else 0.0,
            reason,
        )
        yield Finished(reason, Usage(prompt_tokens=len(tokens), completion_tokens=generated))

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
