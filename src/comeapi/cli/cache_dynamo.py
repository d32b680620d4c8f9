"""``comeapi cache push dynamodb`` and ``comeapi cache pull dynamodb``: the local store (or an
export archive) to a DynamoDB table and back. Imported only when run: boto3 is slow to load."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from comeapi.cli.options import build_settings, settings_options, user_errors

F = TypeVar("F", bound=Callable[..., Any])


def dynamodb_options(func: F) -> F:
    """TARGET (only ``dynamodb`` today) and where the table is."""
    options = [
        click.argument("target", type=click.Choice(["dynamodb"]), metavar="dynamodb"),
        click.option("--table", required=True, help="DynamoDB table name."),
        click.option(
            "--region", default=None, help="AWS region (default: AWS_REGION or the profile's)."
        ),
        click.option(
            "--endpoint-url",
            default=None,
            help="Another DynamoDB endpoint, e.g. moto_server or DynamoDB Local "
            "(dummy credentials are used if none are configured).",
        ),
        click.option(
            "--merge/--replace",
            default=True,
            help="Add to the destination, replacing the same prompt variants (default), or "
            "make it hold exactly the source.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.command()
@dynamodb_options
@click.option("--create", is_flag=True, help="Create the table (on-demand billing) if missing.")
@click.option(
    "--from-archive",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Push this export archive (.tar.gz or .jsonl) instead of the local store.",
)
@settings_options("store")
@click.pass_context
def push(
    ctx: click.Context,
    /,
    target: str,
    table: str,
    region: str | None,
    endpoint_url: str | None,
    merge: bool,
    create: bool,
    from_archive: Path | None,
    **values: Any,
) -> None:
    """Load the cache into a DynamoDB table for the Lambda handler (safe to repeat).

    Entries go in BatchWriteItem batches of 25; the table's catalogue item is written after
    them, so a reader never sees a variant before it exists.
    """
    from comeapi.cache.dynamo import DynamoStore, create_table, make_client

    settings = build_settings(ctx, values)
    with user_errors():
        if from_archive is not None:
            from comeapi.cache.archive import read_calibration, read_entries_file

            entries, source = read_entries_file(from_archive), str(from_archive)
            calibration = read_calibration(from_archive)
        else:
            from comeapi.cache.default import open_configured_store

            with open_configured_store(settings) as local:
                entries, source = list(local.entries()), settings.store
                calibration = local.calibration()
        if not entries:
            # An empty push cannot mean anything useful, and with --replace it would wipe the table.
            raise click.ClickException(f"nothing to push: {source} holds no entries")
        client = make_client(region, endpoint_url)
        if create and create_table(client, table):
            click.echo(f"created table {table} (on-demand billing)")
        store = DynamoStore(client, table)
        if calibration is not None:
            # Similar matching's thresholds go with the answers, written first: the entries'
            # catalogue write is then the push's one new revision (a function watching the
            # revision reads both at once).
            store.set_calibration(calibration, new_revision=False)
        count = store.put_many(entries) if merge else store.replace_all(entries)
        revision = store.catalogue(consistent=True).revision
    prompts = len({e.key for e in entries})
    how = "merged into" if merge else "replaced the contents of"
    click.echo(f"{count} entries ({prompts} prompts) from {source} {how} dynamodb table {table}")
    click.echo(
        f"table {table} is now at catalogue revision {revision}. Lambda functions whose package "
        "holds an older snapshot answer cold starts from it until they check the table: run "
        "`make lambda-package`, `sam build`, `sam deploy` to ship this revision (docs/aws.md)"
    )


@click.command()
@dynamodb_options
@settings_options("store")
@click.pass_context
def pull(
    ctx: click.Context,
    /,
    target: str,
    table: str,
    region: str | None,
    endpoint_url: str | None,
    merge: bool,
    **values: Any,
) -> None:
    """Copy a DynamoDB table's entries into the local store (checksums verified first)."""
    from comeapi.cache.dynamo import DynamoStore, make_client
    from comeapi.cache.open import open_store

    settings = build_settings(ctx, values)
    with user_errors():
        remote = DynamoStore(make_client(region, endpoint_url), table)
        entries, calibration = list(remote.entries()), remote.calibration()
        if not entries:
            raise click.ClickException(f"nothing to pull: dynamodb table {table} holds no entries")
        for entry in entries:
            entry.verify()  # a tampered item stops the pull before the local store changes
        with open_store(settings.store) as local:
            count = local.put_many(entries) if merge else local.replace_all(entries)
            if calibration is not None:
                local.set_calibration(calibration)
    prompts = len({e.key for e in entries})
    how = "merged into" if merge else "replaced the contents of"
    click.echo(
        f"{count} entries ({prompts} prompts) from dynamodb table {table} {how} {settings.store}"
    )
