"""Cold start to the first cached answer of the Lambda handler, against `import boto3` + a
DynamoDB client, measured side by side in one run; and the warm hit.

Cold: a fresh interpreter per sample, the programs interleaved, time measured inside the child
(interpreter start-up excluded: Lambda's init phase starts after it; so are the modules Lambda's
Python runtime, awslambdaric's bootstrap, has imported before it imports a handler: json,
logging, traceback, importlib), medians:
  baseline   ``import boto3; boto3.client("dynamodb")``: what any Python Lambda on DynamoDB pays
  table      the package without a snapshot (the handler before issue 15): import the handler,
             which builds its DynamoDB client at init as in Lambda, then one API Gateway v2
             event for a cached prompt: two GetItems (catalogue, entry) to moto's server
  snapshot   the package ``comeapi aws package`` writes: import, load and verify the snapshot,
             the same event answered from it; boto3 is not imported
  https      the alternative not taken, a hand-signed DynamoDB client: only the imports it
             would need (ssl with its default context, http.client, hmac), no request yet
The packages are built by ``comeapi.serverless.package.build_package`` from a table on moto's
server (a real process on loopback), as ``make lambda-package`` builds them. Each runs as plain
source (Lambda's /var/task is read-only, so Python compiles it at every cold start) and with
.pyc files compiled in (``compileall --invalidation-mode unchecked-hash``, docs/aws.md).
boto3 is precompiled, as in the Lambda runtime. Goal: snapshot <= 0.3x of the baseline.

Warm: one container answering the same event again and again (median / p99): from its
snapshot; and from the table with the DynamoDB call excluded (an in-memory client).

A ratio measured on a busy machine is not worth printing: when the load average says the
machine was busy (benchmarks/machine.py; this program keeps one process running, its own
load), the times are printed but the ratios are not.
A real Lambda at 256 MB gets a fraction of a core, so its times are several times these; the
ratio is what transfers.

    .venv/bin/python benchmarks/lambda_coldstart.py [--runs 21] [--warm 5000] [--python PY]

--python runs the cold programs with another interpreter, e.g. Python 3.12 as on Lambda (it
needs boto3: ``python3.12 -m venv /tmp/py312 && /tmp/py312/bin/pip install boto3``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.aws_local: moto's server and sample entries

from tests.aws_local import MODEL, prompt_entries  # noqa: E402
from tests.helpers import Proc, free_port  # noqa: E402

from comeapi.cache.dynamo import DynamoStore, create_table, make_client  # noqa: E402
from comeapi.serverless.package import build_package  # noqa: E402
from machine import Load, add_summary_option  # noqa: E402  (benchmarks/machine.py)

TABLE = "comeapi-bench"
PROMPT = "日本の首都はどこですか"
CHILD_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    "AWS_LAMBDA_FUNCTION_NAME": "comeapi-bench",
    "TABLE_NAME": TABLE,
    "PYTHONDONTWRITEBYTECODE": "1",
}
# What Lambda's Python runtime has imported before the handler (awslambdaric/bootstrap.py).
RUNTIME = "import importlib, json, logging, os, sys, time, traceback\n"
BASELINE = (
    RUNTIME
    + """
t, c = time.perf_counter(), time.process_time()
import boto3
boto3.client("dynamodb")
print(time.perf_counter() - t, time.process_time() - c)
"""
)
# The event is built before the clock starts: API Gateway makes it, not the function.
HANDLER = (
    RUNTIME
    + """
event = {"version": "2.0", "routeKey": "$default", "rawPath": "/generate",
         "rawQueryString": "", "headers": {"content-type": "application/json"},
         "requestContext": {"http": {"method": "POST", "path": "/generate"},
                            "stage": "$default"},
         "body": sys.argv[3], "isBase64Encoded": False}
t, c = time.perf_counter(), time.process_time()
import comeapi.serverless.handler as h
result = h.handler(event, None)
wall, cpu = time.perf_counter() - t, time.process_time() - c
assert result["statusCode"] == 200 and result["headers"]["X-Cache"] == "HIT", result
assert h.__file__.startswith(sys.argv[1]), h.__file__
assert ("boto3" in sys.modules) == (sys.argv[2] == "table"), sorted(sys.modules)
print(wall, cpu)
"""
)
HTTPS = (
    RUNTIME
    + """
