"""The cache archive: how a cache moves between machines and deployments (gateway, nginx, AWS).

A gzipped tar with exactly two files:
  ``manifest.json``  format name and version, key version, creation time, the prompts with
                     their variant counts, and the SHA-256 of every entry line;
  ``entries.jsonl``  one ``Entry`` per line (``Entry.to_dict``, keys sorted, UTF-8).
Reading validates everything before returning anything, so an import of a truncated,
tampered or incompatible archive fails before the store is touched; it streams, under the
ceilings below, the manifest first and each entry line checked against it as it comes, so a
hostile archive (a gzip bomb, a sparse member, a forged manifest) costs no more memory than a
good one. The same entry lines without the tar (``*.jsonl``), after one header line with
their count and SHA-256, are the reviewable form the repo ships its default cache in.

Version 2 entry lines carry the review (state, flags, pinned, history); version 1 files
(from before review) are still read, their entries ``pending``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import tarfile
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from comeapi import __version__
from comeapi.cache.key import KEY_VERSION, chat_key, prompt_key
from comeapi.cache.store import Entry
from comeapi.errors import ArchiveError, StoreError

FORMAT = "comeapi-cache"
JSONL_FORMAT = "comeapi-cache-jsonl"
FORMAT_VERSION = 2
#: Versions this comeapi reads: 1 has no review fields (its entries read as pending).
READ_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
#: The manifest's (or .jsonl header's) optional field with the store's calibration (its
#: ``similar.Calibration`` as JSON): files without it, older ones included, read as before.
CALIBRATION = "calibration"
ENTRIES = "entries.jsonl"

# Ceilings, checked before anything is allocated (a cache of short answers is far smaller:
# the shipped 50 answers are 35 KB; 16 MiB of lines is some 24,000 such answers). Reading
# holds the manifest, one line and the entries read so far, so that the largest archive
# within them peaks under 300 MB as a process (tests/cache/test_archive_limits.py: entries
# of 1,000 one-letter chat messages are the most objects per byte, ten times their text).
MAX_ENTRIES_BYTES = 16 << 20
MAX_MANIFEST_BYTES = 16 << 20
MAX_LINE_BYTES = 4 << 20
MAX_ENTRIES = 50_000
# JSON values a manifest may hold (counted by their separators before it is parsed): a
# 16 MiB manifest of empty lists parses into 450 MB; a real one holds about 2 per entry and
# 11 per prompt.
MAX_MANIFEST_VALUES = 20 * MAX_ENTRIES
MEMBER_LIMITS = {MANIFEST: MAX_MANIFEST_BYTES, ENTRIES: MAX_ENTRIES_BYTES}
MAX_TAR_BYTES = MAX_ENTRIES_BYTES + MAX_MANIFEST_BYTES + (1 << 20)  # + headers and padding
MAX_VARIANT = 1 << 31
MAX_TOKENS = 1 << 53  # an exact float too, so every store keeps it as it is
BLOCK = 512
RECORD = 64 << 10  # tar pads to 10 KiB records; allow for other writers' record sizes
CHUNK = 64 << 10


def entry_line(entry: Entry) -> bytes:
    """An entry as one canonical JSON line (what the per-entry SHA-256 covers)."""
    doc = json.dumps(entry.to_dict(), ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return doc.encode("utf-8") + b"\n"


def write_archive(
    entries: Iterable[Entry], path: Path, calibration: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``entries`` to the archive ``path`` (atomically: temp file, then rename), with
    the store's similar-matching ``calibration`` in the manifest when it has one.

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
    if calibration is not None:
        manifest[CALIBRATION] = calibration
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


def write_jsonl(
    entries: Iterable[Entry], path: Path, calibration: dict[str, Any] | None = None
) -> int:
    """A header line, then the entry lines (reviewable in a diff), written atomically;
    returns the count. The header holds the count, the SHA-256 of the entry lines and the
    store's similar-matching ``calibration`` when it has one."""
    ordered = _verified(entries)
    lines = [entry_line(e) for e in ordered]
    header = {
        "format": JSONL_FORMAT,
        "version": FORMAT_VERSION,
        "key_version": KEY_VERSION,
        "entries": len(lines),
        "entries_sha256": hashlib.sha256(b"".join(lines)).hexdigest(),
    }
    if calibration is not None:
        header[CALIBRATION] = calibration
    head = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    head += "\n"
    _atomic_write(path, lambda fh: fh.writelines([head.encode("utf-8"), *lines]))
    return len(ordered)


