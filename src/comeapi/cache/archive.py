"""The cache archive: how a cache moves between machines and deployments (gateway, nginx, AWS).

A gzipped tar with exactly two files:
  ``manifest.json``  format name and version, key version, creation time, the prompts with
                     their variant counts, and the SHA-256 of every entry line;
  ``entries.jsonl``  one ``Entry`` per line (``Entry.to_dict``, keys sorted, UTF-8).
Reading validates everything before returning anything, so an import of a truncated,
tampered or incompatible archive fails before the store is touched. The same entry lines
without the tar (``*.jsonl``) are the reviewable form the repo ships its default cache in.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from comeapi import __version__
from comeapi.cache.key import KEY_VERSION, chat_key, prompt_key
from comeapi.cache.store import Entry
from comeapi.errors import ArchiveError, StoreError

FORMAT = "comeapi-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ENTRIES = "entries.jsonl"
MAX_BYTES = 1 << 30  # decompressed; a cache of short answers is far smaller


def entry_line(entry: Entry) -> bytes:
    """An entry as one canonical JSON line (what the per-entry SHA-256 covers)."""
    doc = json.dumps(entry.to_dict(), ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return doc.encode("utf-8") + b"\n"


def write_archive(entries: Iterable[Entry], path: Path) -> dict[str, Any]:
    """Write ``entries`` to the archive ``path`` (atomically: temp file, then rename).

    Returns the manifest. Every entry is verified first: a corrupt store is not exported.
    """
    ordered = _verified(entries)
    lines = [entry_line(e) for e in ordered]
    body = b"".join(lines)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "key_version": KEY_VERSION,
        "comeapi": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "entries": len(ordered),
        "entries_sha256": hashlib.sha256(body).hexdigest(),
        "prompts": _prompt_counts(ordered),
        "sha256": {
            _name(e): hashlib.sha256(line).hexdigest()
            for e, line in zip(ordered, lines, strict=True)
        },
    }
    head = json.dumps(manifest, ensure_ascii=False, indent=2, sort_keys=True).encode("utf-8")
    mtime = int(time.time())

    def fill(fh: io.BufferedWriter) -> None:
        with (
            gzip.GzipFile(fileobj=fh, mode="wb", mtime=mtime) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for name, data in ((MANIFEST, head), (ENTRIES, body)):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, mtime
                tar.addfile(info, io.BytesIO(data))

    _atomic_write(path, fill)
    return manifest


def write_jsonl(entries: Iterable[Entry], path: Path) -> int:
    """The entry lines alone (reviewable in a diff), written atomically; returns the count."""
    ordered = _verified(entries)
    _atomic_write(path, lambda fh: fh.writelines(entry_line(e) for e in ordered))
    return len(ordered)


def read_entries_file(path: Path) -> list[Entry]:
    """Entries of an archive, or of a ``.jsonl`` file, fully validated (else ArchiveError)."""
    return read_jsonl(path) if path.name.endswith(".jsonl") else read_archive(path)


def read_archive(path: Path) -> list[Entry]:
    """Every entry of the archive ``path``, after validating all of it; else ArchiveError."""
    raw = _read_file(path)
    files = _untar(path, _gunzip(path, raw))
    manifest = _manifest(path, files[MANIFEST])
    body = files[ENTRIES]
    if hashlib.sha256(body).hexdigest() != manifest.get("entries_sha256"):
        raise ArchiveError(f"archive {path}: {ENTRIES} does not match its SHA-256 in the manifest")
    expected = manifest.get("sha256")
    if not isinstance(expected, dict):
        raise ArchiveError(f"archive {path}: manifest has no per-entry sha256 table")
    entries = []
    for n, line in enumerate(body.splitlines(keepends=True), start=1):
        entry = _parse_line(path, n, line)
        if expected.get(_name(entry)) != hashlib.sha256(line).hexdigest():
            raise ArchiveError(
                f"archive {path}: {ENTRIES} line {n} ({_name(entry)}) does not match its "
                "SHA-256 in the manifest"
            )
        entries.append(entry)
    _check_set(path, entries)
    if len(entries) != manifest.get("entries") or len(entries) != len(expected):
        raise ArchiveError(
            f"archive {path}: holds {len(entries)} entries, the manifest lists "
            f"{manifest.get('entries')} (truncated or tampered)"
        )
    if _prompt_counts(entries) != manifest.get("prompts"):
        raise ArchiveError(f"archive {path}: variant counts per prompt differ from the manifest")
    return entries


def read_jsonl(path: Path) -> list[Entry]:
    body = _read_file(path)
    entries = [_parse_line(path, n, line) for n, line in enumerate(body.splitlines(), start=1)]
    _check_set(path, entries)
    return entries


# --- validation ---------------------------------------------------------------------------


def entry_problem(entry: Entry) -> str | None:
    """Why ``entry`` cannot be trusted (checksum, key, shape), or None."""
    if entry.checksum != entry.compute_checksum():
        return "fails its checksum"
    if entry.variant < 0:
        return "has a negative variant"
    if entry.kind == "chat" and entry.messages:
        key = chat_key(entry.messages, entry.model)
    elif entry.kind == "prompt" and entry.messages is None:
        key = prompt_key(entry.prompt, entry.model)
    else:
        return f"has kind {entry.kind!r} but messages {entry.messages!r}"
    if key != entry.key:
        return "has a key that is not the key of its prompt and model (another key version?)"
    return None


def _parse_line(path: Path, n: int, line: bytes) -> Entry:
    try:
        doc = json.loads(line)
        if not isinstance(doc, dict):
            raise TypeError("not a JSON object")
        entry = Entry.from_dict(doc)
    except (ValueError, TypeError, KeyError) as exc:
        raise ArchiveError(f"{path}: line {n} is not a valid entry: {exc!r}") from None
    problem = entry_problem(entry)
    if problem:
        raise ArchiveError(f"{path}: line {n}: entry {_name(entry)} {problem}")
    return entry


def _check_set(path: Path, entries: list[Entry]) -> None:
    dupes = [name for name, n in Counter(_name(e) for e in entries).items() if n > 1]
    if dupes:
        raise ArchiveError(f"{path}: entry {dupes[0]} appears more than once")


def _verified(entries: Iterable[Entry]) -> list[Entry]:
    ordered = sorted(entries, key=lambda e: (e.key, e.variant))
    for e in ordered:
        problem = entry_problem(e)
        if problem:
            raise StoreError(f"entry {_name(e)} {problem}: not exported", code="store_corrupt")
    return ordered


def _prompt_counts(entries: list[Entry]) -> list[dict[str, Any]]:
    first: dict[str, Entry] = {}
    counts: Counter[str] = Counter()
    for e in entries:
        first.setdefault(e.key, e)
        counts[e.key] += 1
    return [
        {"key": k, "kind": e.kind, "model": e.model, "prompt": e.prompt, "variants": counts[k]}
        for k, e in sorted(first.items())
    ]


def _name(entry: Entry) -> str:
    return f"{entry.key}#{entry.variant}"


# --- bytes on disk ------------------------------------------------------------------------


def _read_file(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ArchiveError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_BYTES:
        raise ArchiveError(f"{path} is larger than {MAX_BYTES} bytes: not a comeapi cache")
    return raw


def _gunzip(path: Path, raw: bytes) -> bytes:
    # zlib checks the gzip trailer (CRC and length), which tarfile alone would not reach.
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(raw, MAX_BYTES + 1)
    except zlib.error as exc:
        raise ArchiveError(f"archive {path} is not a valid gzip file ({exc})") from None
    if len(data) > MAX_BYTES:
        raise ArchiveError(f"archive {path} unpacks to more than {MAX_BYTES} bytes")
    if not inflater.eof:
        raise ArchiveError(f"archive {path} is truncated (the gzip stream ends early)")
    if inflater.unused_data:
        raise ArchiveError(f"archive {path} has trailing bytes after the gzip stream")
    return data


def _untar(path: Path, data: bytes) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if member.name not in (MANIFEST, ENTRIES) or not member.isfile():
                    raise ArchiveError(f"archive {path}: unexpected member {member.name!r}")
                if member.name in files:
                    raise ArchiveError(f"archive {path}: {member.name} appears twice")
                fh = tar.extractfile(member)
                content = fh.read() if fh is not None else b""
                if len(content) != member.size:
                    raise ArchiveError(f"archive {path}: {member.name} is truncated")
                files[member.name] = content
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveError(f"archive {path} is not a valid tar archive ({exc})") from None
    for name in (MANIFEST, ENTRIES):
        if name not in files:
            raise ArchiveError(f"archive {path} has no {name}: not a comeapi cache archive")
    return files


def _manifest(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise ArchiveError(f"archive {path}: {MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArchiveError(
            f"archive {path} is not a comeapi cache archive (format is not {FORMAT!r})"
        )
    if manifest.get("version") != FORMAT_VERSION:
        raise ArchiveError(
            f"archive {path} has format version {manifest.get('version')!r}; this comeapi "
            f"reads version {FORMAT_VERSION} (export it again with a matching comeapi)"
        )
    if manifest.get("key_version") != KEY_VERSION:
        raise ArchiveError(
            f"archive {path} uses cache key version {manifest.get('key_version')!r}; this "
            f"comeapi uses version {KEY_VERSION}"
        )
    return manifest


def _atomic_write(path: Path, fill: Callable[[io.BufferedWriter], object]) -> None:
    """Write ``path`` through ``fill`` so readers see the old file or the whole new one."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise ArchiveError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
