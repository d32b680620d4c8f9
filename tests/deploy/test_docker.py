"""Phase 1 in Docker, on a real engine: nginx + comeapi built from deploy/nginx, the cache in a
named volume, moved to "another machine" over a real sshd.

The chain of issue 11, one step per test (in file order, sharing one stack): compose up ->
make warmup -> 50 entries in the named volume -> comeapi stopped, nginx answers alone -> the
nginx container re-created, still every answer -> make cache-export, cache-copy and
cache-import over ssh into a second compose project's fresh volume -> that project's nginx,
with no comeapi at all, serves all 50 -> make all does the same in one command.

The images are built by `docker compose build` from the project's Dockerfiles with local
base images (tests/deploy/docker_engine.py) passed through their ARGs, and comeapi's Python
packages from `make wheelhouse`; base images stay cached by tag, layers in the engine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from comeapi.cache.prompts import PromptItem, load_prompt_set
from comeapi.models.bundled import GEMMA_MODEL, SMOLLM2_MODEL
from comeapi.models.tokens import TokenCounter
from tests.deploy.docker_engine import BaseImages, DockerEngine, base_images, docker
from tests.deploy.nginx_stack import DEPLOY, post
from tests.deploy.sshd import HOST_ALIAS, Sshd, sshd_missing
from tests.helpers import REPO, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

PROMPTS_FILE = Path(__file__).with_name("nginx_prompts.yaml")
PROMPT_SET = load_prompt_set(PROMPTS_FILE)
VARIANTS = 5
ENTRIES = len(PROMPT_SET.items) * VARIANTS  # 50
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
# Test images get their own tags: a developer's comeapi:local stays untouched.
COMEAPI_IMAGE = "comeapi-test/comeapi:e2e"
NGINX_IMAGE = "comeapi-test/comeapi-nginx:e2e"
PROJECTS = ("comeapi-e2e-a", "comeapi-e2e-b", "comeapi-e2e-c")


def route_of(item: PromptItem) -> str:
    return "/v1/chat/completions" if item.kind == "chat" else "/generate"


def client_body(item: PromptItem) -> bytes:
    body = item.request_body(0)
    body.pop("seed")
    return json.dumps(body, ensure_ascii=False).encode()


@contextmanager
def step(name: str) -> Iterator[None]:
    """Print how long a step took (pytest -s shows it)."""
    started = time.monotonic()
    yield
    print(f"docker test: {name}: {time.monotonic() - started:.1f} s", flush=True)


def run(
    argv: list[str], env: dict[str, str], timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )


@dataclass
class Project:
    """One compose project of deploy/nginx/docker-compose.yml on its own loopback ports."""

    name: str
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    warmup_port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self.env = {
            **self.env,
            "NGINX_PORT": f"127.0.0.1:{self.port}",
            "NGINX_WARMUP_PORT": str(self.warmup_port),
        }

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def warmup_url(self) -> str:
        return f"http://127.0.0.1:{self.warmup_port}"

    @property
    def volume(self) -> str:
        return f"{self.name}_nginx_cache_data"

    def compose(
        self, *args: str, timeout: float = 900, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = ["docker", "compose", "-f", str(COMPOSE_FILE), "-p", self.name, *args]
        result = run(argv, self.env, timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed:\n{result.stdout}{result.stderr}")
        return result

    def make(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        argv = ["make", "--no-print-directory", f"COMPOSE_PROJECT_NAME={self.name}", *args]
        return run(argv, self.env, timeout)

    def container_id(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "60", check=False).stdout

    def wait_nginx(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url + "/nope", timeout=2)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise TimeoutError(f"nginx of {self.name} not answering:\n{self.logs()}")

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "--timeout", "5", check=False, timeout=120)
        docker("volume", "rm", "-f", self.volume, f"{self.name}_comeapi_data", check=False)


@dataclass
class Stack:
    images: BaseImages
    base: Path
    a: Project
    b: Project
    c: Project
    client: httpx.Client
    warmup: subprocess.CompletedProcess[str]
    # references[item index][variant]: what nginx stored for that slot after the warmup
    references: dict[int, dict[int, bytes]] = field(default_factory=dict)
    sshd: Sshd | None = None

    def slot(self, project: Project, item: PromptItem, variant: int) -> httpx.Response:
        return post(
            self.client,
            project.warmup_url + route_of(item),
            client_body(item),
            **{"X-Comeapi-Variant": str(variant)},
        )

    def count(self, volume: str) -> int:
        result = subprocess.run(
            [
                "bash",
                str(DEPLOY / "cache.sh"),
                "count",
                "--volume",
                volume,
                "--image",
                self.images.debian,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        return int(result.stdout.strip())

    def assert_every_slot_hits(self, project: Project) -> None:
        for item in PROMPT_SET.items:
            for v in range(VARIANTS):
                r = self.slot(project, item, v)
                assert r.status_code == 200, r.text
                assert r.headers["x-cache-status"] == "HIT", (item.index, v)
                assert r.content == self.references[item.index][v]

    def stop_comeapi(self) -> None:
        self.a.compose("stop", "comeapi")
        state = docker(
            "inspect",
            "-f",
            "{{.State.Running}}",
            self.a.container_id("comeapi") or "none",
            check=False,
        )
        assert state.stdout.strip() in ("false", ""), state.stdout

    def remote_make_flags(self) -> list[str]:
        assert self.sshd is not None
        return [
            f"REMOTE_HOST={HOST_ALIAS}",
            f"SSH_OPTS=-F {self.sshd.config_file}",
            f"HELPER_IMAGE={self.images.debian}",
        ]


@pytest.fixture(scope="module")
def stack(model_dir: Path) -> Iterator[Stack]:
    base = Path(tempfile.mkdtemp(prefix="comeapi-docker-test-"))
    base.chmod(0o755)
    try:
        with step("engine"):
            engine = DockerEngine.ensure(base)
    except RuntimeError as exc:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"no Docker engine: {exc}")
    if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode:
        engine.stop()
        pytest.fail("`docker compose` is missing: run make compose-plugin (or install Compose v2)")
    client = httpx.Client(timeout=httpx.Timeout(120.0, connect=5.0))
    projects: list[Project] = []
    s: Stack | None = None
    try:
        with step("base images"):
            images = base_images(base)
        with step("make wheelhouse"):
            wheels = run(["make", "--no-print-directory", "wheelhouse"], dict(os.environ))
        assert wheels.returncode == 0, wheels.stdout + wheels.stderr
        env = {
            **os.environ,
            "COMEAPI_VARIANT_SECRET": secrets.token_hex(24),
            "PYTHON_IMAGE": images.python,
            "NGINX_IMAGE": images.nginx,
            "COMEAPI_IMAGE": COMEAPI_IMAGE,
            "COMEAPI_NGINX_IMAGE": NGINX_IMAGE,
            # The test's prompt set is Gemma's: model-less requests mean it, on both tiers.
            "COMEAPI_DEFAULT_MODEL": PROMPT_SET.model,
        }
        projects = [Project(name, env) for name in PROJECTS]
        for project in projects:
            project.down()  # whatever an interrupted run left behind
        a = projects[0]
        with step("docker compose build"):
            a.compose("build", timeout=3000)
        with step("docker compose up, comeapi ready"):
            a.compose("up", "-d")
            deadline = time.monotonic() + 300
            while True:
                try:
                    health = httpx.get(a.url + "/health", timeout=5)
                    if health.status_code == 200 and health.json()["healthy_backends"] >= 1:
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                assert time.monotonic() < deadline, a.logs()
                time.sleep(0.5)
        with step("make warmup"):
            warmup = a.make(
                "warmup", f"WARMUP_URL={a.warmup_url}", f"COMEAPI_PROMPTS={PROMPTS_FILE}"
            )
        assert warmup.returncode == 0, warmup.stdout + warmup.stderr + a.logs()
        s = Stack(images, base, *projects, client=client, warmup=warmup)
        for item in PROMPT_SET.items:
            s.references[item.index] = {}
            for v in range(VARIANTS):
                r = s.slot(a, item, v)
                assert r.headers["x-cache-status"] == "HIT", r.text
                s.references[item.index][v] = r.content
        yield s
    finally:
        if s is not None and s.sshd is not None:
            s.sshd.stop()
        client.close()
        for project in projects:
            project.down()
        engine.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def sshd(stack: Stack) -> Sshd:
    missing = sshd_missing()
    if missing:
        pytest.fail(missing)
    if stack.sshd is None:
        stack.sshd = Sshd(stack.base / "sshd").start()
    return stack.sshd


def openmp_wait_policy(image: str) -> str | None:
    env = json.loads(docker("image", "inspect", image, "--format", "{{json .Config.Env}}").stdout)
    return next((e.split("=", 1)[1] for e in env if e.startswith("OMP_WAIT_POLICY=")), None)


def test_the_comeapi_image_does_not_spin_its_openmp_threads(stack: Stack) -> None:
    """Issue 22 (item 14): llama.cpp's OpenMP threads spinning beside the gateway and nginx
    made the warmup's answers about 5 times slower (benchmarks/docker_warmup.py)."""
    assert openmp_wait_policy(COMEAPI_IMAGE) == "PASSIVE"