def read_entries_file(path: Path) -> list[Entry]:
    """Entries of an archive, or of a ``.jsonl`` file, fully validated (else ArchiveError)."""
    return read_jsonl(path) if path.name.endswith(".jsonl") else read_archive(path)


def read_calibration(path: Path) -> dict[str, Any] | None:
    """The calibration an archive's manifest or a ``.jsonl`` header carries (checked by
    ``similar.Calibration.from_dict`` where it is used); None for a file without one, such
    as every file written before similar matching."""
    with _open(path) as fh:
        if path.name.endswith(".jsonl"):
            first = fh.readline(MAX_LINE_BYTES + 1)
            head = _jsonl_header(str(path), first) if first.endswith(b"\n") else {}
        else:
            tar = _TarStream(path, _Gunzip(path, fh, limit=MAX_TAR_BYTES))
            member = next(tar.members(), None)
            head = {} if member is None else _manifest_document(path, tar.read_member(member))
    doc = head.get(CALIBRATION)
    return doc if isinstance(doc, dict) else None


def read_archive(path: Path) -> list[Entry]:
    """Every entry of the archive ``path``, after validating all of it; else ArchiveError.

    Read as a stream under fixed ceilings: nothing a header declares is allocated before it
    has been checked, so a small hostile file cannot make the import large. The manifest
    comes first (comeapi writes it first) and is checked before any entry is read; each
    entry line is then checked against it as it arrives (its SHA-256, its prompt's variant
    count), so a forged or mismatched archive is refused at its first bad line, holding at
    most the entries before it.
    """
    with _open(path) as fh:
        tar = _TarStream(path, _Gunzip(path, fh, limit=MAX_TAR_BYTES))
        members = tar.members()
        first = next(members, None)
        if first is None or first.name != MANIFEST:
            raise ArchiveError(
                f"archive {path} has no {MANIFEST} as its first member: not a comeapi cache "
                "archive (comeapi writes its manifest first)"
            )
        manifest = _Manifest(path, tar.read_member(first))
        second = next(members, None)
        if second is None:
            raise ArchiveError(f"archive {path} has no {ENTRIES}: not a comeapi cache archive")
        reader = _EntryReader(f"archive {path}: {ENTRIES}", manifest=manifest)
        reader.read_lines(tar.member_chunks(second))
        for extra in members:  # _TarStream refuses a third member by name: never reached
            raise ArchiveError(f"archive {path}: unexpected member {extra.name!r}")
        tar.finish()
    manifest.check_complete(reader)
    entries = reader.entries()
    _check_review(f"archive {path}", manifest.version, entries)
    return entries


def read_jsonl(path: Path) -> list[Entry]:
    """Every entry of a ``.jsonl`` export: its header line first (format, count, SHA-256 of
    the entry lines), so a file cut anywhere, even between two lines, is refused."""
    reader = _EntryReader(str(path), header=True)
    with _open(path) as fh:
        reader.read_lines(_file_chunks(path, fh, MAX_ENTRIES_BYTES + MAX_LINE_BYTES))
    header = reader.header
    if header is None:
        raise ArchiveError(
            f"{path} is empty: a .jsonl export starts with its header line "
            "(write one with `comeapi cache export FILE.jsonl`)"
        )
    entries = reader.entries()
    if len(entries) != header.get("entries"):
        raise ArchiveError(
            f"{path}: holds {len(entries)} entries, its header lists {header.get('entries')} "
            "(truncated or tampered)"
        )
    if reader.body_sha256() != header.get("entries_sha256"):
        raise ArchiveError(f"{path}: the entry lines do not match the SHA-256 in its header")
    reader.check_entries()
    _check_review(str(path), header["version"], entries)
    return entries


