"""OpenAI's request parameters through the official client, against a real `comeapi backend`
with the bundled model, for both engines (`--slots 1` serial, `--slots 3` batched), streamed
and not: each parameter is honoured (the answer shows it) or refused with a 400 naming it."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import llama_cpp
import openai
import pytest

from tests.contract.openai_spec import contract
from tests.helpers import BUNDLED_MODEL, Proc, comeapi_argv, free_port

pytestmark = pytest.mark.slow

DOCS = Path(__file__).resolve().parents[2] / "docs" / "backend.md"
GREEDY: dict[str, Any] = {"model": BUNDLED_MODEL, "temperature": 0}
# A few-shot chat the base model answers with one short JSON object, then stops.
FEW_SHOT = [
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": '{"answer": "Paris"}'},
    {"role": "user", "content": "Capital of Italy?"},
]
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "population": {"type": "integer"},
    },
    "required": ["city", "population"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module", params=[1, 3], ids=["serial", "batched"])
def client(
    request: pytest.FixtureRequest, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[openai.OpenAI]:
    """One backend per engine for the whole module (pytest runs each engine's tests together)."""
    port = free_port()
    argv = comeapi_argv(
        "backend",
        "--model-dir", str(model_dir),
        "--port", str(port),
        "--slots", str(request.param),
        "--threads", "1",
        "--ctx", "512",
    )  # fmt: skip
    proc = Proc(argv, tmp_path_factory.mktemp("backend") / "backend.log")
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http(url + "/health", timeout=180)
        with openai.OpenAI(
            base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120
        ) as client:
            yield client
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def vocab(model_dir: Path) -> Iterator[llama_cpp.Llama]:
    """The bundled model's tokenizer, to turn a token's text back into its id."""
    llama = llama_cpp.Llama(str(model_dir / BUNDLED_MODEL), vocab_only=True, verbose=False)
    yield llama
    llama.close()


def chat(client: openai.OpenAI, stream: bool, **fields: Any) -> dict[str, Any]:
    """A chat completion as one body: streamed chunks are put back together per choice."""
    body = {**GREEDY, "messages": FEW_SHOT, "max_tokens": 8, **fields}
    if not stream:
        return client.chat.completions.create(**body).model_dump()
    chunks = list(client.chat.completions.create(**body, stream=True))
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for c in chunk.choices:
            slot = choices.setdefault(
                c.index, {"index": c.index, "message": {"content": ""}, "logprobs": None}
            )
            slot["message"]["content"] += c.delta.content or ""
            if c.logprobs is not None:
                slot["logprobs"] = slot["logprobs"] or {"content": []}
                slot["logprobs"]["content"] += [t.model_dump() for t in c.logprobs.content or []]
            if c.finish_reason is not None:
                slot["finish_reason"] = c.finish_reason
    return {"choices": [choices[i] for i in sorted(choices)]}


def complete(client: openai.OpenAI, stream: bool, **fields: Any) -> dict[str, Any]:
    """A completion as one body: streamed chunks are put back together per choice."""
    body = {**GREEDY, "prompt": "The capital of France is", "max_tokens": 4, **fields}
    if not stream:
        return client.completions.create(**body).model_dump()
    usage = None
    choices: dict[int, dict[str, Any]] = {}
    for chunk in client.completions.create(
        **body, stream=True, stream_options={"include_usage": True}
    ):
        usage = chunk.usage.model_dump() if chunk.usage is not None else usage
        for c in chunk.choices:
            slot = choices.setdefault(c.index, {"index": c.index, "text": "", "logprobs": None})
            slot["text"] += c.text
            if c.logprobs is not None:
                lp = c.logprobs.model_dump()
                slot["logprobs"] = slot["logprobs"] or {k: [] for k in lp}
                for key, values in lp.items():
                    slot["logprobs"][key] += values or []
            if c.finish_reason is not None:
                slot["finish_reason"] = c.finish_reason
    return {"choices": [choices[i] for i in sorted(choices)], "usage": usage}


STREAM = pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])


