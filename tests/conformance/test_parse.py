"""The conformance table against the one parse and the key, in process (the other tiers'
tests run the same table over HTTP, through API Gateway events, and through nginx)."""

from __future__ import annotations

import pytest

from comeapi.cache.key import lookup_key, uncacheable
from comeapi.errors import RequestError
from comeapi.protocol.requests import KINDS, decode_json, parse_request
from tests.conformance.table import CASES, DEFAULT_MODEL, Case


def test_the_table_is_broad() -> None:
    outcomes = [c.outcome for c in CASES]
    assert len(CASES) >= 80
    assert min(outcomes.count(o) for o in ("key", "error", "uncacheable")) >= 10
    assert {c.route for c in CASES} == set(KINDS)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_case(case: Case) -> None:
    try:
        request = parse_request(KINDS[case.route], decode_json(case.raw), max_tokens_limit=2048)
        blocker = uncacheable(request)
        key = lookup_key(request, DEFAULT_MODEL) if blocker is None else None
    except RequestError as exc:
        assert case.outcome == "error", f"unexpected 400: {exc.message}"
        assert exc.status == 400
        assert exc.param == case.expect["error"], exc.message
        if "code" in case.expect:
            assert exc.code == case.expect["code"]
        return
    assert case.outcome != "error", f"accepted, expected a 400 naming {case.expect['error']}"
    if case.outcome == "uncacheable":
        assert blocker == case.expect["uncacheable"]
    else:
        assert blocker is None
        assert key == case.key
