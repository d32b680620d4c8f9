"""No special token in any answer: with the bundled Gemma 3 270M, both engines, streamed and
not. Seeds 1, 4 and 6 of the poem prompt drew ``<start_of_image>`` as their first token
before special tokens were masked (its GGUF marks it USER_DEFINED, which llama.cpp renders
as text)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from comeapi.backend.batched import BatchedEngine
from comeapi.backend.engine import Engine, Finished, TextDelta
from comeapi.backend.native import NativeModel
from comeapi.backend.serial import SerialEngine
from comeapi.backend.vocab import special_tokens, token_text
from comeapi.cache.checks import check_answer
from comeapi.errors import RequestError
from comeapi.models.bundled import SMOLLM2_MODEL
from comeapi.protocol.requests import parse_request
from comeapi.settings import load_settings
from tests.helpers import BUNDLED_MODEL, Proc, comeapi_argv, free_port

pytestmark = pytest.mark.slow

POEM = "Write a short poem about the sea:"
LEAKING_SEEDS = (1, 4, 6)  # drew <start_of_image> first, at temperature 0.8
SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}
START_OF_IMAGE, END_OF_TURN, STRONG = 255999, 106, 198


@pytest.fixture(scope="module")
def batched(model_dir: Path) -> Iterator[BatchedEngine]:
    # One thread: two spin on each other when the machine's cores are shared.
    settings = load_settings(model_dir=model_dir, slots=16, ctx=128, threads=1)
    engine = BatchedEngine(settings)
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.close())


@pytest.fixture(scope="module")
def serial(model_dir: Path) -> Iterator[SerialEngine]:
    settings = load_settings(model_dir=model_dir, ctx=128, threads=1)
    engine = SerialEngine(settings)
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.close())


async def answers(engine: Engine, body: dict[str, Any], kind: str = "completion") -> list[Any]:
    """Every choice's (text, finish reason), by index."""
    request = parse_request(kind, body, max_tokens_limit=4096)
    texts: dict[int, list[str]] = {}
    reasons: dict[int, str] = {}
    async for event in engine.generate(request, BUNDLED_MODEL):
        if isinstance(event, TextDelta):
            texts.setdefault(event.index, []).append(event.text)
        elif isinstance(event, Finished):
            reasons[event.index] = event.reason
    return [("".join(texts.get(i, [])), reasons[i]) for i in sorted(reasons)]


def test_the_special_tokens_of_gemma_3(model_dir: Path) -> None:
    model = NativeModel(model_dir / BUNDLED_MODEL, n_seq=1, ctx=64, batch_size=8, threads=1)
    try:
        vocab = model.tokenizer.vocab
        special = set(special_tokens(vocab).tolist())
        names = {token_text(vocab, t) for t in special}
    finally:
        model.close()
    # the image placeholders (USER_DEFINED) and the control tokens that do not end a turn
    assert {"<start_of_image>", "<end_of_image>", "[multimodal]", "<start_of_turn>"} <= names
    assert {"<pad>", "<bos>", "<unused0>"} <= names
    # end-of-generation tokens stay: sampling one ends the answer
    assert END_OF_TURN not in special and 1 not in special  # <end_of_turn>, <eos>
    # ordinary text that Gemma keeps as single tokens
    assert STRONG not in special and 107 not in special  # "<strong>", "\n"
    assert START_OF_IMAGE in special


@pytest.mark.parametrize("engine_name", ["batched", "serial"])
def test_seeds_that_drew_start_of_image_no_longer_write_it(
    engine_name: str, request: pytest.FixtureRequest
) -> None:
    engine = request.getfixturevalue(engine_name)
    for seed in LEAKING_SEEDS:
        body = {"prompt": POEM, "max_tokens": 3, "seed": seed, **SAMPLING}
        [(text, reason)] = asyncio.run(answers(engine, body))
        assert "<start_of_image>" not in text, (seed, text)
        assert text and reason == "length"


def test_no_special_token_in_1000_answers(batched: BatchedEngine) -> None:
    """1,008 short answers (completion and chat, 16 seeds per request) from the batched
    engine: no special token's text in any, and the quality check agrees."""
    vocab_names = _special_names(batched)
    chat = [{"role": "user", "content": "Hello! What can you help me with?"}]
    jobs: list[tuple[str, dict[str, Any]]] = []
    for j in range(63):
        seed = j // 2 * 16  # choice i draws with seed + i: seeds 0..511 of each kind
        if j % 2 == 0:
            jobs.append(("completion", {"prompt": POEM, "n": 16, "seed": seed}))
        else:
            jobs.append(("chat", {"messages": chat, "n": 16, "seed": seed}))

    async def run_all() -> list[tuple[str, str]]:
        done = await asyncio.gather(
            *(answers(batched, {**body, "max_tokens": 3, **SAMPLING}, kind) for kind, body in jobs)
        )
        return [a for group in done for a in group]

    results = asyncio.run(run_all())
    assert len(results) == 1008
    leaked = [
        text
        for text, _ in results
        if any(name in text for name in vocab_names)
        or "special_token"
        in check_answer(text, kind="prompt", prompt=POEM, messages=None, finish_reason="stop")
    ]
    assert leaked == []
    assert sum(1 for text, _ in results if text.strip()) > 900  # answers, not nothing


