"""BatchedEngine with the real bundled model: batched text equals solo text, slots are
independent and freed at once, FIFO admission; then `comeapi backend --slots 5` over HTTP."""

from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from comeapi.backend.batched import BatchedEngine
from comeapi.backend.decoding import PREFILL_CHUNK
from comeapi.backend.engine import Event, Finished, TextDelta
from comeapi.backend.native import Entry, NativeModel, lib
from comeapi.backend.slots import LONE_PAD_FROM, pairs_are_cheaper
from comeapi.errors import ContextLengthError, ModelNotFoundError, UnavailableError
from comeapi.protocol.requests import GenerationRequest, parse_request
from comeapi.settings import load_settings
from tests.helpers import BUNDLED_MODEL, Proc, comeapi_argv, free_port

pytestmark = pytest.mark.slow

CTX = 512
# Long enough for three prefill chunks, and for a lone decode to reach llama.cpp's split-KV
# attention kernel (512 KV cells) unless the engine pads it.
LONG_PROMPT = "Inventory list. " + " ".join(f"Box {i} holds {i * 7} apples;" for i in range(45))
# System prompts of about 430 tokens for the prefix-reuse tests (no other prompt starts like
# them, so a first run computes them afresh).
RULES = " ".join(f"Rule {i}: answer item {i} with care and {i * 3} words." for i in range(23))
SYSTEM = "You are a careful assistant. " + RULES
OTHER_SYSTEM = "Be a patient helper. " + RULES
PROMPTS = [
    "The capital of France is",
    LONG_PROMPT,
    "def fibonacci(n):",
    "日本の首都は",
    "1, 2, 3, 4,",
]


def request(prompt: str, **fields: Any) -> GenerationRequest:
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0.0, **fields}
    return parse_request("completion", body, max_tokens_limit=4096)


def start_engine(model_dir: Path, slots: int) -> BatchedEngine:
    settings = load_settings(model_dir=model_dir, slots=slots, ctx=CTX, threads=2)
    engine = BatchedEngine(settings)
    asyncio.run(engine.start())
    return engine


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[BatchedEngine]:
    engine = start_engine(model_dir, slots=5)
    yield engine
    asyncio.run(engine.close())


async def run(engine: BatchedEngine, req: GenerationRequest) -> tuple[str, Finished]:
    pieces: list[str] = []
    async for event in engine.generate(req, BUNDLED_MODEL):
        if isinstance(event, TextDelta):
            assert "\ufffd" not in event.text  # only whole UTF-8 characters
            pieces.append(event.text)
        else:
            return "".join(pieces), event
    raise AssertionError("no Finished event")


async def run_all(engine: BatchedEngine, req: GenerationRequest) -> list[tuple[str, Finished]]:
    """Every choice's text and Finished event, by index."""
    texts: dict[int, str] = {}
    done: dict[int, Finished] = {}
    async for event in engine.generate(req, BUNDLED_MODEL):
        if isinstance(event, TextDelta):
            texts[event.index] = texts.get(event.index, "") + event.text
        else:
            done[event.index] = event
    return [(texts.get(i, ""), done[i]) for i in sorted(done)]


def prefills(batches: list[list[Entry]]) -> list[list[Entry]]:
    """The prefill calls among recorded batches: several tokens of one stream."""
    return [b for b in batches if len(b) > 1 and len({e.seq for e in b}) == 1]


