"""The conformance table against a real `comeapi serve` over HTTP: a store holding one answer
per key of the table, no backend, so every miss is refused and every outcome is visible."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from comeapi.cache.sqlite import SqliteStore
from tests.conformance.table import CASES, DEFAULT_MODEL, Case, check_reply, entries
from tests.helpers import Proc, comeapi_argv, free_port


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("conformance-gateway")
    with SqliteStore(root / "store.db") as store:
        store.put_many(entries())
    port = free_port()
    argv = comeapi_argv(
        "serve",
        "--port", str(port),
        "--store", f"sqlite:{root / 'store.db'}",
        "--default-model", DEFAULT_MODEL,
        "--on-miss", "reject",
    )  # fmt: skip
    proc = Proc(argv, root / "gateway.log")
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/health", timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30.0) as c:
        yield c


@pytest.mark.parametrize("case", CASES, ids=str)
def test_case(gateway: str, client: httpx.Client, case: Case) -> None:
    for _ in range(case.asks):
        r = client.post(gateway + case.route, content=case.raw)
        check_reply(case, r.status_code, r.headers, r.content, tier="gateway")


def test_an_invalid_body_is_refused_whether_or_not_its_prompt_is_cached(
    gateway: str, client: httpx.Client
) -> None:
    for prompt in ("Hello", "a prompt that is not cached"):
        body = {"prompt": prompt, "max_tokens": -1, "temperature": "hot", "stream": "yes"}
        r = client.post(gateway + "/generate", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
