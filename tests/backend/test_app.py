"""The backend over real HTTP with real inference on the bundled model (one process per module)."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.helpers import BUNDLED_MODEL, Proc, comeapi_argv, free_port

pytestmark = pytest.mark.slow

CTX = 256  # small, so "longer than the context" is cheap to send
TOKENS_LIMIT = 512


@dataclass
class Backend:
    url: str
    proc: Proc

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(self.url + "/health", timeout=5).json()
        return body

    def wait_idle(self, timeout: float = 5.0) -> float:
        """Seconds until in_flight is 0 again; fails after ``timeout``."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.health()["in_flight"] == 0:
                return time.monotonic() - start
            time.sleep(0.02)
        raise AssertionError(f"still busy after {timeout}s: {self.health()}")


@pytest.fixture(scope="module")
def backend(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    port = free_port()
    argv = comeapi_argv(
        "backend",
        "--model-dir", str(model_dir),
        "--port", str(port),
        "--threads", "1",
        "--ctx", str(CTX),
        "--backend-queue", "1",
        "--max-tokens-limit", str(TOKENS_LIMIT),
    )  # fmt: skip
    proc = Proc(argv, tmp_path_factory.mktemp("backend") / "backend.log")
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http(url + "/health", timeout=120)
        yield Backend(url, proc)
    finally:
        proc.stop()


def post(
    backend: Backend, path: str, body: Any, timeout: float | httpx.Timeout = 60
) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(
        backend.url + path,
        content=content,
        headers={"content-type": "application/json"},
        timeout=timeout,
    )


# --- status routes ----------------------------------------------------------------------


def test_health_contract(backend: Backend) -> None:
    r = httpx.get(backend.url + "/health", timeout=5)
    assert r.status_code == 200
    body = r.json()
    instance = body.pop("instance")  # random per process start: who answers on this port
    assert isinstance(instance, str) and len(instance) == 16
    assert body == {
        "status": "ok",
        "capacity": 1,
        "in_flight": 0,
        "available": 1,
        "models": [BUNDLED_MODEL],
        "loaded_models": [BUNDLED_MODEL],
    }


def test_status_and_model_listings(backend: Backend) -> None:
    status = httpx.get(backend.url + "/", timeout=5).json()
    assert status["message"] == "ComeAPI Backend"
    assert status["status"] == "idle"
    assert status["models"] == [BUNDLED_MODEL]
    assert httpx.get(backend.url + "/status", timeout=5).json()["status"] == "idle"

    models = httpx.get(backend.url + "/models", timeout=5).json()
    assert models["models"] == [{"name": BUNDLED_MODEL, "size_mb": pytest.approx(241.4, abs=1)}]

    listing = httpx.get(backend.url + "/v1/models", timeout=5).json()
    assert listing["object"] == "list"
    [entry] = listing["data"]
    assert entry["id"] == BUNDLED_MODEL
    assert entry["object"] == "model"
    assert entry["owned_by"] == "comeapi"
    assert isinstance(entry["created"], int)


# --- generation -------------------------------------------------------------------------


def test_generate_comeapi_shape_and_real_usage(backend: Backend) -> None:
    r = post(backend, "/generate", {"prompt": "The capital of France is", "max_tokens": 6})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"response", "model", "finish_reason", "usage"}
    assert isinstance(body["response"], str) and body["response"]
    assert body["model"] == BUNDLED_MODEL
    usage = body["usage"]
    assert usage["prompt_tokens"] == 6  # <bos> + 5 tokens of the prompt
    assert 1 <= usage["completion_tokens"] <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if usage["completion_tokens"] < 6:
        assert body["finish_reason"] == "stop"
    else:
        assert body["finish_reason"] == "length"


