"""AWS SAM CLI's local emulator for the Phase 2 test: the images `sam local` runs (built once by
the Makefile's targets, then cached by tag), a Docker network with moto's server on it, and
`sam local start-api` on the built template.

Everything a run makes is named from one random token (network, moto's container) and removed
by name at the end. SAM is stopped with SIGTERM, on which it removes its function containers
(it ignores SIGINT when not interactive); any a killed SAM left on the network go after it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from comeapi.cache.dynamo import DynamoStore, make_client
from tests.deploy.docker_engine import base_images, docker, image_exists
from tests.helpers import REPO, Proc, free_port

REGION = "us-east-1"
TABLE = "comeapi-cache"  # the template's TableName default, as `make lambda-package` reads
TEMPLATE = REPO / "deploy" / "aws" / "template.yaml"
KIT = REPO / "deploy" / "aws" / "local"
# What SAM's containers are labelled with (samcli/local/docker/lambda_container.py).
LAMBDA_LABEL = "sam.cli.container.type=lambda"
MOTO_PINS = ("moto", "flask", "flask-cors", "py-partiql-parser")


def run(argv: list[str], *, timeout: float, cwd: Path = REPO) -> str:
    """Run ``argv``; its stdout, or an AssertionError with all of its output."""
    done = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        )
    return done.stdout


def make(*args: str, timeout: float = 1800) -> str:
    # -o: the venv is the one running this test; never reinstall it from here.
    return run(["make", "-s", "--no-print-directory", "-o", ".venv/.installed",
                "-o", ".venv/.installed-dev", *args], timeout=timeout)  # fmt: skip


def sam_cli() -> Path:
    """The sam of `make sam-cli` (its own venv, made once and cached)."""
    sam = Path(make("sam-cli").strip().splitlines()[-1])
    assert sam.is_file(), sam
    return sam


@dataclass(frozen=True)
class Images:
    runtime: str  # the python3.12 runtime for --invoke-image
    moto: str


def _recipe(*texts: str) -> str:
    """A digest of what an image is made from, so that a cached one is never stale."""
    digest = hashlib.sha256()
    for path in sorted(KIT.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for text in texts:
        digest.update(text.encode() + b"\0")
    return digest.hexdigest()[:12]


def local_images(work_dir: Path) -> Images:
    """The runtime and moto images, built by `make lambda-runtime-image` and `make moto-image`
    on the Debian stand-ins of docker_engine.py when their tag is missing.

    The runtime's repository carries the digest too: SAM tags the image it derives (with the
    emulator added) REPOSITORY:rapid-x86_64 and reuses it while it exists."""
    base = base_images(work_dir)
    pins = {n: importlib.metadata.version(n) for n in ("boto3", *MOTO_PINS)}
    makefile = (REPO / "Makefile").read_text()
    ric = re.search(r"^AWSLAMBDARIC_VERSION\s*\?=\s*(\S+)", makefile, re.M)
    assert ric is not None, "AWSLAMBDARIC_VERSION is not in the Makefile"
    runtime = (
        f"comeapi-test/lambda-python3.12-{_recipe(base.debian, ric[1], pins['boto3'])}:runtime"
    )
    if not image_exists(runtime):
        make("lambda-runtime-image", f"LAMBDA_BASE_IMAGE={base.debian}",
             f"LAMBDA_RUNTIME_IMAGE={runtime}")  # fmt: skip
    moto = f"comeapi-test/moto:{_recipe(base.python, *(pins[n] for n in MOTO_PINS))}"
    if not image_exists(moto):
        make("moto-image", f"MOTO_BASE_IMAGE={base.python}", f"MOTO_IMAGE={moto}")
    return Images(runtime, moto)


class LocalAws:
    """A Docker network of this run's own, moto's server on it as ``dynamodb`` (the function
    reaches it by that name, only on this network) and published on a loopback port for the
    test's own pushes."""

    def __init__(self, images: Images):
        self.images = images
        self.network = f"comeapi-sam-{secrets.token_hex(4)}"
        self.dynamodb = f"{self.network}-dynamodb"
        self.port = free_port()

    @property
    def endpoint(self) -> str:
        """moto's server from this machine."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def inner_endpoint(self) -> str:
        """moto's server from a container on the network."""
        return f"http://{self.dynamodb}:5000"

    def start(self) -> LocalAws:
        docker("network", "create", self.network)
        docker("run", "-d", "--name", self.dynamodb, "--network", self.network,
               "-p", f"127.0.0.1:{self.port}:5000", self.images.moto)  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.endpoint}/moto-api/", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                logs = docker("logs", self.dynamodb, check=False).stdout
                raise TimeoutError(f"moto's server did not answer in 60 s:\n{logs}")
            time.sleep(0.3)

    def function_containers(self) -> list[str]:
        """IDs of SAM's function containers on this network."""
        out = docker("ps", "-aq", "--filter", f"network={self.network}",
                     "--filter", f"label={LAMBDA_LABEL}").stdout  # fmt: skip
        return out.split()

    def calls_from_containers(self) -> int:
        """DynamoDB calls moto's server has logged from containers on the network, i.e. from
        the function: the test's own come through the published port, from the gateway."""
        gateway = docker(
            "network", "inspect", self.network, "--format", "{{(index .IPAM.Config 0).Gateway}}"
        ).stdout.strip()
        logs = docker("logs", self.dynamodb, check=False)
        return sum(
            1
            for line in (logs.stdout + logs.stderr).splitlines()
            if "POST / HTTP/1.1" in line and line.split(" ", 1)[0] not in ("", gateway)
        )

    def push(self, *args: str) -> str:
        """`comeapi cache push dynamodb` into the table, from this machine."""
        return run([sys.executable, "-m", "comeapi", "cache", "push", "dynamodb",
                    "--table", TABLE, "--endpoint-url", self.endpoint, "--region", REGION,
                    *args], timeout=120)  # fmt: skip

    def table(self) -> DynamoStore:
        return DynamoStore(make_client(REGION, self.endpoint), TABLE)

    def stop(self) -> None:
        for container in self.function_containers():
            docker("rm", "-f", container, check=False)
        docker("rm", "-f", self.dynamodb, check=False)
        docker("network", "rm", self.network, check=False)


