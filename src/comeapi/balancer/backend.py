"""What the balancer knows about one backend: where it is, whether it answers, how busy it is.

The pool changes ``in_flight``/``served``; the health checker changes the rest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False, slots=True)
class Backend:
    """One backend process (``comeapi backend`` or anything speaking its API)."""

    url: str
    healthy: bool = False
    capacity: int = 1
    in_flight: int = 0
    served: int = 0
    failures: int = 0
    #: Wall-clock time of the last probe (None: never probed).
    last_check: float | None = None
    #: Round trip of the last successful probe, seconds.
    latency: float | None = None
    #: GGUF file names the backend can serve (from its /health).
    models: frozenset[str] = field(default_factory=frozenset)
    #: Models it has in memory now.
    loaded_models: tuple[str, ...] = ()
    #: Why it is down ("connection refused", "loading", ...), None while healthy.
    reason: str | None = "not probed yet"
    #: Failed probes or requests since it was last healthy (drives the re-probe backoff).
    consecutive_failures: int = 0
    #: The backend process's instance id from /health (changes when it restarts).
    instance: str | None = None
    #: Restarts seen: times the instance id changed.
    restarts: int = 0

    @property
    def free(self) -> int:
        return self.capacity - self.in_flight

    def has_model(self, model: str | None) -> bool:
        """True when ``model`` (a file name, with or without .gguf) is served here, or when the
        request names none (the backend then uses its default)."""
        if model is None:
            return True
        return model in self.models or f"{model}.gguf" in self.models

    def mark_healthy(
        self, *, capacity: int, models: frozenset[str], loaded: tuple[str, ...], latency: float
    ) -> None:
        self.healthy = True
        self.capacity = max(1, capacity)
        self.models = models
        self.loaded_models = loaded
        self.latency = latency
        self.reason = None
        self.consecutive_failures = 0
        self.last_check = time.time()

    def note_instance(self, instance: str | None) -> None:
        """Record the instance id a probe saw; a different one means the process restarted."""
        if instance is None:
            return
        if self.instance is not None and instance != self.instance:
            self.restarts += 1
        self.instance = instance

    def mark_down(self, reason: str, *, failure: bool = True) -> None:
        """Down until a probe says otherwise. ``failure=False`` for a backend that is merely
        starting (loading its model): not its fault, so not counted."""
        self.healthy = False
        self.reason = reason
        if failure:
            self.failures += 1
            self.consecutive_failures += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "healthy": self.healthy,
            "in_flight": self.in_flight,
            "capacity": self.capacity,
            "served": self.served,
            "failures": self.failures,
            "last_check": self.last_check,
            "latency_ms": None if self.latency is None else round(self.latency * 1000, 2),
            "models": sorted(self.models),
            "loaded_models": list(self.loaded_models),
            "reason": self.reason,
            "instance": self.instance,
            "restarts": self.restarts,
        }
