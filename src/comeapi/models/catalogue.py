"""List and check the GGUF files of a models directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from comeapi.errors import ConfigError, ModelNotFoundError
from comeapi.models.bundled import BUNDLED_MODEL
from comeapi.settings import Settings

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True, slots=True)
class ModelFile:
    name: str
    path: Path
    size_bytes: int

    @property
    def size_mb(self) -> float:
        return round(self.size_bytes / (1024 * 1024), 1)


def check_gguf(path: Path) -> None:
    """ConfigError unless ``path`` starts with the GGUF magic (catches truncated downloads)."""
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ConfigError(f"model file {path} cannot be read: {exc}") from exc
    if magic != GGUF_MAGIC:
        raise ConfigError(f"model file {path} is not a GGUF file (magic {magic!r})")


def list_models(model_dir: Path) -> list[ModelFile]:
    """The ``*.gguf`` files of ``model_dir``, sorted by name."""
    if not model_dir.is_dir():
        raise ConfigError(
            f"models directory {model_dir} does not exist (run: comeapi models prepare)"
        )
    return [
        ModelFile(p.name, p, p.stat().st_size)
        for p in sorted(model_dir.glob("*.gguf"))
        if p.is_file()
    ]


def resolve(models: list[ModelFile], name: str | None, default: str | None = None) -> ModelFile:
    """The model a request asked for: by file name (with or without .gguf), else the default."""
    wanted = name or default
    if wanted is None:
        if len(models) == 1:
            return models[0]
        raise ModelNotFoundError("(none given)", [m.name for m in models])
    for m in models:
        if wanted in (m.name, m.name.removesuffix(".gguf")):
            return m
    raise ModelNotFoundError(wanted, [m.name for m in models])


def check_model_dir(settings: Settings) -> tuple[list[ModelFile], ModelFile]:
    """Every GGUF file of the models directory and the default one, or ConfigError.

    The default serves requests that name no model: ``default_model``, else the only file,
    else the bundled default model (SmolLM2) when it is there, else the first by name.

    Each file's magic is checked now, so a truncated download or a stray non-GGUF file is one
    clear start-up error instead of a backend that crashes on its first request.
    """
    models = list_models(settings.model_dir)
    if not models:
        raise ConfigError(
            f"no *.gguf model in {settings.model_dir} (run: comeapi models prepare "
            f"--model-dir {settings.model_dir})"
        )
    for model in models:
        check_gguf(model.path)
    if settings.default_model is None:
        bundled = next((m for m in models if m.name == BUNDLED_MODEL), None)
        return models, bundled or models[0]  # the only one, the bundled one, the first
    try:
        return models, resolve(models, settings.default_model)
    except ModelNotFoundError as exc:
        raise ConfigError(f"default_model: {exc.message}") from None