def sam_environment() -> dict[str, str]:
    """What SAM runs with besides the test's dummy AWS credentials: no telemetry (no network)."""
    return {"SAM_CLI_TELEMETRY": "0", "SAM_CLI_CONTACT_TRACKING": "0"}


def sam_build(sam: Path, work_dir: Path) -> Path:
    """`sam build` of the repository's template, the function package taken from
    ``work_dir``/deploy/aws/build/CacheFunction (where CodeUri points from --base-dir) and
    the build written under ``work_dir``; returns the built template."""
    base = work_dir / "deploy" / "aws"
    build = base / ".aws-sam" / "build"
    run([str(sam), "build", "--template-file", str(TEMPLATE), "--base-dir", str(base),
         "--build-dir", str(build), "--parameter-overrides", "Architecture=x86_64"],
        cwd=work_dir, timeout=600)  # fmt: skip
    return build / "template.yaml"


class SamApi:
    """`sam local start-api` on a free loopback port: the function in the runtime image, on
    ``aws``'s network, its containers kept warm between requests (LAZY: made at the first)."""

    def __init__(
        self,
        sam: Path,
        template: Path,
        aws: LocalAws,
        work_dir: Path,
        env: dict[str, str],
        parameters: dict[str, str],
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env_file = work_dir / f"env-{self.port}.json"
        env_file.write_text(json.dumps({"CacheFunction": env}))
        overrides = " ".join(
            f"{k}={v}" for k, v in {"Architecture": "x86_64", **parameters}.items()
        )
        self.argv = [
            str(sam), "local", "start-api", "--template", str(template),
            "--parameter-overrides", overrides, "--env-vars", str(env_file),
            "--docker-network", aws.network, "--invoke-image", aws.images.runtime,
            "--skip-pull-image", "--warm-containers", "LAZY",
            "--host", "127.0.0.1", "--port", str(self.port), "--region", REGION,
        ]  # fmt: skip
        self.proc = Proc(self.argv, work_dir / f"sam-{self.port}.log", env=sam_environment())

    def wait_ready(self, timeout: float = 300) -> None:
        """Until SAM's local API Gateway answers (a path it does not route: no invocation)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.popen.poll() is not None:
                raise RuntimeError(f"sam exited {self.proc.popen.returncode}:\n{self.proc.log()}")
            try:
                httpx.get(f"{self.url}/not-routed", timeout=2)
                return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise TimeoutError(f"sam local start-api not up in {timeout} s:\n{self.proc.log()}")

    def stop(self) -> int | None:
        """SIGTERM (SAM then removes its containers), SIGKILL after 60 s."""
        return self.proc.stop(timeout=60)
