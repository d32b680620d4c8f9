"""Cache hits per second: `comeapi serve` beside the requirements' plain nginx, the shipped
nginx configuration and Python's floor, at equal workers, in one run.

    .venv/bin/python benchmarks/nginx_vs_gateway.py [--workers 1,2] [--rounds 3] [--duration 10]
        [--baseline-src DIR]

Every server answers the 50 shipped answers (10 prompts x 5 variants, no model runs):

- ``plain nginx``: the requirements' Phase 1 as its users would configure it
  (../shared/anchors/nginx-plain.conf: proxy_cache keyed on the raw URI and body plus a
  ``split_clients`` variant slot, no njs, no validation), filled through comeapi;
- ``shipped nginx``: deploy/nginx as shipped (njs front door), filled by warmup.sh;
- ``uvicorn floor`` and ``granian floor``: bare apps returning the bytes of a comeapi hit
  (benchmarks/floor_apps.py; uvicorn with httptools and uvloop, granian's RSGI);
- ``comeapi``: `comeapi serve` over a SQLite store holding the shipped answers.

Each runs with the same number of worker processes (nginx's worker_processes, uvicorn's and
granian's --workers, comeapi's --workers), access logs off. wrk (one thread, loopback) POSTs
the 10 prompts' bodies in turn; every answer must be a hit. Rounds rotate the order; the
ratios are the median of each round's pair (the two ran side by side). Each server's CPU
time per request (its whole process tree, from /proc) is printed too: on a shared machine
it moves less than throughput does.

Goals (issue 21), at each number of workers: comeapi >= 0.5x plain nginx with p99 <= 2x
nginx's; the shipped nginx configuration >= 0.8x plain nginx.
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
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from baseline import import_shipped  # benchmarks/baseline.py (the script's folder)
from machine import (  # benchmarks/machine.py (the script's folder)
    Load,
    add_summary_option,
    process_cpu_seconds,
)

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "nginx"
ANCHORS = REPO.parent / "shared" / "anchors"
SHIPPED_CACHE = REPO / "src" / "comeapi" / "data" / "default-cache.jsonl"
BIN = Path(sys.executable).parent
PLAIN, SHIPPED, UVICORN, GRANIAN, COMEAPI, BEFORE = (
    "plain nginx",
    "shipped nginx",
    "uvicorn floor",
    "granian floor",
    "comeapi",
    "comeapi before",
)
GOAL_COMEAPI, GOAL_SHIPPED, GOAL_P99 = 0.5, 0.8, 2.0


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


def check_hits(url: str, bodies: list[tuple[str, str]], header: str | None) -> None:
    """Every body answered 200 (and, where the server says so, a hit), three times over."""
    with httpx.Client(timeout=10) as client:
        for route, body in bodies * 3:
            r = client.post(
                url + route, content=body.encode(), headers={"Content-Type": "application/json"}
            )
            # The plain nginx adds its X-Cache after the one comeapi's stored answer carries.
            said = r.headers.get_list(header)[-1:] if header else ["HIT"]
            if r.status_code != 200 or said != ["HIT"]:
                raise SystemExit(f"{url}{route}: {r.status_code} {header}={said}")


@dataclass
class Server:
    name: str
    url: str
    pid: int
    runs: list[WrkResult] = field(default_factory=list)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--rounds", type=int, default=3, help="rotating runs of each server")
    parser.add_argument(
        "--workers",
        "--gateway-workers",
        default="1,2",
        help="worker processes of every server, one comparison each (e.g. 1,2)",
    )
    parser.add_argument("--anchors", type=Path, default=ANCHORS, help="the peers' configs")
    parser.add_argument(
        "--baseline-src",
        type=Path,
        help="also run `comeapi serve` from this src directory (an older checkout, e.g. "
        "`git archive COMMIT src | tar -x -C DIR`) as 'comeapi before': before/after in one run",
    )
    parser.add_argument(
        "--skip", default="", help=f"servers left out, comma-separated ({GRANIAN}, ...)"
    )
    add_summary_option(parser)
    args = parser.parse_args()
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (make system-deps)")
    if not (args.anchors / "nginx-plain.conf").is_file():
        raise SystemExit(f"{args.anchors}/nginx-plain.conf not found (--anchors DIR)")
    workers = [int(w) for w in str(args.workers).split(",") if w]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    base = Path(tempfile.mkdtemp(prefix="comeapi-nginx-bench-"))
    base.chmod(0o755)  # nginx's worker user must reach the cache directory
    load = Load(own=float(os.cpu_count() or 1))  # the servers and wrk fill every CPU
    results: dict[int, list[Server]] = {}
    try:
        prepare(base)
        for count in workers:
            results[count] = bench(base / f"w{count}", count, args, skip)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    load.finish()
    for count, servers in results.items():
        report(servers, count, args, load)


def prepare(base: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "comeapi", "cache", "import", "--store",
         f"sqlite:{base / 'store.db'}", str(SHIPPED_CACHE)],
        check=True, capture_output=True, cwd=REPO, timeout=120,
    )  # fmt: skip


def bench(base: Path, workers: int, args: argparse.Namespace, skip: set[str]) -> list[Server]:
    """Start every server with ``workers`` workers, fill the caches, run the rounds."""
    base.mkdir()
    base.chmod(0o755)
    shutil.copyfile(base.parent / "store.db", base / "store.db")
    secret = secrets.token_urlsafe(24)
    py = [sys.executable, "-m", "comeapi"]
    bodies = request_bodies()
    script = base / "bodies.lua"
    script.write_text(lua_script(bodies))
    ports = {name: free_port() for name in (PLAIN, SHIPPED, UVICORN, GRANIAN, COMEAPI)}
    filler_port, warm_port = free_port(), free_port()
    # The nginx caches are filled through a comeapi of their own (not the one measured).
    filler = [*py, "serve", "--port", str(filler_port), "--store", f"sqlite:{base}/filler.db"]
    filler += ["--variant-secret", secret, "--log-level", "warning"]
    shutil.copyfile(base / "store.db", base / "filler.db")
    comeapi = [*py, "serve", "--port", str(ports[COMEAPI]), "--store", f"sqlite:{base}/store.db"]
    comeapi += ["--log-level", "warning", "--workers", str(workers)]
    servers: list[Server] = []
    with contextlib.ExitStack() as stack:
        fill = stack.enter_context(running(filler, base / "filler.log"))
        wait_port(filler_port, fill)
        gw = stack.enter_context(running(comeapi, base / "comeapi.log"))
        wait_port(ports[COMEAPI], gw)
        url = f"http://127.0.0.1:{ports[COMEAPI]}"
        check_hits(url, bodies, "x-cache")
        servers.append(Server(COMEAPI, url, gw.pid))
        if args.baseline_src is not None:
            port = free_port()
            import_shipped(
                args.baseline_src.resolve(), f"sqlite:{base}/before.db", SHIPPED_CACHE, base
            )
            before = [*py, "serve", "--port", str(port), "--store", f"sqlite:{base}/before.db"]
            before += ["--log-level", "warning", "--workers", str(workers)]
            env = {"PYTHONPATH": str(args.baseline_src.resolve())}
            proc = stack.enter_context(running(before, base / "before.log", env))
            wait_port(port, proc)
            url = f"http://127.0.0.1:{port}"
            check_hits(url, bodies, "x-cache")
            servers.append(Server(BEFORE, url, proc.pid))
        if PLAIN not in skip:
            plain = plain_nginx(base / "plain", workers, ports[PLAIN], filler_port, args.anchors)
            proc = stack.enter_context(running(plain, base / "plain.log"))
            wait_port(ports[PLAIN], proc)
            url = f"http://127.0.0.1:{ports[PLAIN]}"
            fill_plain(url, bodies)
            servers.append(Server(PLAIN, url, proc.pid))
        if SHIPPED not in skip:
            shipped = shipped_nginx(base / "shipped", workers, ports[SHIPPED], warm_port)
            proc = stack.enter_context(running(shipped(filler_port, secret), base / "shipped.log"))
            wait_port(ports[SHIPPED], proc)
            warmup(warm_port)
            url = f"http://127.0.0.1:{ports[SHIPPED]}"
            check_hits(url, bodies, "x-cache-status")
            servers.append(Server(SHIPPED, url, proc.pid))
        floor_env = {"FLOOR_RESPONSE": str(floor_response(base, servers[0].url, bodies[0]))}
        floor_env["PYTHONPATH"] = str(REPO / "benchmarks")
        if UVICORN not in skip:
            argv = [str(BIN / "uvicorn"), "floor_apps:asgi_app", "--port", str(ports[UVICORN])]
            argv += ["--workers", str(workers), "--loop", "uvloop", "--http", "httptools"]
            argv += ["--no-access-log", "--log-level", "warning"]
            proc = stack.enter_context(running(argv, base / "uvicorn.log", floor_env))
            wait_port(ports[UVICORN], proc)
            check_hits(f"http://127.0.0.1:{ports[UVICORN]}", bodies, None)
            servers.append(Server(UVICORN, f"http://127.0.0.1:{ports[UVICORN]}", proc.pid))
        if GRANIAN not in skip:
            argv = [str(BIN / "granian"), "--interface", "rsgi", "--port", str(ports[GRANIAN])]
            argv += ["--workers", str(workers), "--no-ws", "--log-level", "warning"]
            argv += ["floor_apps:rsgi_app"]
            proc = stack.enter_context(running(argv, base / "granian.log", floor_env))
            wait_port(ports[GRANIAN], proc)
            check_hits(f"http://127.0.0.1:{ports[GRANIAN]}", bodies, None)
            servers.append(Server(GRANIAN, f"http://127.0.0.1:{ports[GRANIAN]}", proc.pid))
        for round_ in range(args.rounds):
            shift = round_ % len(servers)
            for server in servers[shift:] + servers[:shift]:
                server.runs.append(run_wrk(server.url, script, args, server.pid))
    return servers


def plain_nginx(base: Path, workers: int, port: int, upstream: int, anchors: Path) -> list[str]:
    """The anchor configuration, filled in; nginx's argv."""
    base.mkdir()
    for sub in ("cb", "px", "fc", "uw", "sc", "cache"):
        (base / sub).mkdir()
    conf = (anchors / "nginx-plain.conf").read_text()
    for name, value in {
        "WORKERS": workers,
        "DIR": base,
        "UPSTREAM_PORT": upstream,
        "PORT": port,
    }.items():
        conf = conf.replace(f"@{name}@", str(value))
    if os.geteuid() != 0:
        conf = re.sub(r"^user [^;]+;", "", conf, flags=re.M)
    (base / "nginx.conf").write_text(conf)
    return [
        "nginx",
        "-p",
        f"{base}/",
        "-c",
        str(base / "nginx.conf"),
        "-e",
        str(base / "error.log"),
    ]


