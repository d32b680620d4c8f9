"""One settings object: flags > environment > TOML > defaults, and errors that name the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from comeapi.errors import ConfigError
from comeapi.settings import Settings, data_dir, load_settings, parse_backends_range


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("COMEAPI_"):
            monkeypatch.delenv(key)


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "comeapi.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    settings = load_settings()
    assert settings.model_dir == data_dir() / "models"
    assert settings.store == f"sqlite:{data_dir() / 'cache.db'}"
    assert settings.model_dir.is_absolute()
    assert settings.backend_port == 8080
    assert settings.ctx == 2048
    assert settings.slots == 1
    assert settings.threads is None


def test_precedence_flags_then_env_then_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_toml(tmp_path, "ctx = 512\nthreads = 3\ncount = 4\n")
    from_toml = load_settings(config)
    assert (from_toml.ctx, from_toml.threads, from_toml.count) == (512, 3, 4)

    monkeypatch.setenv("COMEAPI_CTX", "1024")
    monkeypatch.setenv("COMEAPI_THREADS", "2")
    from_env = load_settings(config)
    assert (from_env.ctx, from_env.threads, from_env.count) == (1024, 2, 4)

    from_flags = load_settings(config, ctx=256, threads=None)  # None: flag not given
    assert (from_flags.ctx, from_flags.threads, from_flags.count) == (256, 2, 4)


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_toml(tmp_path, "backend_port = 8181\n")
    monkeypatch.setenv("COMEAPI_CONFIG", str(config))
    assert load_settings().backend_port == 8181


def test_comma_lists_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMEAPI_BACKENDS", "127.0.0.1:8080, http://10.0.0.2:8080")
    settings = load_settings()
    assert settings.backend_urls() == ["http://127.0.0.1:8080", "http://10.0.0.2:8080"]


def test_keys_and_origins_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMEAPI_API_KEYS", "k1, k2")
    monkeypatch.setenv("COMEAPI_CORS_ORIGINS", "https://a.example,https://b.example")
    monkeypatch.setenv("COMEAPI_BACKEND_API_KEY", "")
    settings = load_settings()
    assert settings.api_keys == ["k1", "k2"]
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert settings.backend_api_key is None  # empty means none, not the key ""
    assert load_settings(backend_api_key="b").backend_api_key == "b"


@pytest.mark.parametrize(
    ("source", "key"),
    [("flag", "ctx"), ("env", "threads"), ("toml", "slots")],
)
def test_bad_value_names_the_key_and_where_to_set_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, key: str
) -> None:
    config = write_toml(tmp_path, "slots = 0\n" if source == "toml" else "")
    overrides: dict[str, int] = {}
    if source == "flag":
        overrides["ctx"] = 10
    if source == "env":
        monkeypatch.setenv("COMEAPI_THREADS", "many")
    with pytest.raises(ConfigError) as err:
        load_settings(config, **overrides)
    message = err.value.message
    assert message.startswith(f"invalid setting {key}:")
    assert "\n" not in message
    assert f"--{key.replace('_', '-')}" in message and f"COMEAPI_{key.upper()}" in message
    assert str(config) in message


@pytest.mark.parametrize(
    ("store", "says"),
    [
        ("/tmp/x.db", "expected sqlite:PATH or dynamodb:TABLE (did you mean sqlite:/tmp/x.db?)"),
        ("redis://x", "expected sqlite:PATH or dynamodb:TABLE"),
        ("sqlite:", "sqlite: needs a file path"),
        ("dynamodb:", "dynamodb: needs a table"),
    ],
)
def test_a_bad_store_names_the_store_key(store: str, says: str) -> None:
    """Fault: `--store /tmp/x.db` gave a garbled message naming no key."""
    with pytest.raises(ConfigError) as err:
        load_settings(store=store)
    message = err.value.message
    assert message.startswith("invalid setting store: ")
    assert says in message and "--store, COMEAPI_STORE" in message
    assert "(settings)" not in message and "Value error" not in message


def test_several_bad_keys_are_one_line() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(ctx=10, slots=0)
    message = err.value.message
    assert "\n" not in message and "ctx:" in message and "slots:" in message


def test_unknown_toml_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model_directory"):
        load_settings(write_toml(tmp_path, 'model_directory = "models"\n'))


def test_toml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"comeapi\.toml"):
        load_settings(write_toml(tmp_path, "ctx = = 3\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(Exception, match="frozen"):
        settings.ctx = 1  # type: ignore[misc]
    assert isinstance(settings, Settings)


def test_backends_range() -> None:
    assert parse_backends_range("127.0.0.1:8080:3") == [
        "http://127.0.0.1:8080",
        "http://127.0.0.1:8081",
        "http://127.0.0.1:8082",
    ]
    for bad in ("127.0.0.1:8080", "host:x:2", "h:65535:2", ":8080:1", "h:8080:0"):
        with pytest.raises(ValueError, match="HOST:FIRST_PORT:COUNT"):
            parse_backends_range(bad)
    with pytest.raises(ConfigError, match="backends_range"):
        load_settings(backends_range="nope")


def test_an_empty_default_model_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """docker-compose passes COMEAPI_DEFAULT_MODEL= (empty) when it is not set."""
    monkeypatch.setenv("COMEAPI_DEFAULT_MODEL", "")
    assert load_settings().default_model is None
    monkeypatch.setenv("COMEAPI_DEFAULT_MODEL", "m.gguf")
    assert load_settings().default_model == "m.gguf"
