"""The directory ``sam build`` packages for the cache function: the ``comeapi`` package (pure
Python; the runtime provides boto3), a snapshot of the table (``snapshot.py``) and the
Makefile ``sam build`` runs (the template's ``BuildMethod: makefile``).

    comeapi aws package deploy/aws/build/CacheFunction --table comeapi-cache

The template's CodeUri points at that directory (docs/aws.md, "Deploy"). The Makefile copies
the package into the build and compiles it for the runtime's Python: Lambda's /var/task is
read-only, so source without .pyc files is compiled again at every cold start, and SAM's own
Python builder would drop .pyc files.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import comeapi
from comeapi.errors import ConfigError
from comeapi.serverless.snapshot import SNAPSHOT_DIR, Snapshot, write_snapshot

if TYPE_CHECKING:
    from comeapi.cache.dynamo import DynamoStore

IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc")
FUNCTION = "CacheFunction"  # the template's logical id: sam build runs build-CacheFunction
RUNTIME = "3.12"  # the template's Runtime (python3.12); .pyc files are per Python version
MAKEFILE = """\
# Written by `comeapi aws package`. `sam build` runs this target (the template's Metadata:
# BuildMethod: makefile) in a copy of this directory, ARTIFACTS_DIR being the function's build.
# It copies the package and compiles it for the runtime's Python $(RUNTIME): Lambda's /var/task
# is read-only, so a module shipped without its .pyc is compiled again at every cold start.
# The compiler is PYTHON if set, else the first of python$(RUNTIME) on the PATH and pyenv's
# $(RUNTIME).x that runs and is $(RUNTIME) (an inactive pyenv shim on the PATH does not run).
# With none the build fails rather than ship source unnoticed; PYC=off ships source on purpose.
PYTHON  ?=
RUNTIME ?= {runtime}
PYC     ?= on
PYENV   := $(wildcard $(HOME)/.pyenv/versions/$(RUNTIME).*/bin/python$(RUNTIME))

build-{function}:
\tcp -R {copied} "$(ARTIFACTS_DIR)/"
\t@if [ "$(PYC)" = off ]; then echo "PYC=off: the package ships without .pyc files"; exit 0; fi; \\
\tfor p in $(or $(PYTHON),python$(RUNTIME) $(PYENV)); do \\
\t\tif "$$p" -c 'import sys; sys.exit("%d.%d" % sys.version_info[:2] != "$(RUNTIME)")' \\
\t\t\t2>/dev/null; then \\
\t\t\techo "compiling for Python $(RUNTIME) with $$p"; \\
\t\t\texec "$$p" -m compileall -q --invalidation-mode unchecked-hash "$(ARTIFACTS_DIR)/comeapi"; \\
\t\tfi; \\
\tdone; \\
\techo "no Python $(RUNTIME) to compile the package with (PYTHON, python$(RUNTIME) on the PATH," \\
\t\t"~/.pyenv/versions/$(RUNTIME).*): set PYTHON=/path/to/python$(RUNTIME), or PYC=off to" \\
\t\t"ship source (each cold start then compiles what it imports)" >&2; \\
\texit 1
"""


def build_package(out: Path, store: DynamoStore | None) -> Snapshot | None:
    """Write the function package to ``out`` (replacing a package there), with a snapshot of
    ``store``'s table unless ``store`` is None. Built beside ``out`` and renamed into place,
    so a failed build (the table unreachable, say) leaves the previous package whole."""
    if out.exists() and not (out / "comeapi").is_dir():
        raise ConfigError(f"{out} exists and is not a function package: not replacing it")
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        shutil.copytree(Path(comeapi.__file__).parent, partial / "comeapi", ignore=IGNORED)
        snapshot = write_snapshot(store, partial / SNAPSHOT_DIR) if store is not None else None
        copied = "comeapi" if snapshot is None else f"comeapi {SNAPSHOT_DIR}"
        makefile = MAKEFILE.format(runtime=RUNTIME, function=FUNCTION, copied=copied)
        (partial / "Makefile").write_text(makefile, encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return snapshot
