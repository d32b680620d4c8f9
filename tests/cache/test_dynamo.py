"""DynamoStore: in-process moto for the logic, botocore's Stubber for failures DynamoDB
produces under load, and moto's server over HTTP for the real wire path."""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import botocore.exceptions
import pytest
from botocore.config import Config
from botocore.stub import Stubber
from moto import mock_aws

from comeapi.cache.dynamo import DynamoStore, create_table, dynamo_errors, make_client
from comeapi.cache.dynamo_items import CATALOGUE_KEY, Catalogue, encode_entry
from comeapi.cache.open import open_store
from comeapi.cache.store import Entry, PromptInfo
from comeapi.errors import ConfigError, StoreError, StoreUnavailableError
from tests.aws_local import (
    REGION,
    chat_entries,
    dummy_credentials,
    prompt_entries,
    start_moto_server,
)
from tests.cache.factory import reviewed, reviewed_entries
from tests.helpers import Proc, free_port

CHAT = (("system", "Answer briefly."), ("user", "Hello"))
TABLE = "comeapi-test"


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    dummy_credentials(monkeypatch)
    with mock_aws():
        client = boto3.client("dynamodb", region_name=REGION)
        assert create_table(client, TABLE) is True
        yield client


@pytest.fixture
def store(client: Any) -> DynamoStore:
    return DynamoStore(client, TABLE)


def test_put_get_and_catalogue(store: DynamoStore) -> None:
    entries = prompt_entries("日本の首都はどこですか", 5) + chat_entries(CHAT, 2)
    assert store.put_many(entries) == 7
    for e in entries:
        assert store.get(e.key, e.variant) == e
    assert store.get(entries[0].key, 5) is None
    assert store.get("0" * 64, 0) is None
    by_key = {p.key: p for p in store.prompts()}
    assert by_key[entries[0].key].variants == 5
    assert by_key[entries[0].key].prompt == "日本の首都はどこですか"
    assert by_key[entries[-1].key].kind == "chat"
    assert by_key[entries[-1].key].variants == 2
    assert sorted(store.entries(), key=lambda e: (e.key, e.variant)) == sorted(
        entries, key=lambda e: (e.key, e.variant)
    )


def test_catalogue_is_a_reserved_item_not_an_entry(store: DynamoStore, client: Any) -> None:
    store.put_many(prompt_entries("p", 1))
    item = client.get_item(
        TableName=TABLE, Key={"key": {"S": CATALOGUE_KEY}, "variant": {"N": "0"}}
    )["Item"]
    assert item["revision"]["N"] == "1"
    assert all(e.key != CATALOGUE_KEY for e in store.entries())


def test_variant_count_stops_at_the_first_gap(store: DynamoStore) -> None:
    entries = prompt_entries("gappy", 4)
    store.put_many([entries[0], entries[1], entries[3]])
    assert store.catalogue().variants() == {entries[0].key: 2}
    store.put(entries[2])
    assert store.catalogue().variants() == {entries[0].key: 4}


def test_put_many_merges_with_what_is_there(store: DynamoStore) -> None:
    a, b = prompt_entries("a", 2), prompt_entries("b", 3)
    store.put_many(a)
    store.put_many(b)
    assert store.catalogue().variants() == {a[0].key: 2, b[0].key: 3}
    assert store.revision() == 2


def test_replace_all_mirrors_the_source_and_is_idempotent(store: DynamoStore) -> None:
    old = prompt_entries("old", 5) + prompt_entries("kept", 5)
    store.put_many(old)
    new = prompt_entries("kept", 3) + prompt_entries("new", 2)
    for _ in range(2):
        assert store.replace_all(new) == 5
        assert sorted(store.entries(), key=lambda e: (e.key, e.variant)) == sorted(
            new, key=lambda e: (e.key, e.variant)
        )
        assert store.catalogue().variants() == {new[0].key: 3, new[3].key: 2}
    assert store.revision() == 3


