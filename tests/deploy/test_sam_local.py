"""Phase 2 run the way AWS runs it, under AWS SAM CLI's local emulator: API Gateway's own
events, the Lambda runtime interface client, a read-only /var/task, the memory limit, and the
template's handler, environment and architecture.

`make lambda-package` writes the function package from a table on moto's server (a container
on this run's Docker network, filled by `comeapi cache push`), `sam build` builds the
repository's deploy/aws/template.yaml, and `sam local start-api` runs it in the locally built
python3.12 runtime image (deploy/aws/local, `--invoke-image`), reaching DynamoDB by the moto
container's name on that network (`--docker-network`). The commands are docs/aws.md's "Run it
locally under SAM". Tests run in file order against one warm container: from the snapshot
first, then from the table once a push changed it; the last starts SAM again with
SNAPSHOT=off.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from comeapi.cache.key import prompt_key
from comeapi.cache.sqlite import SqliteStore
from comeapi.cache.store import Entry
from comeapi.protocol.requests import KINDS
from tests.aws_local import dummy_credentials, prompt_entries
from tests.deploy.docker_engine import DockerEngine, docker
from tests.deploy.sam_local import (
    REGION,
    TABLE,
    LocalAws,
    SamApi,
    local_images,
    make,
    sam_build,
    sam_cli,
)
from tests.helpers import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

API_KEY = "sam-local-test-key"
# How often a warm container compares its snapshot with the table (the handler's
# CATALOGUE_TTL, 60 s by default; docs/aws.md, "Freshness"): short here, so that the test
# can wait for it.
CHECK_INTERVAL = 3.0
MISS_REFRESH = 5.0  # the handler's miss_refresh: a miss looks at the table at most this often
HITS_PER_ROUTE = 50
VARIANTS = 5
# chi-square's 0.01% critical value, 4 degrees of freedom: a fair picker fails 1 run in 10,000;
# one that picks a variant twice as often as it should (0.4, the others 0.15) fails nearly
# always at 250 draws (noncentrality 62).
CHI2_P0001_DF4 = 23.51
LATER_PROMPT = "A prompt pushed after the function package was built"


@contextmanager
def step(name: str) -> Iterator[None]:
    """Print how long a step took (pytest -s shows it)."""
    started = time.monotonic()
    yield
    print(f"sam test: {name}: {time.monotonic() - started:.1f} s", flush=True)


@dataclass
class Local:
    """What the tests share: the network with moto, the built template, the table's
    entries by key and variant, and the running API."""

    aws: LocalAws
    sam: Path
    template: Path
    work_dir: Path
    entries: dict[str, dict[int, Entry]]
    client: httpx.Client
    api: SamApi | None = None

    @property
    def url(self) -> str:
        assert self.api is not None
        return self.api.url

    def post(self, path: str, body: Any, key: str | None = API_KEY) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
        return self.client.post(self.url + path, content=data, headers=headers)

    def logs(self) -> str:
        """The end of SAM's output (the function's log lines included), for failures."""
        return self.api.proc.log()[-4000:] if self.api is not None else ""

    def get(self, path: str, key: str | None = API_KEY) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return self.client.get(self.url + path, headers=headers)


def request_body(path: str, entry: Entry) -> dict[str, Any]:
    """What a client sends for ``entry``'s prompt on route ``path``."""
    if KINDS[path] == "chat":
        assert entry.messages is not None
        messages = [{"role": role, "content": text} for role, text in entry.messages]
        return {"model": entry.model, "messages": messages}
    if KINDS[path] == "generate":
        return {"prompt": entry.prompt, "max_tokens": 100}
    return {"model": entry.model, "prompt": entry.prompt}


def answer_text(path: str, body: dict[str, Any]) -> str:
    if KINDS[path] == "generate":
        return str(body["response"])
    choice = body["choices"][0]
    return str(choice["message"]["content"] if KINDS[path] == "chat" else choice["text"])


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert error["message"], error
    if code is not None:
        assert error["code"] == code, error


