"""Cold start and warm time of the Lambda handler, measured side by side in one run.

Cold: a fresh interpreter per sample, the programs interleaved, time measured inside the child
(interpreter start-up excluded: Lambda's init phase starts after it):
  baseline  ``import boto3; boto3.client("dynamodb")``
  handler   ``import comeapi.serverless.handler`` with AWS_LAMBDA_FUNCTION_NAME and TABLE_NAME
            set, so the import also builds the app and its DynamoDB client, as in Lambda.
The handler runs from a copy of src/comeapi, as ``sam build`` packages it: once as plain
source (Lambda's /var/task is read-only, so Python compiles it at every cold start) and once
with .pyc files compiled in (``compileall --invalidation-mode unchecked-hash``, docs/aws.md).
boto3 is precompiled, as in the Lambda runtime. Goal: handler / baseline <= 1.10 (medians).

Warm: one ServerlessApp answering a payload v2 event for a cached prompt, DynamoDB call
excluded: (a) with an in-memory client (the handler's own work), (b) with botocore's Stubber
(adds botocore's parameter validation and event hooks, still no network).

    .venv/bin/python benchmarks/lambda_coldstart.py [--runs 21] [--warm 5000]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import py_compile
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CHILD_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    "AWS_LAMBDA_FUNCTION_NAME": "comeapi-bench",
    "TABLE_NAME": "comeapi-bench",
    "PYTHONDONTWRITEBYTECODE": "1",
}
SRC = Path(__file__).resolve().parent.parent / "src" / "comeapi"
BASELINE = """
import sys, time
t, c = time.perf_counter(), time.process_time()
import boto3
boto3.client("dynamodb")
print(time.perf_counter() - t, time.process_time() - c)
"""
HANDLER = """
import sys, time
t, c = time.perf_counter(), time.process_time()
import comeapi.serverless.handler as h
wall, cpu = time.perf_counter() - t, time.process_time() - c
assert h.default_app.cache_info().currsize == 1, "the app was not built at import"
assert h.__file__.startswith(sys.argv[1]), h.__file__
print(wall, cpu)
"""
EXTRA_MODULES = """
import sys
import boto3
boto3.client("dynamodb")
before = set(sys.modules)
import comeapi.serverless.handler
print(" ".join(sorted(set(sys.modules) - before)))
"""


def child(code: str, package: Path | None = None) -> tuple[float, float]:
    """(wall, CPU) seconds the child spent; CPU time is what a busy machine disturbs least."""
    env = {**os.environ, **CHILD_ENV}
    argv = [sys.executable, "-c", code]
    if package is not None:
        env["PYTHONPATH"] = str(package)
        argv.append(str(package))
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True, timeout=60)
    wall, cpu = out.stdout.split()
    return float(wall), float(cpu)


def package(into: Path, *, compiled: bool) -> Path:
    """src/comeapi copied as ``sam build`` would, optionally with .pyc files compiled in."""
    shutil.copytree(SRC, into / "comeapi", ignore=shutil.ignore_patterns("__pycache__"))
    if compiled:
        compileall.compile_dir(
            into / "comeapi",
            quiet=1,
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
        )
    return into


def cold(runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source = package(Path(tmp) / "source", compiled=False)
        compiled = package(Path(tmp) / "compiled", compiled=True)
        programs = {
            "import boto3 + DynamoDB client": (BASELINE, None),
            "import handler, source package": (HANDLER, source),
            "import handler, with .pyc": (HANDLER, compiled),
        }
        for code, pkg in programs.values():
            child(code, pkg)  # warm the OS file cache first
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in programs}
        for _ in range(runs):
            for name, (code, pkg) in programs.items():
                samples[name].append(child(code, pkg))
        extra = subprocess.run(
            [sys.executable, "-c", EXTRA_MODULES],
            env={**os.environ, **CHILD_ENV, "PYTHONPATH": str(compiled)},
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.split()
    print(f"cold start: fresh interpreter, {runs} runs each, interleaved (medians)")
    print(f"  {'':34s} {'wall':>9s} {'ratio':>7s} {'CPU':>9s} {'ratio':>7s}")
    base = [
        statistics.median(x[i] for x in samples["import boto3 + DynamoDB client"]) for i in (0, 1)
    ]
    for name, values in samples.items():
        wall, cpu = (statistics.median(x[i] for x in values) for i in (0, 1))
        print(
            f"  {name:34s} {wall * 1e3:6.1f} ms {wall / base[0]:6.3f}x"
            f" {cpu * 1e3:6.1f} ms {cpu / base[1]:6.3f}x"
        )
    print("  goal: handler <= 1.10x of the baseline")
    print(f"  modules the handler adds ({len(extra)}): {' '.join(extra)}")


def _item_store() -> tuple[dict[str, Any], dict[str, Any], str]:
    from comeapi.cache.dynamo_items import Catalogue, encode_catalogue, encode_entry
    from comeapi.cache.key import prompt_key
    from comeapi.cache.store import Entry, PromptInfo

    model = "gemma-3-270m-q4_k_m.gguf"
    prompt = "日本の首都はどこですか"
    key = prompt_key(prompt, model)
    entry = Entry(
        key=key,
        variant=0,
        kind="prompt",
        prompt=prompt,
        answer="東京です。" * 40,
        model=model,
        params={"temperature": 0.8},
        prompt_tokens=8,
        completion_tokens=100,
        created=time.time(),
    ).sealed()
    catalogue = encode_catalogue(Catalogue(1, (PromptInfo(key, "prompt", prompt, model, 1),)))
    return encode_entry(entry), catalogue, prompt


class MemoryClient:
    """The two GetItem answers the handler needs, from memory."""

    def __init__(self, item: dict[str, Any], catalogue: dict[str, Any]):
        self.item, self.catalogue = item, catalogue

    def get_item(self, **kwargs: Any) -> dict[str, Any]:
        is_catalogue = kwargs["Key"]["key"]["S"].startswith("#")
        return {"Item": self.catalogue if is_catalogue else self.item}


def warm(n: int) -> None:
    import boto3
    from botocore.stub import Stubber

    from comeapi.cache.dynamo import DynamoStore
    from comeapi.serverless.events import http_api_event
    from comeapi.serverless.handler import ServerlessApp

    item, catalogue, prompt = _item_store()
    body = json.dumps({"prompt": prompt, "model_name": "gemma-3-270m-q4_k_m.gguf"}).encode()
    event = http_api_event("POST", "/generate", body=body)

    def timed(app: ServerlessApp, count: int) -> list[float]:
        assert app(event, None)["statusCode"] == 200  # loads the catalogue
        samples = []
        for _ in range(count):
            t = time.perf_counter()
            result = app(event, None)
            samples.append(time.perf_counter() - t)
        assert result["statusCode"] == 200
        return samples

    memory = timed(ServerlessApp(DynamoStore(MemoryClient(item, catalogue), "t")), n)
    for k, v in CHILD_ENV.items():
        os.environ.setdefault(k, v)
    client = boto3.client("dynamodb", region_name="us-east-1")
    stub = Stubber(client)
    stubbed_n = max(1, n // 5)
    stub.add_response("get_item", {"Item": catalogue})
    for _ in range(stubbed_n + 1):  # + the first call, which also reads the catalogue
        stub.add_response("get_item", {"Item": item})
    with stub:
        stubbed = timed(ServerlessApp(DynamoStore(client, "t")), stubbed_n)
    print("warm invocation, DynamoDB call excluded (median / p99)")
    for label, samples in (
        (f"in-memory client, {n} calls", memory),
        (f"botocore Stubber, {stubbed_n} calls", stubbed),
    ):
        samples.sort()
        p99 = samples[int(len(samples) * 0.99) - 1]
        median = statistics.median(samples)
        print(f"  {label:34s} {median * 1e6:8.1f} us / {p99 * 1e6:8.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=21, help="cold start samples per program")
    parser.add_argument("--warm", type=int, default=5000, help="warm invocations")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    cold(args.runs)
    warm(args.warm)


if __name__ == "__main__":
    main()
