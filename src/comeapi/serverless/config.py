"""How the Lambda functions are configured: every environment variable they read, read once
into one object (in the spirit of aws-powertools' ``IdempotencyConfig``).

A field is read from the variable of its name in upper case (``table_name`` from
``TABLE_NAME``), as ``comeapi.settings`` names its ``COMEAPI_*`` variables; the field lists
are the whole list of variables (deploy/aws/template.yaml declares each one, and
tests/deploy/test_sam_template.py checks it against ``FUNCTION_VARIABLES`` and
``IDLE_STOP_VARIABLES``). An empty variable means its default, as the template declares
every variable, most of them empty. A bad value is a ConfigError naming the variable.

The defaults the gateway has too come from where ``comeapi.settings`` takes its own: the
request limits from ``protocol.limits``, the review states served from ``cache.serving``.
NamedTuples, standard library only: this is read at cold start (as ``events.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple, TypeVar

from comeapi.cache.serving import DEFAULT_SERVE_STATES, parse_serve_states
from comeapi.errors import ConfigError
from comeapi.protocol.limits import MAX_TOKENS_LIMIT

T = TypeVar("T", bound=tuple[Any, ...])


class BackendConfig(NamedTuple):
    """``ON_MISS=start-backend``: the stopped EC2 instance that runs ``comeapi backend``
    (``serverless.ondemand``)."""

    backend_instance_id: str
    backend_port: int = 8080
    backend_host: str | None = None  # a fixed address (an Elastic IP's DNS name)
    backend_address: Literal["public", "private"] = "public"  # which IP, without a host
    backend_api_key: str | None = None  # sent as a bearer token
    forward_timeout: float = 25.0  # s a forwarded miss may take (API Gateway allows 29)
    boot_retry_after: float = 30.0  # Retry-After (s) while the instance boots

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> BackendConfig:
        if not environ.get("BACKEND_INSTANCE_ID"):
            raise ConfigError("ON_MISS=start-backend needs BACKEND_INSTANCE_ID")
        return _read(cls, environ, _BACKEND)


class FunctionConfig(NamedTuple):
    """The cache function (``serverless.handler``)."""

    table_name: str  # the DynamoDB table holding the cache
    dynamodb_endpoint_url: str | None = None  # another endpoint (local runs); None: AWS's
    default_model: str | None = None  # None: the bundled model, or the one cached
    api_keys: tuple[str, ...] = ()  # bearer keys (comma-separated); none: open
    serve_states: frozenset[str] = frozenset(DEFAULT_SERVE_STATES)
    max_tokens_limit: int = MAX_TOKENS_LIMIT
    catalogue_ttl: float = 60.0  # s the table's catalogue is kept; the snapshot's check interval
    snapshot: Literal["auto", "off"] = "auto"  # auto: the package's snapshot, if it has one
    snapshot_dir: str | None = None  # None: comeapi-snapshot/ beside the package
    on_miss: Literal["reject", "start-backend"] = "reject"
    backend: BackendConfig | None = None  # with on_miss=start-backend (BACKEND_* variables)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> FunctionConfig:
        if not environ.get("TABLE_NAME"):
            raise ConfigError("TABLE_NAME is not set: the DynamoDB table holding the cache")
        config = _read(cls, environ, _FUNCTION)
        if config.on_miss == "start-backend":
            return config._replace(backend=BackendConfig.from_env(environ))
        return config


class IdleStopConfig(NamedTuple):
    """The scheduled function that stops the on-demand backend when idle."""

    backend_instance_id: str
    idle_minutes: float = 30.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> IdleStopConfig:
        if not environ.get("BACKEND_INSTANCE_ID"):
            raise ConfigError("BACKEND_INSTANCE_ID is not set: the backend's EC2 instance")
        return _read(cls, environ, _IDLE_STOP)


def init_in_lambda(environ: Mapping[str, str]) -> bool:
    """Whether to build the app at import: inside Lambda (which sets
    AWS_LAMBDA_FUNCTION_NAME) and configured enough to try."""
    return bool(environ.get("AWS_LAMBDA_FUNCTION_NAME") and environ.get("TABLE_NAME"))


# --- reading a value ---------------------------------------------------------------------

Parse = Callable[[str, str], Any]  # (variable, non-empty value) -> the field's value


def _read(cls: type[T], environ: Mapping[str, str], parsers: Mapping[str, Parse]) -> T:
    """``cls`` from the variables named by its fields (``parsers``: one per field read)."""
    values = {}
    for field, parse in parsers.items():
        name = field.upper()
        raw = environ.get(name, "")
        if raw:
            values[field] = parse(name, raw)
    return cls(**values)


def _text(name: str, value: str) -> str:
    return value


def _keys(name: str, value: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in value.split(",") if k.strip())


def _whole(low: int, high: int | None = None) -> Parse:
    what = f"a whole number from {low}" + (f" to {high}" if high is not None else " up")

    def parse(name: str, value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = low - 1
        if number < low or (high is not None and number > high):
            raise ConfigError(f"{name}={value!r}: expected {what}")
        return number

    return parse


def _seconds(*, zero: bool, unit: str = "seconds") -> Parse:
    what = f"a number of {unit}" + (" (0 or more)" if zero else " above 0")

    def parse(name: str, value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not (number >= 0 if zero else number > 0) or number == float("inf"):
            raise ConfigError(f"{name}={value!r}: expected {what}")
        return number

    return parse


def _choice(*allowed: str) -> Parse:
    def parse(name: str, value: str) -> str:
        if value not in allowed:
            raise ConfigError(f"{name}={value!r}: expected {' or '.join(allowed)}")
        return value

    return parse


def _serve_states(name: str, value: str) -> frozenset[str]:
    try:
        return parse_serve_states(value)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


_BACKEND: dict[str, Parse] = {
    "backend_instance_id": _text,
    "backend_port": _whole(1, 65535),
    "backend_host": _text,
    "backend_address": _choice("public", "private"),
    "backend_api_key": _text,
    "forward_timeout": _seconds(zero=False),
    "boot_retry_after": _seconds(zero=True),
}
_FUNCTION: dict[str, Parse] = {
    "table_name": _text,
    "dynamodb_endpoint_url": _text,
    "default_model": _text,
    "api_keys": _keys,
    "serve_states": _serve_states,
    "max_tokens_limit": _whole(1),
    "catalogue_ttl": _seconds(zero=True),
    "snapshot": _choice("auto", "off"),
    "snapshot_dir": _text,
    "on_miss": _choice("reject", "start-backend"),
}
_IDLE_STOP: dict[str, Parse] = {
    "backend_instance_id": _text,
    "idle_minutes": _seconds(zero=False, unit="minutes"),
}

# Every variable each function reads: its config's fields, upper case.
FUNCTION_VARIABLES = tuple(
    f.upper() for f in (*FunctionConfig._fields, *BackendConfig._fields) if f != "backend"
)
IDLE_STOP_VARIABLES = tuple(f.upper() for f in IdleStopConfig._fields)
