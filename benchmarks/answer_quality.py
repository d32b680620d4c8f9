"""How often each model's answers pass the quality checks, on one prompt set: the figure
behind the choice of the default model (docs/cache.md, "Choosing the default model").

    .venv/bin/python benchmarks/answer_quality.py --prompts src/comeapi/data/prompts.yaml \\
        --model smollm2-135m-instruct-q4_1.gguf --model gemma-3-270m-q4_k_m.gguf \\
        [--variants 5] [--max-tokens N] [--temperature T] [--out answers.jsonl]

Each model runs in a real `comeapi backend` (batched engine, 4 slots, one thread) on a
free port; variant i of every prompt is generated once with seed i (no regeneration: the
first try is what is measured) and scored by comeapi.cache.checks. The table gives, per
prompt and model, how many variants pass every check and which checks failed; --out writes
every answer as one JSON line, to be read by a person (the checks cannot judge sense).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from comeapi.cache.checks import CheckPolicy
from comeapi.cache.generate import VariantGenerator
from comeapi.cache.key import chat_key, prompt_key
from comeapi.cache.prompts import PromptItem, load_prompt_set

REPO = Path(__file__).resolve().parent.parent
SLOTS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_backend(model_dir: Path, model: str, port: int, ctx: int) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable, "-m", "comeapi", "backend", "--model-dir", str(model_dir),
        "--default-model", model, "--port", str(port), "--slots", str(SLOTS), "--threads", "1",
        "--ctx", str(ctx),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the backend for {model} exited ({proc.returncode})")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the backend for {model} did not become healthy")


def for_model(item: PromptItem, model: str, params: dict[str, Any]) -> PromptItem:
    key = chat_key(item.messages, model) if item.messages else prompt_key(item.prompt, model)
    return replace(item, model=model, key=key, params={**item.params, **params})


async def measure(
    url: str, items: list[PromptItem], variants: int
) -> list[tuple[PromptItem, int, Any]]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=5)) as client:
        generator = VariantGenerator(client, [url], policy=CheckPolicy(), retries=0)

        slots = asyncio.Semaphore(SLOTS)  # the backend's capacity: no request waits in it

        async def one(item: PromptItem, v: int) -> tuple[PromptItem, int, Any]:
            async with slots:
                return item, v, (await generator.generate(item, v, v)).entry

        jobs = [one(item, v) for item in items for v in range(variants)]
        return list(await asyncio.gather(*jobs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=Path, default=None)
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--model-dir", type=Path, default=REPO / "models")
    parser.add_argument("--variants", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    prompt_set = load_prompt_set(args.prompts)
    params: dict[str, Any] = {}
    if args.max_tokens is not None:
        params["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        params["temperature"] = args.temperature
    print(f"load average: {os.getloadavg()[0]:.2f} (1 min); prompts: {prompt_set.source}")
    out = args.out.open("w", encoding="utf-8") if args.out else None
    summary: list[str] = []
    for model in args.model:
        items = [for_model(i, model, params) for i in prompt_set.items]
        port = free_port()
        proc = start_backend(args.model_dir, model, port, args.ctx)
        started = time.monotonic()
        try:
            results = asyncio.run(measure(f"http://127.0.0.1:{port}", items, args.variants))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        seconds = time.monotonic() - started
        print(f"\n{model} ({seconds:.0f} s)")
        passed = 0
        for item in items:
            mine = [e for i, _, e in results if i is item]
            ok = sum(1 for e in mine if not e.flags)
            passed += ok
            flags = Counter(f for e in mine for f in e.flags)
            said = ", ".join(f"{f} x{n}" for f, n in sorted(flags.items())) or "-"
            print(f"  {ok}/{len(mine)} pass  {item.kind:6} {item.prompt[:44]!r:48} {said}")
            for e in mine:
                if out is not None:
                    doc = {"model": model, "kind": e.kind, "prompt": e.prompt,
                           "variant": e.variant, "flags": list(e.flags),
                           "finish_reason": e.finish_reason, "answer": e.answer}  # fmt: skip
                    out.write(json.dumps(doc, ensure_ascii=False) + "\n")
        total = len(results)
        summary.append(f"{model}: {passed}/{total} answers pass every check")
    print("\n" + "\n".join(summary))
    if out is not None:
        out.close()


if __name__ == "__main__":
    main()
