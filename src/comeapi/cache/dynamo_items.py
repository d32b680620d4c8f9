"""DynamoDB items <-> comeapi's entries, and the catalogue item readers use to know N.

Items are in the low-level format (``{"S": ...}``), as the client sends and returns them, so
no boto3 resource layer (and its Decimal conversions) is involved. ``params`` is stored as
canonical JSON text so that an entry's checksum survives the round trip; so are the review's
``flags`` and ``history`` (``state`` is a string, ``pinned`` a boolean). An item written
before review has none of these and reads as pending.

The catalogue lists, per prompt, the ``marks`` of its variants (``comeapi.cache.serving``):
what a reader may pick is decided from it once per catalogue, not per request.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from typing import Any, NamedTuple

from comeapi.cache.serving import served_variants
from comeapi.cache.store import Entry, PromptInfo, parse_state
from comeapi.errors import StoreError

CATALOGUE_KEY = "#catalogue"  # never a hex digest, so never a prompt's key
MAX_ITEM_BYTES = 400 * 1024  # DynamoDB's item size limit
CATALOGUE_PROMPT_CHARS = 1000  # longer prompts are listed shortened (the entries keep them whole)


class Catalogue(NamedTuple):
    """The catalogue item: every prompt, its variant count, a revision number (one more at
    every push) and when it was written (Unix seconds; 0 if unknown). The pair names one
    state of the table: a table deleted and created again restarts at revision 1."""

    revision: int
    prompts: tuple[PromptInfo, ...]
    updated: int = 0

    def variants(self) -> dict[str, int]:
        return {p.key: p.variants for p in self.prompts}

    def served(self, serve: Collection[str]) -> dict[str, tuple[int, ...]]:
        """The variants a reader may pick per prompt under ``serve`` (serve_states); prompts
        with none are left out (a miss). StoreError if a row's marks are malformed."""
        out: dict[str, tuple[int, ...]] = {}
        for p in self.prompts:
            try:
                variants = served_variants(p.marks, p.variants, serve)
            except ValueError as exc:
                raise StoreError(f"the catalogue row of {p.key}: {exc}", code="corrupt") from None
            if variants:
                out[p.key] = variants
        return out


def encode_entry(entry: Entry) -> dict[str, Any]:
    """An entry as a low-level DynamoDB item (params as canonical JSON text)."""
    item: dict[str, Any] = {
        "key": {"S": entry.key},
        "variant": {"N": str(entry.variant)},
        "kind": {"S": entry.kind},
        "prompt": {"S": entry.prompt},
        "answer": {"S": entry.answer},
        "model": {"S": entry.model},
        "params": {"S": json.dumps(entry.params, ensure_ascii=False, sort_keys=True)},
        "finish_reason": {"S": entry.finish_reason},
        "prompt_tokens": {"N": str(entry.prompt_tokens)},
        "completion_tokens": {"N": str(entry.completion_tokens)},
        "created": {"N": repr(float(entry.created))},
        "checksum": {"S": entry.checksum},
        "state": {"S": entry.state},
        "flags": {"S": json.dumps(list(entry.flags), ensure_ascii=False)},
        "pinned": {"BOOL": entry.pinned},
        "history": {"S": json.dumps(list(entry.history), ensure_ascii=False, sort_keys=True)},
    }
    if entry.messages is not None:
        item["messages"] = {"L": [{"L": [{"S": r}, {"S": c}]} for r, c in entry.messages]}
    size = item_size(item)
    if size > MAX_ITEM_BYTES:
        raise StoreError(
            f"entry {entry.key}#{entry.variant} is {size} bytes, over DynamoDB's "
            f"{MAX_ITEM_BYTES}-byte item limit",
            code="too_large",
        )
    return item


def decode_entry(item: dict[str, Any]) -> Entry:
    try:
        messages = item.get("messages")
        return Entry(
            key=item["key"]["S"],
            variant=int(item["variant"]["N"]),
            kind=item["kind"]["S"],
            prompt=item["prompt"]["S"],
            answer=item["answer"]["S"],
            model=item["model"]["S"],
            messages=(
                tuple((m["L"][0]["S"], m["L"][1]["S"]) for m in messages["L"])
                if messages is not None
                else None
            ),
            params=json.loads(item["params"]["S"]),
            finish_reason=item["finish_reason"]["S"],
            prompt_tokens=int(item["prompt_tokens"]["N"]),
            completion_tokens=int(item["completion_tokens"]["N"]),
            created=float(item["created"]["N"]),
            state=parse_state(item["state"]["S"] if "state" in item else "pending"),
            flags=tuple(json.loads(item["flags"]["S"])) if "flags" in item else (),
            pinned=bool(item["pinned"]["BOOL"]) if "pinned" in item else False,
            history=tuple(json.loads(item["history"]["S"])) if "history" in item else (),
            checksum=item["checksum"]["S"],
        )
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        where = f"{item.get('key', {}).get('S')}#{item.get('variant', {}).get('N')}"
        raise StoreError(f"item {where} is not a comeapi entry ({exc!r})", code="corrupt") from None


def encode_catalogue(catalogue: Catalogue) -> dict[str, Any]:
    prompts = [
        {
            "M": {
                "key": {"S": p.key},
                "kind": {"S": p.kind},
                "prompt": {"S": shorten(p.prompt)},
                "model": {"S": p.model},
                "variants": {"N": str(p.variants)},
                "marks": {"S": p.marks},
            }
        }
        for p in sorted(catalogue.prompts, key=lambda p: p.key)
    ]
    return {
        "key": {"S": CATALOGUE_KEY},
        "variant": {"N": "0"},
        "revision": {"N": str(catalogue.revision)},
        "updated": {"N": str(int(time.time()))},
        "prompts": {"L": prompts},
    }


def decode_catalogue(item: dict[str, Any]) -> Catalogue:
    try:
        prompts = tuple(
            PromptInfo(
                key=m["key"]["S"],
                kind=m["kind"]["S"],
                prompt=m["prompt"]["S"],
                model=m["model"]["S"],
                variants=int(m["variants"]["N"]),
                marks=m["marks"]["S"] if "marks" in m else "",
            )
            for m in (p["M"] for p in item["prompts"]["L"])
        )
        updated = int(item["updated"]["N"]) if "updated" in item else 0
        return Catalogue(int(item["revision"]["N"]), prompts, updated)
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"the catalogue item is malformed ({exc!r})", code="corrupt") from None


def shorten(text: str) -> str:
    if len(text) <= CATALOGUE_PROMPT_CHARS:
        return text
    return text[: CATALOGUE_PROMPT_CHARS - 1] + "…"


def item_size(value: Any) -> int:
    """DynamoDB's item size, closely enough: UTF-8 bytes of names and values."""
    if isinstance(value, dict):
        return sum(len(k.encode()) + item_size(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(item_size(v) for v in value) + 3
    return len(str(value).encode())