def fill_plain(url: str, bodies: list[tuple[str, str]]) -> None:
    """Send each body until all five slots hold an answer (the anchor's own instructions:
    about 40 each), then check that everything is a hit."""
    with httpx.Client(timeout=30) as client:
        for _ in range(60):
            for route, body in bodies:
                client.post(
                    url + route, content=body.encode(), headers={"Content-Type": "application/json"}
                )
    check_hits(url, bodies, "x-cache")


def shipped_nginx(base: Path, workers: int, port: int, warm_port: int):  # type: ignore[no-untyped-def]
    """A function of (comeapi's port, the variant secret) -> the shipped nginx's argv."""

    def argv(upstream: int, secret: str) -> list[str]:
        env = {
            "COMEAPI_UPSTREAM": f"127.0.0.1:{upstream}",
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
            check=True, capture_output=True, env={**os.environ, **env}, timeout=30,
        )  # fmt: skip
        # Hits are not worth an access log line each; comeapi does not log them either.
        locations = base / "conf" / "comeapi.conf"
        text = re.sub(r"access_log [^;]+;", "access_log off;", locations.read_text())
        locations.write_text(text)
        main_conf = base / "conf" / "nginx.conf"
        text = re.sub(
            r"worker_processes [^;]+;", f"worker_processes {workers};", main_conf.read_text()
        )
        main_conf.write_text(text)
        errors = str(base / "logs" / "error.log")
        return ["nginx", "-p", f"{base}/", "-c", str(main_conf), "-e", errors, "-g", "daemon off;"]

    return argv


