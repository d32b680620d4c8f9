"""The batched engine's decode loop: S slots over one llama.cpp context, run by one thread.

Each step decodes the next token of every generating sequence in one ``llama_decode`` call,
then prefills a bounded amount of prompt (whole chunks) of newly admitted sequences; requests
join and leave between steps. Waiting sequences take free slots in FIFO order. A prompt starts
from the longest prefix of whole chunks any stream holds (``comeapi.backend.prefixes``), and
the n choices of one prompt share its prefill: one prefill, copied cells, the same logits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from comeapi.backend.decoding import PREFILL_CHUNK, ChoiceText, prompt_logprobs
from comeapi.backend.engine import Event, Finished, TextDelta
from comeapi.backend.native import Entry, NativeModel
from comeapi.backend.prefixes import PrefixCache
from comeapi.backend.sampling import LogprobReader, Sampler, SamplingParams
from comeapi.errors import ComeapiError, UnavailableError
from comeapi.protocol.responses import TokenLogprob, Usage

log = logging.getLogger("comeapi.backend")

# Prompt tokens prefilled per step (at least one chunk): bounds how long a long prompt
# delays the next token of the sequences already generating.
PREFILL_BUDGET = 128
# A sequence decoding alone gets a padding token in a second stream once its cache is this
# long: llama.cpp switches a lone single-token decode with >= 512 KV cells to a split-KV
# attention kernel whose rounding differs from the batched one.
LONE_PAD_FROM = 128
# From this many outputs, an odd decode step gets one more (a padding row with its logits
# computed and ignored) where the start-up measurement found pairs cheaper
# (``pairs_are_cheaper``). A lone output is the cheap case.
EVEN_OUTPUTS_FROM = 3

Item = Event | ComeapiError


class Sink(Protocol):
    """Where one request's events go: ``deliver`` is called on ``loop``, its event loop, with
    the events of one decode step."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    def deliver(self, items: list[Item]) -> None: ...


@dataclass(eq=False)
class Sequence:
    """One choice of a request. The decode thread owns everything but ``cancelled``."""

    prompt: list[int]
    budget: int
    sampling: SamplingParams
    sink: Sink
    index: int = 0
    stop: tuple[str, ...] = ()
    echo: str | None = None  # completions' echo: this text is sent before the first token
    logprobs: LogprobReader | None = None
    score_prompt: bool = False  # echo with logprobs: the prompt tokens' log probabilities
    leader: Sequence | None = None  # the choice of the same prompt whose prefill it shares
    label: str = ""
    cancelled: threading.Event = field(default_factory=threading.Event)
    slot: int = -1
    order: int = 0
    n_past: int = 0  # tokens in the KV cache
    reused: int = 0  # prompt tokens whose cells were kept from an earlier prompt
    scores: list[TokenLogprob | None] = field(default_factory=lambda: [None])
    prompt_logprobs: list[TokenLogprob] | None = None
    next_token: int = -1  # sampled, to be decoded in the next step
    generated: int = 0
    started: float = 0.0
    first_token: float = 0.0
    sampler: Sampler | None = None
    text: ChoiceText | None = None

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.prompt)

    @property
    def scoring(self) -> bool:
        """Still computing its prompt's log probabilities (cells then dropped)."""
        return self.score_prompt and self.prompt_logprobs is None

    @property
    def following(self) -> bool:
        """Waiting for its leader's prefill, which it will share."""
        return self.leader is not None and self.leader.slot >= 0 and self.leader.prefilling


