"""Request bodies generated from the conformance table, for the differential test.

Each body starts from a case of tests/conformance/requests.jsonl and gets one to three
mutations from families where JSON parsers and hand-written checks tend to differ: number
syntax, nesting depth, whitespace, string escapes, duplicate keys, values of the wrong type
in known fields, and bytes inserted, removed or cut. A seed makes the list reproducible.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.conformance.table import CASES

# Numbers as written in a body: what JSON allows, what only some parsers accept, and what
# no parser should.
GOOD_NUMBERS = ("0", "-0", "1", "5.0", "0.5", "-0.5", "10", "100.001", "1e5", "1E+2",
                "1e05", "-1.5e-3", "0e0", "2048", "18446744073709551616", "1e-400")  # fmt: skip
BAD_NUMBERS = ("01", "00", "010", "-01", "02049", ".5", "-.5", "1.", "0.", "1.e5", "1.E5",
               ".5e1", "+1", "1e", "0x10", "NaN", "Infinity", "-Infinity", "1e400",
               "1_0", "- 1", "--1")  # fmt: skip
NUMERIC_FIELDS = ("temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens",
                  "seed", "n", "presence_penalty", "logprobs", "top_logprobs", "z")  # fmt: skip
KNOWN_FIELDS = ("prompt", "messages", "model", "model_name", "stop", "stream",
                "stream_options", "logit_bias", "response_format", "echo", "user", "tools",
                "tool_choice", "grammar", "json_schema", *NUMERIC_FIELDS)  # fmt: skip
VALUES: tuple[Any, ...] = (None, True, False, 0, 1, -1, 1.5, 5.0, 2**64, "", "x", " ", [], {},
                           [1], ["a"], {"a": 1}, {"type": "json_object"}, [{"a": []}])  # fmt: skip
JSON_SPACE = (" ", "\t", "\n", "\r", "\r\n", "  ")
NON_JSON_SPACE = ("\f", "\v", "\u00a0", "\u2028", "\u3000", "\ufeff")
NOISE = '{}[],:"0.-e\\ 1tfn'
PLACEHOLDER = "\u0000FUZZ\u0000"


@dataclass(frozen=True)
class Body:
    route: str
    raw: bytes
    how: str  # the seed case and the mutations, for the failure report


def generate(seed: int, count: int) -> list[Body]:
    rng = random.Random(seed)
    cases = [c for c in CASES if len(c.raw) < 4096]
    out = []
    for _ in range(count):
        case = rng.choice(cases)
        text = case.raw.decode("utf-8", errors="surrogatepass")
        steps = [case.id]
        for _ in range(rng.randint(1, 3)):
            name, mutate = rng.choice(MUTATIONS)
            text = mutate(rng, text)
            steps.append(name)
        out.append(Body(case.route, text.encode("utf-8", "surrogatepass"), " + ".join(steps)))
    return out


def _decoded(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _with_field(rng: random.Random, text: str, literal: str, names: tuple[str, ...]) -> str:
    """``text`` with one field (top level, or in a message) set to the raw ``literal``."""
    body = _decoded(text)
    if body is None:
        return text
    target = body
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        target = rng.choice((body, messages[0]))
    target[rng.choice(names)] = PLACEHOLDER
    encoded = json.dumps(body, ensure_ascii=rng.random() < 0.3)
    return encoded.replace(json.dumps(PLACEHOLDER), literal)


def number(rng: random.Random, text: str) -> str:
    literal = rng.choice(GOOD_NUMBERS if rng.random() < 0.4 else BAD_NUMBERS)
    if rng.random() < 0.3:
        literal = f"[{rng.choice(GOOD_NUMBERS)},{literal}]"
    return _with_field(rng, text, literal, NUMERIC_FIELDS)


def nesting(rng: random.Random, text: str) -> str:
    depth = rng.choice((rng.randint(1, 40), rng.randint(27, 34), rng.randint(28, 31)))
    literal = rng.choice(('"x"', "0", "[]", "{}", "null"))
    for _ in range(depth):
        literal = f"[{literal}]" if rng.random() < 0.5 else f'{{"k":{literal}}}'
    return _with_field(rng, text, literal, ("z", "metadata", "logit_bias", "stop", "tools"))


def value(rng: random.Random, text: str) -> str:
    literal = json.dumps(rng.choice(VALUES))
    return _with_field(rng, text, literal, KNOWN_FIELDS)


def whitespace(rng: random.Random, text: str) -> str:
    spaces = NON_JSON_SPACE if rng.random() < 0.3 else JSON_SPACE
    out = []
    in_string = escaped = False
    for ch in text:
        out.append(ch)
        if in_string:
            escaped = not escaped and ch == "\\"
            in_string = escaped or ch != '"'
        elif ch == '"':
            in_string = True
        elif ch in "{}[],:" and rng.random() < 0.3:
            out.append(rng.choice(spaces))
    return rng.choice(spaces) + "".join(out) if rng.random() < 0.2 else "".join(out)


def escapes(rng: random.Random, text: str) -> str:
    body = _decoded(text)
    if body is None:
        return text
    encoded = json.dumps(body, ensure_ascii=True)
    kind = rng.randint(0, 3)
    if kind == 0:
        return encoded.replace("/", "\\/")
    if kind == 1:  # a paired surrogate escape (an emoji) or a lone one
        extra = rng.choice(("\\ud83d\\ude00", "\\ud800", "\\udc00", "\\ud83d x", "\\\\ud800"))
        return encoded.replace('"x"', f'"x{extra}"').replace('"Hello', f'"Hello{extra}', 1)
    if kind == 2:  # an escape JSON does not have
        return encoded.replace('"Hello', rng.choice(('"\\x41Hello', '"\\aHello', '"\\u12Hello')))
    return encoded.replace('"Hello', '"\\u0048ello', 1)


def lookalike(rng: random.Random, text: str) -> str:
    """Text that looks like bad numbers or deep nesting, inside a string."""
    words = ("Step 1. ", "01", ".5", "1.e5", "-.5", " 0. ", '\\"1.\\"', "\\\\", "[[{", "}]]")
    inner = "".join(rng.choices(words, k=rng.randint(1, 8)))
    return text.replace("Hello", rng.choice((inner + "Hello", inner)), 1)


def duplicate(rng: random.Random, text: str) -> str:
    end = text.rfind("}")
    if end < 0:
        return text
    field = rng.choice(KNOWN_FIELDS)
    extra = f',"{field}":{json.dumps(rng.choice(VALUES))}'
    return text[:end] + extra + text[end:]


def bytes_noise(rng: random.Random, text: str) -> str:
    if not text:
        return rng.choice(NOISE)
    i = rng.randrange(len(text))
    kind = rng.randint(0, 3)
    if kind == 0:
        return text[:i] + text[i + 1 :]
    if kind == 1:
        return text[:i] + rng.choice(NOISE) + text[i:]
    if kind == 2:
        return text[:i] + text[i] + text[i:]
    return text[:i]


def wrapping(rng: random.Random, text: str) -> str:
    return rng.choice(("\ufeff" + text, text + " x", text + "\n", "[" + text + "]", text + "{}"))


MUTATIONS: list[tuple[str, Callable[[random.Random, str], str]]] = [
    ("number", number),
    ("number", number),
    ("nesting", nesting),
    ("nesting", nesting),
    ("value", value),
    ("whitespace", whitespace),
    ("escapes", escapes),
    ("lookalike", lookalike),
    ("duplicate", duplicate),
    ("bytes", bytes_noise),
    ("wrapping", wrapping),
]
