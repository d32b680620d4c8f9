"""The Lambda handler where DNS never answers: a call to DynamoDB is a quick 503, never a
wait past API Gateway's 29 s (found under `sam local` on a machine without network, where
SAM answered 502).

It runs in the python3.12 runtime image `sam local` uses (tests/deploy/sam_local.py,
deploy/aws/local), with no network and a name server on its loopback that reads queries and
never answers: glibc's resolver then waits out its timeout (5 s, twice), as it did in SAM's
container. The function answers from its snapshot, and from the table (AWS's endpoint, which
needs DNS) for a miss and with SNAPSHOT=off.
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from comeapi.cache.dynamo import DynamoStore, create_table
from comeapi.serverless.snapshot import write_snapshot
from tests.aws_local import REGION, dummy_credentials, prompt_entries
from tests.deploy.docker_engine import DockerEngine, docker
from tests.deploy.sam_local import local_images
from tests.helpers import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

TABLE = "comeapi-cache"
CACHED = "日本の首都はどこですか"
API_GATEWAY_LIMIT = 29.0  # s: API Gateway gives up on a Lambda after this (a 502 in SAM)

# In the container: the name server that never answers, then the handler, timed.
SCRIPT = """
import json, socket, sys, threading, time
dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dns.bind(("127.0.0.1", 53))
threading.Thread(target=lambda: [dns.recvfrom(4096) for _ in iter(int, 1)], daemon=True).start()

from comeapi.serverless.events import http_api_event
from comeapi.serverless.handler import ServerlessApp

base = {"TABLE_NAME": sys.argv[1]}
apps = {
    "snapshot": ServerlessApp.from_env({**base, "SNAPSHOT_DIR": "/snapshot"}),
    "table": ServerlessApp.from_env({**base, "SNAPSHOT": "off"}),
}
out = []
for app, prompt in (("snapshot", sys.argv[2]), ("snapshot", "not cached"), ("table", sys.argv[2])):
    event = http_api_event("POST", "/generate", body=json.dumps({"prompt": prompt}).encode())
    started = time.monotonic()
    result = apps[app](event, None)
    seconds = time.monotonic() - started
    body = json.loads(result["body"])
    out.append({
        "app": app, "prompt": prompt, "status": result["statusCode"], "seconds": seconds,
        "code": (body.get("error") or {}).get("code"),
        "retry_after": result["headers"].get("Retry-After"),
        "answers_from": apps[app].source.answers_from,
    })
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def work_dir() -> Iterator[Path]:
    # Not under pytest's tmp_path: the container mounts from it.
    path = Path(tempfile.mkdtemp(prefix="comeapi-no-dns-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def snapshot_dir(work_dir: Path) -> Path:
    """A snapshot of a table holding CACHED's answers (taken from moto, in process)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        dummy_credentials(monkeypatch)
        with mock_aws():
            client = boto3.client("dynamodb", region_name=REGION)
            create_table(client, TABLE)
            store = DynamoStore(client, TABLE)
            store.replace_all(prompt_entries(CACHED, 3))
            write_snapshot(store, work_dir / "snapshot")
    return work_dir / "snapshot"


def run_without_dns(work_dir: Path, snapshot_dir: Path) -> list[dict[str, Any]]:
    engine = DockerEngine.ensure(work_dir)
    name = f"comeapi-no-dns-{secrets.token_hex(4)}"
    resolv = work_dir / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:5 attempts:2\n")
    try:
        image = local_images(work_dir).runtime
        done = docker(
            "run", "--rm", "--name", name, "--network", "none",
            "-v", f"{REPO / 'src'}:/var/task:ro",
            "-v", f"{snapshot_dir}:/snapshot:ro",
            "-v", f"{resolv}:/etc/resolv.conf:ro",
            "-e", "PYTHONPATH=/var/task:/var/runtime", "-e", f"AWS_REGION={REGION}",
            "-e", "AWS_ACCESS_KEY_ID=testing", "-e", "AWS_SECRET_ACCESS_KEY=testing",
            "-e", "AWS_EC2_METADATA_DISABLED=true", "-e", "PYTHONDONTWRITEBYTECODE=1",
            "--entrypoint", "/var/lang/bin/python3.12", image,
            "-c", SCRIPT, TABLE, CACHED,
            timeout=600,
        )  # fmt: skip
    finally:
        docker("rm", "-f", name, check=False)
        engine.stop()
    result: list[dict[str, Any]] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_without_dns_the_table_is_a_quick_503(work_dir: Path, snapshot_dir: Path) -> None:
    hit, miss, table = run_without_dns(work_dir, snapshot_dir)
    for answer in (hit, miss, table):  # pytest -s shows them
        print(f"no DNS: {answer}", flush=True)
    assert (hit["status"], hit["answers_from"]) == (200, "snapshot"), hit
    assert hit["seconds"] < 1.0, hit  # the snapshot needs no network
    for answer in (miss, table):
        # A miss looks at the table (a prompt pushed after the build?); SNAPSHOT=off reads it
        # for every request. Neither may outlast API Gateway: 503 with Retry-After, soon.
        assert (answer["status"], answer["code"]) == (503, "store_unavailable"), answer
        assert answer["retry_after"] is not None, answer
        assert answer["seconds"] < 10.0 < API_GATEWAY_LIMIT, answer