def test_the_review_roundtrips_and_the_catalogue_marks_it(store: DynamoStore) -> None:
    entries = reviewed_entries()
    store.put_many(entries)
    for e in entries:
        assert store.get(e.key, e.variant) == e
    marks = {p.key: p.marks for p in store.catalogue().prompts}
    assert marks == {entries[0].key: "Arp", entries[3].key: "pap"}
    assert store.catalogue().served({"approved", "pending"}) == {
        entries[0].key: (0,),  # the pinned one only
        entries[3].key: (0, 1, 2),
    }
    assert store.catalogue().served({"approved"}) == {entries[0].key: (0,), entries[3].key: (1,)}
    # One variant changes: the catalogue row follows (the table is queried for the rest).
    store.put(reviewed(entries[3], state="rejected"))
    assert {p.key: p.marks for p in store.catalogue().prompts}[entries[3].key] == "rap"
    store.replace_all([reviewed(entries[0], pinned=False)])
    assert [p.marks for p in store.catalogue().prompts] == ["a"]


def test_an_item_from_before_review_reads_as_pending(store: DynamoStore, client: Any) -> None:
    entry = prompt_entries("old", 1)[0]
    item = encode_entry(entry)
    for name in ("state", "flags", "pinned", "history"):
        del item[name]
    client.put_item(TableName=TABLE, Item=item)
    got = store.get(entry.key, 0)
    assert got == entry and got is not None and got.state == "pending"
    old_row = Catalogue(1, (PromptInfo(entry.key, "prompt", "old", entry.model, 1),))
    assert old_row.served({"approved", "pending"}) == {entry.key: (0,)}
    assert old_row.served({"approved"}) == {}


def test_malformed_marks_are_a_corrupt_catalogue() -> None:
    row = PromptInfo("k", "prompt", "p", "m.gguf", 2, "ax")
    with pytest.raises(StoreError, match="not a review state"):
        Catalogue(1, (row,)).served({"approved"})


def test_a_prompt_over_the_partition_key_limit_works(store: DynamoStore) -> None:
    # 683 three-byte characters: 2049 bytes, one more than DynamoDB allows in a partition key.
    prompt = "あ" * 683
    assert len(prompt.encode()) == 2049
    entries = prompt_entries(prompt, 2)
    store.put_many(entries)
    assert store.get(entries[1].key, 1) == entries[1]
    assert len(entries[1].key) == 64


def test_long_prompts_are_shortened_in_the_catalogue_only(store: DynamoStore) -> None:
    prompt = "x" * 5000
    entries = prompt_entries(prompt, 1)
    store.put_many(entries)
    listed = store.prompts()[0].prompt
    assert len(listed) == 1000
    assert listed.endswith("…")
    assert store.get(entries[0].key, 0) == entries[0]


def test_a_tampered_item_is_refused(store: DynamoStore, client: Any) -> None:
    entry = prompt_entries("p", 1)[0]
    store.put(entry)
    client.update_item(
        TableName=TABLE,
        Key={"key": {"S": entry.key}, "variant": {"N": "0"}},
        UpdateExpression="SET answer = :a",
        ExpressionAttributeValues={":a": {"S": "tampered"}},
    )
    with pytest.raises(StoreError, match="checksum"):
        store.get(entry.key, 0)


def test_an_item_that_is_not_an_entry_is_refused(store: DynamoStore, client: Any) -> None:
    client.put_item(TableName=TABLE, Item={"key": {"S": "k" * 64}, "variant": {"N": "0"}})
    with pytest.raises(StoreError) as info:
        store.get("k" * 64, 0)
    assert info.value.code == "corrupt"


def test_an_entry_over_the_item_limit_is_refused_before_writing(store: DynamoStore) -> None:
    entry = prompt_entries("big", 1)[0]
    big = Entry(**{**entry.to_dict(), "answer": "y" * 410_000, "checksum": ""}).sealed()
    with pytest.raises(StoreError) as info:
        store.put(big)
    assert info.value.code == "too_large"
    assert list(store.entries()) == []