def pairs_are_cheaper(model: NativeModel, repeats: int = 3) -> tuple[bool, float, float]:
    """Whether a decode step with 4 outputs costs less than one with 3 on this model and
    machine, measured on empty streams 0-3 (left empty again): (the answer, the fastest of
    ``repeats`` 3-output steps, of 4-output steps, in seconds). Where it does (llama.cpp's
    CPU product on AVX2 with a Q8_0 or Q5_0 output matrix), odd steps get one more output
    (``DecodeLoop._even_up``); elsewhere (a K-quant output matrix, a GPU) the extra
    row would only cost. Either way no number changes, only the time a step takes."""

    def step(outputs: int) -> float:
        entries = [Entry(model.pad_token, 0, stream, True) for stream in range(outputs)]
        started = time.perf_counter()
        rc = model.decode(entries)
        elapsed = time.perf_counter() - started
        for stream in range(outputs):
            model.forget(stream)
        if rc != 0:
            raise ComeapiError(f"llama_decode failed ({rc})")
        return elapsed

    step(4)  # the first product pays for page faults and buffers
    three: list[float] = []
    four: list[float] = []
    for _ in range(repeats):
        three.append(step(3))
        four.append(step(4))
    return min(four) < min(three), min(three), min(four)


class DecodeLoop:
    """Runs sequences on ``slots`` KV streams of one ``NativeModel`` from its own thread."""

    def __init__(self, model: NativeModel, slots: int):
        if model.n_seq < max(slots, 2):
            raise ValueError("the context needs max(slots, 2) streams")
        self._model = model
        # Whether odd decode steps get one more output (``_even_up``): possible from
        # EVEN_OUTPUTS_FROM slots with a spare stream, and then measured (None until then)
        # on the decode thread before the first request (``_run``): llama.cpp computes with
        # OpenMP, whose threads belong to the thread that calls it, and a second calling
        # thread would leave a second team of them waiting beside the first (a single
        # stream measured 59-61 tok/s instead of 66-69).
        spare = model.n_seq > slots >= EVEN_OUTPUTS_FROM
        self._even_outputs: bool | None = None if spare else False
        self._slots: list[Sequence | None] = [None] * slots
        self._prefixes = PrefixCache(model, slots)
        self._waiting: deque[Sequence] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._order = itertools.count()
        self._outbox: dict[Sink, list[Item]] = {}  # this step's events, not yet handed over
        self._thread = threading.Thread(target=self._run, name="comeapi-decode", daemon=True)
        self.failed: BaseException | None = None

    # --- any thread ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, *seqs: Sequence) -> None:
        """Queue ``seqs`` (together: a prompt's choices stay next to each other); they take
        free slots in FIFO order."""
        with self._lock:
            if self._stopping or self.failed is not None:
                raise UnavailableError("the backend is shutting down", retry_after=2)
            self._waiting.extend(seqs)
        self._wake.set()

    def cancel(self, seq: Sequence) -> None:
        """Stop ``seq`` before the next step; its slot is freed then."""
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

    def cached_prefixes(self) -> list[int]:
        """Tokens each free slot keeps for later prompts (0 for busy slots)."""
        return [
            len(p) if s is None else 0
            for s, p in zip(self._slots, self._prefixes.held, strict=True)
        ]

    # --- the decode thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self._even_outputs is None:
                self._even_outputs, three, four = pairs_are_cheaper(self._model)
                log.info(
                    "decode steps of 3 outputs %.1f ms, of 4 outputs %.1f ms: %s",
                    three * 1e3,
                    four * 1e3,
                    "odd steps get one more output" if self._even_outputs else "odd steps stay odd",
                )
            while not self._stopping:
                self._wake.clear()
                self._drop_cancelled()
                self._admit()
                if not any(self._slots):
                    self._wake.wait()
                    continue
                self._decode_step()
                self._flush()
                self._prefill_step()
                self._flush()
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
        while None in self._slots:
            with self._lock:
                if not self._waiting:
                    return
                seq = self._waiting.popleft()
            free = [i for i, s in enumerate(self._slots) if s is None]
            fresh = seq.following or seq.scoring  # its slot's cells are dropped anyway
            seq.slot = self._prefixes.choose(free, None if fresh else seq.prompt)
            seq.order = next(self._order)
            seq.started = time.perf_counter()
            tokenizer = self._model.tokenizer
            seq.sampler = Sampler(
                tokenizer.vocab, tokenizer.n_vocab, seq.sampling, tokenizer.special
            )
            seq.text = ChoiceText(seq.stop, base=len(seq.echo) if seq.echo is not None else 0)
            self._slots[seq.slot] = seq
            if seq.leader is not None and seq.leader.prompt_logprobs is not None:
                seq.prompt_logprobs = seq.leader.prompt_logprobs
            if seq.following or seq.scoring:
                self._prefixes.take(seq.slot, None, self._sources())
            else:
                seq.n_past = seq.reused = self._prefixes.take(seq.slot, seq.prompt, self._sources())

    def _sources(self) -> list[list[int]]:
        """The prompt tokens whose cells each busy stream holds, computed in whole chunks
        from position 0 (what another prompt may copy)."""
        out: list[list[int]] = []
        for seq in self._slots:
            if seq is None or seq.scoring or seq.following:
                out.append([])
            else:
                out.append(seq.prompt[: min(seq.n_past, len(seq.prompt))])
        return out

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
                # After whatever the stream holds: a prompt being computed, a kept prefix.
                pos = self._model.kv_tokens(stream)
                entries.append(Entry(self._model.pad_token, pos, stream, False))
                pads.append((stream, pos))
        if self._even_outputs and len(generating) >= EVEN_OUTPUTS_FROM and len(generating) % 2:
            self._even_up(entries, streams, pads, hi)
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
                seq.n_past += 1
                self._sample(seq, index)

    def _even_up(
        self, entries: list[Entry], streams: list[int], pads: list[tuple[int, int]], hi: int
    ) -> None:
        """One more output for an odd count: llama.cpp's CPU matrix product (llamafile's
        tinyBLAS on AVX2) takes the output rows two at a time and the odd last one in a pass
        of its own over the whole output matrix, which costs about what a pair does (5
        outputs 51.9 ms, 5 and a padding output 45.1 ms on the bundled model;
        docs/batching.md). A padding row already in the batch has its logits computed; else
        one is added in the stream after the last generating one (a spare stream is kept for
        this). Its logits are never read, and every row's numbers are the same either way
        (tests/backend/test_batched.py).
        """
        for i, entry in enumerate(entries):
            if not entry.logits:
                entries[i] = Entry(entry.token, entry.pos, entry.seq, True)
                return
        stream = hi + 1  # not a generating slot; at most the spare stream (n_seq > slots)
        pos = self._model.kv_tokens(stream)
        entries.append(Entry(self._model.pad_token, pos, stream, True))
        streams.append(stream)
        pads.append((stream, pos))

    def _prefill_step(self) -> None:
        budget = PREFILL_BUDGET
        pending = sorted(
            (s for s in self._slots if s is not None and s.prefilling and not s.following),
            key=lambda s: s.order,
        )
        for seq in pending:
            if seq.scoring:
                budget -= self._score(seq)
                continue
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
                    self._prefilled(seq, len(entries) - 1)
                    # Its first token goes out now, not after the other prompts' prefills.
                    self._flush()
                if budget <= 0:
                    return

    def _score(self, seq: Sequence) -> int:
        """One pass step over the prompt with every position's logits (at most one output
        per stream of the context); the cells are dropped once the prompt is scored."""
        start = len(seq.scores) - 1
        end = min(start + self._model.n_seq, len(seq.prompt))
        entries = [Entry(t, start + j, seq.slot, True) for j, t in enumerate(seq.prompt[start:end])]
        rc = self._model.decode(entries)
        if rc != 0:
            self._fail(seq, ComeapiError(f"llama_decode failed ({rc})"))
            return len(entries)
        assert seq.logprobs is not None
        for j in range(len(entries)):
            if start + j + 1 < len(seq.prompt):
                logits = self._model.logits(j)
                seq.scores.append(seq.logprobs.read(logits, seq.prompt[start + j + 1]))
        if end == len(seq.prompt):
            tokenizer = self._model.tokenizer
            seq.prompt_logprobs = prompt_logprobs(tokenizer, seq.prompt, seq.scores)
            self._model.forget(seq.slot)
        return len(entries)

    def _prefilled(self, seq: Sequence, index: int) -> None:
        """The prompt is in the cache: its followers get a copy of the cells and sample from
        the same logits (output row ``index``), then it samples its own first token."""
        now = time.perf_counter()
        for other in self._slots:
            if other is not None and other.leader is seq and other.n_past == 0:
                self._model.copy(seq.slot, other.slot)
                other.n_past = len(other.prompt)
                other.prompt_logprobs = seq.prompt_logprobs
                other.first_token = now
                self._begin(other, index)
        seq.first_token = now
        self._begin(seq, index)

    def _begin(self, seq: Sequence, index: int) -> None:
        if seq.echo is not None:
            self._send(seq, TextDelta(seq.echo, seq.index, tuple(seq.prompt_logprobs or ())))
        self._sample(seq, index)

    def _sample(self, seq: Sequence, index: int) -> None:
        """Sample the next token from output row ``index`` of the last decode; stream its
        text, or finish the sequence."""
        tokenizer = self._model.tokenizer
        assert seq.sampler is not None and seq.text is not None
        token = seq.sampler.sample_at(self._model.ctx, index, tokenizer.is_eog)
        if tokenizer.is_eog(token):
            self._finish(seq, "stop")
            return
        seq.generated += 1
        entry = None
        if seq.logprobs is not None:
            entry = seq.logprobs.read(self._model.logits(index), token)
        piece, entries = seq.text.feed(tokenizer.piece(token), entry)
        if piece or entries:
            self._send(seq, TextDelta(piece, seq.index, tuple(entries)))
        if seq.text.stopped:
            self._finish(seq, "stop")
        elif seq.generated >= seq.budget:
            self._finish(seq, "length")
        else:
            seq.next_token = token

    def _finish(self, seq: Sequence, reason: str) -> None:
        assert seq.text is not None
        tail, entries = seq.text.finish()
        if tail or entries:
            self._send(seq, TextDelta(tail, seq.index, tuple(entries)))
        if seq.text.stopped:
            reason = "stop"
        self._send(seq, Finished(reason, Usage(len(seq.prompt), seq.generated), seq.index))
        elapsed = time.perf_counter() - seq.started
        log.info(
            "%s slot %d: choice %d: %d prompt (%d reused) + %d tokens in %.2fs "
            "(first token after %.2fs), %s",
            seq.label,
            seq.slot,
            seq.index,
            len(seq.prompt),
            seq.reused,
            seq.generated,
            elapsed,
            (seq.first_token or time.perf_counter()) - seq.started,
            reason,
        )
        self._release(seq)

    def _fail(self, seq: Sequence, error: ComeapiError) -> None:
        log.error("%s slot %d: %s", seq.label, seq.slot, error.message)
        self._send(seq, error)
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        """Free the slot and the sampler; the slot keeps the prompt's whole chunks for a
        later prompt, and the next waiting sequence may take it."""
        self._slots[seq.slot] = None
        computed = 0 if seq.scoring else min(seq.n_past, len(seq.prompt))
        self._prefixes.keep(seq.slot, seq.prompt[:computed])
        if seq.sampler is not None:
            seq.sampler.close()
            seq.sampler = None
        seq.slot = -1

    def _fail_all(self, error: ComeapiError) -> None:
        for seq in self._slots:
            if seq is not None:
                self._send(seq, error)
                self._release(seq)
        with self._lock:
            self._stopping = True
            waiting, self._waiting = self._waiting, deque()
        for seq in waiting:
            self._send(seq, error)
        self._flush()

    def _send(self, seq: Sequence, item: Item) -> None:
        self._outbox.setdefault(seq.sink, []).append(item)

    def _flush(self) -> None:
        """Hand the events so far over: one call into each event loop after the decode and
        after each prompt's prefill, however many tokens and requests (not one wake-up of the
        loop per token)."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Sink, list[Item]]]] = {}
        for sink, items in self._outbox.items():
            by_loop.setdefault(sink.loop, []).append((sink, items))
        self._outbox = {}
        for loop, batch in by_loop.items():
            # RuntimeError: the event loop is closed, nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, batch)


def _deliver(batch: list[tuple[Sink, list[Item]]]) -> None:
    for sink, items in batch:
        sink.deliver(items)
