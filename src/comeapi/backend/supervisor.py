"""The backend pool: N ``comeapi backend`` processes on consecutive ports, kept alive.

Interface (the ``comeapi backends start`` command and ``comeapi up`` both use it)::

    sup = Supervisor(settings, host="127.0.0.1", base_port=8080, count=5)
    await sup.start()     # spawn all, return once every /health is 200; on failure stop the
                          # others and raise ConfigError with the failing backend's log tail
    sup.urls()            # ["http://127.0.0.1:8080", ..., "http://127.0.0.1:8084"]
    sup.processes()       # [BackendProcess(index=0, url=..., pid=...), ...] (current PIDs)
    task = asyncio.create_task(sup.watch())  # restart a backend that dies (backoff doubling
                                             # from 1 s up to restart_backoff_max), and kill
                                             # (then restart) one that fails
                                             # liveness_failures health probes in a row
    await sup.stop()      # SIGTERM all, wait shutdown_timeout + 5 s, SIGKILL stragglers

``async with Supervisor(...) as sup:`` does start() and stop(). Children get the settings as
explicit flags, and ``api_keys`` / ``cors_origins`` (the given ones, not the parent's) in
their environment; without ``threads`` each gets ``cores // count`` llama.cpp threads.

Each child is started with a random instance id that its /health reports: a backend that
answers on the port with another id is someone else's (a second ``comeapi up``), and start()
fails with one line instead of adopting it. Ports already taken are refused before spawning.

No orphans: on Linux every child gets PR_SET_PDEATHSIG(SIGTERM), which fires even when the
supervisor is SIGKILLed (it is bound to the forking *thread*: call start() from the event
loop's thread, which outlives the children); on every OS each backend also polls its parent
PID (``--parent-pid``) and shuts down when the parent is gone. Children stay in the
supervisor's process group, so a terminal's Ctrl-C reaches them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import httpx

from comeapi.backend.server import EXIT_CONFIG
from comeapi.errors import ConfigError
from comeapi.protocol.health import get_health, new_instance_id, probe_client, read_health
from comeapi.settings import Settings

log = logging.getLogger("comeapi.pool")

START_TIMEOUT = 300.0  # a big model on a slow disk takes a while to load
HEALTHY_RESET = 60.0  # a backend up this long that dies again starts its backoff afresh
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class BackendProcess:
    index: int
    url: str
    pid: int


@dataclass(eq=False)
class _Child:
    index: int
    port: int
    url: str
    process: asyncio.subprocess.Process | None = None
    instance: str = ""
    started_at: float = 0.0
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    relay: asyncio.Task[None] | None = None

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def last_words(self) -> str:
        """The line of its output that says why it stopped (its "Error: ..." line)."""
        for line in reversed(self.tail):
            if line.startswith("Error:"):
                return line.removeprefix("Error:").strip()
        for line in reversed(self.tail):
            if line.strip():
                return line.strip()[-300:]
        return "no output"


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        *,
        host: str,
        base_port: int,
        count: int,
        argv_extra: Sequence[str] = (),
        start_timeout: float = START_TIMEOUT,
        api_keys: Sequence[str] = (),
        cors_origins: Sequence[str] = (),
    ):
        if count < 1 or base_port + count - 1 > 65535:
            raise ConfigError(f"cannot run {count} backends from port {base_port}")
        self._settings = settings
        self._host = host
        self._argv_extra = list(argv_extra)
        self._start_timeout = start_timeout
        # In the environment rather than on the command line, where `ps` would show keys.
        # Always set, so that nothing meant for the parent (COMEAPI_API_KEYS of a gateway)
        # is inherited.
        self._env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "COMEAPI_API_KEYS": ",".join(api_keys),
            "COMEAPI_CORS_ORIGINS": ",".join(cors_origins),
        }
        url_host = f"[{host}]" if ":" in host else host
        self._children = [
            _Child(i, base_port + i, f"http://{url_host}:{base_port + i}") for i in range(count)
        ]
        self._stopping = asyncio.Event()
        self._keepers: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Supervisor:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def urls(self) -> list[str]:
        return [c.url for c in self._children]

    def processes(self) -> list[BackendProcess]:
        return [
            BackendProcess(c.index, c.url, c.process.pid)
            for c in self._children
            if c.process is not None
        ]

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every backend and wait until each is healthy; ConfigError if one is not."""
        for child in self._children:
            problem = port_taken(self._host, child.port)
            if problem:
                raise ConfigError(
                    f"port {child.port} on {self._host} (backend {child.index}) is already "
                    f"in use ({problem}): is another `comeapi up` or `comeapi backends start` "
                    "running? Stop it, or choose other ports with --base-port"
                )
        try:
            for child in self._children:
                await self._spawn(child)
            await asyncio.gather(*(self._wait_healthy(c) for c in self._children))
        except BaseException:
            await self.stop()
            raise
        log.info("%d backends healthy", len(self._children))

    async def watch(self) -> None:
        """Keep every backend alive until stop(); returns when stopped."""
        self._keepers = [asyncio.create_task(self._keep_alive(c)) for c in self._children]
        # stop() cancels the keepers; that ends this call without raising.
        await asyncio.gather(*self._keepers, return_exceptions=True)

    async def stop(self) -> None:
        """Stop every backend: SIGTERM, a grace period, then SIGKILL. Safe to call twice."""
        self._stopping.set()
        for task in self._keepers:
            task.cancel()
        await asyncio.gather(*self._keepers, return_exceptions=True)
        running = [c for c in self._children if c.alive()]
        for child in running:
            _signal(child, signal.SIGTERM)
            _signal(child, signal.SIGCONT)  # a stopped (hung) child could not act on it
        grace = self._settings.shutdown_timeout + 5.0
        waits = [c.process.wait() for c in running if c.process is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), grace)
        except TimeoutError:
            for child in running:
                if child.alive():
                    log.warning("backend %d did not stop in %.0fs: killing it", child.index, grace)
                    _signal(child, signal.SIGKILL)
            await asyncio.gather(*(c.process.wait() for c in running if c.process is not None))
        relays = [c.relay for c in self._children if c.relay is not None]
        await asyncio.gather(*relays, return_exceptions=True)

    # --- one child ------------------------------------------------------------------------

    def _argv(self, child: _Child) -> list[str]:
        s = self._settings
        threads = s.threads or max(1, (os.cpu_count() or 1) // len(self._children))
        argv = [
            sys.executable, "-m", "comeapi", "backend",
            "--host", self._host,
            "--port", str(child.port),
            "--model-dir", str(s.model_dir),
            "--threads", str(threads),
            "--n-gpu-layers", str(s.n_gpu_layers),
            "--ctx", str(s.ctx),
            "--slots", str(s.slots),
            "--max-loaded-models", str(s.max_loaded_models),
            "--max-tokens-limit", str(s.max_tokens_limit),
            "--max-body-bytes", str(s.max_body_bytes),
            "--header-timeout", str(s.header_timeout),
            "--max-header-size", str(s.max_header_size),
            "--max-header-count", str(s.max_header_count),
            "--body-timeout", str(s.body_timeout),
            "--max-connections", str(s.max_connections),
            "--backend-queue", str(s.backend_queue),
            "--shutdown-timeout", str(s.shutdown_timeout),
            "--log-level", s.log_level,
            "--parent-pid", str(os.getpid()),
            "--instance-id", child.instance,
        ]  # fmt: skip
        if s.default_model:
            argv += ["--default-model", s.default_model]
        return argv + self._argv_extra

    async def _spawn(self, child: _Child) -> None:
        child.instance = new_instance_id()
        process = await asyncio.create_subprocess_exec(
            *self._argv(child),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self._env,
            preexec_fn=_die_with_parent(),
        )
        child.process = process
        child.started_at = time.monotonic()
        child.tail.clear()
        assert process.stdout is not None
        child.relay = asyncio.create_task(self._relay(child, process.stdout))
        log.info("backend %d starting on %s (pid %d)", child.index, child.url, process.pid)

    async def _relay(self, child: _Child, stream: asyncio.StreamReader) -> None:
        """Pass the child's output on through logging, keeping a tail for error messages."""
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line over the reader's limit: skip it
                continue
            if not line:
                return
            text = line.decode("utf-8", errors="replace").rstrip()
            child.tail.append(text)
            log.info("backend-%d | %s", child.index, text)

    async def _wait_healthy(self, child: _Child) -> None:
        deadline = time.monotonic() + self._start_timeout
        async with httpx.AsyncClient(timeout=self._settings.health_timeout) as client:
            while True:
                process = child.process
                assert process is not None
                if process.returncode is not None:
                    if child.relay is not None:  # let the last lines arrive
                        await asyncio.wait({child.relay}, timeout=2.0)
                    raise ConfigError(
                        f"backend {child.index} ({child.url}) exited with code "
                        f"{process.returncode} while starting: {child.last_words()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    response = await client.get(child.url + "/health")
                    health = read_health(response.status_code, response.content)
                    if health.instance is not None and health.instance != child.instance:
                        raise ConfigError(
                            f"another backend (instance {health.instance}) answers on "
                            f"{child.url}, not the one just started: is another `comeapi up` "
                            "or `comeapi backends start` running? Stop it, or choose other "
                            "ports with --base-port"
                        )
                    if health.ready and health.instance == child.instance:
                        return
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"backend {child.index} ({child.url}) not healthy after "
                        f"{self._start_timeout:.0f}s: {child.last_words()}"
                    )
                await asyncio.sleep(0.1)

    async def _check_liveness(self, child: _Child) -> None:
        """Kill ``child`` once it fails ``liveness_failures`` health probes in a row (a hung
        process never exits by itself); ``_keep_alive`` then restarts it. Returns when the
        process has exited."""
        limit = self._settings.liveness_failures
        process = child.process
        assert process is not None
        if limit == 0:
            await process.wait()
            return
        interval, timeout = self._settings.health_interval, self._settings.health_timeout
        failed = 0
        async with probe_client(timeout) as client:
            while process.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), interval)
                    return
                reason = await _liveness_problem(client, child, timeout)
                failed = failed + 1 if reason else 0
                if reason:
                    log.warning(
                        "backend %d (%s, pid %d) failed health probe %d of %d: %s",
                        child.index, child.url, process.pid, failed, limit, reason,
                    )  # fmt: skip
                if failed >= limit:
                    log.error(
                        "backend %d (%s, pid %d) failed %d health probes in a row: killing it",
                        child.index, child.url, process.pid, failed,
                    )  # fmt: skip
                    _signal(child, signal.SIGKILL)  # a stopped process ignores SIGTERM
                    await process.wait()
                    return

    async def _keep_alive(self, child: _Child) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            assert child.process is not None
            await self._check_liveness(child)
            code = await child.process.wait()
            if self._stopping.is_set():
                return
            uptime = time.monotonic() - child.started_at
            if uptime > HEALTHY_RESET:
                backoff = 1.0
            # A configuration error fails the same way at once: wait the longest.
            delay = self._settings.restart_backoff_max if code == EXIT_CONFIG else backoff
            log.warning(
                "backend %d (%s, pid %d) exited with code %d after %.0fs; restarting in %.1fs",
                child.index, child.url, child.process.pid, code, uptime, delay,
            )  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
                return  # stopped while waiting
            backoff = min(backoff * 2, self._settings.restart_backoff_max)
            await self._spawn(child)
            try:
                await self._wait_healthy(child)
            except ConfigError as exc:
                log.error("restarting backend %d failed: %s", child.index, exc.message)
                if child.alive():
                    _signal(child, signal.SIGKILL)
                    await child.process.wait()
                continue
            log.info("backend %d restarted (pid %d)", child.index, child.process.pid)


async def _liveness_problem(client: httpx.AsyncClient, child: _Child, limit: float) -> str | None:
    """Why ``child`` does not look alive, or None. Loading counts as alive: it answers."""
    try:
        async with asyncio.timeout(limit):
            response = await get_health(client, child.url)
    except (TimeoutError, httpx.TimeoutException):
        return f"no answer within {limit:g}s"
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    health = read_health(response.status_code, response.content)
    if health.instance != child.instance:
        return f"another process answers (instance {health.instance})"
    return None if health.state != "bad" else health.reason


def port_taken(host: str, port: int) -> str | None:
    """Why ``port`` cannot be listened on at ``host`` ("Address already in use"), or None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _signal(child: _Child, sig: signal.Signals) -> None:
    if child.process is not None and child.process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            child.process.send_signal(sig)


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when this process dies."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork, not in the child
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec
