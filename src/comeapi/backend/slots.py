"""The batched engine's decode loop: S slots over one llama.cpp context, run by one thread.

Each step decodes the next token of every generating sequence in one ``llama_decode`` call,
then prefills a bounded amount of prompt (whole chunks) of newly admitted sequences; requests
join and leave between steps. Waiting requests take free slots in FIFO order.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from comeapi.backend.decoding import TextAssembler
from comeapi.backend.engine import Event, Finished, TextDelta
from comeapi.backend.native import Entry, NativeModel, SamplerChain
from comeapi.errors import ComeapiError, UnavailableError
from comeapi.protocol.responses import Usage

log = logging.getLogger("comeapi.backend")

# Prompt tokens per llama_decode call of one sequence. Chunk boundaries depend only on the
# prompt, so a prompt is computed the same way whatever else is running.
PREFILL_CHUNK = 128
# Prompt tokens prefilled per step (at least one chunk): bounds how long a long prompt
# delays the next token of the sequences already generating.
PREFILL_BUDGET = 128
# A sequence decoding alone gets a padding token in a second stream once its cache is this
# long: llama.cpp switches a lone single-token decode with >= 512 KV cells to a split-KV
# attention kernel whose rounding differs from the batched one.
LONE_PAD_FROM = 128

Sink = Callable[[Event | ComeapiError], None]


@dataclass(eq=False)
class Sequence:
    """One generation. The decode thread owns everything but ``cancelled``."""

    prompt: list[int]
    budget: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: tuple[str, ...]
    sink: Sink
    label: str = ""
    cancelled: threading.Event = field(default_factory=threading.Event)
    slot: int = -1
    order: int = 0
    n_past: int = 0  # tokens in the KV cache
    next_token: int = -1  # sampled, to be decoded in the next step
    generated: int = 0
    started: float = 0.0
    first_token: float = 0.0
    sampler: SamplerChain | None = None
    text: TextAssembler | None = None

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.prompt)


class DecodeLoop:
    """Runs sequences on ``slots`` KV streams of one ``NativeModel`` from its own thread."""

    def __init__(self, model: NativeModel, slots: int):
        if model.n_seq < max(slots, 2):
            raise ValueError("the context needs max(slots, 2) streams")
        self._model = model
        self._slots: list[Sequence | None] = [None] * slots
        self._waiting: deque[Sequence] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._order = itertools.count()
        self._thread = threading.Thread(target=self._run, name="comeapi-decode", daemon=True)
        self.failed: BaseException | None = None

    # --- any thread ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, seq: Sequence) -> None:
        """Queue ``seq``; it takes the first free slot in FIFO order."""
        with self._lock:
            if self._stopping or self.failed is not None:
                raise UnavailableError("the backend is shutting down", retry_after=2)
            self._waiting.append(seq)
        self._wake.set()

    def cancel(self, seq: Sequence) -> None:
        """Stop ``seq`` before the next step; its slot and KV cells are freed then."""
        seq.cancelled.set()
        self._wake.set()

    def stop(self) -> None:
        """Finish the current step, fail every sequence left, stop the thread (blocking)."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def busy_slots(self) -> int:
        return sum(seq is not None for seq in self._slots)

    # --- the decode thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._wake.clear()
                self._drop_cancelled()
                self._admit()
                if not any(self._slots):
                    self._wake.wait()
                    continue
                self._decode_step()
                self._prefill_step()
        except BaseException as exc:
            log.exception("the decode loop failed")
            self.failed = exc
        finally:
            self._fail_all(UnavailableError("the backend is shutting down", retry_after=2))

    def _drop_cancelled(self) -> None:
        for seq in self._slots:
            if seq is not None and seq.cancelled.is_set():
                log.info("generation stopped after %d tokens: client gone", seq.generated)
                self._release(seq)
        with self._lock:
            if any(seq.cancelled.is_set() for seq in self._waiting):
                self._waiting = deque(s for s in self._waiting if not s.cancelled.is_set())

    def _admit(self) -> None:
        while True:
            free = next((i for i, seq in enumerate(self._slots) if seq is None), None)
            if free is None:
                return
            with self._lock:
                if not self._waiting:
                    return
                seq = self._waiting.popleft()
            seq.slot = free
            seq.order = next(self._order)
            seq.started = time.perf_counter()
            seq.sampler = SamplerChain(
                temperature=seq.temperature, top_k=seq.top_k, top_p=seq.top_p, seed=seq.seed
            )
            seq.text = TextAssembler(seq.stop)
            self._slots[free] = seq

    def _decode_step(self) -> None:
        """One token for every generating sequence, all in one llama_decode call.

        llama.cpp splits a batch of separate streams into one micro-batch per run of
        consecutive sequence ids, so gaps (free or still-prefilling slots) are filled with
        padding tokens that are removed right after; the batch stays one micro-batch.
        """
        generating = [s for s in self._slots if s is not None and not s.prefilling]
        if not generating:
            return
        lo, hi = generating[0].slot, generating[-1].slot
        streams = list(range(lo, hi + 1))
        if len(generating) == 1 and generating[0].n_past >= LONE_PAD_FROM:
            streams = [lo, lo + 1] if lo + 1 < self._model.n_seq else [lo - 1, lo]
        entries: list[Entry] = []
        pads: list[tuple[int, int]] = []
        for stream in streams:
            seq = self._slots[stream] if stream < len(self._slots) else None
            if seq is not None and not seq.prefilling:
                entries.append(Entry(seq.next_token, seq.n_past, stream, True))
            else:
                pos = seq.n_past if seq is not None else 0
                entries.append(Entry(self._model.pad_token, pos, stream, False))
                pads.append((stream, pos))
        try:
            rc = self._model.decode(entries)
        finally:
            for stream, pos in pads:
                self._model.forget(stream, pos)
        if rc != 0:
            for seq in generating:
                self._fail(seq, ComeapiError(f"llama_decode failed ({rc})"))
            return
        for index, stream in enumerate(streams):
            seq = self._slots[stream] if stream < len(self._slots) else None
            if seq is not None and not seq.prefilling:
                assert seq.sampler is not None
                token = seq.sampler.sample(self._model, index)
                seq.n_past += 1
                self._accept(seq, token)

    def _prefill_step(self) -> None:
        budget = PREFILL_BUDGET
        pending = sorted(
            (s for s in self._slots if s is not None and s.prefilling), key=lambda s: s.order
        )
        for seq in pending:
            while seq.prefilling:
                start = seq.n_past
                end = min(start + PREFILL_CHUNK, len(seq.prompt))
                if end - start > budget and budget < PREFILL_BUDGET:
                    return
                last = end == len(seq.prompt)
                entries = [
                    Entry(token, start + j, seq.slot, last and start + j == end - 1)
                    for j, token in enumerate(seq.prompt[start:end])
                ]
                rc = self._model.decode(entries)
                if rc != 0:
                    self._fail(seq, ComeapiError(f"llama_decode failed ({rc})"))
                    break
                seq.n_past = end
                budget -= end - start
                if last:
                    assert seq.sampler is not None
                    seq.first_token = time.perf_counter()
                    self._accept(seq, seq.sampler.sample(self._model, len(entries) - 1))
                if budget <= 0:
                    return

    def _accept(self, seq: Sequence, token: int) -> None:
        """Stream a sampled token's text, or finish the sequence."""
        tokenizer = self._model.tokenizer
        if tokenizer.is_eog(token):
            self._finish(seq, "stop")
            return
        assert seq.text is not None
        seq.generated += 1
        piece = seq.text.feed(tokenizer.piece(token))
        if piece:
            seq.sink(TextDelta(piece))
        if seq.text.stopped:
            self._finish(seq, "stop")
        elif seq.generated >= seq.budget:
            self._finish(seq, "length")
        else:
            seq.next_token = token

    def _finish(self, seq: Sequence, reason: str) -> None:
        assert seq.text is not None
        tail = seq.text.flush()
        if tail:
            seq.sink(TextDelta(tail))
        if seq.text.stopped:
            reason = "stop"
        seq.sink(Finished(reason, Usage(len(seq.prompt), seq.generated)))
        elapsed = time.perf_counter() - seq.started
        log.info(
            "%s slot %d: %d prompt + %d tokens in %.2fs (first token after %.2fs), %s",
            seq.label,
            seq.slot,
            len(seq.prompt),
            seq.generated,
            elapsed,
            (seq.first_token or time.perf_counter()) - seq.started,
            reason,
        )
        self._release(seq)

    def _fail(self, seq: Sequence, error: ComeapiError) -> None:
        log.error("%s slot %d: %s", seq.label, seq.slot, error.message)
        seq.sink(error)
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        """Free the slot: its KV cells, its sampler; the next waiting request may take it."""
        self._slots[seq.slot] = None
        self._model.forget(seq.slot)
        if seq.sampler is not None:
            seq.sampler.close()
            seq.sampler = None
        seq.slot = -1

    def _fail_all(self, error: ComeapiError) -> None:
        for seq in self._slots:
            if seq is not None:
                seq.sink(error)
                self._release(seq)
        with self._lock:
            self._stopping = True
            waiting, self._waiting = self._waiting, deque()
        for seq in waiting:
            seq.sink(error)