# --- response_format ----------------------------------------------------------------------


@STREAM
def test_json_mode_output_parses(client: openai.OpenAI, stream: bool) -> None:
    plain = chat(client, stream, max_tokens=12, messages=[{"role": "user", "content": "Hi!"}])
    with pytest.raises(ValueError):  # without the grammar this chat answers in prose
        json.loads(plain["choices"][0]["message"]["content"])
    answer = chat(
        client,
        stream,
        max_tokens=40,
        messages=[{"role": "user", "content": "Hi!"}],
        response_format={"type": "json_object"},
    )["choices"][0]
    if answer["finish_reason"] == "stop":
        assert isinstance(json.loads(answer["message"]["content"]), dict)
    else:  # cut by max_tokens: still the start of a JSON object
        assert answer["message"]["content"].lstrip().startswith("{")
    few_shot = chat(client, stream, max_tokens=40, response_format={"type": "json_object"})
    choice = few_shot["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert isinstance(json.loads(choice["message"]["content"]), dict)


@STREAM
def test_json_schema_output_validates(client: openai.OpenAI, stream: bool) -> None:
    answer = chat(
        client,
        stream,
        max_tokens=48,
        messages=[{"role": "user", "content": "Tell me about Paris."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": SCHEMA, "strict": True},
        },
    )["choices"][0]
    assert answer["finish_reason"] == "stop", answer
    jsonschema.validate(json.loads(answer["message"]["content"]), SCHEMA)


def test_a_schema_without_a_grammar_is_refused(client: openai.OpenAI) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wizard"}}}
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, False, response_format=bad)
    assert info.value.param is not None and info.value.param.startswith("response_format")
    with pytest.raises(openai.BadRequestError) as info:
        complete(client, False, extra_body={"response_format": bad})
    assert info.value.param is not None and info.value.param.startswith("response_format")


# The SDK's completions.create has no response_format argument: it goes in extra_body, as
# llama-server's users send it.
FEW_SHOT_PROMPT = 'Q: Capital of France?\nA: {"answer": "Paris"}\nQ: Capital of Italy?\nA:'


@STREAM
def test_completion_json_mode_output_parses(client: openai.OpenAI, stream: bool) -> None:
    plain = complete(client, stream, max_tokens=12)["choices"][0]
    with pytest.raises(ValueError):  # without the grammar this prompt goes on in prose
        json.loads(plain["text"])
    json_mode = {"response_format": {"type": "json_object"}}
    for prompt in ("The capital of France is", FEW_SHOT_PROMPT):
        answer = complete(client, stream, prompt=prompt, max_tokens=40, extra_body=json_mode)
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        assert isinstance(json.loads(choice["text"]), dict), choice


@STREAM
def test_completion_json_schema_output_validates(client: openai.OpenAI, stream: bool) -> None:
    schema = {
        "type": "json_schema",
        "json_schema": {"name": "city", "schema": SCHEMA, "strict": True},
    }
    for prompt in ("The capital of France is", FEW_SHOT_PROMPT):
        answer = complete(
            client, stream, prompt=prompt, max_tokens=48, extra_body={"response_format": schema}
        )
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["text"]), SCHEMA)


# --- llama-server's request extensions: grammar, json_schema, json_object's schema --------

YES_NO = 'root ::= "yes" | "no"'


@STREAM
def test_a_gbnf_grammar_is_honoured(client: openai.OpenAI, stream: bool) -> None:
    free = complete(client, stream, max_tokens=6)["choices"][0]["text"]
    assert free not in ("yes", "no")
    grammar = {"grammar": YES_NO}
    answer = complete(client, stream, max_tokens=6, extra_body=grammar)["choices"][0]
    assert (answer["text"], answer["finish_reason"]) in (("yes", "stop"), ("no", "stop"))
    reply = chat(client, stream, max_tokens=6, extra_body=grammar)["choices"][0]
    assert reply["message"]["content"] in ("yes", "no") and reply["finish_reason"] == "stop"


