"""Generated bodies sent to every tier; any disagreement fails.

The table (requests.jsonl) says what each listed body means; this test has no expected
answers, only the rule that every tier answers alike: the one parse in process (with orjson,
and with the standard library's json as the Lambda package has it), `comeapi serve` over
HTTP, the Lambda handler over DynamoDB on moto's server, and real nginx's njs. Each verdict
is reduced to what a client sees: a 400 (param, code), a hit (which stored answer) or a miss.

Seeded and bounded: COMEAPI_FUZZ_SEED (default 22) and COMEAPI_FUZZ_BODIES (default 400)
pick the bodies; every request has a timeout. A failure prints the seed and, for each body,
the case it grew from and its mutations.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from comeapi.cache.key import lookup_key, uncacheable
from comeapi.cache.serving import DEFAULT_SERVE_STATES, served_entries
from comeapi.errors import RequestError
from comeapi.protocol import json_body
from comeapi.protocol.requests import KINDS, decode_json, parse_request
from comeapi.serverless.events import http_api_event
from comeapi.serverless.handler import ServerlessApp
from tests.conformance.fuzz import Body, generate
from tests.conformance.table import API_KEY, DEFAULT_MODEL, answer_text, entries
from tests.deploy.nginx_stack import Nginx, nginx_missing

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("COMEAPI_FUZZ_SEED", "22"))
COUNT = int(os.environ.get("COMEAPI_FUZZ_BODIES", "400"))
# The keys a tier answers from the cache: those with a variant served (the table's `st-*`
# rows store reviewed variants; a prompt whose answers were all rejected is a miss).
_GROUPS: dict[str, list[Any]] = {}
for _entry in entries():
    _GROUPS.setdefault(_entry.key, []).append(_entry)
STORED = {k for k, g in _GROUPS.items() if served_entries(g, DEFAULT_SERVE_STATES)}
Verdict = tuple[Any, ...]
KEY = {"Authorization": f"Bearer {API_KEY}"}  # the session's tiers take the table's API key


def in_process(body: Body) -> Verdict:
    try:
        request = parse_request(KINDS[body.route], decode_json(body.raw), max_tokens_limit=2048)
        blocker = uncacheable(request)
        if blocker is not None:
            return ("400", blocker, "not_cacheable")
        key = lookup_key(request, DEFAULT_MODEL)
    except RequestError as exc:
        return ("400", exc.param, exc.code)
    return ("hit", key[:12]) if key in STORED else ("miss",)


def seen(status: int, headers: Any, content: bytes, route: str) -> Verdict:
    """What a client sees in one tier's HTTP answer."""
    if status == 400:
        error = json.loads(content)["error"]
        return ("400", error["param"], error["code"])
    if status == 404:
        return ("miss",)
    if status == 200:
        stream = headers.get("content-type", "").startswith("text/event-stream")
        # "answer <key> [variant N]": which prompt answered, whichever variant was drawn.
        return ("hit", answer_text(route, content, stream).removeprefix("answer ").split()[0])
    return ("status", status, content[:200])


@pytest.fixture(scope="module")
def nginx(gateway: str) -> Iterator[Nginx]:
    missing = nginx_missing()
    if missing:
        pytest.fail(missing)
    base = Path(tempfile.mkdtemp(prefix="comeapi-differential-"))
    base.chmod(0o755)
    server = Nginx(base / "nginx", base / "cache", gateway.removeprefix("http://"), "s" * 32)
    server.secret = secrets.token_hex(16)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_every_tier_gives_every_generated_body_the_same_answer(
    gateway: str,
    client: httpx.Client,
    lambda_app: ServerlessApp,
    nginx: Nginx,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bodies = generate(SEED, COUNT)

    def stdlib_json(body: Body) -> Verdict:
        with monkeypatch.context() as m:
            m.setattr(json_body, "_loads", lambda: json_body._json_loads)
            return in_process(body)

    def over_http(body: Body) -> Verdict:
        r = client.post(gateway + body.route, content=body.raw, headers=KEY)
        return seen(r.status_code, r.headers, r.content, body.route)

    def lambda_handler(body: Body) -> Verdict:
        result = lambda_app(http_api_event("POST", body.route, headers=KEY, body=body.raw))
        raw = result["body"]
        content = base64.b64decode(raw) if result["isBase64Encoded"] else raw.encode("utf-8")
        headers = {k.lower(): v for k, v in result["headers"].items()}
        return seen(result["statusCode"], headers, content, body.route)

    def njs(body: Body) -> Verdict:
        url = nginx.warmup_url + "/_comeapi/key"
        v = client.post(url, params={"route": body.route}, content=body.raw).json()
        if v["error"] is not None:
            return ("400", v["error"]["param"], v["error"]["code"])
        if v["uncacheable"] is not None:
            return ("400", v["uncacheable"], "not_cacheable")
        return ("hit", v["key"][:12]) if v["key"] in STORED else ("miss",)

    tiers: dict[str, Callable[[Body], Verdict]] = {
        "gateway": over_http,
        "lambda": lambda_handler,
        "njs": njs,
        "stdlib json": stdlib_json,
    }
    disagreements = []
    outcomes: set[str] = set()
    for body in bodies:
        reference = in_process(body)
        outcomes.add(reference[0] if reference[0] != "400" else str(reference[2]))
        verdicts = {name: tier(body) for name, tier in tiers.items()}
        differ = {name: v for name, v in verdicts.items() if v != reference}
        if differ:
            disagreements.append(f"{body.how} {body.route} {body.raw[:160]!r}\n"
                                 f"    parse: {reference}  " + "  ".join(
                                     f"{n}: {v}" for n, v in differ.items()))  # fmt: skip
    # The bodies reach every kind of answer, or the comparison says little.
    assert {"hit", "miss", "invalid_json", "invalid_value", "not_cacheable"} <= outcomes
    assert not disagreements, (
        f"seed {SEED}: {len(disagreements)} of {len(bodies)} bodies answered differently:\n"
        + "\n".join(disagreements[:40])
    )