def wait_for(condition: Any, timeout: float, interval: float = 0.2) -> float:
    """Call ``condition()`` every ``interval`` s until it is true; the seconds it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"not within {timeout} s"
        time.sleep(interval)
    return time.monotonic() - started


def start_api(local: Local, env: dict[str, str], parameters: dict[str, str]) -> SamApi:
    """`sam local start-api` on the built template, the function reaching moto by name."""
    env = {
        "TABLE_NAME": TABLE,  # sam local resolves !Ref CacheTable to the logical id
        "DYNAMODB_ENDPOINT_URL": local.aws.inner_endpoint,
        **env,
    }
    local.api = SamApi(local.sam, local.template, local.aws, local.work_dir, env, parameters)
    with step("sam local start-api"):
        local.api.wait_ready()
    return local.api


@pytest.fixture(scope="module")
def local() -> Iterator[Local]:
    work_dir = Path(tempfile.mkdtemp(prefix="comeapi-sam-test-"))
    engine: DockerEngine | None = None
    aws: LocalAws | None = None
    shared: Local | None = None
    client = httpx.Client(timeout=httpx.Timeout(120.0, connect=5.0))
    with pytest.MonkeyPatch.context() as monkeypatch:
        dummy_credentials(monkeypatch)
        try:
            with step("engine"):
                engine = DockerEngine.ensure(work_dir)
            with step("make sam-cli"):
                sam = sam_cli()
            with step("images"):
                images = local_images(work_dir)
            with step("network and moto's server"):
                aws = LocalAws(images).start()
            with step("comeapi cache push (the shipped answers)"):
                aws.push("--create")
            entries: dict[str, dict[int, Entry]] = {}
            for entry in aws.table().entries():
                entries.setdefault(entry.key, {})[entry.variant] = entry
            with step("make lambda-package"):
                package = work_dir / "deploy" / "aws" / "build" / "CacheFunction"
                make("lambda-package", f"LAMBDA_PACKAGE={package}", f"LAMBDA_TABLE={TABLE}",
                     f"LAMBDA_PACKAGE_ARGS=--endpoint-url {aws.endpoint} --region {REGION}",
                     timeout=300)  # fmt: skip
                # The idle-stop function's CodeUri (../../src), as from deploy/aws.
                (work_dir / "src").symlink_to(REPO / "src")
            with step("sam build"):
                template = sam_build(sam, work_dir)
            shared = Local(aws, sam, template, work_dir, entries, client)
            start_api(shared, {"CATALOGUE_TTL": str(CHECK_INTERVAL)}, {"ApiKeys": API_KEY})
            yield shared
        finally:
            client.close()
            if shared is not None and shared.api is not None:
                code = shared.api.stop()
                print(f"sam test: sam local start-api exited {code} on SIGTERM", flush=True)
            if aws is not None:
                aws.stop()
            if engine is not None:
                engine.stop()
            shutil.rmtree(work_dir, ignore_errors=True)


def test_status_comes_from_the_snapshot(local: Local) -> None:
    started = time.monotonic()
    response = local.get("/status")
    print(f"sam test: first request (a cold container): {time.monotonic() - started:.2f} s, "
          f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
    assert response.status_code == 200, response.text + local.logs()
    status = response.json()["status"]
    assert status["answers_from"] == "snapshot"
    assert status["catalogue_revision"] == 1
    assert status["cached_prompts"] == len(local.entries) == 10
    assert status["cached_answers"] == sum(len(v) for v in local.entries.values()) == 50


def test_the_function_runs_as_the_template_says(local: Local) -> None:
    """One warm container, from the runtime image, with the template's memory, the code
    read-only at /var/task, on this run's network."""
    (container,) = local.aws.function_containers()
    info = json.loads(docker("inspect", container).stdout)[0]
    assert info["Config"]["Image"].startswith(local.aws.images.runtime.split(":")[0] + ":")
    assert info["HostConfig"]["Memory"] == 512 * 1024 * 1024
    (task,) = [m for m in info["Mounts"] if m["Destination"] == "/var/task"]
    assert task["RW"] is False
    assert local.aws.network in info["NetworkSettings"]["Networks"]
    env = dict(e.split("=", 1) for e in info["Config"]["Env"])
    assert env["AWS_LAMBDA_FUNCTION_HANDLER"] == "comeapi.serverless.handler.handler"
    assert env["DYNAMODB_ENDPOINT_URL"] == local.aws.inner_endpoint
    # moto's server is on this network only: the function reaches it by name, nowhere else.
    moto = json.loads(docker("inspect", local.aws.dynamodb).stdout)[0]
    assert list(moto["NetworkSettings"]["Networks"]) == [local.aws.network]


