"""A real Docker engine for the Phase 1 tests, and base images made without a registry.

``DockerEngine.ensure()`` uses a running engine, or starts Debian's ``dockerd`` (no systemd
here) with ``--iptables=false --ip6tables=false`` and its default data root, so images
stay cached between runs; an engine it started is stopped by PID at the end. If none can
run, the tests fail with dockerd's log (never skip).

No registry is reachable, so ``python:3.11-slim-bookworm``, ``nginx:1.28`` and ``alpine``
cannot be pulled. ``base_images()`` makes stand-ins from Debian's packages (debootstrap from
this machine's apt mirror, ``docker import``, then apt-get in ``docker build --network
host``) and caches them by tag; the project's Dockerfiles get them through their ARGs.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import Proc

DEBIAN_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEBIAN_IMAGE = f"comeapi-test/debian:{DEBIAN_SUITE}-minbase"
# What the official images give the Dockerfiles: Python 3.11 with venv, nginx with njs.
PYTHON_BASE = f"""FROM {DEBIAN_IMAGE}
RUN apt-get update \\
    && apt-get install -y --no-install-recommends python3 python3-venv \\
    && rm -rf /var/lib/apt/lists/*
"""
NGINX_BASE = f"""FROM {DEBIAN_IMAGE}
RUN apt-get update \\
    && apt-get install -y --no-install-recommends nginx libnginx-mod-http-js \\
    && rm -rf /var/lib/apt/lists/*
"""


def docker(
    *args: str, timeout: float = 120, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, input=input
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result


def engine_answers() -> bool:
    try:
        return (
            docker("info", "--format", "{{.ServerVersion}}", timeout=20, check=False).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


@dataclass
class DockerEngine:
    """The engine the tests use; ``proc`` is set when the tests started it."""

    log_path: Path
    proc: Proc | None = None

    @classmethod
    def ensure(cls, log_dir: Path) -> DockerEngine:
        """A running engine (started here if need be); raises with dockerd's log otherwise."""
        engine = cls(log_dir / "dockerd.log")
        if shutil.which("docker") is None:
            raise RuntimeError("the docker client is not installed (make system-deps)")
        if engine_answers():
            return engine
        dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
        if not os.path.exists(dockerd):
            raise RuntimeError("dockerd is not installed (make system-deps installs docker.io)")
        if os.geteuid() != 0:
            raise RuntimeError("no Docker engine answers, and only root can start dockerd")
        # No iptables rules: nothing is left in the host's firewall. Containers still reach
        # each other on compose's bridge, and published ports go through docker-proxy.
        engine.proc = Proc([dockerd, "--iptables=false", "--ip6tables=false"], engine.log_path)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if engine.proc.popen.poll() is not None:
                raise RuntimeError(
                    f"dockerd exited {engine.proc.popen.returncode}:\n{engine.log()}"
                )
            if engine_answers():
                return engine
            time.sleep(0.5)
        engine.stop()
        raise RuntimeError(f"dockerd did not answer within 60 s:\n{engine.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """Stop dockerd if the tests started it (it stops its containerd with it)."""
        if self.proc is not None:
            self.proc.stop(timeout=30)
            self.proc = None


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (debootstrap fetches from it)."""
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for uri in re.findall(r"^URIs:\s*(\S+)", path.read_text(), re.MULTILINE):
            if uri.rstrip("/").endswith("/debian"):
                return uri
    sources = Path("/etc/apt/sources.list")
    if sources.exists():
        for match in re.finditer(
            r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?\s", sources.read_text(), re.M
        ):
            return match.group(1)
    return DEFAULT_MIRROR


def image_exists(tag: str) -> bool:
    return docker("image", "inspect", tag, check=False, timeout=30).returncode == 0


def _tag(name: str, dockerfile: str) -> str:
    """A tag that changes when the recipe does, so a cached image is never stale."""
    return f"comeapi-test/{name}:{hashlib.sha256(dockerfile.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class BaseImages:
    debian: str  # also the helper image (the requirements' alpine): sh, tar, gzip, find
    python: str
    nginx: str


def base_images(work_dir: Path) -> BaseImages:
    """Build (once, then cached by tag) the stand-ins for the official base images."""
    if not image_exists(DEBIAN_IMAGE):
        if shutil.which("debootstrap") is None:
            raise RuntimeError("debootstrap is not installed (make system-deps)")
        rootfs = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=work_dir))
        try:
            made = subprocess.run(
                ["debootstrap", "--variant=minbase", DEBIAN_SUITE, str(rootfs), apt_mirror()],
                capture_output=True,
                text=True,
                timeout=900,
            )
            if made.returncode != 0:
                raise RuntimeError(f"debootstrap failed:\n{made.stdout[-3000:]}{made.stderr}")
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            imported = subprocess.run(
                ["docker", "import", "-", DEBIAN_IMAGE],
                stdin=tar.stdout,
                capture_output=True,
                timeout=300,
            )
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait(60)
            if imported.returncode != 0 or tar.returncode != 0:
                raise RuntimeError(f"docker import failed: {imported.stderr.decode()}")
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
    python, nginx = _tag("python", PYTHON_BASE), _tag("nginx", NGINX_BASE)
    for tag, dockerfile in ((python, PYTHON_BASE), (nginx, NGINX_BASE)):
        if not image_exists(tag):
            # The legacy builder, a Dockerfile on stdin and no context; apt-get reaches the
            # mirror through the host's network.
            docker("build", "--network", "host", "-t", tag, "-", input=dockerfile, timeout=900)
    return BaseImages(DEBIAN_IMAGE, python, nginx)
