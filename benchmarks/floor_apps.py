"""Python's floor for a cache hit: bare apps that read the request and answer the same bytes
as a comeapi hit, with nothing else. ``asgi_app`` runs under uvicorn (httptools, uvloop),
``rsgi_app`` under granian's RSGI interface (Rust HTTP). The body and its headers come from
the file named by FLOOR_RESPONSE (JSON: ``{"body": str, "headers": [[name, value], ...]}``),
written by benchmarks/nginx_vs_gateway.py from a real comeapi hit."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

_DOC = json.loads(Path(os.environ["FLOOR_RESPONSE"]).read_text(encoding="utf-8"))
BODY: bytes = _DOC["body"].encode()
HEADERS: list[tuple[str, str]] = [(k, v) for k, v in _DOC["headers"]]
_ASGI_HEADERS = [(k.encode(), v.encode()) for k, v in HEADERS]
_ASGI_HEADERS.append((b"content-length", str(len(BODY)).encode()))


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": _ASGI_HEADERS})
    await send({"type": "http.response.body", "body": BODY})


async def rsgi_app(scope: Any, protocol: Any) -> None:
    await protocol()  # the whole body
    protocol.response_bytes(200, HEADERS, BODY)