def test_the_api_key_is_required(local: Local) -> None:
    entry = next(e[0] for e in local.entries.values() if e[0].kind == "prompt")
    assert_openai_error(local.post("/generate", request_body("/generate", entry), key=None), 401)
    assert_openai_error(local.post("/generate", request_body("/generate", entry), key="wrong"), 401)
    assert_openai_error(local.get("/v1/models", key=None), 401)
    assert local.get("/v1/models").status_code == 200


def test_hits_on_every_generation_route_with_uniform_variants(local: Local) -> None:
    pooled: Counter[int] = Counter()
    durations: list[float] = []
    for path, kind in KINDS.items():
        want = "chat" if kind == "chat" else "prompt"
        variants = next(v for v in local.entries.values() if v[0].kind == want)
        counts: Counter[int] = Counter()
        for _ in range(HITS_PER_ROUTE):
            started = time.monotonic()
            response = local.post(path, request_body(path, variants[0]))
            durations.append(time.monotonic() - started)
            assert response.status_code == 200, (path, response.text, local.logs())
            assert response.headers["x-cache"] == "HIT", (path, response.headers)
            variant = int(response.headers["x-cache-variant"])
            assert answer_text(path, response.json()) == variants[variant].answer
            counts[variant] += 1
        assert sorted(counts) == list(range(VARIANTS)), (path, counts)
        pooled.update(counts)
    expected = len(KINDS) * HITS_PER_ROUTE / VARIANTS
    chi2 = sum((pooled[v] - expected) ** 2 / expected for v in range(VARIANTS))
    assert chi2 < CHI2_P0001_DF4, pooled
    durations.sort()
    median, p90 = durations[len(durations) // 2], durations[int(len(durations) * 0.9)]
    print(f"sam test: warm hits through sam's API Gateway: median {median * 1000:.0f} ms, "
          f"p90 {p90 * 1000:.0f} ms, load {os.getloadavg()[0]:.1f}")  # fmt: skip


def test_streaming_and_the_openai_client(local: Local) -> None:
    variants = next(v for v in local.entries.values() if v[0].kind == "chat")
    body = {**request_body("/v1/chat/completions", variants[0]), "stream": True}
    response = local.post("/v1/chat/completions", body)
    assert response.status_code == 200, response.text + local.logs()
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in map(json.loads, events[:-1])
        if c["choices"]
    )
    assert text == variants[int(response.headers["x-cache-variant"])].answer

    client = openai.OpenAI(base_url=local.url + "/v1", api_key=API_KEY, timeout=120, max_retries=0)
    answers = {e.answer for e in variants.values()}
    messages: Any = request_body("/v1/chat/completions", variants[0])["messages"]
    chat = client.chat.completions.create(model=variants[0].model, messages=messages)
    assert chat.choices[0].message.content in answers
    stream = client.chat.completions.create(model=variants[0].model, messages=messages, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) in answers
    prompts = next(v for v in local.entries.values() if v[0].kind == "prompt")
    completion = client.completions.create(model=prompts[0].model, prompt=prompts[0].prompt)
    assert completion.choices[0].text in {e.answer for e in prompts.values()}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=local.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_a_bad_body_is_a_400_in_openais_shape(local: Local) -> None:
    assert_openai_error(local.post("/generate", b"{not json"), 400)
    assert_openai_error(local.post("/generate", {"max_tokens": 5}), 400)
    assert local.post("/generate", {"max_tokens": 5}).json()["error"]["param"] == "prompt"
    assert_openai_error(local.post("/v1/chat/completions", {"model": "m", "messages": "hi"}), 400)
    assert_openai_error(local.post("/v1/completions", {"prompt": "x", "max_tokens": -1}), 400)


def test_a_miss_is_a_404_with_the_known_prompts_after_a_dynamodb_call(local: Local) -> None:
    """A prompt missing from the snapshot makes the function look at the table at once (at
    most every 5 s): a real GetItem from the container to moto's, then 404. Before the
    template declared DYNAMODB_ENDPOINT_URL this call went to AWS and the request timed out
    after 29 s with a 502."""
    time.sleep(MISS_REFRESH + 1)  # no request meanwhile: the last look at the table is older
    before = local.aws.calls_from_containers()
    response = local.post("/generate", {"prompt": "a prompt nobody cached"})
    assert_openai_error(response, 404, "prompt_not_cached")
    known = response.json()["error"]["known_prompts"]
    assert sorted(known) == sorted(v[0].prompt for v in local.entries.values())
    wait_for(lambda: local.aws.calls_from_containers() > before, timeout=10)


