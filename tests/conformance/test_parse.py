"""The conformance table against the one parse, the key and the one API-key rule, in process
(the other tiers' tests run the same table over HTTP, through API Gateway events, and through
nginx)."""

from __future__ import annotations

import pytest

from comeapi.cache.key import lookup_key, uncacheable
from comeapi.errors import RequestError
from comeapi.protocol.auth import BearerKeys
from comeapi.protocol.requests import KINDS, decode_json, parse_request
from tests.conformance.table import API_KEY, CASES, DEFAULT_MODEL, Case


def test_the_table_is_broad() -> None:
    outcomes = [c.outcome for c in CASES]
    assert len(CASES) >= 80
    assert min(outcomes.count(o) for o in ("key", "error", "uncacheable")) >= 10
    assert {c.route for c in CASES} == set(KINDS)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_case(case: Case) -> None:
    denied = BearerKeys([API_KEY, "another-key"]).check(case.authorization)
    if case.outcome == "unauthorized":
        assert denied is not None, "let in"
        assert denied.status == 401 and denied.headers() == {"WWW-Authenticate": "Bearer"}
        error = denied.to_dict()["error"]
        assert error["type"] == "authentication_error" and error["param"] is None
        assert (error["code"], error["message"]) == (
            case.expect["unauthorized"]["code"],
            case.expect["unauthorized"]["message"],
        )
        return
    assert denied is None, denied.message
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