def recorder(model: NativeModel, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """Record the decode batches and stream copies of ``model`` from now on."""
    seen: dict[str, list[Any]] = {"batches": [], "copies": []}
    decode, copy = model.decode, model.copy

    def recording_decode(entries: Any) -> int:
        seen["batches"].append(list(entries))
        return int(decode(entries))

    def recording_copy(source: int, target: int) -> None:
        seen["copies"].append((source, target))
        copy(source, target)

    monkeypatch.setattr(model, "decode", recording_decode)
    monkeypatch.setattr(model, "copy", recording_copy)
    return seen


Results = list[tuple[str, Finished]]


def solo_then_together(
    engine: BatchedEngine, reqs: list[GenerationRequest]
) -> tuple[Results, Results]:
    async def scenario() -> tuple[Results, Results]:
        solo = [await run(engine, r) for r in reqs]
        together = await asyncio.gather(*(run(engine, r) for r in reqs))
        return solo, list(together)

    return asyncio.run(scenario())


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(6000):  # 30 s
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not met in time")


def assert_idle(engine: BatchedEngine) -> None:
    assert engine.in_flight == 0
    decoder, model = engine._decoder, engine._model
    assert decoder is not None and model is not None
    deadline = time.monotonic() + 5
    while decoder.busy_slots() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert decoder.busy_slots() == 0
    # A free slot holds only the whole prompt chunks it keeps for later prompts.
    kept = decoder.cached_prefixes() + [0] * (model.n_seq - len(decoder.cached_prefixes()))
    assert [model.kv_tokens(s) for s in range(model.n_seq)] == kept
    assert all(k % PREFILL_CHUNK == 0 for k in kept)


# --- correctness ---------------------------------------------------------------------------


def test_greedy_text_is_the_same_alone_and_in_a_full_batch(engine: BatchedEngine) -> None:
    tokens = len(engine._model.tokenizer.tokenize(LONG_PROMPT.encode()))  # type: ignore[union-attr]
    # Over 256 cached tokens llama.cpp attends over 512 cells: its split-KV kernel's threshold.
    assert tokens > 2 * PREFILL_CHUNK and tokens > 256
    reqs = [request(p, max_tokens=12) for p in PROMPTS]
    solo, together = solo_then_together(engine, reqs)
    for prompt, (solo_text, solo_done), (text, done) in zip(PROMPTS, solo, together, strict=True):
        assert text == solo_text, prompt[:40]
        assert done == solo_done
        assert done.usage.completion_tokens > 0
    assert len({text for text, _ in together}) == len(PROMPTS)
    assert_idle(engine)


def test_gaps_and_a_lone_long_sequence_are_padded(
    engine: BatchedEngine, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decode batch covers consecutive streams (llama.cpp would split it into several
    micro-batches otherwise): a slot still prefilling between two generating ones gets a
    padding token; so does a second stream next to a lone sequence with a long cache.
    The solo answers come from the module's engine, the scenario runs on a fresh one (no
    kept prefixes, so slots are taken lowest first)."""
    short = request("The capital of France is", max_tokens=24)
    brief = request("Hello", max_tokens=8)
    long = request(LONG_PROMPT, max_tokens=36)  # outlasts the short ones: ends alone

    async def solo_runs() -> list[tuple[str, Finished]]:
        return [await run(engine, r) for r in (short, long)]

    solo = asyncio.run(solo_runs())
    fresh = start_engine(model_dir, slots=5)
    model = fresh._model
    assert model is not None
    batches: list[list[Entry]] = []
    decode = model.decode

    def recording(entries: Any) -> int:
        batches.append(list(entries))
        return int(decode(entries))

    monkeypatch.setattr(model, "decode", recording)

    async def scenario() -> None:
        decoder = fresh._decoder
        assert decoder is not None
        first = asyncio.ensure_future(run(fresh, short))
        await until(lambda: decoder.busy_slots() == 1)
        second = asyncio.ensure_future(run(fresh, brief))
        await until(lambda: decoder.busy_slots() == 2)
        third = asyncio.ensure_future(run(fresh, short))
        await until(lambda: decoder.busy_slots() == 3)
        await second  # slot 1 is free again, slots 0 and 2 keep generating
        middle = asyncio.ensure_future(run(fresh, long))  # prefills in slot 1
        assert [await first, await middle, await third] == [solo[0], solo[1], solo[0]]

    try:
        asyncio.run(scenario())
        assert_idle(fresh)
    finally:
        asyncio.run(fresh.close())
    steps = [b for b in batches if len({e.seq for e in b}) == len(b)]  # one token per stream
    lone_long = [b for b in steps if b[0].pos >= LONE_PAD_FROM and sum(e.logits for e in b) == 1]
    assert lone_long and all(len(b) == 2 for b in lone_long)
    gap = [b for b in steps if [e.seq for e in b] == [0, 1, 2] and not b[1].logits]
    assert gap, "no decode step padded the prefilling slot 1"
    assert all(b[1].token == model.pad_token and b[1].pos % PREFILL_CHUNK == 0 for b in gap)
    assert any(b[1].pos > 0 for b in gap), "no padding token while slot 1 was prefilling"


def test_padding_gives_a_lone_decode_the_batched_numbers(model_dir: Path) -> None:
    """Why the lone sequence is padded: with >= 512 KV cells llama.cpp decodes a single
    stream's single token with a split-KV attention kernel that rounds differently."""
    model = NativeModel(
        model_dir / BUNDLED_MODEL, n_seq=3, ctx=1024, batch_size=PREFILL_CHUNK, threads=2
    )
    try:
        vocab_size = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model._model))
        short, long = (model.tokenizer.tokenize(p.encode()) for p in ("Hello there", LONG_PROMPT))
        for seq, tokens in ((0, short), (1, long)):
            for start in range(0, len(tokens), PREFILL_CHUNK):
                chunk = tokens[start : start + PREFILL_CHUNK]
                entries = [Entry(t, start + j, seq, False) for j, t in enumerate(chunk)]
                assert model.decode(entries) == 0

        def long_logits(entries: list[Entry]) -> list[float]:
            """Logits of the long sequence's next token decoded in this batch (then undone)."""
            assert model.decode(entries) == 0
            index = next(i for i, e in enumerate(entries) if e.seq == 1)
            row = lib.llama_get_logits_ith(model.ctx, index)
            values = [row[i] for i in range(vocab_size)]
            for e in entries:
                model.forget(e.seq, e.pos)
            return values

        step = Entry(100, len(long), 1, True)
        alone = long_logits([step])
        batched = long_logits([Entry(200, len(short), 0, True), step])
        pad_in_free_stream = long_logits([step, Entry(model.pad_token, 0, 2, False)])
        pad_in_used_stream = long_logits([Entry(model.pad_token, len(short), 0, False), step])
        assert pad_in_free_stream == batched
        assert pad_in_used_stream == batched
        assert alone != batched, "llama.cpp no longer needs the padding (LONE_PAD_FROM)"
    finally:
        model.close()