def test_model_name_selects_the_file(backend: Backend) -> None:
    for name in (BUNDLED_MODEL, BUNDLED_MODEL.removesuffix(".gguf")):
        r = post(backend, "/generate", {"prompt": "Hi", "model_name": name, "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == BUNDLED_MODEL


def test_same_seed_same_answer(backend: Backend) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0, "seed": 1234}
    first = post(backend, "/generate", body).json()["response"]
    second = post(backend, "/generate", body).json()["response"]
    assert first == second


def test_stop_string_cuts_the_answer(backend: Backend) -> None:
    body: dict[str, Any] = {"prompt": "1, 2, 3, 4,", "max_tokens": 12, "temperature": 0.0}
    greedy = post(backend, "/v1/completions", body).json()["choices"][0]["text"]
    assert len(greedy) > 4, greedy
    stop = greedy[3:5]
    cut = post(backend, "/v1/completions", {**body, "stop": [stop]}).json()["choices"][0]
    assert cut["text"] == greedy[: greedy.index(stop)]
    assert cut["finish_reason"] == "stop"


def sse_events(response: httpx.Response) -> list[bytes]:
    """The raw events of an SSE body, each checked to be one ``data: ...`` block."""
    raw = b"".join(response.iter_bytes())
    assert raw.endswith(b"\n\n")
    events = raw[:-2].split(b"\n\n")
    for event in events:
        assert event.startswith(b"data: "), event
        assert b"\n" not in event, event
    return [e.removeprefix(b"data: ") for e in events]


@pytest.mark.parametrize(
    ("path", "request_body"),
    [
        ("/generate", {"prompt": "The sky is"}),
        ("/v1/completions", {"prompt": "The sky is"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "The sky is"}]}),
    ],
)
def test_stream_framing_matches_the_full_answer(
    backend: Backend, path: str, request_body: dict[str, Any]
) -> None:
    body = {**request_body, "max_tokens": 5, "temperature": 0.0}
    full = post(backend, path, body).json()
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", backend.url + path, json={**body, "stream": True}) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        events = sse_events(r)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    if path == "/generate":
        text = "".join(c["response"] for c in chunks)
        assert chunks[-1]["done"] is True
        assert chunks[-1]["usage"] == full["usage"]
        assert text == full["response"]
        return
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1
    if path == "/v1/completions":
        assert all(c["object"] == "text_completion" for c in chunks)
        text = "".join(c["choices"][0]["text"] for c in chunks)
        assert text == full["choices"][0]["text"]
    else:
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        first = {"role": "assistant", "content": "", "refusal": None}
        assert chunks[0]["choices"][0]["delta"] == first
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text == full["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_openai_client(backend: Backend) -> None:
    client = openai.OpenAI(
        base_url=backend.url + "/v1", api_key="unused", max_retries=0, timeout=60
    )
    try:
        assert [m.id for m in client.models.list()] == [BUNDLED_MODEL]

        chat = client.chat.completions.create(
            model=BUNDLED_MODEL,
            messages=[
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Name a colour."},
            ],
            max_tokens=4,
        )
        assert chat.choices[0].message.role == "assistant"
        assert isinstance(chat.choices[0].message.content, str)
        assert chat.usage is not None and chat.usage.completion_tokens <= 4

        completion = client.completions.create(model=BUNDLED_MODEL, prompt="Hello", max_tokens=4)
        assert completion.choices[0].finish_reason in {"stop", "length"}
        assert completion.usage is not None and completion.usage.prompt_tokens > 0

        stream = client.chat.completions.create(
            model=BUNDLED_MODEL,
            messages=[{"role": "user", "content": "Count: one, two,"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 4
        assert any(c.choices and c.choices[0].finish_reason for c in chunks)

        pieces = client.completions.create(
            model=BUNDLED_MODEL, prompt="Hello", max_tokens=4, stream=True
        )
        assert "".join(c.choices[0].text for c in pieces) is not None

        with pytest.raises(openai.NotFoundError) as err:
            client.completions.create(model="gpt-4", prompt="Hello", max_tokens=2)
        assert err.value.body is not None
    finally:
        client.close()


# --- bad input --------------------------------------------------------------------------

BAD_INPUT = [
    ("/generate", b'{"prompt": ', 400, None, "invalid_json"),
    ("/generate", b"\xff\xfe not utf-8", 400, None, "invalid_json"),
    ("/generate", b"[" * 100_000, 400, None, "invalid_json"),
    ("/generate", b'["a list"]', 400, None, "invalid_json"),
    ("/generate", {}, 400, "prompt", None),
    ("/generate", {"prompt": ""}, 400, "prompt", None),
    ("/generate", {"prompt": 42}, 400, "prompt", None),
    ("/generate", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
    ("/generate", {"prompt": "hi", "max_tokens": -5}, 400, "max_tokens", None),
    ("/generate", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens", None),
    ("/generate", {"prompt": "hi", "max_tokens": 1.5}, 400, "max_tokens", None),
    ("/generate", {"prompt": "hi", "max_tokens": TOKENS_LIMIT + 1}, 400, "max_tokens", None),
    ("/generate", {"prompt": "hi", "temperature": -0.1}, 400, "temperature", None),
    ("/generate", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", None),
    ("/generate", {"prompt": "hi", "top_p": -0.5}, 400, "top_p", None),
    ("/generate", {"prompt": "hi", "top_p": 1.5}, 400, "top_p", None),
    ("/generate", {"prompt": "hi", "top_k": -1}, 400, "top_k", None),
    ("/generate", {"prompt": "hi", "seed": -1}, 400, "seed", None),
    ("/generate", {"prompt": "hi", "stream": "yes"}, 400, "stream", None),
    ("/generate", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ("/v1/completions", {"prompt": [1, 2]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": "hi", "n": 17}, 400, "n", None),
    ("/v1/completions", {"prompt": "hi", "suffix": "x"}, 400, "suffix", "unsupported_parameter"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "best_of", None),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, None, None),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages", None),
    ("/v1/chat/completions", {"prompt": "hi"}, 400, "messages", None),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), BAD_INPUT)
def test_bad_input_is_a_clear_4xx(
    backend: Backend, path: str, body: Any, status: int, param: str | None, code: str | None
) -> None:
    r = post(backend, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error
    if code is not None:
        assert error["code"] == code


def test_prompt_longer_than_the_context(backend: Backend) -> None:
    long_prompt = "word " * (CTX + 10)
    r = post(backend, "/generate", {"prompt": long_prompt, "max_tokens": 1})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "prompt"

    r = post(backend, "/generate", {"prompt": "Hi", "max_tokens": CTX})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "max_tokens"

    chat = {"messages": [{"role": "user", "content": long_prompt}], "stream": True}
    r = post(backend, "/v1/chat/completions", chat)
    assert r.status_code == 400  # checked before the stream starts: a status, not an event
    assert r.json()["error"]["param"] == "messages"


def test_unknown_model_is_404_listing_the_models(backend: Backend) -> None:
    r = post(backend, "/generate", {"prompt": "hi", "model_name": "qwen3-4b.Q4_K_M.gguf"})
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "model_not_found"
    assert error["available_models"] == [BUNDLED_MODEL]
    assert BUNDLED_MODEL in error["message"]


def test_oversized_body_wrong_method_and_route(backend: Backend) -> None:
    big = orjson.dumps({"prompt": "x" * 300_000})
    assert post(backend, "/generate", big).status_code == 413
    r = httpx.get(backend.url + "/generate", timeout=5)
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.get(backend.url + "/nope", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_still_healthy_after_all_that(backend: Backend) -> None:
    assert backend.proc.popen.poll() is None
    assert backend.health()["status"] == "ok"
    assert post(backend, "/generate", {"prompt": "Hi", "max_tokens": 2}).status_code == 200


# --- concurrency: health while generating, disconnects, the wait queue --------------------


def test_health_answers_promptly_during_a_long_generation(backend: Backend) -> None:
    result: dict[str, Any] = {}

    def generate() -> None:
        body = {"prompt": "Once upon a time", "max_tokens": 100, "temperature": 1.0, "seed": 7}
        result["response"] = post(backend, "/generate", body)

    worker = threading.Thread(target=generate)
    latencies: list[float] = []
    busy = 0
    with httpx.Client(timeout=5) as client:
        worker.start()
        while worker.is_alive():
            started = time.perf_counter()
            health = client.get(backend.url + "/health")
            latencies.append(time.perf_counter() - started)
            assert health.status_code == 200
            busy += health.json()["in_flight"]
            time.sleep(0.01)
    worker.join()
    assert result["response"].status_code == 200
    assert result["response"].json()["usage"]["completion_tokens"] >= 50
    assert busy >= 10, "the probes did not overlap the generation"
    # A probe that waited on the generation would take most of its duration (seconds).
    slow = [t for t in latencies if t > 0.1]
    assert statistics.median(latencies) < 0.05, latencies
    assert len(slow) <= len(latencies) // 100, f"{len(slow)} of {len(latencies)} probes > 100ms"
    assert max(latencies) < 0.5, latencies


def test_client_disconnect_mid_stream_stops_the_generation(backend: Backend) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 1.0, "stream": True}
    before = backend.proc.log().count("client gone")
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", backend.url + "/generate", json=body) as r,
    ):
        chunks = r.iter_bytes()
        next(chunks)
        next(chunks)
    # Leaving the block closed the connection mid-stream.
    assert backend.wait_idle(timeout=3.0) < 3.0
    started = time.monotonic()
    r = post(backend, "/generate", {"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200
    assert time.monotonic() - started < 10  # not stuck behind the 200 tokens
    log = _wait_for_log(backend, "client gone", before + 1)
    stopped_after = int(log.split("generation stopped after ")[-1].split()[0])
    assert stopped_after < 200


def test_client_disconnect_without_stream_stops_the_generation(backend: Backend) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 1.0}
    before = backend.proc.log().count("client gone")
    with pytest.raises(httpx.ReadTimeout):
        post(backend, "/generate", body, timeout=httpx.Timeout(5, read=0.5))
    assert backend.wait_idle(timeout=3.0) < 3.0
    _wait_for_log(backend, "client gone", before + 1)


def _wait_for_log(backend: Backend, text: str, count: int) -> str:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        log = backend.proc.log()
        if log.count(text) >= count:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged {count} times:\n{backend.proc.log()[-3000:]}")


def test_busy_backend_queues_then_refuses(backend: Backend) -> None:
    """Capacity 1 + a queue of 1 (--backend-queue 1): the third request gets 503 at once."""

    async def scenario() -> httpx.Response:
        long = {"prompt": "Once upon a time", "max_tokens": 200, "stream": True}
        async with httpx.AsyncClient(timeout=30) as client:
            running = asyncio.create_task(_read_forever(client, backend.url, long))
            waiting = asyncio.create_task(_read_forever(client, backend.url, long))
            try:
                deadline = time.monotonic() + 10
                while (await client.get(backend.url + "/health")).json()["in_flight"] < 2:
                    assert time.monotonic() < deadline, "the two requests never overlapped"
                    await asyncio.sleep(0.02)
                health = (await client.get(backend.url + "/health")).json()
                assert health["available"] == 0
                return await client.post(
                    backend.url + "/generate", json={"prompt": "Hi", "max_tokens": 1}
                )
            finally:
                running.cancel()
                waiting.cancel()
                await asyncio.gather(running, waiting, return_exceptions=True)

    refused = asyncio.run(scenario())
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"
    assert backend.wait_idle(timeout=3.0) < 3.0  # the waiting request left the queue too
    assert post(backend, "/generate", {"prompt": "Hi", "max_tokens": 1}).status_code == 200


async def _read_forever(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> None:
    async with client.stream("POST", url + "/generate", json=body) as r:
        async for _ in r.aiter_bytes():
            pass
