"""The on-demand backend: EC2 (moto) starts the instance, a loopback stub plays the backend."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest

from comeapi.cache.dynamo import DynamoStore
from comeapi.errors import UnavailableError, UpstreamError
from comeapi.serverless.events import HttpRequest, http_api_event
from comeapi.serverless.handler import ServerlessApp
from comeapi.serverless.ondemand import (
    LAST_USED_TAG,
    OnDemandBackend,
    idle_stop,
    idle_stop_handler,
)
from comeapi.serverless.source import TableSource
from tests.aws_local import REGION
from tests.helpers import Proc, comeapi_argv, free_port
from tests.serverless.conftest import GENERATE_PROMPT, TABLE

AMI = "ami-12c6146b"  # an image moto knows


class Backend:
    """A stand-in for `comeapi backend` on loopback: records requests, answers as told."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.status = 200
        self.delay = 0.0
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                backend.requests.append(
                    (self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                )
                time.sleep(backend.delay)
                answer = json.dumps({"response": "live answer"}).encode()
                self.send_response(backend.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def backend() -> Iterator[Backend]:
    b = Backend()
    yield b
    b.close()


@pytest.fixture
def ec2(aws: None) -> Any:
    return boto3.client("ec2", region_name=REGION)


def stopped_instance(ec2: Any) -> str:
    instance_id: str = ec2.run_instances(ImageId=AMI, MinCount=1, MaxCount=1)["Instances"][0][
        "InstanceId"
    ]
    ec2.stop_instances(InstanceIds=[instance_id])
    return instance_id


def state(ec2: Any, instance_id: str) -> str:
    reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return str(reservations[0]["Instances"][0]["State"]["Name"])


def tags(ec2: Any, instance_id: str) -> dict[str, str]:
    instance = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def miss(prompt: str = "not cached") -> HttpRequest:
    body = json.dumps({"prompt": prompt}).encode()
    return HttpRequest("POST", "/generate", {"content-type": "application/json"}, body)


def test_a_miss_starts_the_stopped_instance_then_is_forwarded(ec2: Any, backend: Backend) -> None:
    instance_id = stopped_instance(ec2)
    on_demand = OnDemandBackend(
        instance_id, ec2=ec2, host="127.0.0.1", port=backend.port, api_key="secret"
    )
    with pytest.raises(UnavailableError) as info:
        on_demand(miss())
    assert info.value.status == 503
    assert info.value.code == "backend_starting"
    assert info.value.headers() == {"Retry-After": "30"}
    assert state(ec2, instance_id) == "running"  # moto boots instantly
    assert LAST_USED_TAG in tags(ec2, instance_id)
    assert backend.requests == []

    reply = on_demand(miss())
    assert reply.status == 200
    assert json.loads(reply.body) == {"response": "live answer"}
    assert reply.headers == {"X-Cache": "MISS", "Content-Type": "application/json"}
    path, headers, body = backend.requests[0]
    assert path == "/generate"
    assert json.loads(body) == {"prompt": "not cached"}
    assert headers["authorization"] == "Bearer secret"


def test_through_the_handler_hits_never_touch_ec2(
    store: DynamoStore, ec2: Any, backend: Backend
) -> None:
    instance_id = stopped_instance(ec2)
    on_demand = OnDemandBackend(instance_id, ec2=ec2, host="127.0.0.1", port=backend.port)
    app = ServerlessApp(TableSource(store), on_miss=on_demand)
    event = http_api_event(
        "POST", "/generate", body=json.dumps({"prompt": GENERATE_PROMPT}).encode()
    )
    assert app(event, None)["statusCode"] == 200
    assert state(ec2, instance_id) == "stopped"

    unknown = http_api_event("POST", "/generate", body=b'{"prompt": "something new"}')
    first = app(unknown, None)
    assert first["statusCode"] == 503
    assert first["headers"]["Retry-After"] == "30"
    assert json.loads(first["body"])["error"]["code"] == "backend_starting"
    second = app(unknown, None)
    assert second["statusCode"] == 200
    assert json.loads(second["body"]) == {"response": "live answer"}


def test_the_backends_errors_are_passed_on(ec2: Any, backend: Backend) -> None:
    instance_id = stopped_instance(ec2)
    ec2.start_instances(InstanceIds=[instance_id])
    backend.status = 429
    reply = OnDemandBackend(instance_id, ec2=ec2, host="127.0.0.1", port=backend.port)(miss())
    assert reply.status == 429


def test_running_but_not_listening_is_503(ec2: Any) -> None:
    instance_id = stopped_instance(ec2)
    ec2.start_instances(InstanceIds=[instance_id])
    on_demand = OnDemandBackend(instance_id, ec2=ec2, host="127.0.0.1", port=free_port())
    with pytest.raises(UnavailableError) as info:
        on_demand(miss())
    assert info.value.code == "backend_starting"
    assert info.value.headers() == {"Retry-After": "10"}


def test_a_slow_backend_is_502_after_the_timeout(ec2: Any, backend: Backend) -> None:
    instance_id = stopped_instance(ec2)
    ec2.start_instances(InstanceIds=[instance_id])
    backend.delay = 1.5
    on_demand = OnDemandBackend(
        instance_id, ec2=ec2, host="127.0.0.1", port=backend.port, forward_timeout=0.3
    )
    with pytest.raises(UpstreamError) as info:
        on_demand(miss())
    assert info.value.code == "backend_timeout"


def test_the_instance_address_is_used_without_a_fixed_host(ec2: Any) -> None:
    instance_id = stopped_instance(ec2)
    ec2.start_instances(InstanceIds=[instance_id])
    instance = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    public = OnDemandBackend(instance_id, ec2=ec2, port=8080)
    private = OnDemandBackend(instance_id, ec2=ec2, port=8080, address="private")
    assert public.url(instance) == f"http://{instance['PublicIpAddress']}:8080"
    assert private.url(instance) == f"http://{instance['PrivateIpAddress']}:8080"


def test_last_use_is_recorded_at_most_once_a_minute(ec2: Any, backend: Backend) -> None:
    instance_id = stopped_instance(ec2)
    ec2.start_instances(InstanceIds=[instance_id])
    now = [1_000_000.0]
    on_demand = OnDemandBackend(
        instance_id, ec2=ec2, host="127.0.0.1", port=backend.port, clock=lambda: now[0]
    )
    on_demand(miss())
    now[0] += 30
    on_demand(miss())
    assert tags(ec2, instance_id)[LAST_USED_TAG] == "1000000"
    now[0] += 31
    on_demand(miss())
    assert tags(ec2, instance_id)[LAST_USED_TAG] == "1000061"


class FakeEC2:
    def __init__(self, state: str) -> None:
        self.state = state

    def describe_instances(self, InstanceIds: list[str]) -> dict[str, Any]:
        instance = {"InstanceId": InstanceIds[0], "State": {"Name": self.state}}
        return {"Reservations": [{"Instances": [instance]}]}


@pytest.mark.parametrize(
    ("ec2_state", "code", "retry_after"),
    [
        ("pending", "backend_starting", "30"),
        ("stopping", "backend_stopping", "15"),
        ("terminated", "backend_unavailable", "300"),
    ],
)
def test_other_states_are_503(ec2_state: str, code: str, retry_after: str) -> None:
    with pytest.raises(UnavailableError) as info:
        OnDemandBackend("i-0123", ec2=FakeEC2(ec2_state))(miss())
    assert info.value.code == code
    assert info.value.headers() == {"Retry-After": retry_after}


def test_an_unknown_instance_is_503(ec2: Any) -> None:
    with pytest.raises(UnavailableError) as info:
        OnDemandBackend("i-00000000000000000", ec2=ec2)(miss())
    assert info.value.code == "backend_unavailable"


def test_from_env_through_the_handler(
    store: DynamoStore, ec2: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    instance_id = stopped_instance(ec2)
    env = {
        "TABLE_NAME": TABLE,
        "ON_MISS": "start-backend",
        "BACKEND_INSTANCE_ID": instance_id,
        "BACKEND_PORT": "9999",
        "BOOT_RETRY_AFTER": "45",
    }
    app = ServerlessApp.from_env(env, client=store.client)
    assert isinstance(app.on_miss, OnDemandBackend)
    assert app.on_miss.port == 9999
    result = app(http_api_event("POST", "/generate", body=b'{"prompt": "new"}'), None)
    assert result["statusCode"] == 503
    assert result["headers"]["Retry-After"] == "45"
    assert state(ec2, instance_id) == "running"


# --- the idle stop --------------------------------------------------------------------------


def test_idle_stop(ec2: Any) -> None:
    instance_id = stopped_instance(ec2)
    assert "nothing to do" in idle_stop(ec2, instance_id, idle_minutes=30)
    ec2.start_instances(InstanceIds=[instance_id])
    now = time.time()
    ec2.create_tags(
        Resources=[instance_id], Tags=[{"Key": LAST_USED_TAG, "Value": str(int(now - 600))}]
    )
    assert "kept running" in idle_stop(ec2, instance_id, idle_minutes=30, now=now)
    assert state(ec2, instance_id) == "running"
    assert "stopping" in idle_stop(ec2, instance_id, idle_minutes=5, now=now)
    assert state(ec2, instance_id) == "stopped"


def test_idle_stop_without_a_tag_counts_from_launch(ec2: Any) -> None:
    instance_id = stopped_instance(ec2)
    ec2.start_instances(InstanceIds=[instance_id])
    assert "kept running" in idle_stop(ec2, instance_id, idle_minutes=30)
    later = time.time() + 31 * 60
    assert "stopping" in idle_stop(ec2, instance_id, idle_minutes=30, now=later)


def test_idle_stop_handler_reads_the_environment(ec2: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    instance_id = stopped_instance(ec2)
    ec2.start_instances(InstanceIds=[instance_id])
    ec2.create_tags(Resources=[instance_id], Tags=[{"Key": LAST_USED_TAG, "Value": "0"}])
    monkeypatch.setenv("BACKEND_INSTANCE_ID", instance_id)
    monkeypatch.setenv("IDLE_MINUTES", "1")
    result = idle_stop_handler({"source": "aws.events"}, None)
    assert "stopping" in result["result"]
    assert state(ec2, instance_id) == "stopped"


@pytest.mark.slow
def test_a_miss_is_answered_by_a_real_comeapi_backend(
    store: DynamoStore, ec2: Any, spawn: Callable[..., Proc], model_dir: Path
) -> None:
    port = free_port()
    backend = spawn(
        comeapi_argv("backend", "--model-dir", str(model_dir), "--port", str(port)),
        name="backend",
    )
    backend.wait_http(f"http://127.0.0.1:{port}/health", timeout=120)
    instance_id = stopped_instance(ec2)
    app = ServerlessApp(
        TableSource(store),
        on_miss=OnDemandBackend(instance_id, ec2=ec2, host="127.0.0.1", port=port),
    )
    body = json.dumps({"prompt": "The capital of France is", "max_tokens": 4, "seed": 1})
    event = http_api_event("POST", "/generate", body=body.encode())
    assert app(event, None)["statusCode"] == 503  # the instance starts
    result = app(event, None)
    assert result["statusCode"] == 200, result
    assert result["headers"]["X-Cache"] == "MISS"
    answer = json.loads(result["body"])
    assert isinstance(answer["response"], str)
    assert answer["usage"]["completion_tokens"] <= 4