def test_the_comeapi_image_matches_by_meaning_without_a_network(stack: Stack) -> None:
    """The image has comeapi[similar] (``--match similar``): its embedding engine loads with
    no network at all and puts a Japanese paraphrase near its English prompt, far from an
    unrelated one."""
    script = (
        "from comeapi.similar.engines import open_embedder; "
        "v = open_embedder('use').embed(['What is the capital of Japan?', "
        "'日本の首都はどこですか？', 'Write a four-line poem about the sea.']); "
        "print(float(v[0] @ v[1]), float(v[0] @ v[2]))"
    )
    result = docker(
        "run", "--rm", "--network", "none", "--entrypoint", "python", COMEAPI_IMAGE,
        "-c", script,
    )  # fmt: skip
    near, far = map(float, result.stdout.split())
    assert near > 0.6 and far < 0.3, result.stdout  # here, 2026-12-07: 0.74 and 0.07


def test_the_comeapi_image_counts_typed_answers_with_its_bundled_models(
    stack: Stack, model_dir: Path
) -> None:
    """An answer a person edits through the image's review API is served with its own token
    count (``models.tokens.TokenCounter`` on the image's ``model_dir`` setting): the image's
    settings find the bundled models and its llama.cpp reads their vocabularies with no
    network, and Gemma's count is the host's count with the same GGUF."""
    text = "Tokyo is the capital of Japan. 東京は日本の首都です。"
    script = (
        "import sys; from comeapi.settings import load_settings; "
        "from comeapi.models.tokens import TokenCounter; "
        "c = TokenCounter(load_settings(None).model_dir); "
        "print(*(c.count(m, sys.argv[1]) for m in sys.argv[2:]))"
    )
    result = docker(
        "run", "--rm", "--network", "none", "--entrypoint", "python", COMEAPI_IMAGE,
        "-c", script, text, GEMMA_MODEL, SMOLLM2_MODEL,
    )  # fmt: skip
    gemma, smollm2 = result.stdout.split()
    host = TokenCounter(model_dir).count(GEMMA_MODEL, text)
    assert host is not None and host > 0
    assert gemma == str(host), result.stdout + result.stderr
    assert smollm2 != "None" and int(smollm2) > 0, result.stdout + result.stderr