@STREAM
def test_a_top_level_json_schema_and_a_json_object_schema_validate(
    client: openai.OpenAI, stream: bool
) -> None:
    answer = complete(
        client, stream, prompt=FEW_SHOT_PROMPT, max_tokens=48, extra_body={"json_schema": SCHEMA}
    )["choices"][0]
    assert answer["finish_reason"] == "stop", answer
    jsonschema.validate(json.loads(answer["text"]), SCHEMA)
    for extra in (
        {"json_schema": SCHEMA},
        {"response_format": {"type": "json_object", "schema": SCHEMA}},
    ):
        reply = chat(client, stream, max_tokens=48, extra_body=extra)["choices"][0]
        assert reply["finish_reason"] == "stop", reply
        jsonschema.validate(json.loads(reply["message"]["content"]), SCHEMA)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"grammar": 'root ::= ("yes"'}, "grammar"),
        ({"grammar": "root ::= other"}, "grammar"),
        ({"grammar": ["root ::= x"]}, "grammar"),
        ({"json_schema": {"type": "wizard"}}, "json_schema"),
        ({"json_schema": "object"}, "json_schema"),
        ({"response_format": {"type": "json_object", "schema": 123}}, "response_format.schema"),
        (
            {"response_format": {"type": "json_object", "schema": {"type": "wizard"}}},
            "response_format.schema",
        ),
        ({"grammar": YES_NO, "json_schema": SCHEMA}, "json_schema"),
    ],
)
def test_a_bad_grammar_or_schema_is_a_400_naming_its_field(
    client: openai.OpenAI, extra: dict[str, Any], param: str
) -> None:
    for send in (complete, chat):
        with pytest.raises(openai.BadRequestError) as info:
            send(client, False, extra_body=extra)
        assert info.value.param == param, info.value.message


# --- OpenAI's null prompt: a new document ------------------------------------------------------


@STREAM
def test_a_null_prompt_generates_from_the_start_of_a_document(
    client: openai.OpenAI, stream: bool
) -> None:
    """OpenAI's schema: prompt is nullable, its default <|endoftext|>: the model generates
    as if from the beginning of a new document (here: from the BOS token alone)."""
    answer = complete(client, stream, prompt=None, max_tokens=3)
    assert answer["usage"]["prompt_tokens"] == 1  # BOS
    assert answer["usage"]["completion_tokens"] >= 1
    assert (
        answer["choices"][0]["text"]
        == complete(client, False, prompt=None, max_tokens=3)["choices"][0]["text"]
    )  # greedy: the same document start, streamed or not


# --- logprobs -----------------------------------------------------------------------------


@STREAM
def test_chat_top_logprobs_have_the_asked_length_and_sum_to_at_most_one(
    client: openai.OpenAI, stream: bool
) -> None:
    answer = chat(client, stream, max_tokens=5, logprobs=True, top_logprobs=4)["choices"][0]
    content = answer["logprobs"]["content"]
    assert len(content) == 5  # one entry per generated token (no stop string here)
    assert "".join(t["token"] for t in content) == answer["message"]["content"]
    for token in content:
        assert bytes(token["bytes"]).decode() == token["token"]
        tops = token["top_logprobs"]
        assert len(tops) == 4
        assert sum(math.exp(t["logprob"]) for t in tops) <= 1 + 1e-6
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert token["token"] == tops[0]["token"] and token["logprob"] == tops[0]["logprob"]
    plain = chat(client, stream, max_tokens=5)["choices"][0]
    assert plain["logprobs"] is None
    assert plain["message"]["content"] == answer["message"]["content"]


@STREAM
def test_completion_logprobs_in_openai_shape(client: openai.OpenAI, stream: bool) -> None:
    answer = complete(client, stream, max_tokens=5, logprobs=2)["choices"][0]
    lp = answer["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert "".join(lp["tokens"]) == answer["text"]
    assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(5)]
    for top, logprob in zip(lp["top_logprobs"], lp["token_logprobs"], strict=True):
        assert len(top) == 2 and max(top.values()) == logprob <= 0
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-6


