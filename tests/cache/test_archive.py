"""The export archive: a roundtrip is exact; anything truncated, tampered or incompatible is
refused with a message, before any entry is handed out."""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from comeapi.cache.archive import (
    ENTRIES,
    MANIFEST,
    entry_line,
    read_archive,
    read_entries_file,
    read_jsonl,
    write_archive,
    write_jsonl,
)
from comeapi.cache.sqlite import SqliteStore
from comeapi.cache.store import Entry
from comeapi.errors import ArchiveError, StoreError
from tests.cache.factory import build_archive, reviewed_entries, sample_entries


def _sorted(entries: list[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: (e.key, e.variant))


def test_roundtrip_through_a_fresh_store_is_identical(tmp_path: Path) -> None:
    entries = sample_entries(prompts=3, variants=5)
    with SqliteStore(tmp_path / "a.db") as source:
        source.put_many(entries)
        manifest = write_archive(source.entries(), tmp_path / "cache.tar.gz")
    assert manifest["entries"] == 15
    assert [p["variants"] for p in manifest["prompts"]] == [5, 5, 5]
    with SqliteStore(tmp_path / "b.db") as target:
        target.put_many(read_archive(tmp_path / "cache.tar.gz"))
        assert list(target.entries()) == _sorted(entries)


def test_archive_layout_and_manifest(tmp_path: Path) -> None:
    entries = sample_entries(prompts=2, variants=2)
    write_archive(entries, tmp_path / "c.tar.gz")
    with tarfile.open(tmp_path / "c.tar.gz", "r:gz") as tar:
        assert tar.getnames() == [MANIFEST, ENTRIES]
        manifest = json.loads(_member(tar, MANIFEST))
        body = _member(tar, ENTRIES)
    assert manifest["format"] == "comeapi-cache"
    assert manifest["version"] == 2
    assert manifest["key_version"] == 1
    lines = body.splitlines(keepends=True)
    assert len(lines) == 4
    for e in entries:
        line = entry_line(e)
        assert line in lines
        assert manifest["sha256"][f"{e.key}#{e.variant}"] == hashlib.sha256(line).hexdigest()


def test_jsonl_roundtrip(tmp_path: Path) -> None:
    entries = sample_entries(prompts=2, variants=3)
    assert write_jsonl(entries, tmp_path / "d.jsonl") == 6
    assert read_jsonl(tmp_path / "d.jsonl") == _sorted(entries)
    assert read_entries_file(tmp_path / "d.jsonl") == _sorted(entries)


def test_a_failed_write_leaves_no_partial_file(tmp_path: Path) -> None:
    good = sample_entries(prompts=1, variants=2)
    target = tmp_path / "out.tar.gz"
    write_archive(good, target)
    before = target.read_bytes()
    corrupt = [*good, replace(good[0], variant=7)]  # checksum no longer matches
    with pytest.raises(StoreError, match="checksum"):
        write_archive(corrupt, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tar.gz"]


# --- rejections ---------------------------------------------------------------------------


def _member(tar: tarfile.TarFile, name: str) -> bytes:
    fh = tar.extractfile(name)
    assert fh is not None
    return fh.read()


@pytest.fixture
def parts(tmp_path: Path) -> tuple[dict[str, Any], bytes]:
    """The manifest and entry lines of a good archive, to tamper with."""
    write_archive(sample_entries(prompts=2, variants=3), tmp_path / "good.tar.gz")
    with tarfile.open(tmp_path / "good.tar.gz", "r:gz") as tar:
        return json.loads(_member(tar, MANIFEST)), _member(tar, ENTRIES)


def _resealed(manifest: dict[str, Any], body: bytes) -> dict[str, Any]:
    """The manifest updated to match ``body`` (a tamperer who recomputes the SHA-256s)."""
    fixed = dict(manifest)
    fixed["entries_sha256"] = hashlib.sha256(body).hexdigest()
    table = {}
    for line in body.splitlines(keepends=True):
        doc = json.loads(line)
        table[f"{doc['key']}#{doc['variant']}"] = hashlib.sha256(line).hexdigest()
    fixed["sha256"] = table
    fixed["entries"] = len(table)
    return fixed


def _edit_first(body: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    lines = body.splitlines(keepends=True)
    doc = json.loads(lines[0])
    change(doc)
    lines[0] = (json.dumps(doc, ensure_ascii=False, sort_keys=True) + "\n").encode()
    return b"".join(lines)


def test_every_truncation_is_rejected(tmp_path: Path) -> None:
    write_archive(sample_entries(prompts=2, variants=3), tmp_path / "good.tar.gz")
    raw = (tmp_path / "good.tar.gz").read_bytes()
    cut = tmp_path / "cut.tar.gz"
    for size in [0, 1, 10, len(raw) // 3, len(raw) // 2, len(raw) - 8, len(raw) - 1]:
        cut.write_bytes(raw[:size])
        with pytest.raises(ArchiveError, match=r"truncated|not a valid gzip"):
            read_archive(cut)


def test_flipped_bytes_are_rejected(tmp_path: Path) -> None:
    write_archive(sample_entries(prompts=2, variants=3), tmp_path / "good.tar.gz")
    raw = bytearray((tmp_path / "good.tar.gz").read_bytes())
    for offset in range(12, len(raw), max(1, len(raw) // 25)):
        bad = bytearray(raw)
        bad[offset] ^= 0x55
        (tmp_path / "bad.tar.gz").write_bytes(bytes(bad))
        with pytest.raises(ArchiveError):
            read_archive(tmp_path / "bad.tar.gz")


def test_a_changed_answer_fails_the_manifest_sha256(
    tmp_path: Path, parts: tuple[dict[str, Any], bytes]
) -> None:
    manifest, body = parts
    body = _edit_first(body, lambda d: d.update(answer="a different answer"))
    path = build_archive(
        tmp_path / "t.tar.gz", {MANIFEST: json.dumps(manifest).encode(), ENTRIES: body}
    )
    with pytest.raises(ArchiveError, match="does not match its SHA-256"):
        read_archive(path)


def test_a_changed_answer_with_resealed_manifest_fails_the_entry_checksum(
    tmp_path: Path, parts: tuple[dict[str, Any], bytes]
) -> None:
    manifest, body = parts
    body = _edit_first(body, lambda d: d.update(answer="a different answer"))
    fixed = _resealed(manifest, body)
    path = build_archive(
        tmp_path / "t.tar.gz", {MANIFEST: json.dumps(fixed).encode(), ENTRIES: body}
    )
    with pytest.raises(ArchiveError, match=r"line 1: entry .* fails its checksum"):
        read_archive(path)


def test_an_entry_under_the_wrong_key_is_rejected(
    tmp_path: Path, parts: tuple[dict[str, Any], bytes]
) -> None:
    manifest, body = parts

    def move(doc: dict[str, Any]) -> None:
        doc["model"] = "another-model.gguf"
        doc["checksum"] = Entry.from_dict(doc).compute_checksum()

    body = _edit_first(body, move)
    fixed = _resealed(manifest, body)
    path = build_archive(
        tmp_path / "t.tar.gz", {MANIFEST: json.dumps(fixed).encode(), ENTRIES: body}
    )
    with pytest.raises(ArchiveError, match="not the key of its prompt"):
        read_archive(path)


def test_a_dropped_entry_is_rejected(tmp_path: Path, parts: tuple[dict[str, Any], bytes]) -> None:
    manifest, body = parts
    body = b"".join(body.splitlines(keepends=True)[1:])
    manifest = {**manifest, "entries_sha256": hashlib.sha256(body).hexdigest()}
    path = build_archive(
        tmp_path / "t.tar.gz", {MANIFEST: json.dumps(manifest).encode(), ENTRIES: body}
    )
    with pytest.raises(ArchiveError, match="holds 5 entries, the manifest lists 6"):
        read_archive(path)


def test_a_duplicated_entry_is_rejected(
    tmp_path: Path, parts: tuple[dict[str, Any], bytes]
) -> None:
    manifest, body = parts
    body = body + body.splitlines(keepends=True)[0]
    fixed = {**manifest, "entries_sha256": hashlib.sha256(body).hexdigest()}
    path = build_archive(
        tmp_path / "t.tar.gz", {MANIFEST: json.dumps(fixed).encode(), ENTRIES: body}
    )
    with pytest.raises(ArchiveError, match="more than once"):
        read_archive(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 3}, "format version 3; this comeapi reads version 1 or 2"),
        ({"version": True}, "format version True"),
        ({"version": None}, "format version None"),
        ({"format": "nginx-cache"}, "not a comeapi cache archive"),
        ({"key_version": 2}, "cache key version 2"),
        ({"prompts": []}, "variant counts per prompt differ"),
    ],
)
def test_incompatible_manifests_are_rejected(
    tmp_path: Path, parts: tuple[dict[str, Any], bytes], change: dict[str, Any], message: str
) -> None:
    manifest, body = parts
    path = build_archive(
        tmp_path / "t.tar.gz",
        {MANIFEST: json.dumps({**manifest, **change}).encode(), ENTRIES: body},
    )
    with pytest.raises(ArchiveError, match=re.escape(message)):
        read_archive(path)


def test_wrong_members_are_rejected(tmp_path: Path, parts: tuple[dict[str, Any], bytes]) -> None:
    manifest, body = parts
    head = json.dumps(manifest).encode()
    cases = {
        "no entries": ({MANIFEST: head}, f"has no {ENTRIES}"),
        "no manifest": ({ENTRIES: body}, f"has no {MANIFEST}"),
        "manifest last": ({ENTRIES: body, MANIFEST: head}, f"no {MANIFEST} as its first member"),
        "extra member": ({MANIFEST: head, ENTRIES: body, "../evil": b"x"}, "unexpected member"),
        "bad json": ({MANIFEST: b"{nope", ENTRIES: body}, "not valid JSON"),
    }
    for name, (members, message) in cases.items():
        path = build_archive(tmp_path / f"{name}.tar.gz", members)
        with pytest.raises(ArchiveError, match=message):
            read_archive(path)
    (tmp_path / "plain.tar.gz").write_bytes(b"just text, not gzip")
    with pytest.raises(ArchiveError, match="not a valid gzip"):
        read_archive(tmp_path / "plain.tar.gz")
    with pytest.raises(ArchiveError, match="cannot read"):
        read_archive(tmp_path / "missing.tar.gz")


def _jsonl_parts(path: Path) -> tuple[dict[str, Any], bytes]:
    """The header and the entry lines of a .jsonl export."""
    head, _, body = path.read_bytes().partition(b"\n")
    return json.loads(head), body


def _jsonl(path: Path, header: dict[str, Any], body: bytes) -> Path:
    path.write_bytes(json.dumps(header).encode() + b"\n" + body)
    return path


def test_a_tampered_jsonl_line_is_rejected(tmp_path: Path) -> None:
    write_jsonl(sample_entries(prompts=1, variants=2), tmp_path / "d.jsonl")
    header, body = _jsonl_parts(tmp_path / "d.jsonl")
    assert header["format"] == "comeapi-cache-jsonl" and header["entries"] == 2
    changed = _edit_first(body, lambda d: d.update(answer="x"))
    _jsonl(tmp_path / "d.jsonl", header, changed)
    with pytest.raises(ArchiveError, match="do not match the SHA-256 in its header"):
        read_jsonl(tmp_path / "d.jsonl")
    resealed = {**header, "entries_sha256": hashlib.sha256(changed).hexdigest()}
    _jsonl(tmp_path / "d.jsonl", resealed, changed)
    with pytest.raises(ArchiveError, match=r"line 2: .* fails its checksum"):
        read_jsonl(tmp_path / "d.jsonl")
    _jsonl(tmp_path / "d.jsonl", header, body + b"{not json\n")
    with pytest.raises(ArchiveError, match="line 4 is not a valid entry"):
        read_jsonl(tmp_path / "d.jsonl")


def test_a_jsonl_cut_anywhere_is_rejected(tmp_path: Path) -> None:
    """Fault: `cache import e.jsonl --replace` with a truncated file cut the store."""
    write_jsonl(sample_entries(prompts=2, variants=3), tmp_path / "d.jsonl")
    raw = (tmp_path / "d.jsonl").read_bytes()
    lines = raw.splitlines(keepends=True)
    cuts = [b"", *(b"".join(lines[:n]) for n in range(1, len(lines))), raw[:-1], raw[:100]]
    for cut in cuts:
        (tmp_path / "cut.jsonl").write_bytes(cut)
        with pytest.raises(ArchiveError, match=r"empty|truncated"):
            read_jsonl(tmp_path / "cut.jsonl")


def test_a_jsonl_without_its_header_is_rejected(tmp_path: Path) -> None:
    write_jsonl(sample_entries(prompts=1, variants=2), tmp_path / "d.jsonl")
    _, body = _jsonl_parts(tmp_path / "d.jsonl")
    (tmp_path / "bare.jsonl").write_bytes(body)
    with pytest.raises(ArchiveError, match=r"line 1 is not a comeapi \.jsonl header"):
        read_jsonl(tmp_path / "bare.jsonl")


# --- the review, and files from before it ---------------------------------------------------


def test_the_review_travels_through_archive_and_jsonl(tmp_path: Path) -> None:
    entries = reviewed_entries()
    write_archive(entries, tmp_path / "r.tar.gz")
    write_jsonl(entries, tmp_path / "r.jsonl")
    for path in (tmp_path / "r.tar.gz", tmp_path / "r.jsonl"):
        back = read_entries_file(path)
        assert back == _sorted(entries)
        assert {e.state for e in back} == {"approved", "rejected", "pending"}
        assert any(e.pinned for e in back) and any(e.edited for e in back)


def _version_1_lines(entries: list[Entry]) -> bytes:
    """Entry lines as comeapi wrote them before review: no review fields at all."""
    lines = []
    for e in _sorted(entries):
        doc = e.to_dict()
        for name in ("state", "flags", "pinned", "history"):
            del doc[name]
        text = json.dumps(doc, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        lines.append(text.encode() + b"\n")
    return b"".join(lines)


def test_a_version_1_archive_imports_as_pending(
    tmp_path: Path, parts: tuple[dict[str, Any], bytes]
) -> None:
    manifest, _ = parts
    entries = sample_entries(prompts=2, variants=3)
    body = _version_1_lines(entries)
    v1 = {**_resealed(manifest, body), "version": 1}
    path = build_archive(tmp_path / "v1.tar.gz", {MANIFEST: json.dumps(v1).encode(), ENTRIES: body})
    back = read_archive(path)
    assert back == _sorted(entries)
    assert {e.state for e in back} == {"pending"}
    with SqliteStore(tmp_path / "s.db") as store:
        store.put_many(back)
        assert len(store.load_index()) == 2


def test_a_version_1_jsonl_imports_as_pending(tmp_path: Path) -> None:
    entries = sample_entries(prompts=1, variants=2)
    body = _version_1_lines(entries)
    header = {
        "entries": 2,
        "entries_sha256": hashlib.sha256(body).hexdigest(),
        "format": "comeapi-cache-jsonl",
        "key_version": 1,
        "version": 1,
    }
    _jsonl(tmp_path / "v1.jsonl", header, body)
    assert read_jsonl(tmp_path / "v1.jsonl") == _sorted(entries)


def test_a_version_1_file_carrying_a_review_is_refused(
    tmp_path: Path, parts: tuple[dict[str, Any], bytes]
) -> None:
    manifest, body = parts

    def approve(doc: dict[str, Any]) -> None:
        doc["state"] = "approved"
        doc["checksum"] = Entry.from_dict(doc).compute_checksum()

    body = _edit_first(body, approve)
    v1 = {**_resealed(manifest, body), "version": 1}
    path = build_archive(tmp_path / "v1.tar.gz", {MANIFEST: json.dumps(v1).encode(), ENTRIES: body})
    with pytest.raises(ArchiveError, match="format version 1 has no review state"):
        read_archive(path)
    read_archive(  # the same lines in a version 2 archive are fine
        build_archive(
            tmp_path / "v2.tar.gz",
            {MANIFEST: json.dumps(_resealed(manifest, body)).encode(), ENTRIES: body},
        )
    )


def test_a_tampered_state_with_resealed_manifest_fails_the_entry_checksum(
    tmp_path: Path, parts: tuple[dict[str, Any], bytes]
) -> None:
    manifest, body = parts
    body = _edit_first(body, lambda d: d.update(state="approved"))
    path = build_archive(
        tmp_path / "t.tar.gz",
        {MANIFEST: json.dumps(_resealed(manifest, body)).encode(), ENTRIES: body},
    )
    with pytest.raises(ArchiveError, match=r"line 1: entry .* fails its checksum"):
        read_archive(path)