def warmup(warm_port: int) -> None:
    warm = subprocess.run(
        ["bash", str(DEPLOY / "warmup.sh"), "-u", f"http://127.0.0.1:{warm_port}", "-t", "60"],
        env={**os.environ, "COMEAPI_PYTHON": sys.executable},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if warm.returncode != 0:
        raise SystemExit(f"warmup failed:\n{warm.stdout}{warm.stderr}")


def floor_response(base: Path, comeapi_url: str, request: tuple[str, str]) -> Path:
    """A real comeapi hit's body and headers, for the floor apps to answer with."""
    route, body = request
    r = httpx.post(
        comeapi_url + route,
        content=body.encode(),
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    keep = ("content-type", "x-cache", "x-cache-variant")
    doc = {"body": r.text, "headers": [[k, v] for k, v in r.headers.items() if k in keep]}
    path = base / "floor.json"
    path.write_text(json.dumps(doc))
    return path


def paired(a: Server, b: Server) -> float:
    """The median of a/b over the rounds (each round ran both side by side)."""
    return statistics.median(
        x.requests_per_s / y.requests_per_s for x, y in zip(a.runs, b.runs, strict=True)
    )


def report(servers: list[Server], workers: int, args: argparse.Namespace, load: Load) -> None:
    print(
        f"\n{workers} worker(s) each: wrk -t{args.threads} -c{args.connections} "
        f"-d{args.duration}s, {args.rounds} rotating rounds, the 10 prompts' bodies in turn, "
        f"loopback, {os.cpu_count()} CPUs"
    )
    by_name = {s.name: s for s in servers}
    for s in servers:
        for r in s.runs:
            extra = f"  [{r.errors}]" if r.errors else ""
            print(
                f"  {s.name:14} {r.requests_per_s:9.0f} req/s  p50 {r.p50_ms:6.2f} ms"
                f"  p99 {r.p99_ms:6.2f} ms  CPU {r.cpu_us:6.1f} us/request{extra}"
            )
    median = {
        s.name: (
            statistics.median(r.requests_per_s for r in s.runs),
            statistics.median(r.p99_ms for r in s.runs),
            statistics.median(r.cpu_us for r in s.runs),
        )
        for s in servers
    }
    for name, (rps, p99, cpu) in median.items():
        print(f"  median {name:14} {rps:9.0f} req/s  p99 {p99:6.2f} ms  CPU {cpu:6.1f} us")
    come = by_name[COMEAPI]
    parts, verdicts = [], []
    if PLAIN in by_name:
        plain = by_name[PLAIN]
        ratio = paired(come, plain)
        p99_ratio = median[COMEAPI][1] / median[PLAIN][1]
        met = ratio >= GOAL_COMEAPI and p99_ratio <= GOAL_P99
        parts.append(
            f"comeapi/plain nginx {ratio:.2f}x (goal >= {GOAL_COMEAPI}), p99 {p99_ratio:.2f}x "
            f"(goal <= {GOAL_P99}): {'met' if met else 'NOT met'}"
        )
        verdicts.append(met)
        if SHIPPED in by_name:
            shipped = paired(by_name[SHIPPED], plain)
            ok = shipped >= GOAL_SHIPPED
            parts.append(
                f"shipped nginx/plain nginx {shipped:.2f}x (goal >= {GOAL_SHIPPED}): "
                f"{'met' if ok else 'NOT met'}"
            )
            verdicts.append(ok)
    for floor in (UVICORN, GRANIAN):
        if floor in by_name:
            parts.append(f"comeapi/{floor} {paired(come, by_name[floor]):.2f}x")
    if BEFORE in by_name:
        before = by_name[BEFORE]
        parts.append(f"comeapi/comeapi before {paired(come, before):.2f}x")
        if PLAIN in by_name:
            parts.append(f"comeapi before/plain nginx {paired(before, by_name[PLAIN]):.2f}x")
    headline = "; ".join(parts)
    print(load.verdict(f"{workers} worker(s): {headline}"))
    load.summarize(
        args.summary,
        name=f"nginx_vs_gateway_{workers}",
        what=f"cache hits, {workers} worker(s) each: `comeapi serve` vs the requirements' plain "
        f"nginx (raw-body key, split_clients, no njs), the shipped nginx config and bare "
        f"uvicorn/granian apps, `wrk -t{args.threads} -c{args.connections}`, POST",
        headline=f"{median[COMEAPI][0]:,.0f} req/s; {headline}",
    )


if __name__ == "__main__":
    main()
