"""Every benchmark in turn, then one table of their headlines with the command behind each
(`make bench`); ``--write-readme`` puts the table into README.md between its markers.

    .venv/bin/python benchmarks/run_all.py [--quick] [--only NAME,...] [--settle 120]
        [--llama-server PATH] [--lambda-python PY] [--out DIR] [--write-readme]
    .venv/bin/python benchmarks/run_all.py --from DIR --write-readme   # an earlier run's table

Each benchmark runs as its own program with the arguments behind the README's figure
(``--quick``: the smallest that exercise it, to check the programs, not to measure),
appends its headline to a results file as one JSON line (``--summary``,
benchmarks/machine.py), and prints to the terminal and to a log beside that file. A
figure measured while the machine was busy is withheld by the benchmark itself; so that
the load one benchmark leaves does not count against the next, the runner first waits up
to ``--settle`` seconds for the 1-minute load average to fall below the quiet threshold.
A benchmark that needs something missing (llama-server, a second Python) still runs what
it can and its row says what is missing; one that fails gets a row saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from machine import QUIET_LOAD_PER_CPU, QUIET_OTHER_CPU

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
TIMEOUT = 30 * 60  # seconds for one benchmark before it is interrupted


@dataclass
class Bench:
    name: str
    script: str
    args: list[str]
    quick: list[str]  # the smallest arguments that exercise it
    doc: str = ""  # where the figure is discussed
    notes: list[str] = field(default_factory=list)  # filled in by the runner


def benchmarks(llama_server: str, lambda_python: str) -> list[Bench]:
    """The fixed list, in the README's order; each with the README figure's arguments."""
    server = ["--llama-server", llama_server] if Path(llama_server or "-").is_file() else []
    gemma = ["--default-model", "gemma-3-270m-q4_k_m.gguf"]
    python = ["--python", lambda_python] if Path(lambda_python or "-").is_file() else []
    quick_wrk = ["--rounds", "1", "--duration", "2"]
    return [
        Bench("nginx-1", "nginx_vs_gateway.py", ["--workers", "1"], ["--workers", "1", *quick_wrk],
              "docs/cache.md#how-a-hit-is-served"),
        Bench("nginx-2", "nginx_vs_gateway.py", ["--workers", "2"], ["--workers", "2", *quick_wrk],
              "docs/cache.md#how-a-hit-is-served"),
        Bench("hit", "hit_in_process.py", [], ["--hits", "200", "--rounds", "1"],
              "docs/cache.md#how-a-hit-is-served"),
        Bench("balancer", "balancer_overhead.py", ["--requests", "400"], ["--requests", "20"],
              "docs/balancer.md"),
        Bench("parallel", "parallel_throughput.py", ["--rounds", "3"],
              ["--rounds", "1", "--max-tokens", "8"], "docs/balancer.md"),
        Bench("batching", "batching.py", ["--rounds", "7", *server],
              ["--rounds", "1", "--max-tokens", "8", *server], "docs/batching.md"),
        # Gemma named: with SmolLM2 beside it in models/, the backend's default would change
        # what this row has always measured.
        Bench("backend", "backend_single.py", ["--", "--threads", "1", *gemma],
              ["--runs", "1", "--tokens", "16", "--", "--threads", "1", *gemma],
              "docs/backend.md"),
        Bench("access-log", "access_log_cost.py", ["--hits", "20000", "--rounds", "5", "--wrk"],
              ["--hits", "500", "--rounds", "1", "--wrk", "--duration", "1"],
              "docs/operations.md"),
        Bench("lambda", "lambda_coldstart.py", ["--runs", "21", "--warm", "5000", *python],
              ["--runs", "2", "--warm", "100", *python], "docs/aws.md#benchmark"),
        Bench("prefix", "prefix_reuse.py", [], ["--rounds", "1", "--requests", "1"],
              "docs/batching.md"),
        Bench("grammar", "grammar_check.py", [], ["--runs", "1"], "docs/backend.md"),
        Bench("cors", "cors_overhead.py", [], ["--hits", "500", "--rounds", "1"],
              "docs/balancer.md"),
        Bench("similar", "similar.py", [], ["--rounds", "1"], "docs/matching.md"),
        Bench("similar_serve", "similar_serve.py", [], ["--rounds", "1", "--exact-hits", "50"],
              "docs/cache.md#matching-by-meaning"),
    ]  # fmt: skip


def settle(limit: float, patience: float) -> None:
    """Wait until the 1-minute load average is below ``limit`` (at most ``patience`` s)."""
    deadline = time.monotonic() + patience
    load = os.getloadavg()[0]
    if load < limit:
        return
    print(f"waiting for the load average ({load:.2f}) to fall below {limit:.2f} ...", flush=True)
    while load >= limit and time.monotonic() < deadline:
        time.sleep(5)
        load = os.getloadavg()[0]
    print(f"load average {load:.2f}", flush=True)


def run_one(bench: Bench, args: list[str], results: Path, log: Path) -> dict[str, Any]:
    """Run one benchmark; its summary line, or a row saying why there is none."""
    # --summary before the arguments: backend_single.py passes what follows `--` on.
    argv = [sys.executable, str(REPO / "benchmarks" / bench.script)]
    argv += ["--summary", str(results), *args]
    before = results.read_text().count("\n") if results.exists() else 0
    started = time.monotonic()
    tail: list[str] = []
    with log.open("w") as out:
        # Same process group as the runner: Ctrl-C reaches the benchmark, whose own
        # clean-up then stops the servers it started.
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO
        )
        # Interrupted, not killed, when it overruns: its clean-up must still run.
        timer = threading.Timer(TIMEOUT, proc.send_signal, [signal.SIGINT])
        timer.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            out.write(line)
            tail = [*tail[-4:], line.rstrip()]
        code = proc.wait()
        timer.cancel()
    lines = results.read_text().splitlines()[before:] if results.exists() else []
    if code == 0 and lines:
        row: dict[str, Any] = json.loads(lines[-1])
    else:
        reason = next((t for t in reversed(tail) if t.strip()), "no output")
        row = {
            "name": bench.script.removesuffix(".py"),
            "what": f"`benchmarks/{bench.script}`",
            "headline": f"FAILED (exit {code}): {reason}",
            "withheld": False,
            "failed": True,
            "command": " ".join([".venv/bin/python", f"benchmarks/{bench.script}", *args]),
        }
    row["key"], row["doc"], row["log"] = bench.name, bench.doc, str(log)
    row["seconds"] = round(time.monotonic() - started)
    if bench.notes:
        row["notes"] = "; ".join(filter(None, [row.get("notes", ""), *bench.notes]))
    return row


def figure(row: dict[str, Any]) -> str:
    """The figure cell: the headline, or why it was withheld, and what did not run."""
    if row.get("withheld") and "other_busiest" in row:
        text = (
            f"WITHHELD: other processes used {row['other_busiest']:.2f} CPUs (quiet: <= "
            f"{QUIET_OTHER_CPU * row['cpus']:g}; load average {row['load_start']:.2f} at "
            f"start, {row['load_end']:.2f} at the end)"
        )
    elif row.get("withheld"):  # a row from before the other-processes guard
        limit = QUIET_LOAD_PER_CPU * row["cpus"]
        text = (
            f"WITHHELD: load average {row['load_start']:.2f} at start, {row['load_end']:.2f} "
            f"at the end (quiet: <= {limit:g} at start, <= {limit:g} + its own {row['own']:g} "
            "at the end)"
        )
    else:
        text = str(row["headline"])
    if row.get("notes"):
        text += f". {row['notes']}"
    return text


def table(rows: list[dict[str, Any]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| what | figure | command |", "|---|---|---|"]
    for row in rows:
        command = f"`{row['command']}`"
        if row.get("doc"):
            command += f" ([{row['doc'].split('#')[0]}]({row['doc']}))"
        lines.append(f"| {cell(row['what'])} | {cell(figure(row))} | {cell(command)} |")
    return "\n".join(lines)


def readme_block(rows: list[dict[str, Any]], stamp: str) -> str:
    return f"{START}\n{stamp}\n\n{table(rows)}\n{END}"


def write_readme(path: Path, block: str) -> None:
    """Replace what lies between the markers (the markers included) with ``block``."""
    text = path.read_text()
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if len(pattern.findall(text)) != 1:
        raise SystemExit(f"{path}: expected one {START} ... {END} block")
    path.write_text(pattern.sub(lambda _: block, text))


def commit() -> str:
    out = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return out.stdout.strip() or "unknown commit"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smallest arguments (a check)")
    parser.add_argument("--only", default="", help="comma-separated names (see --list)")
    parser.add_argument("--list", action="store_true", help="print the list and exit")
    parser.add_argument("--settle", type=float, default=120, help="max seconds to wait")
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER", ""))
    parser.add_argument("--lambda-python", default=os.environ.get("LAMBDA_PYTHON", ""))
    parser.add_argument("--out", type=Path, help="directory for results.jsonl and the logs")
    parser.add_argument("--write-readme", action="store_true", help="update README.md's table")
    parser.add_argument("--from", dest="source", type=Path, help="an earlier run's --out DIR")
    args = parser.parse_args()

    if args.source is not None:
        rows_text = (args.source / "rows.jsonl").read_text()
        rows = [json.loads(line) for line in rows_text.splitlines() if line]
        stamp = (args.source / "stamp.txt").read_text().strip()
    else:
        rows, stamp = run(args)
    print("\n" + table(rows))
    if args.write_readme:
        if args.quick or args.only:
            raise SystemExit("--write-readme takes the full list, not --quick or --only")
        write_readme(README, readme_block(rows, stamp))
        print(f"\nREADME.md: table between {START} and {END} rewritten")


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    chosen = benchmarks(args.llama_server, args.lambda_python)
    if args.list:
        for bench in chosen:
            print(f"{bench.name:11s} benchmarks/{bench.script} {' '.join(bench.args)}")
        raise SystemExit(0)
    if args.only:
        names = set(args.only.split(","))
        if unknown := names - {b.name for b in chosen}:
            raise SystemExit(f"unknown benchmark(s): {', '.join(sorted(unknown))} (see --list)")
        chosen = [b for b in chosen if b.name in names]
    for bench in chosen:
        if bench.script == "lambda_coldstart.py" and "--python" not in bench.args:
            bench.notes.append(
                f"Ran with this venv's Python {sys.version.split()[0]}, not Lambda's 3.12: no "
                f"interpreter at --lambda-python '{args.lambda_python}' (`make bench` makes one "
                "when a python3.12 runs, on the PATH or pyenv's)"
            )
    out = args.out or Path(tempfile.mkdtemp(prefix="comeapi-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    limit = QUIET_LOAD_PER_CPU * (os.cpu_count() or 1)
    started = time.monotonic()
    rows = []
    for i, bench in enumerate(chosen, 1):
        bench_args = bench.quick if args.quick else bench.args
        print(f"\n=== [{i}/{len(chosen)}] benchmarks/{bench.script} {' '.join(bench_args)}")
        settle(limit, args.settle)
        row = run_one(bench, bench_args, results, out / f"{bench.name}.log")
        rows.append(row)
        print(f"=== {bench.name}: {row['seconds']} s", flush=True)
    minutes = (time.monotonic() - started) / 60
    when = datetime.now(UTC).strftime("%Y-%m-%d")
    stamp = (
        f"Measured by `make bench` on {when} at `{commit()}`, {os.cpu_count()} CPUs, "
        f"{minutes:.0f} minutes{' (--quick: not results)' if args.quick else ''}."
    )
    (out / "table.md").write_text(table(rows) + "\n")
    (out / "stamp.txt").write_text(stamp + "\n")
    with (out / "rows.jsonl").open("w") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    print(f"\n{stamp}\nlogs, results.jsonl and table.md in {out}")
    return rows, stamp


if __name__ == "__main__":
    main()