# --- validation ---------------------------------------------------------------------------


def entry_problem(entry: Entry) -> str | None:
    """Why ``entry`` cannot be trusted (checksum, key, shape), or None."""
    if entry.checksum != entry.compute_checksum():
        return "fails its checksum"
    if not 0 <= entry.variant <= MAX_VARIANT:
        return f"has variant {entry.variant}, outside 0..{MAX_VARIANT}"
    for name in ("prompt_tokens", "completion_tokens"):
        count = getattr(entry, name)
        if not 0 <= count <= MAX_TOKENS:
            return f"has {name} {count}, outside 0..{MAX_TOKENS}"
    if not math.isfinite(entry.created):
        return f"has a creation time of {entry.created}"
    if list(entry.flags) != sorted(set(entry.flags)):
        return "has flags that are not sorted and distinct"
    if entry.pinned and entry.state == "rejected":
        return "is pinned and rejected"
    if entry.kind == "chat" and entry.messages:
        key = chat_key(entry.messages, entry.model)
    elif entry.kind == "prompt" and entry.messages is None:
        key = prompt_key(entry.prompt, entry.model)
    else:
        return f"has kind {entry.kind!r} but messages {entry.messages!r}"
    if key != entry.key:
        return "has a key that is not the key of its prompt and model (another key version?)"
    return None


def _check_review(where: str, version: int, entries: list[Entry]) -> None:
    """A version 1 file was written before review existed: review fields in it are forged."""
    if version >= 2:
        return
    for entry in entries:
        if entry.state != "pending" or entry.flags or entry.pinned or entry.history:
            raise ArchiveError(
                f"{where}: format version 1 has no review state, yet entry {_name(entry)} "
                "carries one"
            )


def _parse_line(where: str, n: int, line: bytes) -> Entry:
    try:
        return Entry.from_dict(_json_object(line))
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise ArchiveError(f"{where}: line {n} is not a valid entry: {_short(exc)}") from None


def _check_entry(where: str, n: int, entry: Entry) -> None:
    try:
        problem = entry_problem(entry)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        problem = f"cannot be checked ({_short(exc)})"
    if problem:
        raise ArchiveError(f"{where}: line {n}: entry {_name(entry)} {problem}")


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except RecursionError:  # "[[[[...": the parser's stack, not ours, is the limit
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise TypeError("not a JSON object")
    return doc


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 200 else text[:199] + "…"


class _EntryReader:
    """Entry lines read one at a time (each at most MAX_LINE_BYTES, at most MAX_ENTRIES of
    them), parsed and checked as they come; duplicates are refused at once. With
    ``header``, the first line is the .jsonl header rather than an entry; with
    ``manifest``, each line must be the one the manifest lists."""

    def __init__(
        self, where: str, *, header: bool = False, manifest: _Manifest | None = None
    ) -> None:
        self.where = where
        self.want_header = header
        self.header: dict[str, Any] | None = None
        self.manifest = manifest
        self.lines: list[tuple[int, Entry]] = []
        self._names: set[str] = set()
        self._body = hashlib.sha256()

    def read_lines(self, chunks: Iterable[bytes]) -> None:
        for n, line in enumerate(_lines(self.where, chunks), start=1):
            if self.want_header and n == 1:
                self.header = _jsonl_header(self.where, line)
                continue
            entry = _parse_line(self.where, n, line)
            name = _name(entry)
            if name in self._names:
                raise ArchiveError(f"{self.where}: entry {name} appears more than once")
            if len(self.lines) == self._most():
                listed = "the header lists" if self.manifest is None else "the manifest lists"
                raise ArchiveError(
                    f"{self.where}: more than {self._most()} entries ({listed} fewer, or the "
                    "ceiling of a comeapi cache)"
                )
            self._names.add(name)
            self._body.update(line)
            if self.manifest is not None:
                # The hash first: it says most precisely what was changed.
                self.manifest.check_sha256(self.where, n, entry, line)
                _check_entry(self.where, n, entry)
                self.manifest.check_prompt(n, entry)
            self.lines.append((n, entry))

    def _most(self) -> int:
        """How many entries may come: what the manifest or header lists, within MAX_ENTRIES."""
        if self.manifest is not None:
            return self.manifest.entries
        listed = self.header.get("entries") if self.header is not None else None
        return listed if type(listed) is int and 0 <= listed <= MAX_ENTRIES else MAX_ENTRIES

    def body_sha256(self) -> str:
        return self._body.hexdigest()

    def check_entries(self) -> None:
        """Each entry's checksum, key and ranges (after the hash over the lines, which
        says more precisely what was changed)."""
        for n, entry in self.lines:
            _check_entry(self.where, n, entry)

    def entries(self) -> list[Entry]:
        return [entry for _, entry in self.lines]