def test_a_changed_answer_reaches_the_warm_container_within_the_check_interval(
    local: Local,
) -> None:
    (container,) = local.aws.function_containers()
    original = next(v for v in local.entries.values() if v[0].kind == "prompt")
    changed = prompt_entries(original[0].prompt, VARIANTS, original[0].model)
    assert changed[0].key == original[0].key == prompt_key(original[0].prompt, original[0].model)
    store = SqliteStore(local.work_dir / "changed.db")
    store.put_many(changed)
    store.close()
    body = request_body("/generate", original[0])
    assert local.post("/generate", body).json()["response"] in {e.answer for e in original.values()}

    local.aws.push("--store", f"sqlite:{local.work_dir / 'changed.db'}")
    new = {e.answer for e in changed}
    took = wait_for(
        lambda: local.post("/generate", body).json()["response"] in new,
        timeout=CHECK_INTERVAL + 3,
    )
    print(f"sam test: a pushed change reached the warm container in {took:.1f} s "
          f"(check interval {CHECK_INTERVAL:g} s, load {os.getloadavg()[0]:.1f})")  # fmt: skip
    status = local.get("/status").json()["status"]
    assert (status["answers_from"], status["catalogue_revision"]) == ("table", 2)
    seen = {local.post("/generate", body).json()["response"] for _ in range(30)}
    assert seen <= new and len(seen) > 1
    assert local.aws.function_containers() == [container]  # the same, warm container
    for e in changed:
        local.entries[e.key][e.variant] = e


def test_a_prompt_pushed_later_is_answered_from_the_table(local: Local) -> None:
    # For the model the shipped answers are for: the function's default (a request names none).
    model = next(iter(next(iter(local.entries.values())).values())).model
    later = prompt_entries(LATER_PROMPT, VARIANTS, model)
    store = SqliteStore(local.work_dir / "later.db")
    store.put_many(later)
    store.close()
    local.aws.push("--store", f"sqlite:{local.work_dir / 'later.db'}")
    # A warm container reads the catalogue again within its check interval (a miss looks
    # again only when the catalogue is older than 5 s): a push quicker than that is a 404
    # for a moment, as docs/aws.md says.
    took = wait_for(
        lambda: local.post("/generate", {"prompt": LATER_PROMPT}).status_code == 200,
        timeout=CHECK_INTERVAL + 3,
    )
    print(f"sam test: a prompt pushed later was answered after {took:.1f} s")
    response = local.post("/generate", {"prompt": LATER_PROMPT})
    assert response.status_code == 200, response.text + local.logs()
    assert response.json()["response"] in {e.answer for e in later}
    miss = local.post("/generate", {"prompt": "still nobody's prompt"})
    assert_openai_error(miss, 404, "prompt_not_cached")
    assert LATER_PROMPT in miss.json()["error"]["known_prompts"]
    local.entries[later[0].key] = {e.variant: e for e in later}


def test_without_the_snapshot_every_answer_comes_from_the_table(local: Local) -> None:
    """SNAPSHOT=off and no API key: a second `sam local start-api` on the same build."""
    assert local.api is not None
    assert local.api.stop() == 0  # SIGTERM: SAM exits and removes its container
    assert local.aws.function_containers() == []
    start_api(local, {"SNAPSHOT": "off"}, {})
    before = local.aws.calls_from_containers()
    miss = local.post("/generate", {"prompt": "a prompt nobody cached"}, key=None)
    assert_openai_error(miss, 404, "prompt_not_cached")
    assert sorted(miss.json()["error"]["known_prompts"]) == sorted(
        v[0].prompt for v in local.entries.values()
    )
    wait_for(lambda: local.aws.calls_from_containers() > before, timeout=10)
    status = local.get("/status", key=None).json()["status"]
    assert (status["answers_from"], status["catalogue_revision"]) == ("table", 3)
    for variants in local.entries.values():
        path = "/v1/chat/completions" if variants[0].kind == "chat" else "/v1/completions"
        before = local.aws.calls_from_containers()
        response = local.post(path, request_body(path, variants[0]), key=None)
        assert response.status_code == 200, response.text + local.logs()
        assert response.headers["x-cache"] == "HIT"
        variant = int(response.headers["x-cache-variant"])
        assert answer_text(path, response.json()) == variants[variant].answer
        wait_for(lambda b=before: local.aws.calls_from_containers() > b, timeout=10)  # GetItem
