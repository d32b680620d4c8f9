"""The backend pool: `comeapi backends start` restarts dead backends and leaves no orphans."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from comeapi.backend.supervisor import Supervisor
from comeapi.errors import ConfigError
from comeapi.settings import load_settings
from tests.helpers import BUNDLED_MODEL, Proc, comeapi_argv, group_alive

pytestmark = pytest.mark.slow

Spawn = Callable[..., Proc]


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = int(probe.getsockname()[1])
        if first + count > 65535:
            continue
        try:
            for port in range(first, first + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError("no consecutive free ports")


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def pool_argv(model_dir: Path, base_port: int, count: int, *extra: str) -> list[str]:
    return comeapi_argv(
        "backends", "start",
        "--model-dir", str(model_dir),
        "--host", "127.0.0.1",
        "--base-port", str(base_port),
        "--count", str(count),
        "--threads", "1",
        "--ctx", "256",
        "--shutdown-timeout", "5",
        *extra,
    )  # fmt: skip


def test_pool_restarts_a_killed_backend_and_sigterm_leaves_nothing(
    spawn: Spawn, model_dir: Path
) -> None:
    base = free_ports(2)
    urls = [f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 1}"]
    pool = spawn(pool_argv(model_dir, base, 2), name="pool")
    wait_until(lambda: "Ctrl-C stops every backend" in pool.log(), 120, "the pool table")
    assert all(healthy(u) for u in urls)
    first = children_of(pool.pid)
    assert len(first) == 2
    for url, pid in zip(urls, first, strict=True):
        assert url in pool.log() and str(pid) in pool.log()  # the printed table

    victim = first[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: len(children_of(pool.pid)) == 2 and victim not in children_of(pool.pid),
        30,
        "a replacement backend",
    )
    wait_until(lambda: all(healthy(u) for u in urls), 60, "both backends healthy again")
    second = children_of(pool.pid)
    assert first[1] in second  # the other backend was left alone
    # the restart is logged once the new backend is healthy: a moment after we saw it so
    wait_until(
        lambda: "restarting in" in pool.log() and "restarted (pid" in pool.log(),
        30,
        "the restart in the pool's log",
    )

    os.kill(pool.pid, signal.SIGTERM)
    assert pool.popen.wait(30) == 0
    assert group_alive(pool.pid) == []
    assert not any(alive(pid) for pid in first + second)
    assert not any(healthy(u) for u in urls)


def test_sigkilled_supervisor_takes_its_backends_down(spawn: Spawn, model_dir: Path) -> None:
    base = free_ports(1)
    pool = spawn(pool_argv(model_dir, base, 1), name="pool")
    wait_until(lambda: "Ctrl-C stops every backend" in pool.log(), 120, "the pool table")
    [child] = children_of(pool.pid)
    os.kill(pool.pid, signal.SIGKILL)
    pool.popen.wait(5)
    wait_until(lambda: not alive(child), 30, f"backend {child} to exit after its parent")
    assert group_alive(pool.pid) == []


def test_a_backend_that_cannot_start_fails_the_pool_clearly(spawn: Spawn, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "truncated.gguf").write_bytes(b"\x00" * 16)
    pool = spawn(pool_argv(models, free_ports(1), 1), name="pool")
    assert pool.popen.wait(60) != 0
    log = pool.log()
    assert "truncated.gguf is not a GGUF file" in log  # the backend's own error, passed on
    assert "exited with code 78" in log
    last = log.strip().splitlines()[-1]
    assert last.startswith("Error: backend 0") and "is not a GGUF file" in last  # one line
    assert group_alive(pool.pid) == []


def test_a_hung_backend_is_killed_and_restarted(spawn: Spawn, model_dir: Path) -> None:
    """Fault: the supervisor restarted only children that exit, never one that hangs."""
    base = free_ports(1)
    url = f"http://127.0.0.1:{base}"
    liveness = ("--health-interval", "0.5", "--health-timeout", "0.5", "--liveness-failures", "3")
    pool = spawn(pool_argv(model_dir, base, 1, *liveness), name="pool")
    wait_until(lambda: "Ctrl-C stops every backend" in pool.log(), 120, "the pool table")
    [hung] = children_of(pool.pid)
    instance = httpx.get(url + "/health", timeout=2).json()["instance"]
    os.kill(hung, signal.SIGSTOP)
    try:
        wait_until(lambda: not alive(hung), 30, f"the hung backend {hung} to be killed")
    finally:
        if alive(hung):
            os.kill(hung, signal.SIGCONT)
    wait_until(lambda: healthy(url), 60, "a healthy replacement")
    assert httpx.get(url + "/health", timeout=2).json()["instance"] != instance
    assert children_of(pool.pid) != [hung]
    wait_until(lambda: "restarted (pid" in pool.log(), 30, "the restart in the log")
    assert "failed 3 health probes in a row: killing it" in pool.log()


def test_busy_ports_are_refused_before_anything_starts(spawn: Spawn, tmp_path: Path) -> None:
    base = free_ports(2)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", base + 1))
        squatter.listen()
        started = time.monotonic()
        pool = spawn(pool_argv(tmp_path, base, 2), name="pool")
        assert pool.popen.wait(60) == 1
    assert time.monotonic() - started < 30
    last = pool.log().strip().splitlines()[-1]
    assert last.startswith(f"Error: port {base + 1} on 127.0.0.1 (backend 1) is already in use")
    assert "backend 0 starting" not in pool.log()  # nothing was spawned


def test_a_backend_answering_with_another_instance_id_is_not_adopted(
    spawn: Spawn, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another comeapi backend holds the port: start() must not take it for its own, even
    when the port check is raced (the other one binds after the check)."""
    import comeapi.backend.supervisor as supervisor_module

    base = free_ports(1)
    other = spawn(
        comeapi_argv(
            "backend", "--model-dir", str(model_dir), "--port", str(base),
            "--threads", "1", "--ctx", "256",
        ),
        name="other",
    )  # fmt: skip
    other.wait_http(f"http://127.0.0.1:{base}/health", timeout=120)
    monkeypatch.setattr(supervisor_module, "port_taken", lambda host, port: None)
    settings = load_settings(model_dir=model_dir, threads=1, ctx=256, shutdown_timeout=5)
    supervisor = Supervisor(settings, host="127.0.0.1", base_port=base, count=1)
    with pytest.raises(ConfigError) as caught:
        asyncio.run(supervisor.start())
    message = caught.value.message
    assert "\n" not in message
    assert "another backend" in message or "already in use" in message, message
    assert all(not alive(p.pid) for p in supervisor.processes())
    assert other.popen.poll() is None and healthy(f"http://127.0.0.1:{base}")