t, c = time.perf_counter(), time.process_time()
import datetime, hashlib, hmac, http.client, json, ssl
ssl.create_default_context()
print(time.perf_counter() - t, time.process_time() - c)
"""
)
MODULES = (
    RUNTIME
    + """
before = set(sys.modules)
import comeapi.serverless.handler
print(len(set(sys.modules) - before))
"""
)


@contextmanager
def moto_table(root: Path) -> Iterator[tuple[str, DynamoStore]]:
    """moto's server on a free loopback port, with a table holding 5 answers to PROMPT."""
    for name, value in CHILD_ENV.items():
        if name.startswith("AWS_") and name != "AWS_LAMBDA_FUNCTION_NAME":
            os.environ[name] = value
    port = free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = Proc(argv, root / "moto.log")
    try:
        endpoint = f"http://127.0.0.1:{port}"
        proc.wait_http(f"{endpoint}/moto-api/", timeout=60)
        store = DynamoStore(make_client("us-east-1", endpoint), TABLE)
        create_table(store.client, TABLE)
        store.replace_all(prompt_entries(PROMPT, 5))
        yield endpoint, store
    finally:
        proc.stop()


def compiled(package: Path, python: str) -> Path:
    """``package`` with .pyc files for ``python``, as the package's Makefile compiles it."""
    argv = [python, "-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash"]
    subprocess.run([*argv, str(package)], check=True, timeout=300)
    return package


def child(python: str, code: str, env: dict[str, str], *args: str) -> tuple[float, float]:
    """(wall, CPU) seconds the child spent; CPU time is what a busy machine disturbs least."""
    argv = [python, "-c", code, *args]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True, timeout=60)
    wall, cpu = out.stdout.split()
    return float(wall), float(cpu)


