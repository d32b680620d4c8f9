"""``comeapi cache ls|export|import|copy|push|pull``, ``calibrate``
(``comeapi.cli.similar``), the review commands of
``comeapi.cli.review`` (``review|approve|reject|pin|unpin|edit|regenerate``) and ``comeapi
cache check`` (``comeapi.cli.check``).

Every command takes ``--store URL`` (default: the ``store`` setting, COMEAPI_STORE); the
DynamoDB commands ``push`` and ``pull`` load boto3 only when run.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from comeapi.cli.options import build_settings, settings_options, short, user_errors

# name -> "module:attribute", imported only when the command runs (boto3 is slow to import).
LAZY_COMMANDS = {
    "push": "comeapi.cli.cache_dynamo:push",
    "pull": "comeapi.cli.cache_dynamo:pull",
    "check": "comeapi.cli.check:check",
    "calibrate": "comeapi.cli.similar:calibrate",
    "misses": "comeapi.cli.similar:misses",
    "label": "comeapi.cli.similar:label",
    **{
        name: f"comeapi.cli.review:{name}"
        for name in ("review", "approve", "reject", "pin", "unpin", "edit", "regenerate")
    },
}


# --- the cache group ----------------------------------------------------------------------


class _CacheGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*self.commands, *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        target = LAZY_COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        try:
            command = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            return None
        return command if isinstance(command, click.Command) else None


@click.group(cls=_CacheGroup)
def cache() -> None:
    """Inspect the response store and move it between machines."""


@cache.command("ls")
@settings_options("store")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def ls(ctx: click.Context, /, as_json: bool, **values: Any) -> None:
    """List the cached prompts with their variants and hit counts."""
    from comeapi.cache.default import open_configured_store

    settings = build_settings(ctx, values)
    with user_errors(), open_configured_store(settings) as store:
        present = store.variants_by_key()
        hits = store.hit_counts()
        prompts = store.prompts()
    listing: list[dict[str, Any]] = []
    for p in prompts:
        per_variant = {v: hits.get((p.key, v), 0) for v in sorted(present.get(p.key, ()))}
        listing.append(
            {
                "key": p.key,
                "kind": p.kind,
                "model": p.model,
                "prompt": p.prompt,
                "variants": sorted(per_variant),
                "hits": {str(v): n for v, n in per_variant.items()},
                "total_hits": sum(per_variant.values()),
            }
        )
    if as_json:
        doc = {"store": settings.store, "prompts": listing}
        click.echo(json.dumps(doc, ensure_ascii=False, indent=2))
        return
    table = Table(title=f"{settings.store}: {len(listing)} prompts")
    for column in ("key", "kind", "variants", "hits", "hits per variant", "prompt"):
        table.add_column(column, justify="right" if column in ("variants", "hits") else "left")
    for row in listing:
        table.add_row(
            row["key"][:12],
            row["kind"],
            str(len(row["variants"])),
            str(row["total_hits"]),
            " ".join(f"{v}:{n}" for v, n in row["hits"].items()),
            short(row["prompt"], 48),
        )
    Console().print(table)


@cache.command("export")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@settings_options("store")
@click.pass_context
def export(ctx: click.Context, /, file: Path, **values: Any) -> None:
    """Write every entry to FILE: a .tar.gz archive, or .jsonl lines."""
    from comeapi.cache.archive import write_archive, write_jsonl
    from comeapi.cache.default import open_configured_store

    settings = build_settings(ctx, values)
    with user_errors(), open_configured_store(settings) as store:
        entries = list(store.entries())
        calibration = store.calibration()  # similar matching's thresholds travel with them
        if file.name.endswith(".jsonl"):
            write_jsonl(entries, file, calibration)
        else:
            write_archive(entries, file, calibration)
    prompts = len({e.key for e in entries})
    click.echo(f"exported {len(entries)} entries ({prompts} prompts) to {file}")


@cache.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--merge/--replace",
    default=True,
    help="Add to the store, replacing the same prompt variants (default), or make the store "
    "hold exactly the archive.",
)
@settings_options("store")
@click.pass_context
def import_(ctx: click.Context, /, file: Path, merge: bool, **values: Any) -> None:
    """Load FILE (.tar.gz archive or .jsonl) into the store, after validating all of it.

    All or nothing: a truncated, tampered or empty FILE changes nothing.
    """
    from comeapi.cache.archive import read_calibration, read_entries_file
    from comeapi.cache.open import open_store
    from comeapi.errors import ArchiveError
    from comeapi.similar.calibration import Calibration

    settings = build_settings(ctx, values)
    with user_errors():
        entries = read_entries_file(file)  # a bad archive stops here: the store is untouched
        if not entries:  # --replace would empty the store: never by accident
            raise ArchiveError(f"{file} holds no entries: nothing imported, the store is unchanged")
        calibration = read_calibration(file)
        if calibration is not None:
            Calibration.from_dict(calibration)  # a malformed one stops here too
        with open_store(settings.store) as store:
            count = store.put_many(entries) if merge else store.replace_all(entries)
            if calibration is not None:  # a file without one leaves the store's as it is
                store.set_calibration(calibration)
    prompts = len({e.key for e in entries})
    how = "merged into" if merge else "replaced the contents of"
    click.echo(f"{count} entries ({prompts} prompts) {how} {settings.store}")


@cache.command("copy")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.argument("destination")
@click.option("--timeout", type=click.FloatRange(1), default=300.0, show_default=True)
def copy(file: Path, destination: str, timeout: float) -> None:
    """Copy an archive to another machine with scp: DESTINATION is user@host:PATH.

    The archive is validated first, so a broken file is never shipped.
    """
    from comeapi.cache.archive import read_entries_file

    if ":" not in destination:
        raise click.BadParameter("expected user@host:PATH", param_hint="DESTINATION")
    with user_errors():
        read_entries_file(file)
    scp = shutil.which("scp")
    if scp is None:
        raise click.ClickException("scp is not installed (apt-get install openssh-client)")
    argv = [scp, "-q", "-o", "BatchMode=yes", "-o", "ConnectTimeout=15", str(file), destination]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise click.ClickException(f"scp to {destination} timed out after {timeout:g}s") from None
    if result.returncode != 0:
        detail = result.stderr.strip() or f"exit status {result.returncode}"
        raise click.ClickException(f"scp to {destination} failed: {detail}")
    click.echo(f"copied {file} to {destination}")
