"""How a stored answer is sent on every tier (``cache.replies``): each route's shape, streams
that rebuild the answer, a fresh id per reply, and bodies that hold the placeholders' own
characters (``%``, quotes, the id's text)."""

from __future__ import annotations

import time

import orjson
import pytest

from comeapi.cache.key import prompt_key
from comeapi.cache.replies import AnswerFormat, HitReply, Replies, entry_from_answer
from comeapi.cache.store import Entry
from comeapi.protocol.requests import parse_request
from comeapi.protocol.responses import StreamEncoder, Usage, full_body, read_answer

MODEL = "gemma-3-270m-q4_k_m.gguf"


def entry(answer: str = "answer number 2 答え", variant: int = 2) -> Entry:
    return Entry(
        key=prompt_key("hello", MODEL),
        variant=variant,
        kind="prompt",
        prompt="hello",
        answer=answer,
        model=MODEL,
        prompt_tokens=3,
        completion_tokens=5,
        finish_reason="length",
    )


def test_each_route_gets_its_own_shape_with_the_variant() -> None:
    e = entry()
    gen = orjson.loads(HitReply(AnswerFormat("generate", False, False), e).body())
    assert gen == {
        "response": e.answer,
        "model": MODEL,
        "finish_reason": "length",
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
        "variant": 2,
    }
    comp = orjson.loads(HitReply(AnswerFormat("completion", False, False), e).body())
    assert comp["object"] == "text_completion" and comp["choices"][0]["text"] == e.answer
    assert comp["id"].startswith("cmpl-") and len(comp["id"]) == len("cmpl-") + 32
    chat = orjson.loads(HitReply(AnswerFormat("chat", False, False), e).body())
    assert chat["object"] == "chat.completion" and chat["id"].startswith("chatcmpl-")
    assert chat["choices"][0]["message"] == {
        "role": "assistant",
        "content": e.answer,
        "refusal": None,
    }
    assert chat["variant"] == 2 and abs(chat["created"] - time.time()) < 5


def test_a_body_is_what_the_encoder_writes_with_that_id_and_time() -> None:
    e = entry()
    for kind in ("completion", "chat"):
        body = HitReply(AnswerFormat(kind, False, False), e).body()  # type: ignore[arg-type]
        doc = orjson.loads(body)
        expected = full_body(
            kind,  # type: ignore[arg-type]
            model=MODEL,
            text=e.answer,
            finish_reason="length",
            usage=Usage(3, 5),
            id=doc["id"],
            created=doc["created"],
        )
        assert body == orjson.dumps({**expected, "variant": 2})


def test_every_reply_gets_a_new_id() -> None:
    reply = HitReply(AnswerFormat("chat", True, True), entry())
    first, second = reply.body(), reply.body()
    ids = {orjson.loads(line[6:])["id"] for line in first.split(b"\n\n")[:-2]}
    assert len(ids) == 1  # one stream, one id in every chunk
    assert first != second and len(first) == len(second)


@pytest.mark.parametrize("kind", ["generate", "completion", "chat"])
@pytest.mark.parametrize("usage", [False, True])
def test_a_stream_rebuilds_the_answer_as_the_live_encoder_sends_it(kind: str, usage: bool) -> None:
    text = 'a "quoted" 100% answer with \\ and "id":"x" and "created":1'
    e = entry(text)
    reply = HitReply(AnswerFormat(kind, True, usage), e)  # type: ignore[arg-type]
    body = reply.body()
    assert dict(reply.headers)["Content-Type"] == "text/event-stream"
    events = [x for x in body.decode().split("\n\n") if x]
    assert events[-1] == "data: [DONE]"
    chunks = [orjson.loads(x.removeprefix("data: ")) for x in events[:-1]]
    head = chunks[0]
    live = StreamEncoder(
        kind,  # type: ignore[arg-type]
        MODEL,
        include_usage=usage,
        id=head.get("id"),
        created=head.get("created"),
    ).answer(text, "length", Usage(3, 5))
    assert body == live


def test_percent_signs_and_lookalike_text_survive() -> None:
    text = '%s %d %% "id":"comeapi-id-placeholder" "created":1000000000123456789'
    for kind in ("generate", "completion", "chat"):
        doc = orjson.loads(HitReply(AnswerFormat(kind, False, False), entry(text)).body())  # type: ignore[arg-type]
        got = doc["response"] if kind == "generate" else doc["choices"][0]
        if kind == "completion":
            got = got["text"]
        elif kind == "chat":
            got = got["message"]["content"]
        assert got == text


def test_headers_are_the_same_names_on_every_tier() -> None:
    reply = HitReply(AnswerFormat("chat", True, False), entry(variant=4))
    assert reply.headers == (
        ("Content-Type", "text/event-stream"),
        ("X-Cache", "HIT"),
        ("X-Cache-Variant", "4"),
        ("X-Cache-Match", "exact"),
        ("Cache-Control", "no-cache"),
    )
    assert reply.head == (
        b"content-type: text/event-stream\r\nx-cache: HIT\r\nx-cache-variant: 4\r\n"
        b"x-cache-match: exact\r\ncache-control: no-cache\r\n"
    )


def test_replies_are_made_again_when_the_answer_is_replaced() -> None:
    replies = Replies(size=2)
    fmt = AnswerFormat("generate", False, False)
    old = entry("old")
    first = replies.get(old, fmt)
    assert replies.get(old, fmt) is first
    new = entry("new")
    assert orjson.loads(replies.get(new, fmt).body())["response"] == "new"
    for v in range(5):  # past the size: still right
        assert replies.get(entry(str(v), variant=v), fmt).entry.answer == str(v)


def test_an_answer_read_back_into_an_entry() -> None:
    request = parse_request(
        "chat",
        {"messages": [{"role": "user", "content": " Hi "}], "max_tokens": 8},
        max_tokens_limit=2048,
    )
    body = {
        "choices": [{"message": {"content": "Hello!"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 2},
    }
    made = entry_from_answer("k", 3, MODEL, request, read_answer("chat", orjson.dumps(body)))
    assert made is not None and made.kind == "chat" and made.prompt == "Hi"
    assert made.answer == "Hello!" and made.params["seed"] == 3 and made.completion_tokens == 2
    no_text = read_answer("chat", b'{"choices": []}')
    assert entry_from_answer("k", 3, MODEL, request, no_text) is None