def _jsonl_header(where: str, line: bytes) -> dict[str, Any]:
    try:
        header = _json_object(line)
    except (ValueError, TypeError):
        header = {}
    if header.get("format") != JSONL_FORMAT:
        raise ArchiveError(
            f"{where}: line 1 is not a comeapi .jsonl header (written by `comeapi cache export "
            "FILE.jsonl`, it gives the format, the entry count and their SHA-256)"
        )
    if not _readable(header.get("version")) or header.get("key_version") != KEY_VERSION:
        raise ArchiveError(
            f"{where}: format version {header.get('version')!r}, key version "
            f"{header.get('key_version')!r}; this comeapi reads {_versions()} and "
            f"{KEY_VERSION}"
        )
    return header


def _lines(where: str, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Lines (with their newline) of a byte stream; a line longer than MAX_LINE_BYTES, or a
    last line without its newline (a file cut short), is refused."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        start = 0
        while (end := pending.find(b"\n", start)) >= 0:
            yield pending[start : end + 1]
            start = end + 1
        pending = pending[start:]
        if len(pending) > MAX_LINE_BYTES:
            raise ArchiveError(f"{where}: a line is longer than {MAX_LINE_BYTES} bytes")
    if pending:
        raise ArchiveError(f"{where}: the last line has no newline (the file is truncated)")


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
    return [{**_prompt_record(e), "variants": counts[k]} for k, e in sorted(first.items())]


def _prompt_record(entry: Entry) -> dict[str, Any]:
    """What the manifest says of an entry's prompt (without its variant count)."""
    return {"key": entry.key, "kind": entry.kind, "model": entry.model, "prompt": entry.prompt}


def _name(entry: Entry) -> str:
    return f"{entry.key}#{entry.variant}"


# --- bytes on disk ------------------------------------------------------------------------


@contextlib.contextmanager
def _open(path: Path) -> Iterator[BinaryIO]:
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise ArchiveError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        yield fh
    except OSError as exc:
        raise ArchiveError(f"cannot read {path}: {exc.strerror or exc}") from exc
    finally:
        fh.close()


def _file_chunks(path: Path, fh: BinaryIO, limit: int) -> Iterator[bytes]:
    total = 0
    while chunk := fh.read(CHUNK):
        total += len(chunk)
        if total > limit:
            raise ArchiveError(f"{path} is larger than {limit} bytes: not a comeapi cache")
        yield chunk


class _Gunzip:
    """A gzip file inflated on demand, never more than ``limit`` bytes in all. zlib checks
    the gzip trailer (CRC and length), which a tar reader alone would not reach."""

    def __init__(self, path: Path, fh: BinaryIO, *, limit: int):
        self.path = path
        self._fh = fh
        self._limit = limit
        self._total = 0
        self._inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        self._buffer = bytearray()

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes (fewer only at the end of the stream)."""
        while len(self._buffer) < size and not self._inflater.eof:
            self._inflate(size - len(self._buffer))
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out

    def finish(self, slack: int) -> None:
        """Read to the end, which must come within ``slack`` bytes (tar's zero padding) and
        be followed by nothing."""
        left = slack - len(self._buffer)
        self._buffer.clear()
        while not self._inflater.eof:
            self._inflate(CHUNK)
            left -= len(self._buffer)
            self._buffer.clear()
            if left < 0:
                raise ArchiveError(f"archive {self.path} has data after the end of the tar")
        if self._inflater.unused_data or self._fh.read(1):
            raise ArchiveError(f"archive {self.path} has trailing bytes after the gzip stream")

    def _inflate(self, want: int) -> None:
        data = self._inflater.unconsumed_tail or self._fh.read(CHUNK)
        if not data:
            raise ArchiveError(f"archive {self.path} is truncated (the gzip stream ends early)")
        try:
            out = self._inflater.decompress(data, max(want, CHUNK))
        except zlib.error as exc:
            raise ArchiveError(f"archive {self.path} is not a valid gzip file ({exc})") from None
        self._total += len(out)
        if self._total > self._limit:
            raise ArchiveError(f"archive {self.path} unpacks to more than {self._limit} bytes")
        self._buffer += out


class _TarStream:
    """The members of a tar stream, one 512-byte header at a time.

    Not ``tarfile.open``: it reads whatever a header declares (a GNU sparse member's full
    size, pax and long-name records) before the caller can look at the header; a 171-byte
    archive declaring a 1.2 GB sparse member cost 1.2 GB. Here each header is parsed alone
    (``TarInfo.frombuf``) and refused unless it is a regular file of an expected name and
    size, before any of its data is read.
    """

    def __init__(self, path: Path, stream: _Gunzip):
        self.path = path
        self.stream = stream
        self._seen: set[str] = set()

    def members(self) -> Iterator[tarfile.TarInfo]:
        while True:
            block = self._exact(BLOCK)
            if block == bytes(BLOCK):
                return  # the end-of-archive marker
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "strict")
            except (tarfile.TarError, UnicodeDecodeError) as exc:
                raise ArchiveError(
                    f"archive {self.path} is not a valid tar archive ({exc})"
                ) from None
            self._check(info)
            yield info

    def read_member(self, info: tarfile.TarInfo) -> bytes:
        return b"".join(self.member_chunks(info))

    def member_chunks(self, info: tarfile.TarInfo) -> Iterator[bytes]:
        left = info.size
        while left:
            chunk = self._exact(min(CHUNK, left), info.name)
            left -= len(chunk)
            yield chunk
        self._exact(-info.size % BLOCK, info.name)  # padding to the next block

    def finish(self) -> None:
        # After the end marker: zero blocks up to the end of a tar record, the gzip trailer.
        self.stream.finish(slack=RECORD)

    def _check(self, info: tarfile.TarInfo) -> None:
        limit = MEMBER_LIMITS.get(info.name)
        if limit is None:
            raise ArchiveError(f"archive {self.path}: unexpected member {info.name!r}")
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or info.sparse is not None:
            raise ArchiveError(
                f"archive {self.path}: member {info.name!r} is not a regular file "
                f"(tar type {info.type!r})"
            )
        if info.name in self._seen:
            raise ArchiveError(f"archive {self.path}: {info.name} appears twice")
        if info.size > limit:
            raise ArchiveError(
                f"archive {self.path}: {info.name} declares {info.size} bytes, more than "
                f"the {limit} allowed"
            )
        self._seen.add(info.name)

    def _exact(self, size: int, member: str | None = None) -> bytes:
        data = self.stream.read(size)
        if len(data) < size:
            what = member or "the tar stream"
            raise ArchiveError(f"archive {self.path} is truncated ({what} ends early)")
        return data


class _Manifest:
    """An archive's manifest, checked whole before any entry is read, then consumed line by
    line: each entry line must be listed (its SHA-256) and belong to a listed prompt."""

    def __init__(self, path: Path, raw: bytes):
        self.path = path
        doc = _manifest_document(path, raw)
        table, entries, prompts = doc.get("sha256"), doc.get("entries"), doc.get("prompts")
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise ArchiveError(f"archive {path}: manifest has no per-entry sha256 table")
        if type(entries) is not int or entries != len(table) or entries > MAX_ENTRIES:
            raise ArchiveError(
                f"archive {path}: the manifest lists {entries!r} entries and {len(table)} "
                f"SHA-256s (at most {MAX_ENTRIES}; truncated or tampered)"
            )
        self.entries: int = entries
        self.version: int = doc["version"]
        self.entries_sha256 = doc.get("entries_sha256")
        self._sha256: dict[str, str] = table
        self._prompts = _prompt_table(path, prompts, entries)
        self._left = {key: record["variants"] for key, record in self._prompts.items()}

    def check_sha256(self, where: str, n: int, entry: Entry, line: bytes) -> None:
        name = _name(entry)
        if self._sha256.get(name) != hashlib.sha256(line).hexdigest():
            raise ArchiveError(
                f"{where} line {n} ({name}) does not match its SHA-256 in the manifest"
            )

    def check_prompt(self, n: int, entry: Entry) -> None:
        name = _name(entry)
        record = self._prompts.get(entry.key)
        if record is None or self._left[entry.key] == 0:
            raise ArchiveError(f"archive {self.path}: variant counts per prompt differ from "
                               f"the manifest (line {n}, {name})")  # fmt: skip
        first = self._left[entry.key] == record["variants"]
        if first and {**_prompt_record(entry), "variants": record["variants"]} != record:
            raise ArchiveError(f"archive {self.path}: line {n}: the prompt of {name} differs "
                               "from the manifest's")  # fmt: skip
        self._left[entry.key] -= 1

    def check_complete(self, reader: _EntryReader) -> None:
        """After the last line: every listed entry came, and the lines hash as listed."""
        count = len(reader.lines)
        if count != self.entries:
            raise ArchiveError(
                f"archive {self.path}: holds {count} entries, the manifest lists "
                f"{self.entries} (truncated or tampered)"
            )
        if reader.body_sha256() != self.entries_sha256:
            raise ArchiveError(
                f"archive {self.path}: {ENTRIES} does not match its SHA-256 in the manifest"
            )


def _manifest_document(path: Path, raw: bytes) -> dict[str, Any]:
    values = sum(raw.count(c) for c in (b",", b":", b"[", b"{"))
    if values > MAX_MANIFEST_VALUES:
        raise ArchiveError(
            f"archive {path}: {MANIFEST} holds more than {MAX_MANIFEST_VALUES} JSON values "
            "(a comeapi manifest lists about 2 per entry): not a comeapi cache archive"
        )
    try:
        manifest = _json_object(raw)
    except TypeError:
        manifest = {}
    except ValueError as exc:
        raise ArchiveError(f"archive {path}: {MANIFEST} is not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise ArchiveError(
            f"archive {path} is not a comeapi cache archive (format is not {FORMAT!r})"
        )
    if not _readable(manifest.get("version")):
        raise ArchiveError(
            f"archive {path} has format version {manifest.get('version')!r}; this comeapi "
            f"reads version {_versions()} (export it again with a matching comeapi)"
        )
    if manifest.get("key_version") != KEY_VERSION:
        raise ArchiveError(
            f"archive {path} uses cache key version {manifest.get('key_version')!r}; this "
            f"comeapi uses version {KEY_VERSION}"
        )
    return manifest


def _readable(version: Any) -> bool:
    return type(version) is int and version in READ_VERSIONS


def _versions() -> str:
    return " or ".join(str(v) for v in READ_VERSIONS)


def _prompt_table(path: Path, prompts: Any, entries: int) -> dict[str, dict[str, Any]]:
    """The manifest's prompts by key: each record as _prompt_counts writes it, in key order,
    their variants adding up to the entries listed."""
    fields = {"key", "kind", "model", "prompt", "variants"}
    table: dict[str, dict[str, Any]] = {}
    ok = isinstance(prompts, list)
    last = ""
    for record in prompts if ok else ():
        ok = (
            isinstance(record, dict)
            and record.keys() == fields
            and isinstance(record["key"], str)
            and record["key"] > last
            and type(record["variants"]) is int
            and record["variants"] > 0
        )
        if not ok:
            break
        table[last := record["key"]] = record
    if not ok or sum(r["variants"] for r in table.values()) != entries:
        raise ArchiveError(f"archive {path}: variant counts per prompt differ from the manifest")
    return table


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