# --- logit_bias, penalties, seed, stop, user ---------------------------------------------------


@STREAM
def test_a_logit_bias_of_minus_100_changes_the_greedy_first_token(
    client: openai.OpenAI, vocab: llama_cpp.Llama, stream: bool
) -> None:
    first = complete(client, False, max_tokens=1, logprobs=1)["choices"][0]["logprobs"]
    token = first["tokens"][0]
    ids = vocab.tokenize(token.encode(), add_bos=False, special=True)
    assert len(ids) == 1 and vocab.detokenize(ids) == token.encode()
    banned = complete(client, stream, max_tokens=1, logit_bias={str(ids[0]): -100})
    assert banned["choices"][0]["text"] != token
    favoured = complete(
        client, stream, prompt="1, 2, 3,", max_tokens=1, logit_bias={str(ids[0]): 100}
    )
    assert favoured["choices"][0]["text"] == token


def test_a_logit_bias_outside_the_vocabulary_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        complete(client, False, logit_bias={"999999999": 5})
    assert info.value.param == "logit_bias"


@STREAM
def test_penalties_change_nothing_for_one_token_and_break_repetition(
    client: openai.OpenAI, stream: bool
) -> None:
    penalties = {"presence_penalty": 2.0, "frequency_penalty": 2.0}
    one = complete(client, stream, max_tokens=1)["choices"][0]["text"]
    assert complete(client, stream, max_tokens=1, **penalties)["choices"][0]["text"] == one
    loop = {"prompt": "1, 1, 1, 1, 1, 1,", "max_tokens": 8}
    plain = complete(client, stream, **loop)["choices"][0]["text"]
    assert plain.count("1") >= 3  # greedy repeats itself
    penalised = complete(client, stream, **loop, **penalties)["choices"][0]["text"]
    assert penalised != plain and penalised.count("1") < plain.count("1")


@STREAM
def test_seed_gives_the_same_answer_and_choices_of_one_request_differ(
    client: openai.OpenAI, stream: bool
) -> None:
    fields = {"temperature": 1.0, "max_tokens": 8, "prompt": "Once upon a time,"}
    first = complete(client, stream, seed=7, **fields)["choices"][0]["text"]
    assert complete(client, stream, seed=7, **fields)["choices"][0]["text"] == first
    assert complete(client, stream, seed=8, **fields)["choices"][0]["text"] != first
    three = [c["text"] for c in complete(client, stream, seed=7, n=3, **fields)["choices"]]
    assert three[0] == first  # choice i draws with seed + i
    assert len(set(three)) == 3


@STREAM
def test_stop_as_a_string_or_a_list(client: openai.OpenAI, stream: bool) -> None:
    counting = {"prompt": "1, 2, 3, 4,", "max_tokens": 12}
    assert complete(client, stream, stop=", 7", **counting)["choices"][0]["text"] == " 5, 6"
    answer = complete(client, stream, stop=["7", " 6"], **counting)["choices"][0]
    assert answer["text"] == " 5," and answer["finish_reason"] == "stop"


def test_user_is_accepted(client: openai.OpenAI) -> None:
    assert complete(client, False, user="alice")["choices"][0]["text"]


# --- n, several prompts, echo, usage ----------------------------------------------------------


@STREAM
def test_n_choices_and_usage(client: openai.OpenAI, stream: bool) -> None:
    one = complete(client, stream, max_tokens=5)
    three = complete(client, stream, max_tokens=5, n=3)
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    # Greedy choices share the prompt's computation and give the same text as n=1.
    assert {c["text"] for c in three["choices"]} == {one["choices"][0]["text"]}
    usage, single = three["usage"], one["usage"]
    assert usage["prompt_tokens"] == single["prompt_tokens"]  # the prompt counts once
    assert usage["completion_tokens"] == 3 * single["completion_tokens"]
    chats = chat(client, stream, n=3, max_tokens=4)["choices"]
    assert [c["index"] for c in chats] == [0, 1, 2]
    assert len({c["message"]["content"] for c in chats}) == 1


