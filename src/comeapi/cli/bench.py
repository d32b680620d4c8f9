"""``comeapi bench parallel``: ComeAPI's test_load_balancer.py as a command.

It connects to a gateway (or a single backend), lists the models, fires N generations at
once and prints successes, failures, total time, mean latency and aggregate tokens/s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import click
import httpx


@dataclass
class ParallelResult:
    url: str
    concurrency: int
    requests: int
    succeeded: int = 0
    failed: int = 0
    total_seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def mean_latency(self) -> float:
        return statistics.fmean(self.latencies) if self.latencies else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.total_seconds if self.total_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "mean_latency": self.mean_latency,
            "tokens_per_second": self.tokens_per_second,
        }


async def run_parallel(
    url: str,
    *,
    concurrency: int = 5,
    requests: int | None = None,
    max_tokens: int = 64,
    prompt: str = "Once upon a time in a magical forest,",
    model: str | None = None,
    temperature: float = 0.8,
    api_key: str | None = None,
    request_timeout: float = 600.0,
    use_cache: bool = False,
) -> ParallelResult:
    """``requests`` (default: ``concurrency``) POST /generate, ``concurrency`` at a time."""
    total = requests or concurrency
    result = ParallelResult(url, concurrency, total)
    headers = {} if use_cache else {"Cache-Control": "no-cache"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature}
    if model:
        body["model_name"] = model
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=request_timeout, limits=limits
    ) as client:

        async def one() -> None:
            async with gate:
                started = time.perf_counter()
                try:
                    response = await client.post("/generate", json=body)
                except httpx.HTTPError as exc:
                    result.failed += 1
                    result.errors.append(f"{type(exc).__name__}: {exc}")
                    return
                elapsed = time.perf_counter() - started
                if response.status_code != 200:
                    result.failed += 1
                    result.errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                    return
                result.succeeded += 1
                result.latencies.append(elapsed)
                usage = response.json().get("usage") or {}
                result.completion_tokens += int(usage.get("completion_tokens") or 0)

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(total)))
        result.total_seconds = time.perf_counter() - started
    return result


def _get(url: str, path: str, api_key: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(url.rstrip("/") + path, headers=headers, timeout=10.0)
    response.raise_for_status()
    data = response.json()
    return data if isinstance(data, dict) else {}


@click.group()
def bench() -> None:
    """Measure a running comeapi gateway or backend."""


@bench.command()
@click.option("--url", default="http://127.0.0.1:9000", show_default=True, help="Gateway URL.")
@click.option("--concurrency", "-c", type=click.IntRange(1, 1024), default=5, show_default=True)
@click.option(
    "--requests", "-n", type=click.IntRange(1), default=None, help="Default: --concurrency."
)
@click.option("--max-tokens", type=click.IntRange(1), default=64, show_default=True)
@click.option("--prompt", default="Once upon a time in a magical forest,", show_default=True)
@click.option("--model", default=None, help="model_name to ask for (default: the server's).")
@click.option("--temperature", type=float, default=0.8, show_default=True)
@click.option("--api-key", default=None, help="Bearer token, when the gateway requires one.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Per request (s).")
@click.option("--use-cache", is_flag=True, help="Allow cache hits (default: always generate).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def parallel(
    url: str,
    concurrency: int,
    requests: int | None,
    max_tokens: int,
    prompt: str,
    model: str | None,
    temperature: float,
    api_key: str | None,
    timeout: float,
    use_cache: bool,
    as_json: bool,
) -> None:
    """Fire N generations at once (ComeAPI's parallel test); exit 1 if any failed."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request
    echo = (lambda *_: None) if as_json else click.echo
    echo(f"target: {url}   concurrency: {concurrency}")
    try:
        status = _get(url, "/", api_key).get("status")
        models = _get(url, "/models", api_key).get("models") or []
    except (httpx.HTTPError, ValueError) as exc:
        raise click.ClickException(f"cannot reach {url}: {exc}") from None
    if isinstance(status, dict) and "total_backends" in status:
        echo(f"connected: {status['healthy_backends']}/{status['total_backends']} backends healthy")
    else:
        echo("connected")
    echo(f"models: {len(models)}")
    for m in models:
        if isinstance(m, dict):
            echo(f"  {m.get('name')} ({m.get('size_mb')} MB)")

    result = asyncio.run(
        run_parallel(
            url,
            concurrency=concurrency,
            requests=requests,
            max_tokens=max_tokens,
            prompt=prompt,
            model=model,
            temperature=temperature,
            api_key=api_key,
            request_timeout=timeout,
            use_cache=use_cache,
        )
    )
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        n = result.requests
        echo(f"succeeded:    {result.succeeded}/{n}")
        echo(f"failed:       {result.failed}/{n}")
        echo(f"total time:   {result.total_seconds:.2f} s")
        echo(f"mean latency: {result.mean_latency:.2f} s")
        echo(
            f"tokens:       {result.completion_tokens} "
            f"({result.tokens_per_second:.1f} tokens/s aggregate)"
        )
        for error in result.errors[:5]:
            echo(f"  error: {error}")
    if result.failed:
        raise SystemExit(1)
