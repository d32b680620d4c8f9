"""How many tokens a text is to a model, for counts the cache records without generating
them: an answer a person typed (``comeapi cache edit``, the review API) is served with the
usage of its own text, not of the generated text it replaced.

The model's vocabulary alone is loaded from its GGUF file (llama.cpp's ``vocab_only``: no
weights) on the first count and kept: for Gemma 3's 262,144 tokens about a second and 58 MB
of the process's memory (2026-12-07), then well under a millisecond a count. The text is
tokenized as the backend tokenizes text: no BOS, special-token names read as text.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from comeapi.errors import ComeapiError
from comeapi.models.catalogue import list_models, resolve

log = logging.getLogger("comeapi.models")


class TokenCounter:
    """Counts with the vocabularies of the GGUF files in ``model_dir``. A count is None (not
    known) when the model's file is not there or llama.cpp is not installed (a cache-only
    install); callers record 0 then, as before counts existed. Thread-safe."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self._vocabs: dict[Path, Any] = {}  # per model file, kept (None: unreadable)
        self._lock = threading.Lock()

    def count(self, model: str, text: str) -> int | None:
        """Tokens of ``text`` to ``model`` (a file name, with or without ``.gguf``)."""
        try:
            path = resolve(list_models(self.model_dir), model).path
        except ComeapiError:
            return None
        try:
            from comeapi.backend.native import load_vocab, quiet_llama_logs, tokenize
        except ImportError:  # installed without the [llama] extra
            return None
        with self._lock:
            if path not in self._vocabs:  # a file llama.cpp cannot read is tried once
                quiet_llama_logs(False)
                vocab = self._vocabs[path] = load_vocab(path)
                if vocab is None:
                    log.warning("cannot read the vocabulary of %s: typed text counts 0", path)
            vocab = self._vocabs[path]
        if vocab is None:
            return None
        return len(tokenize(vocab, text.encode("utf-8"), add_bos=False, special=False))