def test_supervisor_in_process(model_dir: Path) -> None:
    """The API `comeapi up` uses: start, urls, processes, stop."""
    settings = load_settings(model_dir=model_dir, threads=1, ctx=256, shutdown_timeout=5)
    base = free_ports(1)

    async def scenario() -> list[int]:
        async with Supervisor(settings, host="127.0.0.1", base_port=base, count=1) as pool:
            assert pool.urls() == [f"http://127.0.0.1:{base}"]
            [proc] = pool.processes()
            assert (proc.index, proc.url) == (0, pool.urls()[0])
            async with httpx.AsyncClient(timeout=5) as client:
                health = (await client.get(proc.url + "/health")).json()
            assert health["models"] == [BUNDLED_MODEL]
            return [proc.pid]

    pids = asyncio.run(scenario())
    assert not any(alive(pid) for pid in pids)


def test_supervisor_start_failure_raises_config_error(tmp_path: Path) -> None:
    settings = load_settings(model_dir=tmp_path, shutdown_timeout=1)
    supervisor = Supervisor(settings, host="127.0.0.1", base_port=free_ports(1), count=1)
    with pytest.raises(ConfigError, match=r"no \*\.gguf model"):
        asyncio.run(supervisor.start())
    assert all(not alive(p.pid) for p in supervisor.processes())
