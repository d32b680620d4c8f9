"""Pick the inference engine for the settings, and check the models directory at start-up."""

from __future__ import annotations

import importlib

from comeapi.backend.engine import Engine
from comeapi.errors import ConfigError, ModelNotFoundError
from comeapi.models.catalogue import ModelFile, check_gguf, list_models, resolve
from comeapi.settings import Settings


def check_model_dir(settings: Settings) -> tuple[list[ModelFile], ModelFile]:
    """Every GGUF file of the models directory and the default one, or ConfigError.

    The default serves requests that name no model: ``default_model``, else the only file,
    else the first by name.

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
        return models, models[0]  # the only one, or the first by name
    try:
        return models, resolve(models, settings.default_model)
    except ModelNotFoundError as exc:
        raise ConfigError(f"default_model: {exc.message}") from None


def make_engine(settings: Settings) -> Engine:
    """``SerialEngine`` for one slot, ``BatchedEngine`` (continuous batching) for more."""
    if settings.slots == 1:
        from comeapi.backend.serial import SerialEngine

        return SerialEngine(settings)
    try:
        batched = importlib.import_module("comeapi.backend.batched")
    except ModuleNotFoundError as exc:
        if exc.name != "comeapi.backend.batched":
            raise
        raise ConfigError(
            f"slots={settings.slots} needs the batched engine, which is not available in "
            "this build; use --slots 1"
        ) from None
    engine: Engine = batched.BatchedEngine(settings)
    return engine
