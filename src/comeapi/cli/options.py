"""Click options generated from the Settings fields, so a flag, its help and its type come
from one place, and every command builds its Settings (and reports errors) the same way."""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

import click

from comeapi.errors import ComeapiError, ConfigError
from comeapi.settings import Settings, load_settings, parse_backends_range

F = TypeVar("F", bound=Callable[..., Any])


# Other spellings of a setting's flag, kept because they are in use: the singular of a
# repeatable flag (--api-key KEY --api-key KEY). The setting's own name always works too.
ALIASES: dict[str, tuple[str, ...]] = {
    "backends": ("--backend",),
    "api_keys": ("--api-key",),
    "cors_origins": ("--cors-origin",),
}


def settings_options(
    *names: str, aliases: dict[str, tuple[str, ...]] | None = None
) -> Callable[[F], F]:
    """One option per Settings field, its flag the field's name (``--queue-size``, as
    ``COMEAPI_QUEUE_SIZE`` and ``queue_size`` in TOML), plus the spellings of ``ALIASES``
    and ``aliases`` (a command's own, e.g. ``--port`` for ``backend_port`` in ``comeapi
    backend``)."""
    extra = {**ALIASES, **(aliases or {})}

    def decorate(func: F) -> F:
        for name in reversed(names):
            field = Settings.model_fields[name]
            flags = ["--" + name.replace("_", "-"), *extra.get(name, ())]
            kwargs = _click_type(field.annotation)
            if field.annotation is bool:  # --store-misses / --no-store-misses
                flags = [f"{flags[0]}/--no-{flags[0].removeprefix('--')}"]
                kwargs = {}
            default = field.get_default(call_default_factory=True)
            shown = "" if default in (None, [], "") else f" [default: {default}]"
            env = f"COMEAPI_{name.upper()}"
            func = click.option(
                *flags,
                name,
                default=None,
                help=f"{field.description or ''}{shown} [env: {env}]",
                **kwargs,
            )(func)
        return func

    return decorate


def _click_type(annotation: Any) -> dict[str, Any]:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _click_type(args[0])
    if origin is typing.Annotated:
        return _click_type(args[0])
    if origin is list:
        return {"multiple": True, "type": str}
    if origin is Literal:
        return {"type": click.Choice([str(a) for a in args])}
    if annotation is bool:
        return {"type": click.BOOL}
    if annotation is Path:
        return {"type": click.Path(path_type=Path)}
    if annotation in (int, float, str):
        return {"type": annotation}
    return {"type": str}


def build_settings(ctx: click.Context, values: dict[str, Any]) -> Settings:
    """Settings from this command's flags plus environment and TOML; exits with the error."""
    overrides = {
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in values.items()
        if k in Settings.model_fields and v not in (None, ())
    }
    _legacy_backends_range(ctx, overrides)
    config = (ctx.find_root().obj or {}).get("config")
    try:
        return load_settings(Path(config) if config else None, **overrides)
    except ConfigError as exc:
        raise SettingsError(exc.message, ctx) from None


def _legacy_backends_range(ctx: click.Context, overrides: dict[str, Any]) -> None:
    """``--backends HOST:FIRST_PORT:COUNT``, the flag's meaning before it took the setting's
    name (``backends``: URLs, as COMEAPI_BACKENDS): still understood, with a warning to use
    ``--backends-range``. A range is never a URL (a port cannot be followed by ``:N``)."""
    ranges = [u for u in overrides.get("backends", []) if _is_range(u)]
    if not ranges:
        return
    if len(ranges) > 1 or overrides.get("backends_range"):
        raise SettingsError("give one HOST:FIRST_PORT:COUNT, with --backends-range", ctx)
    click.echo(
        f"Warning: --backends {ranges[0]} is deprecated: use --backends-range {ranges[0]} "
        "(--backends takes backend URLs, as COMEAPI_BACKENDS does)",
        err=True,
    )
    overrides["backends"] = [u for u in overrides["backends"] if u != ranges[0]]
    overrides["backends_range"] = ranges[0]


def _is_range(value: str) -> bool:
    if "://" in value:
        return False
    try:
        parse_backends_range(value)
    except ValueError:
        return False
    return True


class SettingsError(click.UsageError):
    """A bad setting: exit status 2 like any usage error, shown as one line (the message
    names the key and where it can be set; the usage text would only push it down)."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"Error: {one_line(self.format_message())}", file=file, err=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Errors of ours (and the operating system's) become a one-line message and exit status
    1, never a traceback."""
    try:
        yield
    except ComeapiError as exc:
        raise click.ClickException(one_line(exc.message)) from None
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        raise click.ClickException(f"{exc.strerror or exc}{where}") from None


def one_line(message: str) -> str:
    """A message of several lines (a list of problems) as one line."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def short(text: str, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters (for table cells)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def backend_urls_option(func: F) -> F:
    """``--url URL`` (repeatable) of the commands that generate answers (warmup,
    regenerate); ``generation_targets`` reads it."""
    return click.option(
        "--url",
        "urls",
        multiple=True,
        help="Backend or gateway URL to generate with (repeatable), instead of the configured "
        "backends (--backends, --backends-range); with none of these, the gateway at host:port.",
    )(func)


def generation_targets(settings: Settings, urls: tuple[str, ...]) -> tuple[list[str], str | None]:
    """Where warmup and regenerate send their requests, and the key to send: the ``--url``
    list or the configured backends (their backend key, else a gateway key); with neither,
    the gateway at host:port, which sends its backends the key they take (a gateway key)."""
    gateway_key = next(iter(settings.api_keys), None)
    targets = [u.rstrip("/") for u in urls] or settings.backend_urls()
    if targets:
        return targets, settings.backend_api_key or gateway_key
    return [f"http://{settings.host}:{settings.port}"], gateway_key or settings.backend_api_key
