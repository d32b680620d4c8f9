"""The response store on DynamoDB: one item per variant, plus one catalogue item for readers.

Table (``create_table``, and the same schema in ``deploy/aws/template.yaml``):
  partition key ``key`` (S): the shared cache key (``comeapi.cache.key``), a 64-character hash;
  sort key ``variant`` (N): 0..N-1.
The requirements suggest the raw prompt as partition key, but DynamoDB caps a partition key
at 2048 bytes of UTF-8 (about 680 Japanese characters), and the key must equal the one every
other store uses, so the hash is the key and the prompt text is an ordinary attribute.

Readers must know N per prompt without a scan. One item at ``key = "#catalogue"`` (never a hex
digest, so never a prompt's key) lists every prompt with its variant count, model and text;
a reader fetches it once, keeps it, and then answers each request with ONE GetItem. Writers
put entries first and the catalogue after them, so a reader never picks a variant that is
not there yet; reads write nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import botocore.exceptions
from botocore.config import Config

from comeapi.cache.dynamo_items import (
    CATALOGUE_KEY,
    MAX_ITEM_BYTES,
    Catalogue,
    decode_catalogue,
    decode_entry,
    encode_catalogue,
    encode_entry,
    item_size,
)
from comeapi.cache.serving import mark, marks
from comeapi.cache.store import Entry, PromptInfo, ResponseStore
from comeapi.errors import ConfigError, StoreError, StoreUnavailableError

#: The item holding similar matching's calibration (JSON in ``doc``): like the catalogue, a
#: key that is never a hex digest.
CALIBRATION_KEY = "#calibration"

KEY_SCHEMA = [
    {"AttributeName": "key", "KeyType": "HASH"},
    {"AttributeName": "variant", "KeyType": "RANGE"},
]
ATTRIBUTE_DEFINITIONS = [
    {"AttributeName": "key", "AttributeType": "S"},
    {"AttributeName": "variant", "AttributeType": "N"},
]
BATCH_SIZE = 25  # BatchWriteItem's limit

# Error codes that mean "try again later" rather than "this request is wrong".
TRANSIENT_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "Throttling",
        "RequestLimitExceeded",
        "InternalServerError",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "TransactionInProgressException",
    }
)
_NETWORK_ERRORS = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectionClosedError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.ReadTimeoutError,
)


def client_config(*, connect_timeout: float = 2.0, read_timeout: float = 5.0) -> Config:
    """Timeouts on every call, and botocore's standard retries (throttling included)."""
    return Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"max_attempts": 3, "mode": "standard"},
    )


def make_client(
    region: str | None = None, endpoint_url: str | None = None, *, how: str = "pass --region"
) -> Any:
    """A DynamoDB client. With ``endpoint_url`` (moto, DynamoDB Local) and no AWS credentials
    configured, dummy credentials are used: a local server accepts any. ``how``: how the
    caller's user gives a region, for the error when there is none."""
    import boto3

    # AWS_REGION is what Lambda and the newer SDKs set; botocore reads AWS_DEFAULT_REGION.
    session = boto3.session.Session(region_name=region or os.environ.get("AWS_REGION") or None)
    kwargs: dict[str, Any] = {"endpoint_url": endpoint_url, "config": client_config()}
    if endpoint_url and session.get_credentials() is None:
        kwargs.update(aws_access_key_id="local", aws_secret_access_key="local")
    try:
        return session.client("dynamodb", **kwargs)
    except botocore.exceptions.NoRegionError:
        raise ConfigError(
            f"no AWS region: {how}, or set AWS_REGION or AWS_DEFAULT_REGION"
        ) from None


def create_table(client: Any, table: str, *, wait_seconds: float = 120.0) -> bool:
    """Create ``table`` with comeapi's schema (on-demand billing); False if it already exists.

    An existing table must have the same key schema, else StoreError.
    """
    try:
        with dynamo_errors(f"create table {table}"):
            client.create_table(
                TableName=table,
                KeySchema=KEY_SCHEMA,
                AttributeDefinitions=ATTRIBUTE_DEFINITIONS,
                BillingMode="PAY_PER_REQUEST",
            )
    except StoreError as exc:
        if exc.code != "table_exists":
            raise
        _check_schema(client, table)
        return False
    delay = 1
    with dynamo_errors(f"waiting {wait_seconds:.0f}s for table {table} to become active"):
        client.get_waiter("table_exists").wait(
            TableName=table,
            WaiterConfig={"Delay": delay, "MaxAttempts": max(1, int(wait_seconds / delay))},
        )
    return True


