"""``comeapi serve``, ``comeapi up`` and ``comeapi bench parallel`` as a user runs them."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from comeapi.cli import main
from tests.helpers import BUNDLED_MODEL, Proc, comeapi_argv, free_port, group_alive

Spawn = Callable[..., Proc]


def test_serve_without_backends_serves_the_cache(spawn: Spawn, tmp_path: Path) -> None:
    """No model, no backend: every shipped prompt is answered from the store, in the three
    wire formats, and the official openai client gets a cached chat answer."""
    import openai

    from comeapi.cache.default import shipped_entries
    from comeapi.cache.prompts import load_prompt_set
    from comeapi.cache.sqlite import SqliteStore

    with SqliteStore(tmp_path / "c.db") as store:
        store.put_many(shipped_entries())
    port = free_port()
    proc = spawn(
        comeapi_argv("serve", "--port", str(port), "--store", f"sqlite:{tmp_path / 'c.db'}"),
        env={"COMEAPI_BACKENDS": "", "COMEAPI_BACKENDS_RANGE": ""},
        name="serve",
    )
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(url + "/health", timeout=30)
    prompts = load_prompt_set()
    answers = {e.answer for e in shipped_entries()}
    for item in prompts.items:
        response = httpx.post(url + item.route, json=item.request_body(0), timeout=5)
        assert response.status_code == 200, response.text
        assert response.headers["x-cache"] == "HIT"
        body = response.json()
        choice = body["choices"][0]
        assert (choice["message"]["content"] if item.kind == "chat" else choice["text"]) in answers
    chat = next(item for item in prompts.items if item.kind == "chat")
    assert chat.messages is not None
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=5, max_retries=0)
    completion = client.chat.completions.create(
        model=prompts.model,
        messages=[{"role": r, "content": c} for r, c in chat.messages],  # type: ignore[misc]
    )
    assert completion.choices[0].message.content in answers
    streamed = client.chat.completions.create(
        model=prompts.model,
        messages=[{"role": r, "content": c} for r, c in chat.messages],  # type: ignore[misc]
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text in answers
    unknown = httpx.post(url + "/generate", json={"prompt": "not in the set"}, timeout=5)
    assert unknown.status_code == 404
    assert len(unknown.json()["error"]["known_prompts"]) == 10


def test_a_bad_backends_range_names_the_setting() -> None:
    result = CliRunner().invoke(main, ["serve", "--backends-range", "127.0.0.1:80"])
    assert result.exit_code == 2
    assert "backends_range" in result.output


def test_serve_takes_comeapi_short_form_and_stops_on_sigterm(spawn: Spawn) -> None:
    port, first = free_port(), free_port()
    proc = spawn(
        comeapi_argv(
            "serve", "--port", str(port), "--backends", f"127.0.0.1:{first}:3",
            "--health-interval", "0.5", "--shutdown-timeout", "2",
        ),
        name="serve",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(url + "/health", timeout=30)
    root = httpx.get(url + "/", timeout=5).json()
    assert root["message"] == "ComeAPI Load Balancer"
    assert root["status"]["total_backends"] == 3
    assert root["status"]["healthy_backends"] == 0
    status = httpx.get(url + "/status", timeout=5).json()
    assert [b["url"] for b in status["backends"]] == [
        f"http://127.0.0.1:{p}" for p in range(first, first + 3)
    ]
    assert all(b["reason"] == "connection refused" for b in status["backends"])
    response = httpx.post(url + "/generate", json={"prompt": "hi"}, timeout=5)
    assert response.status_code == 503
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.popen.wait(15) == 0
    assert "Application shutdown complete" in proc.log()


def test_api_keys_from_the_environment(spawn: Spawn) -> None:
    port = free_port()
    proc = spawn(
        comeapi_argv("serve", "--port", str(port), "--backend", f"http://127.0.0.1:{free_port()}"),
        env={"COMEAPI_API_KEYS": "k1,k2"},
        name="serve",
    )
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(url + "/health", timeout=30)
    assert httpx.get(url + "/status", timeout=5).status_code == 401
    assert httpx.get(url + "/status", headers={"Authorization": "Bearer k2"}, timeout=5).is_success


def test_serve_with_workers(spawn: Spawn) -> None:
    port = free_port()
    proc = spawn(
        comeapi_argv(
            "serve", "--port", str(port), "--workers", "2",
            "--backend", f"http://127.0.0.1:{free_port()}",
        ),
        name="serve",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(url + "/health", timeout=60)
    assert httpx.get(url + "/", timeout=5).json()["status"]["total_backends"] == 1
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.popen.wait(20) == 0
    # multiprocessing's resource tracker exits when the parent's pipe closes, a moment later
    deadline = time.monotonic() + 5
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_alive(proc.pid)


@pytest.mark.slow
def test_up_runs_backends_and_gateway_and_leaves_nothing_behind(
    spawn: Spawn, model_dir: Path, tmp_path: Path
) -> None:
    port, base = free_port(), free_port()
    proc = spawn(
        comeapi_argv(
            "up", "--count", "1", "--port", str(port), "--base-port", str(base),
            "--model-dir", str(model_dir), "--threads", "1", "--ctx", "256",
            "--health-interval", "1", "--store", f"sqlite:{tmp_path / 'cache.db'}",
        ),
        env={"COMEAPI_API_KEYS": "gateway-key"},
        name="up",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": "Bearer gateway-key"}
    proc.wait_http(url + "/health", timeout=180)
    assert httpx.get(url + "/status", headers=auth, timeout=5).json()["healthy_backends"] == 1
    # The backends take a key generated for this run, not the gateway's (nor none): only the
    # gateway can use them. Their /health stays open for probes.
    backend = f"http://127.0.0.1:{base}"
    assert httpx.get(backend + "/health", timeout=5).status_code == 200
    for headers in ({}, auth):
        assert httpx.get(backend + "/models", headers=headers, timeout=5).status_code == 401

    bench = subprocess.run(
        comeapi_argv(
            "bench", "parallel", "--url", url, "--concurrency", "2", "--max-tokens", "2",
            "--api-key", "gateway-key",
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert bench.returncode == 0, bench.stdout + bench.stderr
    assert "connected: 1/1 backends healthy" in bench.stdout
    assert "gemma-3-270m-q4_k_m.gguf" in bench.stdout
    assert "succeeded:    2/2" in bench.stdout
    assert "failed:       0/2" in bench.stdout
    assert "tokens/s aggregate" in bench.stdout

    # Warmup through the gateway (the default target) with the gateway's key, which the
    # gateway swaps for its backends' key.
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(
        f"model: {BUNDLED_MODEL}\nvariants: 2\nmax_tokens: 2\nprompts:\n  - prompt: Hello there\n"
    )
    warmup = subprocess.run(
        comeapi_argv(
            "warmup", "--prompts", str(prompts),
            "--store", f"sqlite:{tmp_path / 'warm.db'}",
        ),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COMEAPI_API_KEYS": "gateway-key", "COMEAPI_PORT": str(port)},
    )  # fmt: skip
    assert warmup.returncode == 0, warmup.stdout + warmup.stderr
    assert "2 generated" in warmup.stdout

    os.kill(proc.pid, signal.SIGTERM)  # the parent only: it must stop its backends itself
    assert proc.popen.wait(60) == 0
    deadline = time.monotonic() + 10
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_alive(proc.pid), proc.log()[-2000:]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{base}/health", timeout=2)


def test_bench_parallel_reports_failures(spawn: Spawn) -> None:
    port = free_port()
    proc = spawn(
        comeapi_argv("serve", "--port", str(port), "--backend", f"http://127.0.0.1:{free_port()}"),
        name="serve",
    )
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(url + "/health", timeout=30)
    result = CliRunner().invoke(
        main, ["bench", "parallel", "--url", url, "--concurrency", "3", "--max-tokens", "2"]
    )
    assert result.exit_code == 1
    assert "connected: 0/1 backends healthy" in result.output
    assert "succeeded:    0/3" in result.output
    assert "failed:       3/3" in result.output
    assert "HTTP 503" in result.output


def test_up_with_a_bad_model_file_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "broken.gguf").write_bytes(b"<html>not found</html>")
    result = subprocess.run(
        comeapi_argv(
            "up", "--count", "1", "--model-dir", str(tmp_path),
            "--base-port", str(free_port()), "--port", str(free_port()),
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Error:" in result.stderr
    assert "broken.gguf is not a GGUF file" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_ctrl_c_to_the_whole_group_stops_up_cleanly(spawn: Spawn, model_dir: Path) -> None:
    port = free_port()
    proc = spawn(
        comeapi_argv(
            "up", "--count", "1", "--port", str(port), "--base-port", str(free_port()),
            "--model-dir", str(model_dir), "--threads", "1", "--ctx", "256",
        ),
        name="up",
    )  # fmt: skip
    proc.wait_http(f"http://127.0.0.1:{port}/health", timeout=180)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    assert proc.popen.wait(60) == 0
    deadline = time.monotonic() + 10
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_alive(proc.pid)


def test_serve_with_a_store_it_cannot_open_is_a_one_line_error(tmp_path: Path) -> None:
    """Fault: a traceback instead of one line."""
    (tmp_path / "not-a-db").write_bytes(b"this is not SQLite" * 100)
    for store in (f"sqlite:{tmp_path / 'not-a-db'}", "sqlite:/proc/nope/x.db"):
        result = subprocess.run(
            comeapi_argv("serve", "--port", str(free_port()), "--store", store),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("Error: store") and "Traceback" not in result.stderr, lines


@pytest.mark.slow
def test_a_second_up_on_the_same_ports_fails_with_one_line(spawn: Spawn, model_dir: Path) -> None:
    """Fault: a second `comeapi up` found the ports taken, its backends died with EADDRINUSE,
    and it reported "2 backends healthy", serving through the first instance's backends."""
    port, base = free_port(), free_port()
    argv = comeapi_argv(
        "up", "--count", "1", "--port", str(port), "--base-port", str(base),
        "--model-dir", str(model_dir), "--threads", "1", "--ctx", "256",
    )  # fmt: skip
    first = spawn(argv, name="up-first")
    first.wait_http(f"http://127.0.0.1:{port}/health", timeout=180)

    for second_argv, taken in (
        (argv, f"port {port}"),  # everything the same, as `make run` twice
        ([*argv, "--port", str(free_port())], f"port {base}"),  # only the backends clash
    ):
        started = time.monotonic()
        second = subprocess.run(second_argv, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1, second.stderr
        assert time.monotonic() - started < 30
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: ") and taken in last and "already in use" in last, last
        assert "backends healthy" not in second.stderr and "Traceback" not in second.stderr
    assert first.popen.poll() is None  # the first instance is left alone
    assert httpx.get(f"http://127.0.0.1:{port}/status", timeout=5).json()["healthy_backends"] == 1


def test_a_store_deleted_or_replaced_under_serve_is_noticed(spawn: Spawn, tmp_path: Path) -> None:
    """Fault: the SQLite store deleted or replaced under a running gateway went unnoticed
    (and a cut -shm file killed it with SIGBUS)."""
    from comeapi.cache.sqlite import SqliteStore
    from tests.cache.factory import prompt_entry

    db = tmp_path / "c.db"
    with SqliteStore(db) as store:
        store.put(prompt_entry("first prompt", 0))
    port = free_port()
    proc = spawn(
        comeapi_argv(
            "serve", "--port", str(port), "--store", f"sqlite:{db}", "--cache-refresh", "0.2",
        ),
        env={"COMEAPI_BACKENDS": "", "COMEAPI_BACKENDS_RANGE": ""},
        name="serve",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(url + "/health", timeout=30)

    def cache_status() -> dict[str, object]:
        status: dict[str, object] = httpx.get(url + "/status", timeout=5).json()["cache"]
        return status

    def hit(prompt: str) -> bool:
        body = {"prompt": prompt, "model_name": "gemma-3-270m-q4_k_m.gguf", "max_tokens": 8}
        return httpx.post(url + "/generate", json=body, timeout=5).status_code == 200

    def eventually(condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 15
        while not condition():
            assert time.monotonic() < deadline, f"{what}: {cache_status()}\n{proc.log()[-2000:]}"
            time.sleep(0.1)

    assert hit("first prompt")
    with SqliteStore(tmp_path / "other.db") as other:
        other.put(prompt_entry("second prompt", 0))
    os.replace(tmp_path / "other.db", db)  # another store renamed into place
    eventually(lambda: hit("second prompt"), "the replacement served")
    assert not hit("first prompt")
    assert cache_status()["store_problem"] is None

    shm = Path(f"{db}-shm")  # WAL's shared index, cut and unwritable: harmless now
    shm.write_bytes(b"")
    shm.chmod(0o444)
    db.unlink()
    eventually(lambda: "deleted" in str(cache_status()["store_problem"]), "deletion noticed")
    assert hit("second prompt")  # still serving what was loaded
    assert "was deleted while in use" in proc.log()
    with SqliteStore(db) as fresh:  # an import into the path again
        fresh.put(prompt_entry("third prompt", 0))
    eventually(lambda: hit("third prompt"), "the new file served")
    assert cache_status()["store_problem"] is None
    assert proc.popen.poll() is None
