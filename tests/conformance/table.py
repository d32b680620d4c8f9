"""The conformance table: requests and what every tier must make of them.

tests/conformance/requests.jsonl holds one case per line: a route, a body (``body`` as JSON,
or ``raw`` as the exact text sent) and the expected outcome, one of
  {"key": DOC}            valid and answerable from the cache: the key is the SHA-256 of DOC
                          serialised canonically (computed here, independently of comeapi);
                          ``served``: the variants that may answer (default [0]);
  {"miss": DOC}           valid and keyed so, but no stored answer of it is served (all
                          rejected): 404 prompt_not_cached where misses are refused;
  {"error": PARAM}        400 naming PARAM (null: the body is not a JSON object), and
                          ``code`` when the case gives one;
  {"uncacheable": PARAM}  valid, but asks for what no stored answer carries (PARAM says what);
  {"unauthorized": ERR}   401 with WWW-Authenticate: Bearer and ERR's ``code`` and
                          ``message`` (the key is checked before anything else).
Every tier takes one API key, ``API_KEY``; a case sends ``Authorization: Bearer API_KEY``
unless its ``authorization`` gives the header's value (null: no header).
``stored`` lists the review of the variants the tiers hold for the case's key (default: one
pending variant); the tiers serve with the default serve_states (approved,pending).
``expand`` replaces ``<NAME>`` in every string of the case by a text repeated N times.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TABLE = Path(__file__).with_name("requests.jsonl")
API_KEY = "conformance-key-1"  # what every tier under these tests accepts
DEFAULT_MODEL = "smollm2-135m-instruct-q4_1.gguf"  # comeapi.models.bundled.BUNDLED_MODEL


@dataclass(frozen=True)
class Case:
    id: str
    route: str
    raw: bytes
    expect: dict[str, Any]
    stored: tuple[dict[str, Any], ...] = ({},)
    authorization: str | None = f"Bearer {API_KEY}"

    @property
    def outcome(self) -> str:
        outcomes = ("key", "miss", "error", "uncacheable", "unauthorized")
        return next(k for k in outcomes if k in self.expect)

    @property
    def headers(self) -> dict[str, str]:
        """The request headers a tier test sends (the API key's)."""
        return {} if self.authorization is None else {"Authorization": self.authorization}

    @property
    def keyed(self) -> bool:
        """Whether the request has a key (a hit, or a miss of a reviewed prompt)."""
        return self.outcome in ("key", "miss")

    @property
    def key(self) -> str:
        return canonical_key(self.expect[self.outcome])

    @property
    def served(self) -> set[str]:
        """The answer texts a hit may carry."""
        return {answer_for(self, v) for v in self.expect.get("served", [0])}

    @property
    def asks(self) -> int:
        """How often a tier test sends it: a case with several variants stored, more than
        once (the choice is random)."""
        return 1 if len(self.stored) == 1 and self.outcome != "miss" else 12

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
        stored = tuple(doc.get("stored", [{}]))
        authorization = doc.get("authorization", Case.authorization)
        cases.append(Case(doc["id"], doc["route"], raw, doc["expect"], stored, authorization))
    return cases


CASES = load_cases()


def answer_for(case: Case, variant: int = 0) -> str:
    """The answer the tier tests store for a case's key and variant."""
    return "answer " + case.key[:12] + (f" variant {variant}" if variant else "")


def entries(model_default: str = DEFAULT_MODEL) -> list[Any]:
    """Sealed entries for every distinct key of the table, answering answer_for(): one
    pending variant, or the ``stored`` variants with their review."""
    from comeapi.cache.store import Entry

    out: dict[tuple[str, int], Entry] = {}
    for case in CASES:
        if not case.keyed:
            continue
        doc = case.expect[case.outcome]
        messages = doc.get("messages")
        for variant, review in enumerate(case.stored):
            out[(case.key, variant)] = Entry(
                key=case.key,
                variant=variant,
                kind="chat" if messages is not None else "prompt",
                prompt=doc["prompt"] if messages is None else messages[-1][1],
                answer=answer_for(case, variant),
                model=doc["model"],
                messages=tuple((r, c) for r, c in messages) if messages is not None else None,
                prompt_tokens=3,
                completion_tokens=2,
                state=review.get("state", "pending"),
                pinned=review.get("pinned", False),
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
    if case.outcome == "unauthorized":
        assert status == 401, where
        assert headers.get("www-authenticate") == "Bearer", where
        wanted = case.expect["unauthorized"]
        assert json.loads(body)["error"] == {
            "message": wanted["message"],
            "type": "authentication_error",
            "param": None,
            "code": wanted["code"],
        }, where
        return
    if case.outcome == "key":
        assert status == 200, where
        assert headers.get("x-cache") == "HIT", where
        stream = headers.get("content-type", "").startswith("text/event-stream")
        assert answer_text(case.route, body, stream) in case.served, where
        return
    if case.outcome == "miss":
        assert status == 404, where
        error = json.loads(body)["error"]
        assert error["code"] == "prompt_not_cached", where
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
