"""An older checkout's comeapi beside the current one: its store filled with the shipped
answers by that version itself (an older comeapi may not open a store of a newer schema,
nor read a newer archive format)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Run under the older src: the archive's lines as that version's entries, resealed and
# written in its own format (its Entry drops the fields it does not know).
_DOWNGRADE = """
import json, sys
from pathlib import Path
from comeapi.cache.archive import write_jsonl
from comeapi.cache.store import Entry
lines = Path(sys.argv[1]).read_text(encoding="utf-8").splitlines()[1:]
write_jsonl([Entry.from_dict(json.loads(line)).sealed() for line in lines], Path(sys.argv[2]))
"""


def import_shipped(src: Path, store: str, shipped: Path, workdir: Path) -> None:
    """Import ``shipped`` (a ``.jsonl`` archive) into ``store`` with the comeapi in ``src``;
    if that version cannot read the archive's format, rewrite it with its own writer."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    importer = [sys.executable, "-m", "comeapi", "cache", "import", "--store", store]
    done = subprocess.run(
        [*importer, str(shipped)], capture_output=True, env=env, timeout=120, check=False
    )
    if done.returncode == 0:
        return
    older = workdir / "shipped-older-format.jsonl"
    subprocess.run(
        [sys.executable, "-c", _DOWNGRADE, str(shipped), str(older)],
        check=True,
        capture_output=True,
        env=env,
        timeout=120,
    )
    subprocess.run([*importer, str(older)], check=True, capture_output=True, env=env, timeout=120)