def test_a_concurrent_writer_is_detected(
    store: DynamoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.put_many(prompt_entries("first", 1))
    # This writer read the catalogue before the first push finished.
    monkeypatch.setattr(store, "catalogue", lambda consistent=False: Catalogue(0, ()))
    with pytest.raises(StoreError) as info:
        store.put_many(prompt_entries("second", 1))
    assert info.value.code == "conflict"


def test_create_table_is_idempotent_and_checks_the_schema(client: Any) -> None:
    assert create_table(client, TABLE) is False
    client.create_table(
        TableName="other",
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    with pytest.raises(StoreError, match="key schema"):
        create_table(client, "other")
    description = client.describe_table(TableName=TABLE)["Table"]
    assert description["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"


def test_a_missing_table_says_how_to_create_it(client: Any) -> None:
    with pytest.raises(StoreError, match="--create") as info:
        DynamoStore(client, "missing").get("k", 0)
    assert info.value.code == "table_not_found"


def test_from_url(monkeypatch: pytest.MonkeyPatch) -> None:
    dummy_credentials(monkeypatch)
    store = DynamoStore.from_url("dynamodb:t1?region=eu-west-1&endpoint_url=http://127.0.0.1:9")
    assert store.table == "t1"
    assert store.client.meta.region_name == "eu-west-1"
    assert store.client.meta.endpoint_url == "http://127.0.0.1:9"
    with pytest.raises(ConfigError, match="unknown option"):
        DynamoStore.from_url("dynamodb:t1?regoin=eu-west-1")
    with pytest.raises(ConfigError):
        DynamoStore.from_url("dynamodb:")
    assert isinstance(open_store("dynamodb:t2?region=us-west-2"), DynamoStore)


def test_no_region_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    dummy_credentials(monkeypatch)
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.delenv("AWS_REGION")
    with pytest.raises(ConfigError, match="region"):
        make_client()


# --- failures, with botocore's Stubber -------------------------------------------------------


def stubbed(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Stubber]:
    dummy_credentials(monkeypatch)
    client = boto3.client(
        "dynamodb", region_name=REGION, config=Config(retries={"max_attempts": 1})
    )
    return client, Stubber(client)


@pytest.mark.parametrize(
    "code", ["ProvisionedThroughputExceededException", "ThrottlingException", "InternalServerError"]
)
def test_throttling_is_store_unavailable(monkeypatch: pytest.MonkeyPatch, code: str) -> None:
    client, stub = stubbed(monkeypatch)
    stub.add_client_error("get_item", service_error_code=code, http_status_code=400)
    with stub, pytest.raises(StoreUnavailableError) as info:
        DynamoStore(client, TABLE).get("k", 0)
    assert info.value.status == 503
    assert info.value.headers()["Retry-After"] == "1"


def test_other_client_errors_are_store_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    client, stub = stubbed(monkeypatch)
    stub.add_client_error("get_item", service_error_code="AccessDeniedException")
    with stub, pytest.raises(StoreError) as info:
        DynamoStore(client, TABLE).get("k", 0)
    assert not isinstance(info.value, StoreUnavailableError)
    assert "AccessDeniedException" in info.value.message


def test_unprocessed_items_are_retried_with_growing_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, stub = stubbed(monkeypatch)
    entries = prompt_entries("p", 3)
    items = [{"PutRequest": {"Item": encode_entry(e)}} for e in entries]
    stub.add_response("batch_write_item", {"UnprocessedItems": {TABLE: items[1:]}})
    stub.add_response("batch_write_item", {"UnprocessedItems": {TABLE: items[2:]}})
    stub.add_response(
        "batch_write_item",
        {"UnprocessedItems": {}},
        expected_params={"RequestItems": {TABLE: items[2:]}},
    )
    sleeps: list[float] = []
    store = DynamoStore(client, TABLE, sleep=sleeps.append, backoff_base=0.1)
    with stub:
        store._batch_write(items)
    stub.assert_no_pending_responses()
    assert len(sleeps) == 2
    assert 0.05 <= sleeps[0] <= 0.1
    assert 0.1 <= sleeps[1] <= 0.2


def test_unprocessed_items_give_up_after_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    client, stub = stubbed(monkeypatch)
    items = [{"PutRequest": {"Item": encode_entry(e)}} for e in prompt_entries("p", 1)]
    for _ in range(4):
        stub.add_response("batch_write_item", {"UnprocessedItems": {TABLE: items}})
    sleeps: list[float] = []
    store = DynamoStore(client, TABLE, sleep=sleeps.append, max_batch_attempts=4, backoff_max=0.3)
    with stub, pytest.raises(StoreUnavailableError, match="unprocessed"):
        store._batch_write(items)
    assert len(sleeps) == 3
    assert max(sleeps) <= 0.3


def test_writes_go_in_batches_of_25(store: DynamoStore, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    real = store.client.batch_write_item

    def spy(**kwargs: Any) -> Any:
        sizes.append(len(kwargs["RequestItems"][TABLE]))
        return real(**kwargs)

    monkeypatch.setattr(store.client, "batch_write_item", spy)
    store.put_many([e for i in range(12) for e in prompt_entries(f"p{i}", 5)])
    assert sizes == [25, 25, 10]


def test_an_unreachable_endpoint_is_store_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    dummy_credentials(monkeypatch)
    client = boto3.client(
        "dynamodb",
        region_name=REGION,
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=1),
    )
    with pytest.raises(StoreUnavailableError, match="unreachable"):
        DynamoStore(client, TABLE).get("k", 0)


def test_dynamo_errors_translates_botocore_and_passes_the_rest() -> None:
    throttled = botocore.exceptions.ClientError(
        {"Error": {"Code": "ThrottlingException", "Message": "slow down"}}, "GetItem"
    )
    busy = r"busy \(ThrottlingException\) during X"
    with pytest.raises(StoreUnavailableError, match=busy) as a, dynamo_errors("X"):
        raise throttled
    assert a.value.__cause__ is throttled
    gone = botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
    with pytest.raises(StoreUnavailableError, match="unreachable during Y"), dynamo_errors("Y"):
        raise gone
    waited = botocore.exceptions.WaiterError(name="table_exists", reason="max", last_response={})
    with pytest.raises(StoreError, match="did not finish Z") as c, dynamo_errors("Z"):
        raise waited
    assert c.value.code == "timeout"
    with pytest.raises(KeyError), dynamo_errors("W"):
        raise KeyError("not botocore's: unchanged")


def test_botocore_errors_are_caught_in_one_place() -> None:
    """Every `except` naming botocore in the DynamoDB store is the one in dynamo_errors (and
    make_client's NoRegionError, a configuration error)."""
    import comeapi.cache.dynamo as module

    handlers = [
        ast.unparse(node.type)
        for node in ast.walk(ast.parse(inspect.getsource(module)))
        if isinstance(node, ast.ExceptHandler) and node.type is not None
    ]
    botocore_handlers = [h for h in handlers if "botocore" in h]
    assert botocore_handlers == [
        "botocore.exceptions.NoRegionError",
        "(botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)",
    ]


# --- the real wire: moto's server over HTTP ---------------------------------------------------


def test_against_moto_server(spawn: Callable[..., Proc], monkeypatch: pytest.MonkeyPatch) -> None:
    dummy_credentials(monkeypatch)
    endpoint = start_moto_server(spawn)
    store = DynamoStore.from_url(f"dynamodb:{TABLE}?region={REGION}&endpoint_url={endpoint}")
    assert create_table(store.client, TABLE) is True
    entries = prompt_entries("東京タワーの高さ", 5) + chat_entries(CHAT, 5)
    store.replace_all(entries)
    reader = DynamoStore(make_client(REGION, endpoint), TABLE)
    assert reader.get(entries[3].key, 3) == entries[3]
    assert reader.catalogue().variants() == {entries[0].key: 5, entries[5].key: 5}
    assert sorted(reader.entries(), key=lambda e: (e.key, e.variant)) == sorted(
        entries, key=lambda e: (e.key, e.variant)
    )
