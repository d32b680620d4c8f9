"""Every setting's flag has the setting's name (``--backends`` is ``backends``, as
COMEAPI_BACKENDS and ``backends`` in TOML), and the spellings users typed before still work."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from comeapi.cli import COMMANDS, main
from comeapi.cli.backend import BACKEND_ADDRESS
from comeapi.cli.options import ALIASES
from comeapi.settings import Settings
from tests.helpers import comeapi_argv, free_port


def commands(
    group: click.Group, ctx: click.Context, path: str
) -> Iterator[tuple[str, click.Command]]:
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, name
        yield f"{path} {name}", command
        if isinstance(command, click.Group):
            yield from commands(command, click.Context(command, parent=ctx), f"{path} {name}")


def test_every_settings_flag_is_the_settings_name() -> None:
    ctx = click.Context(main)
    checked = 0
    for path, command in commands(main, ctx, "comeapi"):
        assert isinstance(main, click.Group) and COMMANDS
        for param in command.params:
            if param.name not in Settings.model_fields:
                continue
            own = "--" + param.name.replace("_", "-")
            assert param.opts[0] == own, (path, param.opts)
            allowed = set(ALIASES.get(param.name, ())) | set(BACKEND_ADDRESS.get(param.name, ()))
            assert set(param.opts[1:]) <= allowed, (path, param.opts)
            checked += 1
    assert checked > 100  # serve, up, backend, backends start, warmup, cache ... all seen


def warmup(tmp_path: Path, *flags: str) -> tuple[int, str]:
    """`comeapi warmup` with nothing listening at its backends: exit status, stderr on one
    line (it names every backend it was given)."""
    done = subprocess.run(
        comeapi_argv("warmup", "--store", f"sqlite:{tmp_path / 'c.db'}", "--wait", "0", *flags),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, " ".join(done.stderr.split())


def test_backends_takes_urls_as_comeapi_backends_does(tmp_path: Path) -> None:
    port = free_port()
    code, err = warmup(
        tmp_path, "--backends", f"http://127.0.0.1:{port}", "--backend", f"127.0.0.1:{port + 1}"
    )
    assert code == 1, err
    assert f"http://127.0.0.1:{port}: nothing listens there" in err
    assert f"http://127.0.0.1:{port + 1}: nothing listens there" in err
    assert "deprecated" not in err


def test_backends_range_is_comeapis_short_form(tmp_path: Path) -> None:
    port = free_port()
    code, err = warmup(tmp_path, "--backends-range", f"127.0.0.1:{port}:2")
    assert code == 1, err
    assert f"http://127.0.0.1:{port}: nothing listens there" in err
    assert f"http://127.0.0.1:{port + 1}: nothing listens there" in err


def test_the_old_backends_short_form_still_works_with_a_warning(tmp_path: Path) -> None:
    port = free_port()
    code, err = warmup(tmp_path, "--backends", f"127.0.0.1:{port}:2")
    assert code == 1, err
    assert f"http://127.0.0.1:{port + 1}: nothing listens there" in err
    assert f"deprecated: use --backends-range 127.0.0.1:{port}:2" in err


@pytest.mark.parametrize(
    "flags",
    [
        ("--backends", "127.0.0.1:8080:2", "--backends-range", "127.0.0.1:9090:2"),
        ("--backends", "127.0.0.1:8080:2", "--backends", "127.0.0.1:9090:2"),
    ],
)
def test_two_short_forms_are_refused(tmp_path: Path, flags: tuple[str, ...]) -> None:
    code, err = warmup(tmp_path, *flags)
    assert code == 2, err
    assert "one HOST:FIRST_PORT:COUNT, with --backends-range" in err
