"""Entries for tests: real keys, sealed checksums."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from dataclasses import replace
from pathlib import Path

from comeapi.cache.key import chat_key, prompt_key
from comeapi.cache.store import Entry

MODEL = "gemma-3-270m-q4_k_m.gguf"


def prompt_entry(prompt: str, variant: int, answer: str | None = None) -> Entry:
    return Entry(
        key=prompt_key(prompt, MODEL),
        variant=variant,
        kind="prompt",
        prompt=prompt,
        answer=answer if answer is not None else f"answer {variant} to {prompt}",
        model=MODEL,
        params={"max_tokens": 8, "temperature": 0.8, "top_k": 40, "top_p": 0.9, "seed": variant},
        finish_reason="length",
        prompt_tokens=5,
        completion_tokens=8,
        created=1_700_000_000.0 + variant,
    ).sealed()


def chat_entry(content: str, variant: int, answer: str | None = None) -> Entry:
    messages = (("system", "Be brief."), ("user", content))
    return Entry(
        key=chat_key(messages, MODEL),
        variant=variant,
        kind="chat",
        prompt=content,
        messages=messages,
        answer=answer if answer is not None else f"chat answer {variant}: {content}",
        model=MODEL,
        params={"max_tokens": 8, "seed": variant},
        created=1_700_000_000.5,
    ).sealed()


def sample_entries(prompts: int = 3, variants: int = 5) -> list[Entry]:
    """``prompts`` prompts (the last one chat, Japanese and English) x ``variants``."""
    texts = ["こんにちは、調子はどうですか？", "Once upon a time", "東京のおすすめは？", "Hi"]
    out = []
    for i in range(prompts):
        for v in range(variants):
            text = texts[i % len(texts)] + (f" {i}" if i >= len(texts) else "")
            out.append(chat_entry(text, v) if i == prompts - 1 else prompt_entry(text, v))
    return out


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_archive(path: Path, members: dict[str, bytes]) -> Path:
    """A tar.gz with exactly ``members`` (to forge bad archives)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(gzip.compress(buf.getvalue()))
    return path


def reviewed(entry: Entry, **review: object) -> Entry:
    """``entry`` with review fields changed (``state``, ``flags``, ...), sealed again."""
    return replace(entry, **review, checksum="").sealed()  # type: ignore[arg-type]


def reviewed_entries() -> list[Entry]:
    """Two prompts x 3 variants with every kind of review: approved and pinned, rejected
    with flags, pending after an edit (history), and plain pending ones."""
    entries = sample_entries(prompts=2, variants=3)
    history = (
        {
            "answer": "<start_of_image> old text",
            "finish_reason": "length",
            "params": {"seed": 1},
            "flags": ["special_token"],
            "completion_tokens": 8,
            "replaced": 1_700_000_100.0,
            "why": "edit",
        },
    )
    return [
        reviewed(entries[0], state="approved", pinned=True),
        reviewed(entries[1], state="rejected", flags=("loop", "truncated")),
        reviewed(entries[2], history=history, answer="typed by a person"),
        entries[3],
        reviewed(entries[4], state="approved"),
        reviewed(entries[5], flags=("truncated",)),
    ]
