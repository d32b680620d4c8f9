"""Response bodies and SSE chunks in ComeAPI's and OpenAI's formats."""

from __future__ import annotations

import orjson

from comeapi.errors import ContextLengthError
from comeapi.protocol.responses import (
    DONE,
    Answer,
    StreamEncoder,
    Usage,
    full_body,
    read_answer,
    sse_error,
)

USAGE = Usage(prompt_tokens=3, completion_tokens=2)


def events(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n")
    parts = raw[:-2].split(b"\n\n")
    assert all(p.startswith(b"data: ") for p in parts)
    return [p.removeprefix(b"data: ") for p in parts]


def test_usage_totals() -> None:
    assert USAGE.to_dict() == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_full_bodies() -> None:
    generate = full_body("generate", model="m", text="hi", finish_reason="stop", usage=USAGE)
    assert generate == {
        "response": "hi",
        "model": "m",
        "finish_reason": "stop",
        "usage": USAGE.to_dict(),
    }
    completion = full_body("completion", model="m", text="hi", finish_reason="length", usage=USAGE)
    assert completion["object"] == "text_completion"
    assert completion["id"].startswith("cmpl-")
    assert completion["choices"] == [
        {"text": "hi", "index": 0, "logprobs": None, "finish_reason": "length"}
    ]
    chat = full_body(
        "chat", model="m", text="hi", finish_reason="stop", usage=USAGE, id="x", created=5
    )
    assert (chat["id"], chat["created"], chat["object"]) == ("x", 5, "chat.completion")
    # OpenAI's schema requires "refusal" on every message; null says there was none.
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "hi", "refusal": None}


def test_chat_stream() -> None:
    enc = StreamEncoder("chat", "m", id="chatcmpl-1", created=7)
    raw = enc.start() + enc.delta("Hel") + enc.delta("lo") + enc.finish("stop", USAGE)
    parts = events(raw)
    assert parts[-1] == b"[DONE]"
    chunks = [orjson.loads(p) for p in parts[:-1]]
    assert {c["id"] for c in chunks} == {"chatcmpl-1"}
    assert all(c["object"] == "chat.completion.chunk" and c["created"] == 7 for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas == [
        {"role": "assistant", "content": "", "refusal": None},
        {"content": "Hel"},
        {"content": "lo"},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "stop"]
    assert "usage" not in chunks[-1]


def test_completion_stream_with_usage_chunk() -> None:
    enc = StreamEncoder("completion", "m", include_usage=True)
    assert enc.start() == b""
    parts = events(enc.delta("a") + enc.finish("length", USAGE))
    chunks = [orjson.loads(p) for p in parts[:-1]]
    assert chunks[0]["choices"][0]["text"] == "a"
    assert chunks[1]["choices"][0]["finish_reason"] == "length"
    assert chunks[2]["choices"] == [] and chunks[2]["usage"] == USAGE.to_dict()
    # With include_usage every other chunk carries "usage": null (OpenAI's schema).
    assert [c["usage"] for c in chunks[:2]] == [None, None]


def test_a_finished_answer_streams_as_word_sized_chunks() -> None:
    enc = StreamEncoder("chat", "m", include_usage=True)
    parts = events(enc.answer("Hello there, how are you?", "stop", USAGE))
    chunks = [orjson.loads(p) for p in parts[:-1]]
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert pieces[0] == "" and pieces[-1] is None  # the role chunk and the finish chunk
    assert "".join(pieces[1:-1]) == "Hello there, how are you?"
    assert len(pieces) - 2 == 7  # one chunk per word (up to 4 characters each)
    assert chunks[-1]["usage"] == USAGE.to_dict()


def test_generate_stream() -> None:
    enc = StreamEncoder("generate", "m")
    parts = events(enc.delta("x") + enc.finish("stop", USAGE))
    assert orjson.loads(parts[0]) == {"response": "x", "model": "m"}
    last = orjson.loads(parts[1])
    assert last["done"] is True and last["usage"] == USAGE.to_dict()
    assert parts[2] == b"[DONE]"


def test_text_with_newlines_stays_in_one_event() -> None:
    raw = StreamEncoder("completion", "m").delta("a\n\nb")
    assert raw.count(b"\n\n") == 1 and raw.endswith(b"\n\n")
    assert orjson.loads(events(raw)[0])["choices"][0]["text"] == "a\n\nb"


def test_error_event_ends_the_stream() -> None:
    raw = sse_error(ContextLengthError("too long", param="prompt"))
    assert raw.endswith(DONE)
    error = orjson.loads(events(raw)[0])["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"


def test_read_answer_reads_each_route_and_the_usage_once() -> None:
    chat = read_answer(
        "chat",
        b'{"model":"m","choices":[{"message":{"content":"Hi"},"finish_reason":"length"}],'
        b'"usage":{"prompt_tokens":4,"completion_tokens":2}}',
    )
    assert chat == Answer("Hi", "length", "m", 4, 2)
    completion = read_answer("completion", b'{"choices":[{"text":"t","finish_reason":null}]}')
    assert completion == Answer("t", None, None, None, None)
    generate = read_answer("generate", b'{"response":"r","finish_reason":"stop","usage":{}}')
    assert generate == Answer("r", "stop", None, None, None)


def test_read_answer_takes_only_what_is_there_in_the_right_type() -> None:
    assert read_answer("chat", b"not json") is None
    assert read_answer("chat", b"[1]") is None
    odd = read_answer(
        "chat",
        b'{"model":"","choices":[{"message":{"content":3}}],'
        b'"usage":{"prompt_tokens":true,"completion_tokens":"2"}}',
    )
    assert odd == Answer(None, None, None, None, None)
    # A stream's last event: no kind, only the model and the usage.
    usage = read_answer(None, b'{"model":"m","choices":[],"usage":{"completion_tokens":7}}')
    assert usage == Answer(None, None, "m", None, 7)