def test_an_extra_output_leaves_every_rows_logits_as_they_were(model_dir: Path) -> None:
    """Why an odd decode step may get one more output row (``DecodeLoop._even_up``):
    the padding row, in a free stream, changes no bit of the other rows' logits, whether
    the step has 3 or 5 outputs."""
    model = NativeModel(
        model_dir / BUNDLED_MODEL, n_seq=6, ctx=1024, batch_size=PREFILL_CHUNK, threads=2
    )
    try:
        cheaper, three, four = pairs_are_cheaper(model, repeats=1)  # on the empty streams
        assert isinstance(cheaper, bool) and three > 0 and four > 0
        assert [model.kv_tokens(s) for s in range(6)] == [0] * 6
        vocab_size = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model._model))
        prompts = [model.tokenizer.tokenize(p.encode()) for p in PROMPTS]
        for seq, tokens in enumerate(prompts):
            for start in range(0, len(tokens), PREFILL_CHUNK):
                chunk = tokens[start : start + PREFILL_CHUNK]
                assert (
                    model.decode([Entry(t, start + j, seq, False) for j, t in enumerate(chunk)])
                    == 0
                )

        def step(seqs: list[int], pad: bool) -> dict[int, list[float]]:
            """Each sequence's logits for its next token in this step (then undone)."""
            entries = [Entry(100 + s, len(prompts[s]), s, True) for s in seqs]
            if pad:
                entries.append(Entry(model.pad_token, 0, 5, True))
            assert model.decode(entries) == 0
            rows = {}
            for i, s in enumerate(seqs):
                row = lib.llama_get_logits_ith(model.ctx, i)
                rows[s] = [row[v] for v in range(vocab_size)]
            for e in entries:
                model.forget(e.seq, e.pos)
            return rows

        for seqs in ([0, 1, 2, 3, 4], [2, 3, 4]):
            assert step(seqs, pad=True) == step(seqs, pad=False), seqs
        assert [model.kv_tokens(s) for s in range(6)] == [len(p) for p in prompts] + [0]
    finally:
        model.close()