def _check_schema(client: Any, table: str) -> None:
    with dynamo_errors(f"describe table {table}"):
        described = client.describe_table(TableName=table)["Table"]
    if sorted(described["KeySchema"], key=lambda k: k["KeyType"]) != KEY_SCHEMA:
        raise StoreError(
            f"table {table} exists with key schema {described['KeySchema']}; comeapi needs "
            "partition key 'key' (S) and sort key 'variant' (N)",
            code="bad_table",
        )


@contextlib.contextmanager
def dynamo_errors(what: str) -> Iterator[None]:
    """The one place botocore's errors become comeapi's: whatever the block raises from
    botocore leaves it as ``translate_error(exc, what)``; other exceptions pass unchanged."""
    try:
        yield
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise translate_error(exc, what) from exc


def translate_error(exc: Exception, what: str) -> StoreError:
    """A botocore error as a StoreError; throttling and outages as StoreUnavailableError (503).

    Two codes are told apart for callers: ``table_exists`` (CreateTable on an existing
    table) and ``conflict`` (a conditional write lost to another writer).
    """
    if isinstance(exc, botocore.exceptions.ClientError):
        code = _code(exc)
        message = exc.response.get("Error", {}).get("Message", "")
        if code in TRANSIENT_CODES:
            return StoreUnavailableError(f"DynamoDB is busy ({code}) during {what}; retry")
        if code == "ResourceNotFoundException":
            return StoreError(
                f"DynamoDB table not found during {what} (create it with "
                "`comeapi cache push dynamodb --create` or the SAM template)",
                code="table_not_found",
            )
        if code == "ResourceInUseException":
            return StoreError(f"DynamoDB {code} during {what}: {message}", code="table_exists")
        if code == "ConditionalCheckFailedException":
            return StoreError(
                f"another writer changed the table during {what}; run it again",
                code="conflict",
            )
        return StoreError(f"DynamoDB {code} during {what}: {message}")
    if isinstance(exc, _NETWORK_ERRORS):
        return StoreUnavailableError(f"DynamoDB unreachable during {what}: {exc}", retry_after=2)
    if isinstance(exc, botocore.exceptions.WaiterError):
        return StoreError(f"DynamoDB did not finish {what}: {exc}", code="timeout")
    return StoreError(f"DynamoDB client error during {what}: {exc}")


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class DynamoStore(ResponseStore):
    """A ``ResponseStore`` on a DynamoDB table, through an injected boto3 client."""

    def __init__(
        self,
        client: Any,
        table: str,
        *,
        max_batch_attempts: int = 8,
        backoff_base: float = 0.05,
        backoff_max: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.client = client
        self.table = table
        self._max_batch_attempts = max_batch_attempts
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._sleep = sleep

    @classmethod
    def from_url(cls, url: str) -> DynamoStore:
        """``dynamodb:TABLE?region=eu-west-1&endpoint_url=http://127.0.0.1:5000``."""
        scheme, _, rest = url.partition(":")
        table, _, query = rest.lstrip("/").partition("?")
        if scheme != "dynamodb" or not table:
            raise ConfigError(f"store {url!r}: expected dynamodb:TABLE[?region=R&endpoint_url=U]")
        options = dict(urllib.parse.parse_qsl(query, keep_blank_values=False))
        unknown = set(options) - {"region", "endpoint_url"}
        if unknown:
            raise ConfigError(f"store {url!r}: unknown option(s) {', '.join(sorted(unknown))}")
        how = f"add ?region=R to the store URL {url!r}"
        client = make_client(options.get("region"), options.get("endpoint_url"), how=how)
        return cls(client, table)

    # --- reads: one GetItem each, nothing written ------------------------------------------

    def _get(self, key: str, variant: int) -> Entry | None:
        with dynamo_errors("GetItem"):
            item = self.client.get_item(
                TableName=self.table, Key={"key": {"S": key}, "variant": {"N": str(variant)}}
            ).get("Item")
        if item is None:
            return None
        entry = decode_entry(item)
        entry.verify()
        return entry

    def catalogue(self, *, consistent: bool = False) -> Catalogue:
        """The catalogue item (one GetItem); empty when nothing was pushed yet."""
        with dynamo_errors("GetItem (catalogue)"):
            item = self.client.get_item(
                TableName=self.table,
                Key={"key": {"S": CATALOGUE_KEY}, "variant": {"N": "0"}},
                ConsistentRead=consistent,
            ).get("Item")
        if item is None:
            return Catalogue(0, ())
        return decode_catalogue(item)

    def _prompts(self) -> list[PromptInfo]:
        return list(self.catalogue().prompts)

    def calibration(self) -> dict[str, Any] | None:
        """The item at ``key = "#calibration"`` (one GetItem; read when the store loads)."""
        with dynamo_errors("GetItem (calibration)"):
            item = self.client.get_item(
                TableName=self.table,
                Key={"key": {"S": CALIBRATION_KEY}, "variant": {"N": "0"}},
                ConsistentRead=True,
            ).get("Item")
        if item is None:
            return None
        doc: dict[str, Any] = json.loads(item["doc"]["S"])
        return doc

    def set_calibration(self, doc: dict[str, Any] | None, *, new_revision: bool = True) -> None:
        """Write (or delete) the calibration item, then the catalogue with a new revision, so
        a reader that watches the revision loads it. ``new_revision=False``: the caller
        writes entries next, whose catalogue write is the one new revision readers see."""
        key = {"key": {"S": CALIBRATION_KEY}, "variant": {"N": "0"}}
        with dynamo_errors("PutItem (calibration)"):
            if doc is None:
                self.client.delete_item(TableName=self.table, Key=key)
            else:
                text = json.dumps(doc, ensure_ascii=False, sort_keys=True)
                item = {**key, "doc": {"S": text}}
                if item_size(item) > MAX_ITEM_BYTES:
                    raise StoreError(
                        f"the calibration needs {item_size(item)} bytes, over DynamoDB's "
                        f"{MAX_ITEM_BYTES}-byte item limit",
                        code="too_large",
                    )
                self.client.put_item(TableName=self.table, Item=item)
        if not new_revision:
            return
        current = self.catalogue(consistent=True)
        self._put_catalogue(Catalogue(current.revision + 1, current.prompts), current)

    def revision(self) -> int | None:
        return self.catalogue().revision

    def _entries(self) -> Iterator[Entry]:
        """Every entry (a Scan: for pull and export, never on the request path)."""
        items = [i for i in self._scan() if not i["key"]["S"].startswith("#")]
        entries = sorted((decode_entry(i) for i in items), key=lambda e: (e.key, e.variant))
        return iter(entries)

    def _scan(self, projection: str | None = None) -> Iterator[dict[str, Any]]:
        kwargs: dict[str, Any] = {"TableName": self.table, "ConsistentRead": True}
        if projection:
            kwargs.update(ProjectionExpression=projection, ExpressionAttributeNames={"#k": "key"})
        with dynamo_errors("Scan"):
            for page in self.client.get_paginator("scan").paginate(**kwargs):
                yield from page.get("Items", [])

    # --- writes: entries first, then the catalogue ------------------------------------------

    def _put_many(self, entries: list[Entry]) -> int:
        unique = _dedupe(entries)
        self._batch_write([{"PutRequest": {"Item": encode_entry(e)}} for e in unique])
        touched = {e.key: e for e in unique}
        current = self.catalogue(consistent=True)
        infos = {p.key: p for p in current.prompts}
        for key, entry in touched.items():
            infos[key] = _info(entry, self._stored_marks(key))
        self._put_catalogue(Catalogue(current.revision + 1, tuple(infos.values())), current)
        return len(unique)

    def _replace_all(self, entries: list[Entry]) -> int:
        unique = _dedupe(entries)
        self._batch_write([{"PutRequest": {"Item": encode_entry(e)}} for e in unique])
        groups: dict[str, dict[int, Entry]] = {}
        for e in unique:
            groups.setdefault(e.key, {})[e.variant] = e
        infos = tuple(
            _info(group[min(group)], _contiguous_marks(group.values())) for group in groups.values()
        )
        current = self.catalogue(consistent=True)
        self._put_catalogue(Catalogue(current.revision + 1, infos), current)
        wanted = {(e.key, e.variant) for e in unique}
        stale = [
            {"DeleteRequest": {"Key": {"key": i["key"], "variant": i["variant"]}}}
            for i in self._scan("#k, variant")
            if not i["key"]["S"].startswith("#")  # the catalogue and the calibration stay
            and (i["key"]["S"], int(i["variant"]["N"])) not in wanted
        ]
        self._batch_write(stale)
        return len(unique)

    def _stored_marks(self, key: str) -> str:
        """The marks of ``key``'s contiguous variants as the table holds them now."""
        present: dict[int, str] = {}
        kwargs: dict[str, Any] = {
            "TableName": self.table,
            "KeyConditionExpression": "#k = :k",
            "ExpressionAttributeNames": {"#k": "key", "#s": "state"},
            "ExpressionAttributeValues": {":k": {"S": key}},
            "ProjectionExpression": "variant, #s, pinned",
            "ConsistentRead": True,
        }
        with dynamo_errors("Query"):
            for page in self.client.get_paginator("query").paginate(**kwargs):
                for i in page.get("Items", []):
                    state = i.get("state", {}).get("S", "pending")
                    present[int(i["variant"]["N"])] = mark(
                        state, i.get("pinned", {}).get("BOOL", False)
                    )
        n = _count_contiguous(present)
        return "".join(present[v] for v in range(n))

    def _put_catalogue(self, catalogue: Catalogue, previous: Catalogue) -> None:
        """Write the catalogue unless another writer replaced ``previous`` meanwhile."""
        item = encode_catalogue(catalogue)
        size = item_size(item)
        if size > MAX_ITEM_BYTES:
            raise StoreError(
                f"the catalogue of {len(catalogue.prompts)} prompts needs {size} bytes, over "
                f"DynamoDB's {MAX_ITEM_BYTES}-byte item limit",
                code="too_large",
            )
        with dynamo_errors("this push (PutItem of the catalogue)"):
            self.client.put_item(
                TableName=self.table,
                Item=item,
                ConditionExpression="attribute_not_exists(#k) OR revision = :rev",
                ExpressionAttributeNames={"#k": "key"},
                ExpressionAttributeValues={":rev": {"N": str(previous.revision)}},
            )

    def _batch_write(self, requests: list[dict[str, Any]]) -> None:
        """BatchWriteItem in batches of 25, retrying UnprocessedItems with capped, jittered
        exponential backoff; StoreUnavailableError when the bound is reached."""
        for start in range(0, len(requests), BATCH_SIZE):
            pending = requests[start : start + BATCH_SIZE]
            for attempt in range(self._max_batch_attempts):
                with dynamo_errors("BatchWriteItem"):
                    response = self.client.batch_write_item(RequestItems={self.table: pending})
                pending = response.get("UnprocessedItems", {}).get(self.table, [])
                if not pending:
                    break
                if attempt + 1 < self._max_batch_attempts:
                    delay = min(self._backoff_max, self._backoff_base * 2**attempt)
                    self._sleep(delay * random.uniform(0.5, 1.0))
            else:
                raise StoreUnavailableError(
                    f"DynamoDB left {len(pending)} items unprocessed after "
                    f"{self._max_batch_attempts} attempts; the write is incomplete, run it again",
                    retry_after=self._backoff_max,
                )


def _info(entry: Entry, marks: str) -> PromptInfo:
    """A catalogue row: its variant count is how many contiguous variants ``marks`` covers."""
    return PromptInfo(entry.key, entry.kind, entry.prompt, entry.model, len(marks), marks)


def _contiguous_marks(group: Iterable[Entry]) -> str:
    by_variant = {e.variant: e for e in group}
    return marks(by_variant[v] for v in range(_count_contiguous(by_variant)))


def _count_contiguous(variants: Iterable[int]) -> int:
    """How many variants 0, 1, 2, ... exist without a gap: only those are ever picked."""
    present = set(variants)
    n = 0
    while n in present:
        n += 1
    return n


def _dedupe(entries: list[Entry]) -> list[Entry]:
    # One BatchWriteItem must not name an item twice; the last write of a (key, variant) wins.
    return list({(e.key, e.variant): e for e in entries}.values())