def cold(
    runs: int, python: str, root: Path, endpoint: str, store: DynamoStore
) -> dict[str, tuple[float, float]]:
    env = {**os.environ, **CHILD_ENV, "DYNAMODB_ENDPOINT_URL": endpoint}
    packages: dict[str, Path] = {}
    for mode, source in (("table (before)", None), ("snapshot", store)):
        for form in ("source", "with .pyc"):
            out = root / f"{mode.split()[0]}-{form.split()[-1]}"
            build_package(out, source)
            packages[f"{mode}, {form}"] = compiled(out, python) if form == "with .pyc" else out
    programs: dict[str, tuple[str, dict[str, str], tuple[str, ...]]] = {
        "import boto3 + DynamoDB client": (BASELINE, env, ())
    }
    for name, package in packages.items():
        mode = "table" if name.startswith("table") else "snapshot"
        body = json.dumps({"prompt": PROMPT})
        programs[name] = (HANDLER, {**env, "PYTHONPATH": str(package)}, (str(package), mode, body))
    programs["https client imports (not taken)"] = (HTTPS, env, ())
    for code, program_env, args in programs.values():
        child(python, code, program_env, *args)  # warm the OS file cache first
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in programs}
    for _ in range(runs):
        for name, (code, program_env, args) in programs.items():
            samples[name].append(child(python, code, program_env, *args))
    snapshot_env = {**env, "PYTHONPATH": str(packages["snapshot, with .pyc"])}
    modules = subprocess.run(
        [python, "-c", MODULES], env=snapshot_env, capture_output=True, text=True,
        check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    print(f"  modules the snapshot path imports after the runtime's, comeapi's included: {modules}")
    return {
        name: (
            statistics.median(s[0] for s in values),
            statistics.median(s[1] for s in values),
        )
        for name, values in samples.items()
    }


def print_cold(results: dict[str, tuple[float, float]], runs: int, ratios: bool) -> None:
    print(f"cold start to the first cached answer: fresh interpreter, {runs} runs, medians")
    print(f"  {'':34s} {'wall':>9s} {'ratio':>7s} {'CPU':>9s} {'ratio':>7s}")
    base = results["import boto3 + DynamoDB client"]
    for name, (wall, cpu) in results.items():
        wall_ratio = f"{wall / base[0]:6.3f}x" if ratios else "      -"
        cpu_ratio = f"{cpu / base[1]:6.3f}x" if ratios else "      -"
        print(f"  {name:34s} {wall * 1e3:6.1f} ms {wall_ratio} {cpu * 1e3:6.1f} ms {cpu_ratio}")
    print("  goal: snapshot <= 0.3x of the baseline")


def warm(n: int, root: Path, store: DynamoStore) -> dict[str, tuple[float, float]]:
    """Median and p99 seconds of a warm hit from the snapshot and from the table."""
    from comeapi.serverless.events import http_api_event
    from comeapi.serverless.handler import ServerlessApp
    from comeapi.serverless.snapshot import load_snapshot
    from comeapi.serverless.source import SnapshotSource, TableSource

    event = http_api_event("POST", "/generate", body=json.dumps({"prompt": PROMPT}).encode())

    def timed(app: ServerlessApp) -> list[float]:
        assert app(event, None)["statusCode"] == 200  # loads the catalogue, checks the snapshot
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            result = app(event, None)
            samples.append(time.perf_counter() - t)
        assert result["statusCode"] == 200
        return sorted(samples)

    snapshot = load_snapshot(str(root / "snapshot-source" / "comeapi-snapshot"))
    assert snapshot is not None
    source = SnapshotSource(
        snapshot, TableSource(lambda: store, catalogue_ttl=1e9), background=False
    )
    from_snapshot = ServerlessApp(source)
    memory = MemoryClient(store)
    from_table = ServerlessApp(TableSource(DynamoStore(memory, TABLE)))
    rows = (
        ("from the snapshot", timed(from_snapshot)),
        ("from the table, no I/O", timed(from_table)),
    )
    assert source.snapshot is not None, "the snapshot was dropped"
    print(f"warm hit, {n} calls (median / p99)")
    figures = {}
    for label, samples in rows:
        p99 = samples[int(len(samples) * 0.99) - 1]
        figures[label] = (statistics.median(samples), p99)
        print(f"  {label:34s} {figures[label][0] * 1e6:8.1f} us / {p99 * 1e6:8.1f} us")
    return figures


class MemoryClient:
    """The GetItem answers of the table, read once from moto and kept in memory."""

    def __init__(self, store: DynamoStore):
        self.items: dict[tuple[str, str], Any] = {}
        for item in store.client.scan(TableName=TABLE)["Items"]:
            self.items[(item["key"]["S"], item["variant"]["N"])] = item

    def get_item(self, **kwargs: Any) -> dict[str, Any]:
        key = kwargs["Key"]
        return {"Item": self.items[(key["key"]["S"], key["variant"]["N"])]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=21, help="cold start samples per program")
    parser.add_argument("--warm", type=int, default=5000, help="warm invocations")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the cold runs")
    add_summary_option(parser)
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    # A child, or this program itself, is runnable throughout: one CPU of its own.
    load = Load(own=1.0)
    version = subprocess.run(
        [args.python, "-c", "import sys, boto3; print(sys.version.split()[0], boto3.__version__)"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.split()  # fmt: skip
    print(f"cold runs: python {version[0]}, boto3 {version[1]}; {cpus} CPUs; model {MODEL}")
    with tempfile.TemporaryDirectory() as tmp, moto_table(Path(tmp)) as (endpoint, store):
        results = cold(args.runs, args.python, Path(tmp), endpoint, store)
        load.finish()
        print_cold(results, args.runs, ratios=load.quiet)
        if not load.quiet:
            print("  " + load.verdict("ratios NOT reported; run again on a quiet machine"))
        hits = warm(args.warm, Path(tmp), store)
    base = results["import boto3 + DynamoDB client"][0]
    snapshot, source = (results[f"snapshot, {form}"][0] for form in ("with .pyc", "source"))
    table = results["table (before), with .pyc"][0]
    (snap_p50, snap_p99), (table_p50, _) = hits.values()
    load.summarize(
        args.summary,
        name="lambda_coldstart",
        what="Lambda cold start to the first cached answer (import, init, one v2 event) vs "
        "`import boto3` + client",
        headline=f"Python {version[0]}: from the package's snapshot {snapshot * 1e3:.0f} ms vs "
        f"{base * 1e3:.0f} ms, **{snapshot / base:.2f}x** with `.pyc` (goal <= 0.3x), "
        f"{source / base:.2f}x as source; before (no snapshot) {table / base:.2f}x. Warm hit "
        f"from the snapshot {snap_p50 * 1e6:.0f} us (p99 {snap_p99 * 1e6:.0f} us), from the "
        f"table without the DynamoDB call {table_p50 * 1e6:.0f} us",
    )


if __name__ == "__main__":
    main()