def _special_names(engine: BatchedEngine) -> set[str]:
    model = engine._model
    assert model is not None
    vocab = model.tokenizer.vocab
    return {token_text(vocab, t) for t in special_tokens(vocab).tolist()}


@pytest.mark.parametrize("engine_name", ["batched", "serial"])
def test_an_end_of_generation_token_ends_the_answer_unwritten(
    engine_name: str, request: pytest.FixtureRequest
) -> None:
    engine = request.getfixturevalue(engine_name)
    body = {"prompt": POEM, "max_tokens": 8, "seed": 1, "logit_bias": {str(END_OF_TURN): 100}}
    [(text, reason)] = asyncio.run(answers(engine, body))
    assert (text, reason) == ("", "stop")


@pytest.mark.parametrize("engine_name", ["batched", "serial"])
def test_a_positive_bias_cannot_bring_a_special_token_back(
    engine_name: str, request: pytest.FixtureRequest
) -> None:
    engine = request.getfixturevalue(engine_name)
    body = {"prompt": POEM, "max_tokens": 2, "logit_bias": {str(START_OF_IMAGE): 100}}
    with pytest.raises(RequestError) as info:
        asyncio.run(answers(engine, body))
    assert info.value.param == "logit_bias"
    assert "<start_of_image>" in info.value.message
    # a negative bias is harmless, and a bias on text that is one token in Gemma still works
    body["logit_bias"] = {str(START_OF_IMAGE): -100, str(STRONG): 100}
    [(text, _)] = asyncio.run(answers(engine, body))
    assert text == "<strong><strong>"


@pytest.fixture(scope="module", params=[1, 4])
def backend_url(
    request: pytest.FixtureRequest, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`comeapi backend` with the serial engine (1 slot) or the batched one (4 slots)."""
    port = free_port()
    argv = comeapi_argv(
        "backend", "--model-dir", str(model_dir), "--port", str(port), "--threads", "1",
        "--ctx", "256", "--slots", str(request.param),
    )  # fmt: skip
    proc = Proc(argv, tmp_path_factory.mktemp("backend") / "backend.log")
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http(url + "/health", timeout=120)
        yield url
    finally:
        proc.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_over_http_streamed_and_not(backend_url: str, stream: bool) -> None:
    for seed in LEAKING_SEEDS:
        body = {"prompt": POEM, "max_tokens": 3, "seed": seed, "stream": stream, **SAMPLING}
        r = httpx.post(backend_url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        if stream:
            events = [
                json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")
            ]
            text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
        else:
            text = r.json()["choices"][0]["text"]
        assert text and "<start_of_image>" not in text, (seed, text)


def test_smollm2_chat_answers_end_at_its_end_of_turn(smollm2_dir: Path) -> None:
    """The default model: ChatML's <|im_start|> and StarCoder's <repo_name>... are masked,
    <|im_end|> and <|endoftext|> end the answer, unwritten."""
    model = NativeModel(smollm2_dir / SMOLLM2_MODEL, n_seq=1, ctx=64, batch_size=8, threads=1)
    try:
        vocab = model.tokenizer.vocab
        names = {token_text(vocab, t) for t in model.tokenizer.special.tolist()}
    finally:
        model.close()
    assert {"<|im_start|>", "<repo_name>", "<file_sep>", "<jupyter_code>"} <= names
    assert not {"<|im_end|>", "<|endoftext|>"} & names
    settings = load_settings(model_dir=smollm2_dir, ctx=256, threads=1)
    engine = SerialEngine(settings)

    async def run() -> list[Any]:
        await engine.start()
        try:
            chat = [{"role": "user", "content": "What is the capital of Japan?"}]
            body = {"messages": chat, "max_tokens": 48, "temperature": 0}
            request = parse_request("chat", body, max_tokens_limit=4096)
            texts, reasons = [], []
            async for event in engine.generate(request, SMOLLM2_MODEL):
                if isinstance(event, TextDelta):
                    texts.append(event.text)
                elif isinstance(event, Finished):
                    reasons.append(event.reason)
            return ["".join(texts), *reasons]
        finally:
            await engine.close()

    text, reason = asyncio.run(run())
    assert reason == "stop" and "Tokyo" in text
    assert "<|" not in text