@STREAM
def test_a_list_of_prompts_gives_one_choice_each_in_openai_order(
    client: openai.OpenAI, stream: bool
) -> None:
    prompts = ["The capital of France is", "1, 2, 3,"]
    alone = [complete(client, False, prompt=p)["choices"][0]["text"] for p in prompts]
    both = complete(client, stream, prompt=prompts)
    assert [c["index"] for c in both["choices"]] == [0, 1]
    assert [c["text"] for c in both["choices"]] == alone
    four = complete(client, stream, prompt=prompts, n=2)
    assert [c["text"] for c in four["choices"]] == [alone[0], alone[0], alone[1], alone[1]]
    single = [complete(client, False, prompt=p)["usage"] for p in prompts]
    usage = four["usage"]
    assert usage["prompt_tokens"] == sum(u["prompt_tokens"] for u in single)
    assert usage["completion_tokens"] == 2 * sum(u["completion_tokens"] for u in single)


@STREAM
def test_echo_prepends_the_prompt_and_scores_it(client: openai.OpenAI, stream: bool) -> None:
    prompt = "The capital of France is"
    plain = complete(client, stream)["choices"][0]["text"]
    echoed = complete(client, stream, echo=True)["choices"][0]
    assert echoed["text"] == prompt + plain
    scored = complete(client, stream, echo=True, logprobs=1)["choices"][0]
    assert scored["text"] == prompt + plain
    lp = scored["logprobs"]
    assert "".join(lp["tokens"]) == prompt + plain
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    n_prompt = len(lp["tokens"]) - 4  # max_tokens=4 generated after the prompt's tokens
    assert "".join(lp["tokens"][:n_prompt]) == prompt
    # Every prompt token is scored (given the BOS token before it), like the generated ones.
    assert all(v is not None and v <= 0 for v in lp["token_logprobs"])
    assert lp["text_offset"][n_prompt] == len(prompt)


# --- OpenAI's published schemas -------------------------------------------------------------


def openai_schema(name: str) -> jsonschema.Draft202012Validator:
    """A validator for one schema of OpenAI's OpenAPI document (``nullable`` said in JSON
    Schema's words)."""

    def nullable(node: Any) -> Any:
        if isinstance(node, list):
            return [nullable(item) for item in node]
        if not isinstance(node, dict):
            return node
        schema = {key: nullable(value) for key, value in node.items() if key != "nullable"}
        return {"anyOf": [schema, {"type": "null"}]} if node.get("nullable") is True else schema

    components = nullable(contract()["components"])
    return jsonschema.Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": components}
    )


def test_answers_with_every_parameter_match_openais_schemas(client: openai.OpenAI) -> None:
    base_url = str(client.base_url).rstrip("/")
    completion = {
        **GREEDY,
        "prompt": ["The capital of France is", "1, 2, 3,"],
        "n": 2,
        "logprobs": 2,
        "echo": True,
        "max_tokens": 3,
    }
    r = httpx.post(base_url + "/completions", json=completion, timeout=120)
    assert r.status_code == 200, r.text
    openai_schema("CreateCompletionResponse").validate(r.json())
    assert len(r.json()["choices"]) == 4
    chat_body = {
        **GREEDY,
        "messages": FEW_SHOT,
        "n": 2,
        "logprobs": True,
        "top_logprobs": 2,
        "max_tokens": 3,
        "response_format": {"type": "json_object"},
    }
    r = httpx.post(base_url + "/chat/completions", json=chat_body, timeout=120)
    assert r.status_code == 200, r.text
    openai_schema("CreateChatCompletionResponse").validate(r.json())
    assert r.json()["choices"][1]["logprobs"]["content"]
    events = openai_schema("CreateChatCompletionStreamResponse")
    with httpx.stream(
        "POST", base_url + "/chat/completions", json={**chat_body, "stream": True}, timeout=120
    ) as r:
        chunks = [line[6:] for line in r.iter_lines() if line.startswith("data: {")]
    assert len(chunks) > 4
    for chunk in chunks:
        events.validate(json.loads(chunk))