@pytest.mark.parametrize("even", [True, False])
def test_odd_decode_steps_get_one_more_output_where_pairs_are_cheaper(
    engine: BatchedEngine, model_dir: Path, monkeypatch: pytest.MonkeyPatch, even: bool
) -> None:
    """With 3 or 5 sequences generating, a step asks for 4 or 6 outputs when the start-up
    measurement found pairs cheaper (the padding row in the spare stream), and keeps its
    count when not; the text is the same either way, and the same as alone."""
    reqs = [request(p, max_tokens=10) for p in PROMPTS]
    solo_texts = [asyncio.run(run(engine, r)) for r in reqs]
    monkeypatch.setattr("comeapi.backend.slots.pairs_are_cheaper", lambda model: (even, 0.04, 0.03))
    fresh = start_engine(model_dir, slots=5)
    model = fresh._model
    assert model is not None and model.n_seq == 6  # the five slots and the spare stream
    seen = recorder(model, monkeypatch)

    async def together() -> list[tuple[str, Finished]]:
        return list(await asyncio.gather(*(run(fresh, r) for r in reqs)))

    try:
        assert asyncio.run(together()) == solo_texts
        assert_idle(fresh)
    finally:
        asyncio.run(fresh.close())
    steps = [b for b in seen["batches"] if len({e.seq for e in b}) == len(b)]
    spare = [b for b in steps if any(e.seq == 5 for e in b)]
    odd = [b for b in steps if sum(e.logits for e in b) % 2 and sum(e.logits for e in b) >= 3]
    if even:
        assert spare and all(b[-1].logits and b[-1].token == model.pad_token for b in spare)
        assert not odd, "a step kept an odd number (3 or more) of outputs"
    else:
        assert not spare and odd


@pytest.mark.parametrize("slots", [1, 2])
def test_one_or_two_slots_have_no_spare_stream_and_measure_nothing(
    model_dir: Path, slots: int
) -> None:
    """Below 3 slots no step has 3 outputs: no spare stream, no start-up measurement (which
    needs 4 streams), and requests run as before."""
    fresh = start_engine(model_dir, slots=slots)
    try:
        assert fresh._model is not None and fresh._model.n_seq == 2
        assert fresh._decoder is not None and fresh._decoder._even_outputs is False
        text, done = asyncio.run(run(fresh, request("The capital of France is")))
        assert text and done.usage.completion_tokens > 0
        assert fresh.ready
    finally:
        asyncio.run(fresh.close())


def test_seeds_and_parameters_stay_in_their_own_slot(engine: BatchedEngine) -> None:
    story = "Once upon a time, in a small village,"
    reqs = [
        request(story, temperature=1.0, seed=1, max_tokens=10),
        request(story, temperature=1.0, seed=2, max_tokens=10),
        request(story, temperature=1.0, seed=3, max_tokens=10),
        request(story, temperature=1.3, top_k=5, top_p=0.5, seed=1, max_tokens=6),
        request("1, 2, 3, 4,", stop=", 8", max_tokens=16),  # greedy: " 5, 6, 7, 8, ..."
    ]
    solo, together = solo_then_together(engine, reqs)
    assert together == solo
    seeded = [text for text, _ in together[:3]]
    assert len(set(seeded)) == 3, seeded  # different seeds, different stories
    text, done = together[4]
    assert text == " 5, 6, 7" and done.reason == "stop"
    assert together[3][1].usage.completion_tokens == 6
    assert_idle(engine)


