"""``comeapi serve --workers N``: N gateway processes, each one the same server as a single
``comeapi serve`` (``gateway.server.serve``: graceful shutdown, 503 ``shutting_down`` and
stream error events for what is cut, the cache refresh), on a port they share.

Each worker binds its own socket with SO_REUSEPORT (the kernel spreads new connections over
them) and the parent holds none, so once every worker has begun its shutdown and closed its
socket, new connections are refused at once. (uvicorn's own ``--workers`` runs uvicorn's
plain Server in each worker, on a socket the parent keeps listening: it accepted connections
after SIGTERM and cut in-flight requests with a text/plain 500.)

The parent: SIGINT/SIGTERM are passed on as SIGTERM, and it waits for the workers' graceful
shutdown; a worker that dies is started again, unless it failed while starting.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess

from comeapi.errors import ConfigError
from comeapi.settings import Settings

log = logging.getLogger("comeapi.gateway")

STARTUP_FAILURE = 3  # uvicorn's exit code for a server that could not start
BACKLOG = 2048


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` that other workers may bind as well."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    sock.listen(BACKLOG)
    sock.set_inheritable(False)
    return sock


def run_workers(settings: Settings, target: Callable[[str], None]) -> None:
    """Run ``settings.workers`` processes of ``target(settings as JSON)`` (a module-level
    function: ``gateway.server.worker_main``) until SIGINT/SIGTERM, then stop them
    gracefully."""
    from comeapi.backend.supervisor import port_taken

    problem = port_taken(settings.host, settings.port)
    if problem:  # SO_REUSEPORT would otherwise let the workers share another server's port
        raise ConfigError(
            f"the gateway's port {settings.port} on {settings.host} is already in use "
            f"({problem}): stop what listens there, or choose another --port"
        )
    context = multiprocessing.get_context("spawn")
    settings_json = settings.model_dump_json()
    stopping: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, _: stopping.append(s)) for sig in _SIGNALS}

    def start() -> BaseProcess:
        process = context.Process(target=target, args=(settings_json,), daemon=False)
        process.start()
        return process

    workers = [start() for _ in range(settings.workers)]
    log.info("gateway workers %s on %s:%d", [w.pid for w in workers], settings.host, settings.port)
    try:
        while not stopping:
            time.sleep(0.2)
            for i, worker in enumerate(workers):
                if worker.is_alive() or stopping:
                    continue
                if worker.exitcode == STARTUP_FAILURE:
                    log.error("worker %d could not start: stopping", worker.pid)
                    stopping.append(signal.SIGTERM)
                    break
                log.warning(
                    "worker %d died (exit code %s): starting another", worker.pid, worker.exitcode
                )
                workers[i] = start()
    finally:
        for worker in workers:
            if worker.is_alive() and worker.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + settings.shutdown_timeout + 15
        for worker in workers:
            worker.join(max(deadline - time.monotonic(), 0.1))
            if worker.is_alive():
                log.error("worker %d did not stop in time: killed", worker.pid)
                worker.kill()
                worker.join(5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if any(w.exitcode == STARTUP_FAILURE for w in workers):
        raise SystemExit(1)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)