# --- refused ----------------------------------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}


def test_tools_are_refused_for_a_model_without_tool_support(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, False, tools=[TOOL])
    assert info.value.param == "tools"
    assert "chat template has no tool support" in str(info.value.message)
    # tool_choice "none" never calls a tool: the request is answered.
    assert chat(client, False, tools=[TOOL], tool_choice="none")["choices"][0]["message"]


def test_media_parts_are_refused(client: openai.OpenAI) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, False, messages=[{"role": "user", "content": [image]}])
    assert info.value.param == "messages.0.content"


# --- the table of docs/backend.md ---------------------------------------------------------------

# A value for each field of the table: what a client would send to use it.
EXAMPLES: dict[str, Any] = {
    "model": BUNDLED_MODEL,
    "prompt": ["Hello", "Hi"],
    "messages": [{"role": "user", "content": "Hello"}],
    "max_tokens": 2,
    "max_completion_tokens": 2,
    "temperature": 0.5,
    "top_p": 0.9,
    "top_k": 5,
    "n": 2,
    "stop": ["\n"],
    "stream": True,
    "stream_options": {"include_usage": True},
    "seed": 1,
    "logprobs": True,
    "top_logprobs": 2,
    "logit_bias": {"100": -5},
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "response_format": {"type": "json_object"},
    "grammar": YES_NO,
    "json_schema": {"type": "object"},
    "echo": True,
    "user": "alice",
    "safety_identifier": "user-1",
    "metadata": {"team": "a"},
    "service_tier": "auto",
    "prompt_cache_key": "k",
    "parallel_tool_calls": False,
    "tools": [TOOL],
    "tool_choice": "required",
    "functions": [TOOL["function"]],
    "function_call": "auto",
    "audio": {"voice": "alloy", "format": "mp3"},
    "modalities": ["text", "audio"],
    "web_search_options": {},
    "prediction": {"type": "content", "content": "x"},
    "reasoning_effort": "low",
    "verbosity": "low",
    "store": True,
    "suffix": " the end",
    "best_of": 2,
}


def parameter_table() -> list[tuple[str, str, str]]:
    """(field, route, status) of each row of docs/backend.md's table of OpenAI fields."""
    text = DOCS.read_text()
    section = text[text.index("### OpenAI request fields") :]
    rows = re.findall(r"^\| `(\w+)` \| (\w+) \| (\w+) \|", section, flags=re.MULTILINE)
    assert rows, "no table in docs/backend.md"
    return rows


def test_the_table_covers_every_example() -> None:
    rows = parameter_table()
    assert {field for field, _, _ in rows} == set(EXAMPLES)
    assert {route for _, route, _ in rows} <= {"both", "completions", "chat"}
    assert {status for _, _, status in rows} == {"honoured", "ignored", "refused"}


def test_every_field_of_the_table_is_answered_or_refused_by_name(client: openai.OpenAI) -> None:
    base_url = str(client.base_url).rstrip("/")
    for field, route, status in parameter_table():
        for kind in ("completions", "chat") if route == "both" else (route,):
            body: dict[str, Any] = {"model": BUNDLED_MODEL, "max_tokens": 2, "temperature": 0}
            if kind == "chat":
                body["messages"] = EXAMPLES["messages"]
                if field == "top_logprobs":
                    body["logprobs"] = True
            else:
                body["prompt"] = "Hello"
            body[field] = EXAMPLES[field]
            if field == "logprobs" and kind == "completions":
                body[field] = 2  # completions take the number of alternatives
            if field == "max_completion_tokens":
                del body["max_tokens"]
            path = "/chat/completions" if kind == "chat" else "/completions"
            r = httpx.post(base_url + path, json=body, timeout=120)
            where = f"{field} on {kind}: {r.status_code} {r.text[:200]}"
            if status == "refused":
                assert r.status_code == 400, where
                assert r.json()["error"]["param"] == field, where
            else:
                assert r.status_code == 200, where
