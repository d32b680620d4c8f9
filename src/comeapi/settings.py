"""The one settings object for every comeapi command.

Each setting has one name everywhere: the flag ``--queue-size``, the environment variable
``COMEAPI_QUEUE_SIZE`` and the TOML key ``queue_size`` (``cli.options.ALIASES`` lists the
few other spellings a flag also takes, such as ``--api-key`` for ``--api-keys``).
Precedence: flags, then environment, then the TOML file (``--config`` or
``COMEAPI_CONFIG``), then the defaults below.

The default store and models directory live in one per-user place (``data_dir()``), not in
the working directory, so every command finds the same ones wherever it is run from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from comeapi.cache.checks import CheckPolicy
from comeapi.cache.serving import DEFAULT_SERVE_STATES, parse_serve_states
from comeapi.errors import ConfigError
from comeapi.protocol.limits import MAX_BODY_BYTES, MAX_TOKENS_LIMIT

ENV_PREFIX = "COMEAPI_"

CommaList = Annotated[list[str], NoDecode]


def data_dir() -> Path:
    """Where the default store and models live: ``$XDG_DATA_HOME/comeapi``, by default
    ``~/.local/share/comeapi`` (the XDG base directory rule; a relative value is ignored)."""
    base = os.environ.get("XDG_DATA_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path("~/.local/share").expanduser()
    return root / "comeapi"


def default_store() -> str:
    """The default ``store``: the SQLite file in ``data_dir()``, seeded with the shipped cache."""
    return f"sqlite:{data_dir() / 'cache.db'}"


def default_model_dir() -> Path:
    return data_dir() / "models"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, validate_default=True
    )

    # --- models and the backend process -------------------------------------------------
    model_dir: Path = Field(
        default_factory=default_model_dir,
        description="Directory of *.gguf model files (default: models in the data directory).",
    )
    default_model: str | None = Field(
        None,
        description="GGUF file for requests that name none (default: the only file, else "
        "the bundled smollm2-135m-instruct-q4_1.gguf when present, else the first by name).",
    )
    backend_host: str = Field("127.0.0.1", description="Address `comeapi backend` listens on.")
    backend_port: int = Field(8080, ge=1, le=65535, description="Port of `comeapi backend`.")
    threads: int | None = Field(None, ge=1, description="llama.cpp threads (default: its own).")
    n_gpu_layers: int = Field(0, ge=-1, description="Layers offloaded to the GPU (-1: all).")
    ctx: int = Field(2048, ge=64, description="Context length in tokens.")
    slots: int = Field(1, ge=1, le=64, description="Requests one backend decodes at once.")
    max_loaded_models: int = Field(1, ge=1, description="Models kept loaded at once (LRU).")
    max_tokens_limit: int = Field(
        MAX_TOKENS_LIMIT, ge=1, description="Largest max_tokens a client may ask."
    )
    max_body_bytes: int = Field(
        MAX_BODY_BYTES, ge=1024, description="Largest request body accepted (413 above)."
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="A connection's request headers must be complete this long after it opens "
        "or the request's first byte arrives, or it is closed (s).",
    )
    body_timeout: float = Field(
        30.0, gt=0, description="Longest wait for the rest of a request body (s; 408 after)."
    )
    max_header_size: int = Field(
        8192,
        ge=1024,
        description="Longest request line or header line (bytes; 414/431 above); the whole "
        "request head may hold four times this.",
    )
    max_header_count: int = Field(
        100, ge=8, description="Most headers a request may have (431 above)."
    )
    max_connections: int = Field(
        1000, ge=1, description="Connections (and requests) a server takes at once; 503 above."
    )
    backend_queue: int = Field(
        4, ge=0, description="Requests a backend holds waiting beyond its capacity (503 above)."
    )

    # --- the backend pool (`comeapi backends start`) ------------------------------------
    base_port: int = Field(8080, ge=1, le=65535, description="Port of the first pool backend.")
    count: int = Field(2, ge=1, le=64, description="Backends in the pool (keep <= cores).")
    restart_backoff_max: float = Field(
        30.0, gt=0, description="Longest wait before restarting a crashed backend (s)."
    )
    liveness_failures: int = Field(
        3,
        ge=0,
        description="Health probes in a row a running backend may fail before its supervisor "
        "kills and restarts it (0: never).",
    )

    # --- the gateway (`comeapi serve`) --------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(9000, ge=1, le=65535, description="Port the gateway listens on.")
    backends: CommaList = Field(
        default_factory=list, description="Backend URLs, e.g. http://127.0.0.1:8080."
    )
    backends_range: str | None = Field(
        None, description="ComeAPI short form HOST:FIRST_PORT:COUNT, e.g. 127.0.0.1:8080:5."
    )
    routing: Literal["round-robin", "least-outstanding"] = Field(
        "round-robin", description="How a backend is picked among those with free capacity."
    )
    queue_size: int = Field(64, ge=0, description="Requests that may wait for a free backend.")
    queue_timeout: float = Field(60.0, gt=0, description="Longest wait in the queue (s).")
    health_interval: float = Field(5.0, gt=0, description="Seconds between health probes.")
    health_timeout: float = Field(2.0, gt=0, description="Timeout of one health probe (s).")
    connect_timeout: float = Field(2.0, gt=0, description="Timeout to connect to a backend (s).")
    request_timeout: float = Field(
        600.0, gt=0, description="Longest a backend may take to answer or between stream chunks."
    )
    # 3 s: a hung backend then holds a request for 3 s + one probe (health_timeout) at most,
    # so it is answered elsewhere within 10 s of the hang, regeneration included; a busy
    # backend answers its probes at once (tests/gateway/test_hung_backends.py, both).
    stall_timeout: float = Field(
        3.0,
        gt=0,
        description="Silence from a backend (s) after which it must answer a health probe, or "
        "the request moves to another backend (a started stream ends with an error event).",
    )
    shutdown_timeout: float = Field(
        30.0, ge=0, description="Grace period for in-flight requests on shutdown (s)."
    )
    api_keys: CommaList = Field(
        default_factory=list, description="Accepted bearer tokens (empty: no authentication)."
    )
    workers: int = Field(1, ge=1, le=64, description="Gateway worker processes.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: Literal["off", "text", "json"] = Field(
        "off",
        description="One line per request on stdout: off, text (common log format with "
        "key=value fields) or json.",
    )
    request_log_size: int = Field(
        200, ge=1, le=100_000, description="Recent requests kept in memory for /dashboard."
    )

    # --- the response cache --------------------------------------------------------------
    store: str = Field(
        default_factory=default_store,
        description="Response store URL, e.g. sqlite:path.db (default: cache.db in the data "
        "directory).",
    )
    prompts: Path | None = Field(
        None, description="Prompt set file (YAML or JSON); default: the shipped set."
    )
    variants: int = Field(5, ge=1, le=100, description="Answers generated per prompt.")
    on_miss: Literal["forward", "reject"] = Field(
        "forward", description="Unknown prompt: forward to the pool, or 404."
    )
    store_misses: bool = Field(False, description="Store answers of forwarded misses.")
    match: Literal["exact", "similar"] = Field(
        "exact",
        description="How a request finds a stored answer: exact (the same normalised prompt) "
        "or similar (also a paraphrase of a known prompt, within the store's calibration; "
        "docs/cache.md, Matching).",
    )
    similar_max_false_hits: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="With match=similar: the highest false-hit rate (its 95% upper bound, "
        "from the labelled examples) a prompt may have; a prompt above it stays exact-only.",
    )
    cache_refresh: float = Field(
        5.0, gt=0, description="Seconds between checks for store changes and hit-count writes."
    )
    on_demand: bool = Field(
        False, description="Start the backend pool on the first miss, stop it when idle."
    )
    idle_timeout: float = Field(
        600.0, gt=0, description="Seconds without a forwarded request before on-demand stop."
    )
    serve_states: CommaList = Field(
        default_factory=lambda: [str(s) for s in DEFAULT_SERVE_STATES],
        description="Review states of the answers served: approved (only answers a person "
        "approved) or approved,pending (also those not reviewed yet: the shipped demo's "
        "default). Rejected answers are never served. Applied when the store is loaded.",
    )
    checks: CommaList = Field(
        default_factory=list,
        description="What a quality check does to a new answer, NAME=reject|flag|off (e.g. "
        "truncated=reject): reject regenerates it, flag keeps it with the reason. On top of "
        "the prompt set's `checks` and the defaults (everything rejects but truncated).",
    )
    check_retries: int = Field(
        3,
        ge=0,
        le=20,
        description="New seeds tried for an answer the checks reject; after the last, the "
        "best try is kept with its flags.",
    )
    variant_secret: str | None = Field(
        None,
        description="Shared secret that lets a trusted proxy (nginx) pick the variant with "
        "X-Comeapi-Variant; without it the header is ignored.",
    )

    # --- HTTP: keys between the tiers, browsers ---------------------------------------
    backend_api_key: str | None = Field(
        None,
        description="Bearer token sent to the backends (by the gateway and warmup); `comeapi "
        "up` and --on-demand generate one per run when unset. The backends accept api_keys.",
    )
    cors_origins: CommaList = Field(
        default_factory=list,
        description="Origins a browser page may call from (CORS), e.g. https://app.example, "
        "or * for any (empty: none).",
    )

    @field_validator(
        "backends", "api_keys", "cors_origins", "serve_states", "checks", mode="before"
    )
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("checks")
    @classmethod
    def _check_checks(cls, value: list[str]) -> list[str]:
        try:
            CheckPolicy.parse(value)
        except ConfigError as exc:
            raise ValueError(exc.message.removeprefix("checks: ")) from None
        return value

    @field_validator("serve_states")
    @classmethod
    def _check_serve_states(cls, value: list[str]) -> list[str]:
        return sorted(parse_serve_states(value))

    @field_validator("backend_api_key", "default_model")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None  # COMEAPI_BACKEND_API_KEY= (empty) means none

    @field_validator("backends_range")
    @classmethod
    def _check_range(cls, value: str | None) -> str | None:
        if not value:  # COMEAPI_BACKENDS_RANGE= (empty) means none
            return None
        parse_backends_range(value)
        return value

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: str) -> str:
        scheme, colon, rest = value.partition(":")
        if not colon or scheme not in {"sqlite", "dynamodb"}:
            hint = f" (did you mean sqlite:{value}?)" if not colon and value else ""
            raise ValueError(f"expected sqlite:PATH or dynamodb:TABLE{hint}")
        if not rest:
            raise ValueError(f"{scheme}: needs a {'file path' if scheme == 'sqlite' else 'table'}")
        return value

    def backend_urls(self) -> list[str]:
        """Every configured backend URL: ``backends`` then the ``backends_range`` expansion."""
        urls = list(self.backends)
        if self.backends_range:
            urls += parse_backends_range(self.backends_range)
        return [u if "://" in u else f"http://{u}" for u in urls]


def parse_backends_range(spec: str) -> list[str]:
    """``"127.0.0.1:8080:5"`` -> five URLs on ports 8080..8084 (ComeAPI's argument form)."""
    host, _, rest = spec.rpartition(":")
    host, _, first = host.rpartition(":")
    try:
        port, count = int(first), int(rest)
    except ValueError:
        raise ValueError(f"{spec!r} is not HOST:FIRST_PORT:COUNT") from None
    if not host or count < 1 or not 1 <= port <= 65535 - count + 1:
        raise ValueError(f"{spec!r} is not HOST:FIRST_PORT:COUNT")
    return [f"http://{host}:{p}" for p in range(port, port + count)]


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from flags (``overrides``), environment and the TOML file.

    Raises ConfigError naming the bad key and where it can be set.
    """
    config_file = config_file or _env_config_file()
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"config file {config_file} does not exist")
    flags = {k: v for k, v in overrides.items() if v is not None}

    class _FileSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources = [init_settings, env_settings]
            if config_file is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
            return tuple(sources)

    try:
        loaded = _FileSettings(**flags)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, config_file)) from None
    except ValueError as exc:  # a TOML syntax error surfaces as ValueError
        raise ConfigError(f"config file {config_file}: {exc}") from None
    return Settings.model_construct(**loaded.model_dump())


def _env_config_file() -> Path | None:
    value = os.environ.get(f"{ENV_PREFIX}CONFIG")
    return Path(value) if value else None


def _describe(exc: ValidationError, config_file: Path | None) -> str:
    """One line: each bad key, what is wrong with it, and where it can be set."""
    problems = []
    for err in exc.errors():
        key = str(err["loc"][0]) if err["loc"] else "(settings)"
        where = f"--{key.replace('_', '-')}, {ENV_PREFIX}{key.upper()}"
        if config_file is not None:
            where += f" or {key!r} in {config_file}"
        value = err.get("input")
        shown = f" (got {value!r})" if not isinstance(value, dict) else ""
        message = str(err["msg"]).removeprefix("Value error, ")
        problems.append(f"{key}: {message}{shown} [set by {where}]")
    return "invalid setting " + "; ".join(problems)