def test_n_choices_share_one_prefill_and_do_not_depend_on_the_batch(
    engine: BatchedEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """n sequences take the prompt's cells by a stream copy and sample from the same logits:
    greedy choices equal the n=1 answer; seeded ones are the same alone or in a full batch
    (two requests of n=3 need 6 slots: the last choice waits and prefills by itself)."""
    model = engine._model
    assert model is not None
    one = request("The capital of France is", max_tokens=8)
    greedy = request("The capital of France is", max_tokens=8, n=3)
    seeded = request("Once upon a time,", temperature=1.0, seed=5, n=3, max_tokens=8)

    async def scenario() -> tuple[list[Results], list[Results], dict[str, list[Any]]]:
        single = await run_all(engine, one)
        seen = recorder(model, monkeypatch)
        solo = [await run_all(engine, r) for r in (greedy, seeded)]
        alone = {key: list(values) for key, values in seen.items()}
        together = await asyncio.gather(
            run_all(engine, greedy), run_all(engine, seeded), run_all(engine, request(PROMPTS[1]))
        )
        return [single, *solo], list(together), alone

    (single, solo_greedy, solo_seeded), together, alone = asyncio.run(scenario())
    assert [text for text, _ in solo_greedy] == [single[0][0]] * 3
    assert [done.index for _, done in solo_greedy] == [0, 1, 2]
    assert len({text for text, _ in solo_seeded}) == 3  # seeds 5, 6, 7
    assert together[0] == solo_greedy and together[1] == solo_seeded
    # Alone, each request prefilled its prompt once and copied it to its two other choices.
    assert len(prefills(alone["batches"])) == 2
    assert len(alone["copies"]) == 4
    assert_idle(engine)


def test_shared_prefixes_are_reused_and_answers_stay_the_same(
    engine: BatchedEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt keeps the whole chunks it shares with an earlier one: from a free slot that
    kept them, or copied from a busy stream; the answer is the fresh one, bit for bit."""
    model, decoder = engine._model, engine._decoder
    assert model is not None and decoder is not None
    france = request(SYSTEM + " Question: what is the capital of France?", max_tokens=8)
    fruit = request(SYSTEM + " Question: name a red fruit, please.", max_tokens=40)
    seeded = request(OTHER_SYSTEM + " Question: tell me a story.", temperature=1.0, seed=3)
    seen = recorder(model, monkeypatch)

    async def scenario() -> list[Any]:
        fresh = await run(engine, france)
        fresh_seeded = await run(engine, seeded)
        again = await run(engine, france)  # the prefix kept in a free slot
        busy = asyncio.ensure_future(run(engine, fruit))  # takes the slot with the prefix
        await until(lambda: any(s is not None and not s.prefilling for s in decoder._slots))
        copied = await run(engine, france)  # copies the prefix from fruit's stream
        again_seeded = await run(engine, seeded)
        await busy
        return [fresh, again, copied, fresh_seeded, again_seeded]

    fresh, again, copied, fresh_seeded, again_seeded = asyncio.run(scenario())
    assert again == fresh and copied == fresh
    assert again_seeded == fresh_seeded
    starts = [b[0].pos for b in prefills(seen["batches"])]
    # Each system prompt's first run was computed in 4 chunks; the four runs after them kept
    # 3 chunks (384 tokens) and computed only the last one.
    chunks = [0, 128, 256, 384]
    assert starts == chunks + chunks + [3 * PREFILL_CHUNK] * 4, starts
    assert seen["copies"], "the prefix was never copied from another stream"
    assert_idle(engine)


def test_events_reach_the_event_loop_once_per_step_not_once_per_token(
    engine: BatchedEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decode thread wakes the event loop at most once per llama_decode call, whatever
    the number of tokens and requests in it (it used to wake it for every token)."""
    assert engine._model is not None
    seen = recorder(engine._model, monkeypatch)

    async def scenario() -> tuple[int, list[tuple[str, Finished]]]:
        loop = asyncio.get_running_loop()
        wakes = 0
        call_soon_threadsafe = loop.call_soon_threadsafe

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal wakes
            wakes += threading.current_thread().name == "comeapi-decode"
            return call_soon_threadsafe(*args, **kwargs)

        monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
        reqs = [request(f"{p[:60]} {i}", max_tokens=16) for i, p in enumerate(PROMPTS)]
        results = await asyncio.gather(*(run(engine, r) for r in reqs))
        return wakes, results

    wakes, results = asyncio.run(scenario())
    tokens = sum(done.usage.completion_tokens for _, done in results)
    assert tokens > 3 * len(PROMPTS)  # the streams ran side by side for several steps
    assert 0 < wakes <= len(seen["batches"]) < tokens
    assert_idle(engine)


def test_a_prompts_first_token_is_handed_over_before_the_next_prompt_is_prefilled(
    engine: BatchedEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompts admitted together are prefilled one after another (each in its own calls);
    each one's first token goes to the event loop as soon as its own prefill ends, not when
    the whole step's prefills are done (its client used to wait for the others' prompts)."""
    assert engine._model is not None
    timeline: list[str] = []
    decode = engine._model.decode

    def recording_decode(entries: Any) -> int:
        if len(entries) > 1 and len({e.seq for e in entries}) == 1:
            timeline.append("last prefill" if entries[-1].logits else "prefill")
        return int(decode(entries))

    monkeypatch.setattr(engine._model, "decode", recording_decode)

    async def scenario() -> list[tuple[str, Finished]]:
        loop = asyncio.get_running_loop()
        call_soon_threadsafe = loop.call_soon_threadsafe

        def recording_wake(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread().name == "comeapi-decode":
                timeline.append("wake")
            return call_soon_threadsafe(*args, **kwargs)

        monkeypatch.setattr(loop, "call_soon_threadsafe", recording_wake)
        # Short prompts: several fit in one step's prefill budget.
        reqs = [request(f"{p[:30]} {i}", max_tokens=2) for i, p in enumerate(PROMPTS)]
        return list(await asyncio.gather(*(run(engine, r) for r in reqs)))

    results = asyncio.run(scenario())
    assert all(done.usage.completion_tokens > 0 for _, done in results)
    ends = [i for i, what in enumerate(timeline) if what == "last prefill"]
    assert len(ends) == len(PROMPTS), timeline
    for i in ends:
        # The next thing after a prompt's last prefill call is the hand-over of its token.
        assert timeline[i + 1 : i + 2] == ["wake"], timeline
    assert_idle(engine)


def test_twenty_requests_on_five_slots_all_complete(engine: BatchedEngine) -> None:
    reqs = [request(f"{PROMPTS[i % 5][:60]} {i}", max_tokens=3) for i in range(20)]

    async def scenario() -> list[tuple[str, Finished]]:
        tasks = [asyncio.ensure_future(run(engine, r)) for r in reqs]
        peak = 0
        while not all(t.done() for t in tasks):
            peak = max(peak, engine.in_flight)
            assert engine._decoder is not None and engine._decoder.busy_slots() <= 5
            await asyncio.sleep(0.005)
        assert peak > 5  # requests beyond the slots waited inside the engine
        return [t.result() for t in tasks]

    results = asyncio.run(scenario())
    assert len(results) == 20
    for _, done in results:
        assert done.reason in ("length", "stop") and 0 < done.usage.completion_tokens <= 3
    assert_idle(engine)


def test_cancelled_stream_frees_its_slot_and_waiters_go_in_fifo_order(model_dir: Path) -> None:
    engine = start_engine(model_dir, slots=2)
    counting = request("1, 2, 3, 4,", max_tokens=400)  # greedy counting: no early stop

    async def scenario() -> None:
        firsts: list[str] = []

        async def waiter(name: str) -> None:
            async for event in engine.generate(request(f"{name}:", max_tokens=2), BUNDLED_MODEL):
                if not firsts or firsts[-1] != name:
                    firsts.append(name)
                if isinstance(event, Finished):
                    return

        a = engine.generate(counting, BUNDLED_MODEL)
        b = engine.generate(counting, BUNDLED_MODEL)
        await anext(a), await anext(b)  # both slots are busy now
        decoder = engine._decoder
        assert decoder is not None
        waiters = []
        for name in ("w1", "w2", "w3"):
            waiters.append(asyncio.ensure_future(waiter(name)))
            await until(lambda: len(decoder._waiting) == len(waiters))  # queued in order
        assert firsts == [] and engine.in_flight == 5
        await a.aclose()  # the client of slot "a" is gone
        await asyncio.gather(*waiters)
        assert firsts == ["w1", "w2", "w3"]
        # All three ran through the freed slot while "b" kept generating.
        event = await anext(b)
        assert isinstance(event, TextDelta)
        await b.aclose()

    try:
        asyncio.run(scenario())
        assert_idle(engine)
    finally:
        asyncio.run(engine.close())


def test_close_ends_running_and_waiting_generations(model_dir: Path) -> None:
    engine = start_engine(model_dir, slots=2)
    counting = request("1, 2, 3, 4,", max_tokens=400)

    async def scenario() -> list[BaseException | None]:
        async def consume(gen: AsyncIterator[Event]) -> BaseException | None:
            try:
                async for _ in gen:
                    pass
            except UnavailableError as exc:
                return exc
            return None

        gens = [engine.generate(counting, BUNDLED_MODEL) for _ in range(3)]
        await anext(gens[0]), await anext(gens[1])
        tasks = [asyncio.ensure_future(consume(g)) for g in gens]
        await until(lambda: engine._decoder is not None and len(engine._decoder._waiting) == 1)
        await engine.close()
        assert not engine.ready and engine.loaded_models() == []
        with pytest.raises(UnavailableError):
            await anext(engine.generate(counting, BUNDLED_MODEL))
        return await asyncio.gather(*tasks)

    errors = asyncio.run(scenario())
    assert all(isinstance(e, UnavailableError) for e in errors), errors


def test_bad_requests_fail_before_the_first_token(engine: BatchedEngine) -> None:
    async def first(req: GenerationRequest, model: str = BUNDLED_MODEL) -> Event:
        gen = engine.generate(req, model)
        try:
            return await anext(gen)
        finally:
            await gen.aclose()

    with pytest.raises(ContextLengthError):
        asyncio.run(first(request("Hello", max_tokens=CTX)))
    with pytest.raises(ContextLengthError):
        asyncio.run(first(request("word " * (CTX + 10))))
    with pytest.raises(ModelNotFoundError) as info:
        asyncio.run(first(request("Hello"), model="other.gguf"))
    assert info.value.available == [BUNDLED_MODEL]
    # The model's name without .gguf is the same model.
    assert isinstance(asyncio.run(first(request("Hello"), BUNDLED_MODEL[:-5])), TextDelta)
    assert engine.capacity == 5 and engine.context_per_slot == CTX
    assert_idle(engine)


# --- over HTTP: `comeapi backend --slots 5` ---------------------------------------------------


def start_backend(spawn: Any, model_dir: Path, slots: int) -> tuple[str, Proc]:
    port = free_port()
    argv = comeapi_argv(
        "backend",
        "--model-dir", str(model_dir),
        "--port", str(port),
        "--slots", str(slots),
        "--threads", "2",
        "--ctx", "1024",
    )  # fmt: skip
    proc: Proc = spawn(argv, name=f"backend-{slots}")
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(url + "/health", timeout=120)
    return url, proc


def test_greedy_text_is_the_same_alone_and_in_a_batch_of_eight_or_more(
    spawn: Any, model_dir: Path
) -> None:
    """From 8 rows on, llama.cpp's CPU backend multiplies K-quant matrices with another kernel
    (its tiled path), which rounds differently from the one for fewer rows: a sequence's
    greedy text depended on how many others decoded beside it (here the Japanese prompt
    went another way within 40 tokens). A backend with 8 slots or more turns that path
    off; the switch is read once per process, hence a backend process of its own."""
    url, _ = start_backend(spawn, model_dir, slots=9)
    prompts = [f"{p[:40]} ({i})" for i, p in enumerate(PROMPTS * 2)][:9]

    async def scenario() -> tuple[list[str], list[str]]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:

            async def text(prompt: str) -> str:
                body = {"prompt": prompt, "max_tokens": 40, "temperature": 0}
                response = await client.post("/v1/completions", json=body)
                assert response.status_code == 200, response.text
                return str(response.json()["choices"][0]["text"])

            solo = [await text(p) for p in prompts]
            together = await asyncio.gather(*(text(p) for p in prompts))
            return solo, list(together)

    solo, together = asyncio.run(scenario())
    for prompt, solo_text, text in zip(prompts, solo, together, strict=True):
        assert text == solo_text, prompt


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_five_slots_over_http_stream_together_and_health_stays_prompt(
    spawn: Any, model_dir: Path
) -> None:
    url, _ = start_backend(spawn, model_dir, slots=5)
    health = httpx.get(url + "/health", timeout=5).json()
    assert health["capacity"] == 5 and health["available"] == 5
    results: list[dict[str, Any]] = []

    def stream(i: int) -> None:
        body = {"prompt": PROMPTS[i], "max_tokens": 32, "temperature": 0.7, "seed": i}
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True},
                          timeout=120) as r:  # fmt: skip
            assert r.status_code == 200
            data = [line for line in r.iter_lines() if line.startswith("data: ")]
        results.append({"i": i, "done": data[-1] == "data: [DONE]", "chunks": len(data)})

    workers = [threading.Thread(target=stream, args=(i,)) for i in range(5)]
    latencies: list[float] = []
    in_flight: list[int] = []
    with httpx.Client(timeout=5) as client:
        for w in workers:
            w.start()
        while any(w.is_alive() for w in workers):
            started = time.perf_counter()
            probe = client.get(url + "/health")
            latencies.append(time.perf_counter() - started)
            assert probe.status_code == 200
            in_flight.append(probe.json()["in_flight"])
            time.sleep(0.02)
    for w in workers:
        w.join()
    assert sorted(r["i"] for r in results) == list(range(5))
    assert all(r["done"] and r["chunks"] > 2 for r in results)
    assert max(in_flight) == 5, "the five streams never ran together"
    # The decode loop runs off the event loop: /health answers within 100 ms meanwhile.
    assert statistics.median(latencies) < 0.1, latencies
    assert httpx.get(url + "/health", timeout=5).json()["in_flight"] == 0


def test_five_slots_hold_one_model_copy(spawn: Any, model_dir: Path) -> None:
    model_mb = (model_dir / BUNDLED_MODEL).stat().st_size / 2**20
    rss = {}
    for slots in (1, 5):
        url, proc = start_backend(spawn, model_dir, slots)
        body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0}
        assert httpx.post(url + "/generate", json=body, timeout=60).status_code == 200
        rss[slots] = rss_mb(proc.pid)
        proc.stop()
    # Five slots add KV cache (a few MB per slot here), not model copies.
    assert rss[5] < rss[1] + 0.5 * model_mb, rss
    assert rss[5] < 2 * model_mb + 200, rss


def test_a_batched_backend_advertises_only_the_model_it_serves(
    spawn: Any, model_dir: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    os.link(model_dir / BUNDLED_MODEL, models / BUNDLED_MODEL)
    os.link(model_dir / BUNDLED_MODEL, models / "other.gguf")
    port = free_port()
    argv = comeapi_argv(
        "backend", "--model-dir", str(models), "--port", str(port), "--slots", "2",
        "--threads", "1", "--ctx", "256", "--default-model", BUNDLED_MODEL,
    )  # fmt: skip
    proc: Proc = spawn(argv, name="backend-two-models")
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(url + "/health", timeout=120)
    # What /health lists is what a balancer routes here: only the model this engine runs.
    assert httpx.get(url + "/health", timeout=5).json()["models"] == [BUNDLED_MODEL]
    other = httpx.post(
        url + "/generate", json={"prompt": "Hi", "model_name": "other.gguf"}, timeout=30
    )
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