def test_warmup_fills_exactly_50_entries_in_the_named_volume(stack: Stack) -> None:
    out = stack.warmup.stdout
    assert f"warmup: {ENTRIES} requests" in out and f"0 HIT, {ENTRIES} MISS, 0 failed" in out, out
    assert stack.count(stack.a.volume) == ENTRIES
    # The cache is the named volume, mounted in the nginx container.
    mounts = json.loads(
        docker("inspect", "-f", "{{json .Mounts}}", stack.a.container_id("nginx")).stdout
    )
    cache_mount = next(m for m in mounts if m["Destination"] == "/var/cache/nginx/comeapi")
    assert cache_mount["Type"] == "volume" and cache_mount["Name"] == stack.a.volume
    # Five seeds: the variants of a prompt are not one answer copied five times.
    assert max(len(set(refs.values())) for refs in stack.references.values()) > 1


def test_nginx_answers_every_prompt_alone_with_comeapi_stopped(stack: Stack) -> None:
    stack.stop_comeapi()
    stack.assert_every_slot_hits(stack.a)
    seen: Counter[int] = Counter()
    for item in PROMPT_SET.items:
        for _ in range(20):
            r = post(stack.client, stack.a.url + route_of(item), client_body(item))
            assert r.status_code == 200 and r.headers["x-cache-status"] == "HIT", r.text
            variant = int(r.headers["x-cache-variant"])
            assert r.content == stack.references[item.index][variant]
            seen[variant] += 1
    assert sorted(seen) == list(range(VARIANTS)), seen
    # A prompt nobody warmed: nginx's own answer, in OpenAI's shape.
    # 502 when nginx looks comeapi's name up again (Docker's DNS no longer knows it), 504
    # while nginx still holds its old address (resolver valid=10s) and connecting times out.
    started = time.monotonic()
    miss = post(stack.client, stack.a.url + "/generate", b'{"prompt": "never warmed"}')
    assert time.monotonic() - started < 15
    assert miss.status_code in (502, 504) and miss.headers["retry-after"] == "5"
    assert miss.json()["error"]["code"] in ("backend_unavailable", "backend_timeout")
    assert stack.count(stack.a.volume) == ENTRIES


