"""Hostile archives: a small file must not make the import large, and odd values must be a
one-line refusal, never a traceback. Each case is a fault a tester found (issue 13)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import time
import tracemalloc
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from comeapi.cache import archive
from comeapi.cache.archive import ENTRIES, MANIFEST, entry_line, read_archive, write_archive
from comeapi.cache.key import chat_key
from comeapi.cache.store import Entry
from comeapi.errors import ArchiveError
from tests.cache.factory import MODEL, build_archive, prompt_entry, sample_entries

MiB = 1 << 20
GB = 10**9


def peak_allocation(read: Callable[[], object]) -> tuple[int, ArchiveError]:
    """Peak bytes Python allocated while ``read`` ran, and the ArchiveError it raised."""
    tracemalloc.start()
    try:
        with pytest.raises(ArchiveError) as caught:
            read()
        return tracemalloc.get_traced_memory()[1], caught.value
    finally:
        tracemalloc.stop()


def header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(tarfile.GNU_FORMAT)


def sparse_header(name: str, real_size: int) -> bytes:
    """An old-GNU sparse member: no data stored, ``real_size`` bytes when extracted."""
    block = bytearray(header(name, 0, tarfile.GNUTYPE_SPARSE))
    block[386:398] = b"%011o\0" % (real_size - 1)  # one sparse run: the last byte
    block[398:410] = b"%011o\0" % 1
    block[483:495] = b"%011o\0" % real_size
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def member(name: str, data: bytes) -> bytes:
    """One tar member: its header, its data, the padding to the next block."""
    return header(name, len(data)) + data + bytes(-len(data) % 512)


def plausible_manifest(lines: tuple[bytes, ...] = (b"x\n",)) -> bytes:
    """A manifest that passes every check made before the entries are read, for ``lines``
    (each listed under a made-up name of one prompt)."""
    table = {f"k#{i}": hashlib.sha256(line).hexdigest() for i, line in enumerate(lines)}
    prompt = {"key": "k", "kind": "prompt", "model": "m", "prompt": "p", "variants": len(lines)}
    return json.dumps({
        "format": "comeapi-cache", "version": 1, "key_version": 1, "entries": len(lines),
        "entries_sha256": hashlib.sha256(b"".join(lines)).hexdigest(), "sha256": table,
        "prompts": [prompt],
    }).encode()  # fmt: skip


def gzip_stream(parts: list[bytes], zeros: int = 0) -> bytes:
    """gzip of ``parts`` followed by ``zeros`` zero bytes, compressed without ever holding
    them (a 1.1 GB run of zeros is about 1.1 MB compressed)."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9, mtime=0) as gz:
        for part in parts:
            gz.write(part)
        chunk = bytes(MiB)
        for _ in range(zeros // MiB):
            gz.write(chunk)
        gz.write(bytes(zeros % MiB))
    return out.getvalue()


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("bombs")
    files = {
        # 171 bytes on disk in the tester's report: a sparse member declaring 1.2 GB
        "sparse": gzip_stream([sparse_header(ENTRIES, 12 * GB // 10), bytes(1024)]),
        # a header declaring 1.1 GB of entries, and the zeros to go with it
        "declared": gzip_stream([header(ENTRIES, 1100 * MiB)], zeros=1100 * MiB),
        # a plausible manifest, then a plausible size (15 MiB) of zeros: no line ever ends
        "one line": gzip_stream(
            [member(MANIFEST, plausible_manifest()), header(ENTRIES, 15 * MiB)], zeros=15 * MiB
        ),
        # nothing but zeros: no tar header at all
        "zeros": gzip_stream([], zeros=300 * MiB),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = base / f"{name.replace(' ', '-')}.tar.gz"
        paths[name].write_bytes(data)
    return paths


def test_bombs_are_small_files(bombs: dict[str, Path]) -> None:
    sizes = {name: path.stat().st_size for name, path in bombs.items()}
    assert sizes["sparse"] < 1000
    assert sizes["declared"] < 2 * MiB


@pytest.mark.parametrize(
    ("bomb", "message"),
    [
        ("sparse", "is not a regular file"),
        ("declared", f"declares {1100 * MiB} bytes"),
        ("one line", "a line is longer than"),
        ("zeros", f"has no {MANIFEST}"),
    ],
)
def test_a_bomb_is_refused_within_a_small_memory_bound(
    bombs: dict[str, Path], bomb: str, message: str
) -> None:
    peak, error = peak_allocation(lambda: read_archive(bombs[bomb]))
    assert peak < 24 * MiB, f"{bomb}: {peak / MiB:.0f} MiB allocated"
    assert error.message.count("\n") == 0
    assert message.split("|")[0] in error.message or message.split("|")[-1] in error.message


def import_rss(archive: Path, store: Path) -> tuple[int, int, str]:
    """`comeapi cache import` as a process: exit status, peak RSS (KiB), its output."""
    measure = (
        "import resource, subprocess, sys; "
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(p.returncode); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "print(p.stdout + p.stderr)"
    )
    argv = [sys.executable, "-m", "comeapi", "cache", "import", str(archive)]
    out = subprocess.run(
        [sys.executable, "-c", measure, *argv, "--store", f"sqlite:{store}"],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    ).stdout.split("\n", 2)
    return int(out[0]), int(out[1]), out[2].strip()


def issue_archive(path: Path, manifest_first: bool) -> Path:
    """Issue 22's archive: 2.2 MB holding 470,302 entry lines of 570 bytes, just under the
    256 MiB an entries member could have, and the manifest {"format":"nope"}."""
    count = 470_302
    digits = sum(len(str(i)) for i in range(count))
    entry = replace(prompt_entry("hello", 0), answer="").to_dict()
    bare = json.dumps({**entry, "variant": 0}, sort_keys=True, separators=(",", ":"))
    # The answer pads the lines to 255.5 MiB in all, whatever fields an entry has.
    line = (int(255.5 * MiB) - digits) // count  # newline included, variant's digits not
    entry["answer"] = "a" * (line - (len(bare) - 1) - 1)
    text = json.dumps({**entry, "variant": 0}, sort_keys=True, separators=(",", ":"))
    head, tail = text.split('"variant":0')
    size = count * (len(head) + len(tail) + len('"variant":') + 1)
    size += sum(len(str(i)) for i in range(count))
    assert 255 * MiB < size < 256 * MiB
    manifest = member(MANIFEST, b'{"format":"nope"}')
    z = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    out = [z.compress(manifest)] if manifest_first else []
    out.append(z.compress(header(ENTRIES, size)))
    for start in range(0, count, 8192):
        batch = range(start, min(start + 8192, count))
        out.append(z.compress("".join(f'{head}"variant":{i}{tail}\n' for i in batch).encode()))
    out.append(z.compress(bytes(-size % 512)))
    if not manifest_first:
        out.append(z.compress(manifest))
    out.append(z.compress(bytes(1024)) + z.flush())
    path.write_bytes(b"".join(out))
    return path


@pytest.mark.parametrize("manifest_first", [True, False], ids=["manifest-first", "entries-first"])
def test_an_archive_is_refused_by_its_manifest_before_its_entries_are_read(
    tmp_path: Path, manifest_first: bool
) -> None:
    """Issue 22: refused after 39 s at 949 MB peak RSS, the manifest checked last."""
    archive = issue_archive(tmp_path / "nope.tar.gz", manifest_first)
    assert 2 * MiB < archive.stat().st_size < 3 * MiB
    start = time.monotonic()
    code, rss_kib, output = import_rss(archive, tmp_path / "s.db")
    assert code == 1, output
    assert rss_kib < 100 * 1024, f"peak RSS {rss_kib // 1024} MiB"
    assert time.monotonic() - start < 20
    # Entries first: their header is refused (its size), before any line is read.
    expected = "format is not" if manifest_first else f"{ENTRIES} declares"
    assert expected in output and "\n" not in output, output


def test_a_forged_line_is_refused_when_it_is_read(tmp_path: Path) -> None:
    """A manifest that lists every line, and line 2 changed: refused at line 2, holding
    two entries, not after all 5,000 are parsed."""
    entries = [prompt_entry(f"prompt {i}", 0) for i in range(5000)]
    path = tmp_path / "forged.tar.gz"
    write_archive(entries, path)
    with tarfile.open(path, "r:gz") as tar:
        manifest = tar.extractfile(MANIFEST).read()  # type: ignore[union-attr]
        lines = tar.extractfile(ENTRIES).read().splitlines(keepends=True)  # type: ignore[union-attr]
    lines[1] = lines[1].replace(b"answer 0", b"answer 9")
    build_archive(path, {MANIFEST: manifest, ENTRIES: b"".join(lines)})
    tracemalloc.start()
    try:
        with pytest.raises(ArchiveError, match=r"line 2 \(.*\) does not match its SHA-256"):
            read_archive(path)
        forged_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        lines[1] = entry_line(entries[1])  # sorted order puts prompt 1 second: the good line
        write_archive(entries, path)
        assert len(read_archive(path)) == 5000
        full_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert forged_peak < full_peak / 2, (forged_peak, full_peak)


def test_a_manifest_of_many_small_values_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    """15 MiB of [] (under the manifest's size ceiling) parse into some 400 MB."""
    raw = b'{"format":"comeapi-cache","x":[' + b"[]," * (5 * MiB) + b"[]]}"
    path = build_archive(tmp_path / "values.tar.gz", {MANIFEST: raw, ENTRIES: b""})
    peak, error = peak_allocation(lambda: read_archive(path))
    assert "JSON values" in error.message
    assert peak < 48 * MiB, f"{peak / MiB:.0f} MiB allocated"


def many_messages(count: int, messages: int) -> list[Entry]:
    """Chat entries of ``messages`` one-letter messages: the most objects per byte."""
    out = []
    for i in range(count):
        chat = tuple(("user", chr(65 + j % 26)) for j in range(messages - 1))
        chat += (("user", f"question {i}"),)
        key = chat_key(chat, MODEL)
        out.append(Entry(key, 0, "chat", f"question {i}", "a", MODEL, messages=chat).sealed())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["most entries", "most messages"])
def test_the_largest_archives_within_the_ceilings_import_under_300_mb(
    tmp_path: Path, shape: str
) -> None:
    """Valid archives as large as the ceilings allow: read, checked and imported whole."""
    if shape == "most entries":  # as many of the shortest entries as the bytes allow
        entries = [prompt_entry(f"p{i}", 0, answer="") for i in range(archive.MAX_ENTRIES)]
        room = archive.MAX_ENTRIES_BYTES // max(len(entry_line(e)) for e in entries)
        entries = entries[:room]
    else:
        entries = many_messages(1150, 1000)
    size = sum(len(entry_line(e)) for e in entries)
    assert 0.7 * archive.MAX_ENTRIES_BYTES < size <= archive.MAX_ENTRIES_BYTES
    write_archive(entries, tmp_path / "big.tar.gz")
    del entries
    code, rss_kib, output = import_rss(tmp_path / "big.tar.gz", tmp_path / "s.db")
    assert code == 0, output
    assert rss_kib < 300 * 1024, f"{shape}: peak RSS {rss_kib // 1024} MiB"


def test_the_import_command_stays_small_on_a_gzip_bomb(
    bombs: dict[str, Path], tmp_path: Path
) -> None:
    """The whole `comeapi cache import`, as a process: its peak RSS, not just Python's."""
    measure = (
        "import resource, subprocess, sys; "
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(p.returncode); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "print(p.stdout + p.stderr)"
    )
    argv = [sys.executable, "-m", "comeapi", "cache", "import"]
    store = f"sqlite:{tmp_path / 's.db'}"
    for bomb in ("declared", "one line"):
        out = subprocess.run(
            [sys.executable, "-c", measure, *argv, str(bombs[bomb]), "--store", store],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout.split("\n", 2)
        code, rss_kib, output = int(out[0]), int(out[1]), out[2].strip()
        assert code == 1, output
        assert rss_kib < 200 * 1024, f"{bomb}: peak RSS {rss_kib // 1024} MiB"
        assert output.startswith("Error: ") and "\n" not in output, output


def archive_with_lines(path: Path, lines: list[bytes]) -> Path:
    """An archive whose manifest matches ``lines`` exactly (a forger who reseals it)."""
    body = b"".join(lines)
    # A line that is no entry is listed under a made-up name, so that the manifest holds.
    stand_in = {"key": "x", "kind": "prompt", "model": "m", "prompt": "p"}
    names = [
        json.loads(line) if line.startswith(b"{") else {**stand_in, "variant": i}
        for i, line in enumerate(lines)
    ]
    prompts = [
        {"key": d["key"], "kind": d["kind"], "model": d["model"], "prompt": d["prompt"]}
        for d in names
    ]
    manifest = {
        "format": "comeapi-cache",
        "version": 1,
        "key_version": 1,
        "entries": len(lines),
        "entries_sha256": hashlib.sha256(body).hexdigest(),
        "sha256": {
            f"{d['key']}#{d['variant']}": hashlib.sha256(line).hexdigest()
            for d, line in zip(names, lines, strict=False)
        },
        "prompts": [{**p, "variants": 1} for p in prompts],
    }
    return build_archive(path, {MANIFEST: json.dumps(manifest).encode(), ENTRIES: body})


def test_deeply_nested_json_is_a_clear_error(tmp_path: Path) -> None:
    path = archive_with_lines(tmp_path / "deep.tar.gz", [b"[" * 200_000 + b"\n"])
    with pytest.raises(ArchiveError, match="nested too deeply"):
        read_archive(path)
    manifest_bomb = build_archive(
        tmp_path / "deep-manifest.tar.gz", {MANIFEST: b"[" * 200_000, ENTRIES: b""}
    )
    with pytest.raises(ArchiveError, match="nested too deeply"):
        read_archive(manifest_bomb)


@pytest.mark.parametrize(
    ("field", "value"),
    [("prompt_tokens", 2**70), ("completion_tokens", -1), ("variant", 2**40)],
)
def test_out_of_range_numbers_are_refused(tmp_path: Path, field: str, value: int) -> None:
    entry = replace(prompt_entry("hello", 0), **{field: value}).sealed()  # a valid checksum
    path = archive_with_lines(tmp_path / "big.tar.gz", [entry_line(entry)])
    with pytest.raises(ArchiveError, match=f"has {field} {value}, outside"):
        read_archive(path)


def test_other_member_types_are_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.tar.gz"
    write_archive(sample_entries(prompts=1, variants=1), good)
    for kind in (tarfile.SYMTYPE, tarfile.DIRTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE):
        data = header(MANIFEST, 0, kind) + bytes(1024)
        (tmp_path / "odd.tar.gz").write_bytes(gzip.compress(data))
        with pytest.raises(ArchiveError, match="is not a regular file"):
            read_archive(tmp_path / "odd.tar.gz")
    pax = tarfile.TarInfo(ENTRIES)
    pax.pax_headers = {"comment": "x" * 100}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(pax, io.BytesIO(b""))
    (tmp_path / "pax.tar.gz").write_bytes(gzip.compress(buf.getvalue()))
    with pytest.raises(ArchiveError, match="unexpected member"):
        read_archive(tmp_path / "pax.tar.gz")


def test_gzip_trailer_and_trailing_bytes_are_checked(tmp_path: Path) -> None:
    good = tmp_path / "good.tar.gz"
    write_archive(sample_entries(prompts=1, variants=2), good)
    raw = good.read_bytes()
    (tmp_path / "tail.tar.gz").write_bytes(raw + b"extra")
    with pytest.raises(ArchiveError, match="trailing bytes"):
        read_archive(tmp_path / "tail.tar.gz")
    bad_crc = bytearray(raw)
    bad_crc[-8] ^= 0xFF  # the CRC32 of the gzip trailer
    (tmp_path / "crc.tar.gz").write_bytes(bytes(bad_crc))
    with pytest.raises(ArchiveError, match="not a valid gzip"):
        read_archive(tmp_path / "crc.tar.gz")
    assert len(read_archive(good)) == 2
