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
import tracemalloc
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from comeapi.cache.archive import ENTRIES, MANIFEST, entry_line, read_archive, write_archive
from comeapi.errors import ArchiveError
from tests.cache.factory import build_archive, prompt_entry, sample_entries

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
        # a plausible size (200 MB) of zeros: no line ever ends
        "one line": gzip_stream([header(ENTRIES, 200 * MiB)], zeros=200 * MiB),
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
        ("zeros", "data after the end of the tar"),
    ],
)
def test_a_bomb_is_refused_within_a_small_memory_bound(
    bombs: dict[str, Path], bomb: str, message: str
) -> None:
    peak, error = peak_allocation(lambda: read_archive(bombs[bomb]))
    assert peak < 24 * MiB, f"{bomb}: {peak / MiB:.0f} MiB allocated"
    assert error.message.count("\n") == 0
    assert message.split("|")[0] in error.message or message.split("|")[-1] in error.message


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
    names = [json.loads(line) for line in lines if line.startswith(b"{")]
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
