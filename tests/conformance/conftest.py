"""Two tiers holding the conformance table's answers, shared by the tests of this folder:
`comeapi serve` over HTTP, and the Lambda handler over DynamoDB on moto's server; both take
the table's API key."""

from __future__ import annotations

from collections.abc import Iterator

import boto3
import httpx
import pytest

from comeapi.cache.dynamo import DynamoStore, create_table
from comeapi.cache.sqlite import SqliteStore
from comeapi.serverless.handler import ServerlessApp
from comeapi.serverless.source import TableSource
from tests.aws_local import REGION, dummy_credentials, start_moto_server
from tests.conformance.table import API_KEY, DEFAULT_MODEL, entries
from tests.helpers import Proc, comeapi_argv, free_port

TABLE = "comeapi-conformance"


@pytest.fixture(scope="session")
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
        "--api-keys", API_KEY,
    )  # fmt: skip
    proc = Proc(argv, root / "gateway.log")
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/health", timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30.0) as c:
        yield c


@pytest.fixture(scope="session")
def lambda_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerlessApp]:
    root = tmp_path_factory.mktemp("conformance-lambda")
    procs: list[Proc] = []

    def spawn(argv: list[str]) -> Proc:
        procs.append(Proc(argv, root / f"moto-{len(procs)}.log"))
        return procs[-1]

    with pytest.MonkeyPatch.context() as monkeypatch:
        dummy_credentials(monkeypatch)
        try:
            url = start_moto_server(spawn)
            client = boto3.client("dynamodb", region_name=REGION, endpoint_url=url)
            create_table(client, TABLE)
            store = DynamoStore(client, TABLE)
            store.replace_all(entries())
            # Unset DEFAULT_MODEL: with several models cached, the bundled one is the default.
            yield ServerlessApp(TableSource(store), default_model=None, api_keys=(API_KEY,))
        finally:
            for proc in procs:
                proc.stop()
