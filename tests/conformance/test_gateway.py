"""The conformance table against a real `comeapi serve` over HTTP (the session's ``gateway``
of conftest.py): a store holding one answer per key of the table, no backend, so every miss
is refused and every outcome is visible."""

from __future__ import annotations

import httpx
import pytest

from tests.conformance.table import API_KEY, CASES, Case, check_reply


@pytest.mark.parametrize("case", CASES, ids=str)
def test_case(gateway: str, client: httpx.Client, case: Case) -> None:
    for _ in range(case.asks):
        r = client.post(gateway + case.route, content=case.raw, headers=case.headers)
        check_reply(case, r.status_code, r.headers, r.content, tier="gateway")


def test_an_invalid_body_is_refused_whether_or_not_its_prompt_is_cached(
    gateway: str, client: httpx.Client
) -> None:
    for prompt in ("Hello", "a prompt that is not cached"):
        body = {"prompt": prompt, "max_tokens": -1, "temperature": "hot", "stream": "yes"}
        r = client.post(
            gateway + "/generate", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