def test_a_recreated_nginx_container_keeps_the_cache(stack: Stack) -> None:
    stack.stop_comeapi()
    before = stack.a.container_id("nginx")
    stack.a.compose("rm", "--stop", "--force", "nginx")
    assert stack.a.container_id("nginx") == ""
    stack.a.compose("up", "-d", "nginx")
    after = stack.a.container_id("nginx")
    assert after and after != before
    stack.a.wait_nginx()
    stack.assert_every_slot_hits(stack.a)
    assert stack.count(stack.a.volume) == ENTRIES


def test_openai_client_works_against_nginx_alone(stack: Stack) -> None:
    stack.stop_comeapi()
    client = openai.OpenAI(
        base_url=stack.a.url + "/v1", api_key="unused", max_retries=0, timeout=30
    )
    assert [m.id for m in client.models.list()] == [PROMPT_SET.model]
    chat = next(i for i in PROMPT_SET.items if i.kind == "chat")
    assert chat.messages is not None
    answer = client.chat.completions.create(
        model=PROMPT_SET.model,
        messages=[{"role": role, "content": content} for role, content in chat.messages],
    )
    texts = {
        json.loads(ref)["choices"][0]["message"]["content"]
        for ref in stack.references[chat.index].values()
    }
    assert answer.choices[0].message.content in texts
    with pytest.raises(openai.InternalServerError) as raised:
        client.completions.create(model=PROMPT_SET.model, prompt="never warmed", max_tokens=4)
    assert raised.value.status_code == 502
    body: Any = raised.value.body
    assert body["code"] == "backend_unavailable" and body["type"] == "upstream_error"


