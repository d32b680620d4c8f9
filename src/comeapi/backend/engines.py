"""Pick the inference engine for the settings."""

from __future__ import annotations

import importlib

from comeapi.backend.engine import Engine
from comeapi.errors import ConfigError
from comeapi.settings import Settings


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
