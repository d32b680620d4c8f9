"""SerialEngine in-process with the real bundled model: model selection, LRU, early close."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from comeapi.backend.engine import Event, Finished, TextDelta
from comeapi.backend.serial import SerialEngine
from comeapi.backend.server import make_engine
from comeapi.errors import ConfigError, ContextLengthError, ModelNotFoundError
from comeapi.protocol.requests import GenerationRequest, parse_request
from comeapi.settings import load_settings
from tests.helpers import BUNDLED_MODEL

pytestmark = pytest.mark.slow


def link_model(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


@pytest.fixture
def two_models(model_dir: Path, tmp_path: Path) -> Path:
    models = tmp_path / "models"
    models.mkdir()
    for name in ("alpha.gguf", "beta.gguf"):
        link_model(model_dir / BUNDLED_MODEL, models / name)
    return models


def request(prompt: str = "Hello", **fields: Any) -> GenerationRequest:
    return parse_request("generate", {"prompt": prompt, **fields}, max_tokens_limit=4096)


async def run(engine: SerialEngine, req: GenerationRequest, model: str) -> list[Event]:
    return [event async for event in engine.generate(req, model)]


def test_model_name_selects_and_lru_evicts(two_models: Path) -> None:
    settings = load_settings(model_dir=two_models, threads=1, ctx=256, max_loaded_models=1)

    async def scenario() -> None:
        engine = SerialEngine(settings)
        assert not engine.ready
        await engine.start()
        try:
            assert engine.ready
            assert engine.loaded_models() == ["alpha.gguf"]  # the first by name is the default
            events = await run(engine, request(max_tokens=2), "beta.gguf")
            assert isinstance(events[-1], Finished)
            assert engine.loaded_models() == ["beta.gguf"]  # alpha evicted (cap 1)
            await run(engine, request(max_tokens=1), "alpha.gguf")
            assert engine.loaded_models() == ["alpha.gguf"]
            assert engine.ready  # still ready although the default was evicted once
            with pytest.raises(ModelNotFoundError):
                await run(engine, request(), "gamma.gguf")
        finally:
            await engine.close()
        assert engine.loaded_models() == []

    asyncio.run(scenario())


def test_larger_cap_keeps_models_in_lru_order(two_models: Path) -> None:
    settings = load_settings(model_dir=two_models, threads=1, ctx=256, max_loaded_models=2)

    async def scenario() -> None:
        engine = SerialEngine(settings)
        await engine.start()
        try:
            await run(engine, request(max_tokens=1), "beta.gguf")
            await run(engine, request(max_tokens=1), "alpha.gguf")
            assert engine.loaded_models() == ["beta.gguf", "alpha.gguf"]
        finally:
            await engine.close()

    asyncio.run(scenario())


def test_context_overflow_is_raised_before_any_token(model_dir: Path) -> None:
    settings = load_settings(model_dir=model_dir, threads=1, ctx=128)

    async def scenario() -> None:
        engine = SerialEngine(settings)
        await engine.start()
        try:
            events = engine.generate(request("word " * 200, max_tokens=1), BUNDLED_MODEL)
            with pytest.raises(ContextLengthError):
                await anext(events)
            assert engine.in_flight == 0
            with pytest.raises(ContextLengthError):
                await run(engine, request("Hi", max_tokens=128), BUNDLED_MODEL)
            # max_tokens None: up to the context, which a short prompt fits.
            chat = parse_request(
                "chat",
                {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
                max_tokens_limit=4096,
            )
            last = (await run(engine, chat, BUNDLED_MODEL))[-1]
            assert isinstance(last, Finished) and last.usage.completion_tokens <= 3
        finally:
            await engine.close()

    asyncio.run(scenario())


def test_closing_the_stream_frees_capacity_at_once(model_dir: Path) -> None:
    settings = load_settings(model_dir=model_dir, threads=1, ctx=512)

    async def scenario() -> None:
        engine = SerialEngine(settings)
        await engine.start()
        try:
            events = engine.generate(request("Once upon a time", max_tokens=400), BUNDLED_MODEL)
            assert isinstance(await anext(events), TextDelta)
            assert engine.in_flight == 1
            await events.aclose()  # type: ignore[attr-defined]
            assert engine.in_flight == 0
            # The next request is not stuck behind the remaining ~400 tokens.
            last = (await asyncio.wait_for(run(engine, request(max_tokens=2), BUNDLED_MODEL), 30))[
                -1
            ]
            assert isinstance(last, Finished)
        finally:
            await engine.close()

    asyncio.run(scenario())


def test_requests_beyond_capacity_wait_their_turn(model_dir: Path) -> None:
    settings = load_settings(model_dir=model_dir, threads=1, ctx=256)

    async def scenario() -> None:
        engine = SerialEngine(settings)
        await engine.start()
        try:
            results = await asyncio.gather(
                *(
                    run(engine, request(f"Number {i}:", max_tokens=3), BUNDLED_MODEL)
                    for i in range(3)
                )
            )
            assert all(isinstance(r[-1], Finished) for r in results)
            assert engine.in_flight == 0
        finally:
            await engine.close()

    asyncio.run(scenario())


def test_non_gguf_file_is_a_start_up_error(model_dir: Path, tmp_path: Path) -> None:
    link_model(model_dir / BUNDLED_MODEL, tmp_path / "good.gguf")
    (tmp_path / "broken.gguf").write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(ConfigError, match=r"broken\.gguf.*not a GGUF"):
        SerialEngine(load_settings(model_dir=tmp_path))


def test_corrupt_gguf_fails_to_load_clearly(tmp_path: Path) -> None:
    (tmp_path / "corrupt.gguf").write_bytes(b"GGUF" + b"\x00" * 64)
    engine = SerialEngine(load_settings(model_dir=tmp_path))
    with pytest.raises(ConfigError, match="cannot be loaded"):
        asyncio.run(engine.start())


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "does not exist"),
        ("empty", r"no \*\.gguf"),
        ("bad-default", "default_model"),
    ],
)
def test_bad_models_directory(tmp_path: Path, model_dir: Path, setup: str, message: str) -> None:
    overrides: dict[str, Any] = {"model_dir": tmp_path / "models"}
    if setup != "missing":
        (tmp_path / "models").mkdir()
    if setup == "bad-default":
        link_model(model_dir / BUNDLED_MODEL, tmp_path / "models" / BUNDLED_MODEL)
        overrides["default_model"] = "nope.gguf"
    with pytest.raises(ConfigError, match=message):
        SerialEngine(load_settings(**overrides))


RULES = " ".join(f"Rule {i}: answer item {i} with care and {i * 3} words." for i in range(23))


def test_whole_chunks_of_the_last_prompt_are_reused_and_answers_stay_the_same(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The context keeps the last prompt; the next one computes only what follows their
    common whole chunks, and a seeded answer is the same as when computed afresh."""
    settings = load_settings(model_dir=model_dir, threads=1, ctx=1024)
    prompts = [f"You are a careful assistant. {RULES} Question: {q}" for q in ("why?", "how?")]
    story = parse_request(
        "completion",
        {"prompt": prompts[0], "max_tokens": 8, "temperature": 1.0, "seed": 11},
        max_tokens_limit=4096,
    )
    other = parse_request(
        "completion", {"prompt": prompts[1], "max_tokens": 4}, max_tokens_limit=4096
    )
    evaluated: list[tuple[int, int]] = []  # (cells kept, tokens computed) of each prompt
    eval_ = llama_cpp.Llama.eval

    def recording(self: llama_cpp.Llama, tokens: list[int]) -> None:
        if len(tokens) > 1:
            evaluated.append((self.n_tokens, len(tokens)))
        eval_(self, tokens)

    monkeypatch.setattr(llama_cpp.Llama, "eval", recording)

    async def scenario() -> list[list[Event]]:
        engine = SerialEngine(settings)
        await engine.start()
        try:
            return [await run(engine, r, BUNDLED_MODEL) for r in (story, other, story)]
        finally:
            await engine.close()

    fresh, _, again = asyncio.run(scenario())
    assert again == fresh
    assert [kept for kept, _ in evaluated] == [0, 384, 384]
    assert 384 < evaluated[0][1] < 512


def test_make_engine_picks_by_slots(model_dir: Path) -> None:
    assert isinstance(make_engine(load_settings(model_dir=model_dir)), SerialEngine)
    several = load_settings(model_dir=model_dir, slots=2)
    if importlib.util.find_spec("comeapi.backend.batched") is None:
        with pytest.raises(ConfigError, match="slots"):
            make_engine(several)
    else:
        engine = make_engine(several)
        assert type(engine).__name__ == "BatchedEngine"
        assert engine.capacity == 2