def test_cache_moves_to_another_machine_over_ssh(stack: Stack, sshd: Sshd) -> None:
    a, b = stack.a, stack.b
    archive = stack.base / "export" / "nginx_cache.tar.gz"
    archive.parent.mkdir()
    exported = a.make(
        "cache-export", f"EXPORT_FILE={archive}", f"HELPER_IMAGE={stack.images.debian}"
    )
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert f"exported {ENTRIES} cache entries from volume {a.volume}" in exported.stdout
    with tarfile.open(archive) as tar:
        assert sum(1 for m in tar.getmembers() if m.isfile()) == ENTRIES

    remote_path = stack.base / "remote" / "incoming"
    flags = [f"EXPORT_FILE={archive}", f"REMOTE_PATH={remote_path}", *stack.remote_make_flags()]
    copied = b.make("cache-copy", *flags)
    assert copied.returncode == 0, copied.stdout + copied.stderr + sshd.log()
    assert (remote_path / archive.name).read_bytes() == archive.read_bytes()
    assert f"Accepted publickey for {sshd.user}" in sshd.log()

    assert docker("volume", "inspect", b.volume, check=False).returncode != 0  # fresh
    imported = b.make("cache-import", *flags)
    assert imported.returncode == 0, imported.stdout + imported.stderr + sshd.log()
    assert f"{ENTRIES} cache entries" in imported.stdout
    assert stack.count(b.volume) == ENTRIES

    # The other machine runs nginx only: no comeapi container exists in its project.
    b.compose("up", "-d", "nginx")
    assert b.compose("ps", "-a", "--services").stdout.split() == ["nginx"]
    b.wait_nginx()
    stack.assert_every_slot_hits(b)
    for item in PROMPT_SET.items:
        r = post(stack.client, b.url + route_of(item), client_body(item))
        assert r.status_code == 200 and r.headers["x-cache-status"] == "HIT"
    models = httpx.get(b.url + "/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [PROMPT_SET.model]
    # Importing while that nginx runs on the volume is refused.
    again = b.make("cache-import", *flags)
    assert again.returncode != 0 and "nginx is running" in again.stderr


def test_make_all_runs_the_chain(stack: Stack, sshd: Sshd) -> None:
    """warmup, export, copy and import in one command, into a third project's volume."""
    stack.stop_comeapi()  # every answer is in nginx's cache: the warmup needs no comeapi
    a, c = stack.a, stack.c
    archive = stack.base / "all" / "nginx_cache.tar.gz"
    archive.parent.mkdir()
    result = a.make(
        "all",
        f"WARMUP_URL={a.warmup_url}",
        f"COMEAPI_PROMPTS={PROMPTS_FILE}",
        f"EXPORT_FILE={archive}",
        f"REMOTE_PATH={stack.base / 'remote-all'}",
        f"REMOTE_CACHE_VOLUME_NAME={c.volume}",
        *stack.remote_make_flags(),
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert f"{ENTRIES} HIT, 0 MISS, 0 failed" in out
    assert f"exported {ENTRIES} cache entries" in out
    assert f"imported {stack.base / 'remote-all' / archive.name} into volume {c.volume}" in out
    assert "All cache management tasks completed." in out
    c.compose("up", "-d", "nginx")
    c.wait_nginx()
    stack.assert_every_slot_hits(c)


def test_a_purged_prompt_stops_being_served_from_the_volume(stack: Stack) -> None:
    """`make cache-purge` on the Docker volume while nginx runs on it (the documented way to
    stop serving a rejected answer): the prompt's slots are gone from the volume and nginx
    no longer answers them from its cache (this project has no comeapi to ask), while every
    other prompt still hits."""
    c = stack.c
    purged, kept = PROMPT_SET.items[0], PROMPT_SET.items[1:]
    result = c.make("cache-purge", f"KEYS={purged.key}", f"HELPER_IMAGE={stack.images.debian}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"purged {VARIANTS} cache entries of 1 prompt(s) from volume {c.volume}" in (
        result.stdout
    )
    assert stack.count(c.volume) == ENTRIES - VARIANTS
    for v in range(VARIANTS):
        r = stack.slot(c, purged, v)
        assert r.status_code != 200 and r.headers.get("x-cache-status") != "HIT", (v, r.text)
    for item in kept:
        for v in range(VARIANTS):
            r = stack.slot(c, item, v)
            assert r.status_code == 200 and r.headers["x-cache-status"] == "HIT", (item.index, v)
            assert r.content == stack.references[item.index][v]
