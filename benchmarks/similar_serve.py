"""Similar matching as clients get it: ``comeapi serve --match similar`` beside ``--match
exact``, both over the shipped default store (its answers and calibration), over HTTP.

    .venv/bin/python benchmarks/similar_serve.py [--heldout tests/similar/heldout-shipped.yaml]
        [--rounds 3] [--exact-hits 200]

Starts each gateway itself (a fresh XDG_DATA_HOME, so the default store is seeded from
src/comeapi/data/default-cache.jsonl; no backends, so a miss is a 404), sends every held-out
query of the shipped prompts (never used for calibration) and prints, per server:
paraphrases served as their prompt (cross-language apart), paraphrases answered as another
prompt, near neighbours answered with their 95% upper bound (Clopper-Pearson); the latency
of a similar hit beside an exact hit (client wall time, p50/p99, one keep-alive connection)
and the gateway's CPU per request (its /proc counters over each phase); and each gateway's
RSS once loaded, the difference being what matching costs in memory. The targets and the
tally are benchmarks/similar.py's.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import unquote

import httpx

from comeapi.cache.prompts import PromptItem, load_prompt_set
from comeapi.similar import upper_bound
from machine import Load, add_summary_option, process_cpu_seconds
from similar import REPO, Tally, ms, query_key, run  # benchmarks/similar.py


class Gateway:
    """``comeapi serve --match MATCH`` on a free port, in its own session (stopped by PID)."""

    def __init__(self, match: str, port: int, data_home: Path):
        env = {**os.environ, "XDG_DATA_HOME": str(data_home), "COMEAPI_LOG_LEVEL": "warning"}
        argv = [sys.executable, "-m", "comeapi", "serve", "--port", str(port), "--match", match]
        self.url = f"http://127.0.0.1:{port}"
        self.name = f"serve --match {match}"
        self.proc = subprocess.Popen(
            argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL
        )
        self.client = httpx.Client(timeout=30)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if self.client.get(self.url + "/status").status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise SystemExit(f"{self.name} did not start")

    def answer(self, item: PromptItem, query: str) -> str | None:
        if item.messages is None:
            r = self.client.post(self.url + "/v1/completions", json={"prompt": query})
        else:
            messages = [{"role": r, "content": c} for r, c in item.messages[:-1]]
            messages.append({"role": "user", "content": query})
            r = self.client.post(self.url + "/v1/chat/completions", json={"messages": messages})
        if r.status_code == 404:
            return None
        r.raise_for_status()
        if r.headers.get("x-cache-match") == "similar":
            return query_key(item, unquote(r.headers["x-cache-prompt"]))
        return query_key(item, query)

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def cpu(self) -> float:
        return process_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        self.client.close()
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def exact_hits(gateway: Gateway, items: list[PromptItem], count: int) -> tuple[list[float], float]:
    """Wall seconds of ``count`` exact hits (the shipped prompts in turn) and the gateway's
    CPU seconds per hit."""
    walls = []
    cpu = gateway.cpu()
    for n in range(count):
        item = items[n % len(items)]
        text = item.prompt if item.messages is None else item.messages[-1][1]
        start = time.perf_counter()
        assert gateway.answer(item, text) == item.key
        walls.append(time.perf_counter() - start)
    return walls, (gateway.cpu() - cpu) / count


def report(name: str, t: Tally) -> str:
    bound = upper_bound(len(t.false_hits), t.near)
    return (
        f"{name}: paraphrases served {t.served}/{t.same} ({t.served / t.same:.0%}), "
        f"cross-language {t.cross_served}/{t.cross}; answered as another prompt "
        f"{len(t.wrong)}; near neighbours answered {len(t.false_hits)}/{t.near} "
        f"(95% bound {bound:.1%})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heldout", type=Path, default=REPO / "tests/similar/heldout-shipped.yaml")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes over the queries")
    parser.add_argument("--exact-hits", type=int, default=200, help="exact hits timed")
    add_summary_option(parser)
    args = parser.parse_args()

    shipped = load_prompt_set().items
    by_key = {i.key: i for i in shipped}
    # Sent as the shipped prompt's kind and context (the held-out items name them exactly).
    heldout = [
        replace(by_key[h.key], same=h.same, not_=h.not_)
        for h in load_prompt_set(args.heldout).items
    ]
    load = Load(own=1.0)
    results: dict[str, tuple[Tally, list[float], float, float, float]] = {}
    for match in ("exact", "similar"):
        with tempfile.TemporaryDirectory(prefix="comeapi-bench-similar-") as home:
            gateway = Gateway(match, free_port(), Path(home))
            try:
                rss = gateway.rss_mb()
                walls, exact_cpu = exact_hits(gateway, shipped, args.exact_hits)
                cpu = gateway.cpu()
                tally = run(gateway, heldout, args.rounds)
                queries = len(tally.hit_wall) + len(tally.miss_wall)
                query_cpu = (gateway.cpu() - cpu) / queries
                results[match] = (tally, walls, exact_cpu, query_cpu, rss)
            finally:
                gateway.stop()
        load.between_rounds()
    load.finish()
    for match, (t, walls, exact_cpu, query_cpu, rss) in results.items():
        print(report(f"serve --match {match}", t))
        print(
            f"  RSS once loaded {rss:.0f} MB; exact hits p50 {ms(walls, 0.5):.2f} ms, p99 "
            f"{ms(walls, 0.99):.2f} ms wall, gateway CPU {1000 * exact_cpu:.2f} ms per hit"
        )
        print(
            f"  held-out queries: hits p50 {ms(t.hit_wall, 0.5):.2f} ms, p99 "
            f"{ms(t.hit_wall, 0.99):.2f} ms wall; misses p50 {ms(t.miss_wall, 0.5):.2f} ms; "
            f"gateway CPU {1000 * query_cpu:.2f} ms per query"
        )
        for query in t.wrong:
            print(f"  answered as another prompt: {query}")
        for query in t.false_hits:
            print(f"  near neighbour answered: {query}")
    similar, exact = results["similar"], results["exact"]
    added = ms(similar[0].hit_wall, 0.5) - ms(similar[1], 0.5)
    t = similar[0]
    headline = (
        f"serve --match similar: {t.served}/{t.same} held-out paraphrases served "
        f"({t.cross_served}/{t.cross} cross-language), {len(t.wrong)} as another prompt, "
        f"{len(t.false_hits)}/{t.near} near neighbours answered; a similar hit adds "
        f"{added:.1f} ms p50 over an exact hit; RSS +{similar[4] - exact[4]:.0f} MB over "
        f"--match exact ({exact[0].served}/{exact[0].same} served)"
    )
    print(load.verdict(headline))
    load.summarize(
        args.summary,
        name="similar_serve",
        what="serve --match similar vs exact on tests/similar/heldout-shipped.yaml",
        headline=headline,
    )


if __name__ == "__main__":
    sys.exit(main())
