"""API Gateway proxy events in, Lambda proxy results out: HTTP API (payload v2) and REST API (v1).

Both shapes are documented by AWS ("Working with AWS Lambda proxy integrations for HTTP APIs";
"Lambda proxy integration input format" for REST APIs); tests/serverless/events/ holds samples.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from typing import Any, NamedTuple

from comeapi.errors import RequestError


# NamedTuples, not dataclasses: a tenth of the cost to define, and this is cold-start code.
class HttpRequest(NamedTuple):
    """What the handler needs from an event. ``path`` has no stage prefix; header names are
    lowercase."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    query: str = ""


class Reply(NamedTuple):
    status: int
    body: str
    headers: dict[str, str]


def parse_event(event: dict[str, Any]) -> HttpRequest:
    """An HttpRequest from a v2 or v1 proxy event (RequestError if it is neither)."""
    context = event.get("requestContext") or {}
    if event.get("version") == "2.0":
        method = str(context.get("http", {}).get("method", ""))
        path = str(event.get("rawPath", ""))
        query = str(event.get("rawQueryString", ""))
    elif "httpMethod" in event:
        method = str(event["httpMethod"])
        path = str(event.get("path", ""))
        params = event.get("queryStringParameters") or {}
        query = "&".join(f"{k}={v}" for k, v in params.items())
    else:
        raise RequestError("not an API Gateway proxy event (payload v1 or v2)", code="bad_event")
    stage = str(context.get("stage", "$default"))
    # An HTTP API's named stage appears in rawPath ("/prod/generate"); routes do not have it.
    prefix = f"/{stage}"
    if stage != "$default" and (path == prefix or path.startswith(prefix + "/")):
        path = path[len(prefix) :] or "/"
    headers = {str(k).lower(): str(v) for k, v in (event.get("headers") or {}).items()}
    raw = event.get("body") or ""
    if event.get("isBase64Encoded"):
        try:
            body = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("request body is not valid base64", code="invalid_body") from None
    else:
        body = raw.encode("utf-8") if isinstance(raw, str) else bytes(raw)
    return HttpRequest(method.upper(), path or "/", headers, body, query)


def to_result(reply: Reply) -> dict[str, Any]:
    """The proxy result both payload versions accept."""
    return {
        "statusCode": reply.status,
        "headers": reply.headers,
        "body": reply.body,
        "isBase64Encoded": False,
    }


def http_api_event(
    method: str,
    path: str,
    *,
    query: str = "",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    source_ip: str = "127.0.0.1",
) -> dict[str, Any]:
    """A payload v2 event as API Gateway's HTTP API sends it (``$default`` route and stage)."""
    headers = {k.lower(): v for k, v in (headers or {}).items()}
    try:
        text, encoded = body.decode("utf-8"), False
    except UnicodeDecodeError:
        text, encoded = base64.b64encode(body).decode("ascii"), True
    now = time.time()
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": query,
        "headers": headers,
        "requestContext": {
            "accountId": "anonymous",
            "apiId": "local",
            "domainName": headers.get("host", "localhost"),
            "domainPrefix": "local",
            "http": {
                "method": method.upper(),
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": source_ip,
                "userAgent": headers.get("user-agent", ""),
            },
            "requestId": uuid.uuid4().hex,
            "routeKey": "$default",
            "stage": "$default",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "timeEpoch": int(now * 1000),
        },
        "body": text,
        "isBase64Encoded": encoded,
    }
