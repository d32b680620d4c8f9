"""The conformance table: requests and what every tier must make of them.

tests/conformance/requests.jsonl holds one case per line: a route, a body (``body`` as JSON,
or ``raw`` as the exact text sent) and the expected outcome, one of
  {"key": DOC}            valid and answerable from the cache: the key is the SHA-256 of DOC
                          serialised canonically (computed here, independently of comeapi);
  {"error": PARAM}        400 naming PARAM (null: the body is not a JSON object), and
                          ``code`` when the case gives one;
  {"uncacheable": PARAM}  valid, but asks for what no stored answer carries (PARAM says what).
``expand`` replaces ``<NAME>`` in every string of the case by a text repeated N times.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TABLE = Path(__file__).with_name("requests.jsonl")
DEFAULT_MODEL = "gemma-3-270m-q4_k_m.gguf"


@dataclass(frozen=True)
class Case:
    id: str
    route: str
    raw: bytes
    expect: dict[str, Any]

    @property
    def outcome(self) -> str:
        return next(k for k in ("key", "error", "uncacheable") if k in self.expect)

    @property
    def key(self) -> str:
        return canonical_key(self.expect["key"])

    def __str__(self) -> str:
        return self.id


def canonical_key(doc: dict[str, Any]) -> str:
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _expand(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        for name, text in names.items():
            value = value.replace(f"<{name}>", text)
        return value
    if isinstance(value, list):
        return [_expand(v, names) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, names) for k, v in value.items()}
    return value


def load_cases() -> list[Case]:
    cases = []
    for line in TABLE.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        doc = json.loads(line)
        names = {k: text * n for k, (text, n) in doc.get("expand", {}).items()}
        doc = _expand(doc, names)
        if "raw" in doc:
            raw = doc["raw"].encode("utf-8", errors="surrogatepass")
        else:
            raw = json.dumps(doc["body"], ensure_ascii=False).encode("utf-8")
        cases.append(Case(doc["id"], doc["route"], raw, doc["expect"]))
    return cases


CASES = load_cases()


def answer_for(case: Case) -> str:
    """The answer the tier tests store for a case's key: one per distinct key."""
    return "answer " + case.key[:12]


def entries(model_default: str = DEFAULT_MODEL) -> list[Any]:
    """One sealed entry (variant 0) per distinct key of the table, answering answer_for()."""
    from comeapi.cache.store import Entry

    out: dict[str, Entry] = {}
    for case in CASES:
        if case.outcome != "key":
            continue
        doc = case.expect["key"]
        messages = doc.get("messages")
        out[case.key] = Entry(
            key=case.key,
            variant=0,
            kind="chat" if messages is not None else "prompt",
            prompt=doc["prompt"] if messages is None else messages[-1][1],
            answer=answer_for(case),
            model=doc["model"],
            messages=tuple((r, c) for r, c in messages) if messages is not None else None,
            prompt_tokens=3,
            completion_tokens=2,
        ).sealed()
    return list(out.values())


def answer_text(route: str, body: bytes, stream: bool) -> str:
    """The answer text of a response body, streamed (SSE) or not, for each route's shape."""
    if not stream:
        doc = json.loads(body)
        if route == "/generate":
            return str(doc["response"])
        choice = doc["choices"][0]
        return str(choice["text"] if "text" in choice else choice["message"]["content"])
    pieces = []
    for event in body.decode("utf-8").split("\n\n"):
        data = event.removeprefix("data: ")
        if not event or data == "[DONE]":
            continue
        chunk = json.loads(data)
        if route == "/generate":
            pieces.append(chunk["response"])
        for choice in chunk.get("choices", []):
            pieces.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
    return "".join(pieces)


def check_reply(case: Case, status: int, headers: Any, body: bytes, *, tier: str) -> None:
    """Assert that one tier's HTTP answer to ``case`` is the table's outcome. Misses are
    refused on every tier these tests run (no backend)."""
    where = f"{tier}, case {case.id}: {status} {body[:300]!r}"
    if case.outcome == "key":
        assert status == 200, where
        assert headers.get("x-cache") == "HIT", where
        stream = headers.get("content-type", "").startswith("text/event-stream")
        assert answer_text(case.route, body, stream) == answer_for(case), where
        return
    assert status == 400, where
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error", where
    if case.outcome == "error":
        assert error["param"] == case.expect["error"], where
        if "code" in case.expect:
            assert error["code"] == case.expect["code"], where
    else:
        assert error["param"] == case.expect["uncacheable"], where
        assert error["code"] == "not_cacheable", where
