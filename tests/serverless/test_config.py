"""The Lambda functions' configuration: every variable read once into one object, the
defaults shared with the gateway taken from where Settings takes them, a bad value a
ConfigError naming its variable."""

from __future__ import annotations

import pytest

from comeapi.errors import ConfigError
from comeapi.serverless import config, handler
from comeapi.serverless.config import BackendConfig, FunctionConfig, IdleStopConfig
from comeapi.settings import Settings

BASE = {"TABLE_NAME": "cache"}


def test_the_defaults() -> None:
    got = FunctionConfig.from_env(BASE)
    assert got == FunctionConfig(table_name="cache")
    assert (got.on_miss, got.snapshot, got.catalogue_ttl, got.backend) == (
        "reject",
        "auto",
        60.0,
        None,
    )


def test_the_gateways_defaults_are_the_functions() -> None:
    """One place for each default: the function's are Settings' (no copies to drift)."""
    fields = Settings.model_fields
    got = FunctionConfig.from_env(BASE)
    assert got.max_tokens_limit == fields["max_tokens_limit"].get_default() == 2048
    served = fields["serve_states"].get_default(call_default_factory=True)
    assert sorted(got.serve_states) == sorted(served)
    assert fields["max_body_bytes"].get_default() == handler.MAX_BODY_BYTES


def test_every_field_is_read_from_its_variable() -> None:
    env = {
        "TABLE_NAME": "cache",
        "DYNAMODB_ENDPOINT_URL": "http://127.0.0.1:5000",
        "DEFAULT_MODEL": "m.gguf",
        "API_KEYS": " k1, ,k2 ",
        "SERVE_STATES": "approved",
        "MAX_TOKENS_LIMIT": "512",
        "CATALOGUE_TTL": "0",
        "SNAPSHOT": "off",
        "SNAPSHOT_DIR": "/tmp/snap",
        "ON_MISS": "start-backend",
        "BACKEND_INSTANCE_ID": "i-0123",
        "BACKEND_PORT": "9999",
        "BACKEND_HOST": "gpu.example",
        "BACKEND_ADDRESS": "private",
        "BACKEND_API_KEY": "secret",
        "FORWARD_TIMEOUT": "20",
        "BOOT_RETRY_AFTER": "45",
    }
    assert FunctionConfig.from_env(env) == FunctionConfig(
        table_name="cache",
        dynamodb_endpoint_url="http://127.0.0.1:5000",
        default_model="m.gguf",
        api_keys=("k1", "k2"),
        serve_states=frozenset({"approved"}),
        max_tokens_limit=512,
        catalogue_ttl=0.0,
        snapshot="off",
        snapshot_dir="/tmp/snap",
        on_miss="start-backend",
        backend=BackendConfig(
            backend_instance_id="i-0123",
            backend_port=9999,
            backend_host="gpu.example",
            backend_address="private",
            backend_api_key="secret",
            forward_timeout=20.0,
            boot_retry_after=45.0,
        ),
    )
    assert set(env) == set(config.FUNCTION_VARIABLES)


def test_each_config_reads_exactly_its_fields() -> None:
    assert set(config._FUNCTION) == set(FunctionConfig._fields) - {"backend"}
    assert set(config._BACKEND) == set(BackendConfig._fields)
    assert set(config._IDLE_STOP) == set(IdleStopConfig._fields)


def test_an_empty_variable_is_its_default() -> None:
    """The template declares every variable, most of them empty."""
    empty = dict.fromkeys(config.FUNCTION_VARIABLES, "")
    assert FunctionConfig.from_env({**empty, **BASE}) == FunctionConfig(table_name="cache")


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("CATALOGUE_TTL", "soon", "a number of seconds (0 or more)"),
        ("CATALOGUE_TTL", "-1", "a number of seconds (0 or more)"),
        ("CATALOGUE_TTL", "inf", "a number of seconds (0 or more)"),
        ("MAX_TOKENS_LIMIT", "0", "a whole number from 1 up"),
        ("MAX_TOKENS_LIMIT", "1.5", "a whole number from 1 up"),
        ("SNAPSHOT", "on", "auto or off"),
        ("ON_MISS", "forward", "reject or start-backend"),
        ("SERVE_STATES", "approved,rejected", "a rejected answer is never served"),
    ],
)
def test_a_bad_value_names_its_variable(name: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        FunctionConfig.from_env({**BASE, name: value})
    assert info.value.message.startswith(name)
    assert says in info.value.message


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("BACKEND_PORT", "0", "a whole number from 1 to 65535"),
        ("BACKEND_PORT", "http", "a whole number from 1 to 65535"),
        ("BACKEND_ADDRESS", "elastic", "public or private"),
        ("FORWARD_TIMEOUT", "0", "a number of seconds above 0"),
        ("BOOT_RETRY_AFTER", "later", "a number of seconds (0 or more)"),
    ],
)
def test_a_bad_backend_value_names_its_variable(name: str, value: str, says: str) -> None:
    env = {**BASE, "ON_MISS": "start-backend", "BACKEND_INSTANCE_ID": "i-0", name: value}
    with pytest.raises(ConfigError) as info:
        FunctionConfig.from_env(env)
    assert info.value.message.startswith(f"{name}={value!r}")
    assert says in info.value.message


def test_required_variables() -> None:
    with pytest.raises(ConfigError, match="TABLE_NAME is not set"):
        FunctionConfig.from_env({})
    with pytest.raises(ConfigError, match="ON_MISS=start-backend needs BACKEND_INSTANCE_ID"):
        FunctionConfig.from_env({**BASE, "ON_MISS": "start-backend"})
    with pytest.raises(ConfigError, match="BACKEND_INSTANCE_ID is not set"):
        IdleStopConfig.from_env({"IDLE_MINUTES": "5"})
    with pytest.raises(ConfigError, match="IDLE_MINUTES='x': expected a number of minutes"):
        IdleStopConfig.from_env({"BACKEND_INSTANCE_ID": "i-0", "IDLE_MINUTES": "x"})
    assert IdleStopConfig.from_env({"BACKEND_INSTANCE_ID": "i-0"}).idle_minutes == 30.0


def test_backend_variables_are_read_only_for_start_backend() -> None:
    env = {**BASE, "BACKEND_PORT": "not a port"}
    assert FunctionConfig.from_env(env).backend is None
