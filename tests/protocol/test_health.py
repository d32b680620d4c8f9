"""The one reader of a backend's /health: what each answer means to every caller."""

from __future__ import annotations

import json

import pytest

from comeapi.protocol.health import Health, health_document, new_instance_id, read_health


def doc(**fields: object) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize(
    ("status", "body", "state", "reason"),
    [
        (200, doc(status="ok", capacity=2), "ok", None),
        (503, doc(status="loading"), "loading", "loading"),
        (200, doc(status="loading"), "bad", "/health answered 200 loading"),
        (503, doc(status="ok"), "bad", "/health answered 503 ok"),
        (200, doc(status="degraded"), "bad", "/health answered 200 degraded"),  # a gateway
        (500, b"<html>oops</html>", "bad", "/health answered 500"),
        (200, b"[1, 2]", "bad", "/health answered 200"),
        (200, b"[" * 100_000, "bad", "/health answered 200"),  # nested past the parser
        (200, b"", "bad", "/health answered 200"),
    ],
)
def test_states(status: int, body: bytes, state: str, reason: str | None) -> None:
    health = read_health(status, body)
    assert (health.state, health.reason) == (state, reason)
    assert health.ready is (state == "ok")


def test_fields_are_read_when_well_typed_and_dropped_otherwise() -> None:
    good = read_health(
        200,
        doc(
            status="ok",
            capacity=3,
            in_flight=1,
            models=["a.gguf", 7, "b.gguf"],
            loaded_models=["a.gguf"],
            instance="abc",
        ),
    )
    assert good == Health(
        "ok",
        capacity=3,
        in_flight=1,
        models=frozenset({"a.gguf", "b.gguf"}),
        loaded_models=("a.gguf",),
        instance="abc",
    )
    odd = read_health(200, doc(status="ok", capacity=True, in_flight=-1, models="a", instance=5))
    assert (odd.capacity, odd.in_flight, odd.models, odd.instance) == (None, None, None, None)
    assert read_health(200, doc(status="ok", capacity=0)).capacity is None


def test_what_the_backend_writes_reads_back() -> None:
    instance = new_instance_id()
    for ready in (True, False):
        status, body = health_document(
            ready=ready,
            capacity=2,
            in_flight=1,
            models=["m.gguf"],
            loaded_models=["m.gguf"] if ready else [],
            instance=instance,
        )
        health = read_health(status, json.dumps(body).encode())
        assert health.state == ("ok" if ready else "loading")
        assert (health.capacity, health.in_flight, health.instance) == (2, 1, instance)
        assert body["available"] == 1
    assert new_instance_id() != instance
