"""Cache hits per second: nginx's proxy_cache (Phase 1) beside `comeapi serve`'s own hit path.

    .venv/bin/python benchmarks/nginx_vs_gateway.py [--gateway-workers 1|2] [--duration 10]

Both serve the 50 shipped answers (10 prompts x 5 variants, imported into a fresh SQLite
store, so no model runs): comeapi's gateway from memory, nginx (deploy/nginx as shipped,
njs front door included, access log off on both) from its disk cache, filled through
comeapi by deploy/nginx/warmup.sh. wrk (Debian's package, one thread, loopback) POSTs the
10 prompts' bodies in turn with a Lua script; every response must be a hit. Rounds
alternate; medians decide. Besides requests/s, each server's CPU time per request (its
whole process tree, from /proc) is printed: on a shared machine it moves less than
throughput does.

Goals (issue 14): comeapi/nginx >= 1.0 with 2 comeapi workers against nginx's 2, >= 0.8
with one comeapi worker, and comeapi's p99 no worse than nginx's. ``--server granian`` runs
the same app factory under granian's ASGI server instead of uvicorn, to choose between them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from machine import (  # benchmarks/machine.py (the script's folder)
    Load,
    add_summary_option,
    process_cpu_seconds,
)

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "nginx"
SHIPPED_CACHE = REPO / "src" / "comeapi" / "data" / "default-cache.jsonl"
GOALS = {1: 0.8, 2: 1.0}  # comeapi workers -> comeapi/nginx requests per second


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1.0):
            return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on port {port} after {timeout}s")


@contextlib.contextmanager
def running(
    argv: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A child in its own process group, stopped (the whole group, by PID) on exit."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        try:
            yield proc
            if proc.poll() is not None:
                raise SystemExit(f"{argv[0]} died during the run, see {log}")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def request_bodies() -> list[tuple[str, str]]:
    """(route, JSON body) of each shipped prompt, as a client sends it (and warmup.sh does)."""
    from comeapi.cache.prompts import load_prompt_set

    out = []
    for item in load_prompt_set().items:
        body = item.request_body(0)
        body.pop("seed")
        route = "/v1/chat/completions" if item.kind == "chat" else "/generate"
        out.append((route, json.dumps(body, ensure_ascii=False)))
    return out


def lua_script(bodies: list[tuple[str, str]]) -> str:
    def q(s: str) -> str:  # a Lua long string cannot be closed by JSON text
        return "[==[" + s + "]==]"

    reqs = ",\n".join(f"  {{{q(route)}, {q(body)}}}" for route, body in bodies)
    return (
        f"local reqs = {{\n{reqs}\n}}\n"
        "local i = 0\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        "request = function()\n"
        "  i = i % #reqs + 1\n"
        '  return wrk.format("POST", reqs[i][1], nil, reqs[i][2])\n'
        "end\n"
    )


@dataclass
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: str
    cpu_us: float = 0.0  # the server's CPU time per request


def to_ms(value: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", value)
    if match is None:
        raise ValueError(f"unexpected wrk latency {value!r}")
    number, unit = match.groups()
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4, "h": 3.6e6}[unit]


def run_wrk(url: str, script: Path, args: argparse.Namespace, server_pid: int) -> WrkResult:
    argv = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s"]
    argv += ["--latency", "--timeout", "5s", "-s", str(script), url]
    cpu_before = process_cpu_seconds(server_pid)
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120).stdout
    cpu = process_cpu_seconds(server_pid) - cpu_before
    count = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))  # type: ignore[union-attr]
    # Anchored: a "+/- Stdev" column such as 69.50% must not pass for the 50% percentile.
    p50 = to_ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = to_ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    errors = "; ".join(
        line.strip() for line in out.splitlines() if "errors" in line or "Non-2xx" in line
    )
    return WrkResult(rps, p50, p99, errors, cpu / max(count, 1) * 1e6)


def check_hits(url: str, bodies: list[tuple[str, str]], header: str) -> None:
    with httpx.Client(timeout=10) as client:
        for route, body in bodies * 3:
            r = client.post(
                url + route, content=body.encode(), headers={"Content-Type": "application/json"}
            )
            if r.status_code != 200 or r.headers.get(header) != "HIT":
                raise SystemExit(f"{url}{route}: {r.status_code} {header}={r.headers.get(header)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--rounds", type=int, default=5, help="alternating runs of each")
    parser.add_argument("--gateway-workers", type=int, default=1, choices=[1, 2])
    parser.add_argument("--nginx-workers", type=int, default=2)
    parser.add_argument("--server", choices=["uvicorn", "granian"], default="uvicorn")
    parser.add_argument(
        "--baseline-src",
        type=Path,
        help="also run `comeapi serve` from this src directory (e.g. a worktree of an older "
        "commit) beside the current one: the before/after of a change in one run",
    )
    add_summary_option(parser)
    args = parser.parse_args()
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (make system-deps)")

    base = Path(tempfile.mkdtemp(prefix="comeapi-nginx-bench-"))
    base.chmod(0o755)  # nginx's worker user must reach the cache directory
    try:
        bench(base, args)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def bench(base: Path, args: argparse.Namespace) -> None:
    load = Load(own=float(os.cpu_count() or 1))  # the servers and wrk fill every CPU
    secret = secrets.token_urlsafe(24)
    store = f"sqlite:{base / 'store.db'}"
    py = [sys.executable, "-m", "comeapi"]
    subprocess.run(
        [*py, "cache", "import", "--store", store, str(SHIPPED_CACHE)],
        check=True,
        capture_output=True,
        cwd=REPO,
        timeout=120,
    )
    gw_port, port, warm_port = free_port(), free_port(), free_port()
    gateway = [
        *py,
        "serve",
        "--port",
        str(gw_port),
        "--store",
        store,
        "--variant-secret",
        secret,
        "--backend",
        f"http://127.0.0.1:{free_port()}",
        "--log-level",
        "warning",
        "--workers",
        str(args.gateway_workers),
    ]
    env: dict[str, str] = {}
    if args.server == "granian":
        # The same app factory as `comeapi serve --workers N`, under granian's ASGI server.
        from comeapi.settings import load_settings

        settings = load_settings(None, port=gw_port, store=store, variant_secret=secret)
        env["_COMEAPI_GATEWAY_SETTINGS"] = settings.model_dump_json()
        gateway = [
            str(Path(sys.executable).parent / "granian"),
            "comeapi.gateway.server:worker_app",
            "--factory",
            "--interface", "asgi",
            "--port", str(gw_port),
            "--workers", str(args.gateway_workers),
            "--no-log",
        ]  # fmt: skip
    render_env = {
        "COMEAPI_UPSTREAM": f"127.0.0.1:{gw_port}",
        "COMEAPI_VARIANT_SECRET": secret,
        "NGINX_LISTEN": f"127.0.0.1:{port}",
        "NGINX_WARMUP_LISTEN": f"127.0.0.1:{warm_port}",
        "NGINX_CACHE_DIR": str(base / "cache"),
        "NGINX_STATE_DIR": str(base / "state"),
        "NGINX_LOG_DIR": str(base / "logs"),
        "NGINX_USER": "www-data" if os.geteuid() == 0 else "",
    }
    subprocess.run(
        ["sh", str(DEPLOY / "render.sh"), str(base / "conf")],
        check=True,
        capture_output=True,
        env={**os.environ, **render_env},
        timeout=30,
    )
    # Hits are not worth an access log line each; comeapi does not log them either.
    locations = base / "conf" / "comeapi.conf"
    locations.write_text(re.sub(r"access_log [^;]+;", "access_log off;", locations.read_text()))
    main_conf = base / "conf" / "nginx.conf"
    main_conf.write_text(
        re.sub(
            r"worker_processes [^;]+;",
            f"worker_processes {args.nginx_workers};",
            main_conf.read_text(),
        )
    )
    nginx = [
        "nginx",
        "-p",
        f"{base}/",
        "-c",
        str(base / "conf" / "nginx.conf"),
        "-e",
        str(base / "logs" / "error.log"),
        "-g",
        "daemon off;",
    ]

    bodies = request_bodies()
    script = base / "bodies.lua"
    script.write_text(lua_script(bodies))
    # The baseline gets its own store, imported by its own code: an older comeapi may not
    # open a store of a newer schema.
    baseline_port = free_port()
    if args.baseline_src is not None:
        subprocess.run(
            [*py, "cache", "import", "--store", f"sqlite:{base}/baseline.db", str(SHIPPED_CACHE)],
            check=True,
            capture_output=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(args.baseline_src.resolve())},
            timeout=120,
        )
    baseline = [*py, "serve", "--port", str(baseline_port), "--store", f"sqlite:{base}/baseline.db"]
    baseline += ["--backend", f"http://127.0.0.1:{free_port()}", "--log-level", "warning"]
    baseline += ["--workers", str(args.gateway_workers)]
    with contextlib.ExitStack() as stack:
        gw = stack.enter_context(running(gateway, base / "gateway.log", env))
        ngx = stack.enter_context(running(nginx, base / "nginx.log"))
        old = None
        if args.baseline_src is not None:
            pythonpath = {"PYTHONPATH": str(args.baseline_src.resolve())}
            old = stack.enter_context(running(baseline, base / "baseline.log", pythonpath))
        wait_port(gw_port, gw)
        wait_port(port, ngx)
        warm = subprocess.run(
            ["bash", str(DEPLOY / "warmup.sh"), "-u", f"http://127.0.0.1:{warm_port}", "-t", "60"],
            env={**os.environ, "COMEAPI_PYTHON": sys.executable},
            capture_output=True,
            text=True,
            timeout=600,
        )
        summary = warm.stdout.strip().splitlines()[-1] if warm.stdout.strip() else warm.stderr
        if warm.returncode != 0:
            raise SystemExit(f"warmup failed:\n{warm.stdout}{warm.stderr}")
        print(summary)
        nginx_url, gateway_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{gw_port}"
        check_hits(nginx_url, bodies, "x-cache-status")
        check_hits(gateway_url, bodies, "x-cache")
        runs: dict[str, list[WrkResult]] = {"nginx": [], "comeapi": []}
        if old is not None:
            wait_port(baseline_port, old)
            baseline_url = f"http://127.0.0.1:{baseline_port}"
            check_hits(baseline_url, bodies, "x-cache")
            runs["baseline"] = []
        for _ in range(args.rounds):
            runs["nginx"].append(run_wrk(nginx_url, script, args, ngx.pid))
            runs["comeapi"].append(run_wrk(gateway_url, script, args, gw.pid))
            if old is not None:
                runs["baseline"].append(run_wrk(baseline_url, script, args, old.pid))
    load.finish()
    report(runs, args, load)


def report(runs: dict[str, list[WrkResult]], args: argparse.Namespace, load: Load) -> None:
    print(
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s, {args.rounds} rounds "
        f"alternating, the 10 prompts' bodies in turn, loopback, {os.cpu_count()} CPUs; "
        f"nginx: {args.nginx_workers} workers, comeapi serve: {args.gateway_workers} "
        f"worker(s) on {args.server}"
    )
    median = {}
    for name, results in runs.items():
        for r in results:
            extra = f"  [{r.errors}]" if r.errors else ""
            print(
                f"  {name:8} {r.requests_per_s:10.0f} req/s  p50 {r.p50_ms:6.2f} ms"
                f"  p99 {r.p99_ms:6.2f} ms  CPU {r.cpu_us:6.1f} us/request{extra}"
            )
        median[name] = (
            statistics.median(r.requests_per_s for r in results),
            statistics.median(r.p99_ms for r in results),
            statistics.median(r.cpu_us for r in results),
        )
    (nginx_rps, nginx_p99, nginx_cpu) = median["nginx"]
    (comeapi_rps, comeapi_p99, comeapi_cpu) = median["comeapi"]
    ratio = comeapi_rps / nginx_rps
    # Rounds alternate, so each comeapi run has an nginx run beside it: the ratio of each
    # pair moves less with the machine's slow drifts than the ratio of the medians does.
    paired = statistics.median(
        c.requests_per_s / n.requests_per_s
        for c, n in zip(runs["comeapi"], runs["nginx"], strict=True)
    )
    goal = GOALS[args.gateway_workers]
    met = ratio >= goal and comeapi_p99 <= nginx_p99
    print(
        f"median: nginx {nginx_rps:.0f} req/s (p99 {nginx_p99:.2f} ms, CPU {nginx_cpu:.1f} us), "
        f"comeapi {comeapi_rps:.0f} req/s (p99 {comeapi_p99:.2f} ms, CPU {comeapi_cpu:.1f} us)"
    )
    if "baseline" in median:
        base_rps, base_p99, base_cpu = median["baseline"]
        print(
            load.verdict(
                f"comeapi/baseline = {comeapi_rps / base_rps:.2f} req/s, "
                f"{comeapi_cpu / base_cpu:.2f}x the CPU per hit (baseline: {args.baseline_src}, "
                f"{base_rps:.0f} req/s, p99 {base_p99:.2f} ms, CPU {base_cpu:.1f} us; "
                f"baseline/nginx = {base_rps / nginx_rps:.2f})"
            )
        )
    print(
        load.verdict(
            f"ratio comeapi/nginx = {ratio:.2f} (goal >= {goal}; paired by round "
            f"{paired:.2f}), p99 {comeapi_p99:.2f} vs "
            f"{nginx_p99:.2f} ms (goal: no worse), CPU per hit {comeapi_cpu / nginx_cpu:.2f}x "
            f"nginx's: {'met' if met else 'NOT met'}"
        )
    )
    workers = f"{args.gateway_workers} worker{'s' if args.gateway_workers > 1 else ''}"
    load.summarize(
        args.summary,
        name="nginx_vs_gateway",
        what=f"cache hits, `comeapi serve` ({workers}, {args.server}) vs nginx `proxy_cache` "
        f"({args.nginx_workers} workers), same 50 answers, `wrk -t{args.threads} "
        f"-c{args.connections}`, POST",
        headline=f"{comeapi_rps:,.0f} vs {nginx_rps:,.0f} req/s, **{ratio:.2f}x** (goal >= "
        f"{goal}; paired by round {paired:.2f}x), p99 {comeapi_p99:.1f} vs {nginx_p99:.1f} ms, "
        f"CPU per hit {comeapi_cpu:.0f} vs {nginx_cpu:.0f} us: {'met' if met else 'NOT met'}",
    )


if __name__ == "__main__":
    main()
