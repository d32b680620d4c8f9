"""Real nginx (Debian's package) and the real comeapi stack for the Phase 1 deployment tests.

Each nginx gets its own prefix, rendered config, pid, logs, temp dirs and cache directory
under one base directory, and free loopback ports; it runs in the foreground in its own
process group and is stopped by PID. The system nginx service is never touched.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.helpers import REPO, Proc, comeapi_argv, free_port

DEPLOY = REPO / "deploy" / "nginx"
RENDER = DEPLOY / "render.sh"
WARMUP = DEPLOY / "warmup.sh"
CACHE_SH = DEPLOY / "cache.sh"
# Debian's nginx runs its workers as www-data; when the tests run as root, so do ours, and
# the cache directory must belong to that user (as on a real host).
WORKER_USER = "www-data" if os.geteuid() == 0 else ""


def nginx_missing() -> str | None:
    """Why the nginx tests cannot run here, or None."""
    if shutil.which("nginx") is None:
        return "nginx is not installed (make system-deps)"
    if not Path("/usr/lib/nginx/modules/ngx_http_js_module.so").is_file():
        return "libnginx-mod-http-js is not installed (make system-deps)"
    return None


def wait_port(port: int, proc: Proc, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"nginx exited {proc.popen.returncode}:\n{proc.log()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nginx not listening on {port} after {timeout}s:\n{proc.log()}")


def count_entries(cache_dir: Path) -> int:
    """Cache entries on disk: files named by the MD5 of their key (temp files have a dot)."""
    if not cache_dir.is_dir():
        return 0
    return sum(1 for p in cache_dir.rglob("*") if p.is_file() and "." not in p.name)


@dataclass
class Nginx:
    """One nginx instance rendered from deploy/nginx with its own directories and ports."""

    root: Path
    cache_dir: Path
    upstream: str
    secret: str
    variants: int = 5
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    warmup_port: int = field(default_factory=free_port)
    proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def warmup_url(self) -> str:
        return f"http://127.0.0.1:{self.warmup_port}"

    @property
    def conf_dir(self) -> Path:
        return self.root / "conf"

    @property
    def pid_file(self) -> Path:
        return self.root / "state" / "nginx.pid"

    def render_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "COMEAPI_UPSTREAM": self.upstream,
            "COMEAPI_VARIANT_SECRET": self.secret,
            "COMEAPI_VARIANTS": str(self.variants),
            "NGINX_LISTEN": f"127.0.0.1:{self.port}",
            "NGINX_WARMUP_LISTEN": f"127.0.0.1:{self.warmup_port}",
            "NGINX_CACHE_DIR": str(self.cache_dir),
            "NGINX_STATE_DIR": str(self.root / "state"),
            "NGINX_LOG_DIR": str(self.root / "logs"),
            "NGINX_USER": WORKER_USER,
            **self.env,
        }

    def render(self) -> None:
        subprocess.run(
            ["sh", str(RENDER), str(self.conf_dir)],
            env=self.render_env(),
            check=True,
            capture_output=True,
            timeout=30,
        )

    def start(self) -> Nginx:
        if not (self.conf_dir / "nginx.conf").is_file():
            self.render()
        argv = ["nginx", "-p", f"{self.root}/", "-c", str(self.conf_dir / "nginx.conf")]
        argv += ["-e", str(self.root / "logs" / "error.log"), "-g", "daemon off;"]
        self.proc = Proc(argv, self.root / "nginx.out")
        wait_port(self.port, self.proc)
        wait_port(self.warmup_port, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def error_log(self) -> str:
        path = self.root / "logs" / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class Comeapi:
    """`comeapi backend` (bundled model) and `comeapi serve` with a SQLite store."""

    root: Path
    model_dir: Path
    secret: str
    backend_port: int = field(default_factory=free_port)
    port: int = field(default_factory=free_port)
    procs: list[Proc] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Comeapi:
        backend = Proc(
            comeapi_argv(
                "backend",
                "--port",
                str(self.backend_port),
                "--model-dir",
                str(self.model_dir),
                "--ctx",
                "512",
            ),
            self.root / "backend.log",
        )
        self.procs.append(backend)
        backend.wait_http(f"http://127.0.0.1:{self.backend_port}/health", timeout=180)
        gateway = Proc(
            comeapi_argv(
                "serve",
                "--port",
                str(self.port),
                "--backend",
                f"http://127.0.0.1:{self.backend_port}",
                "--store",
                f"sqlite:{self.root / 'store.db'}",
                "--variant-secret",
                self.secret,
            ),
            self.root / "gateway.log",
        )
        self.procs.append(gateway)
        gateway.wait_http(f"{self.url}/", timeout=60)
        return self

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    @property
    def running(self) -> bool:
        return bool(self.procs)


def run_warmup(url: str, prompts: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(WARMUP), "-u", url, "-p", str(prompts), "-t", "120", *args],
        env={**os.environ, "COMEAPI_PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=900,
    )


def run_cache_sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(CACHE_SH), *args], capture_output=True, text=True, timeout=120
    )


def post(client: httpx.Client, url: str, body: bytes, **headers: str) -> httpx.Response:
    return client.post(url, content=body, headers={"Content-Type": "application/json", **headers})
