"""``comeapi aws``: the function package, and the serverless path on a laptop without an AWS
account.

comeapi aws moto --port 5000            # moto's DynamoDB/EC2 emulator on loopback
comeapi cache push dynamodb --table comeapi --endpoint-url http://127.0.0.1:5000 --create
comeapi aws serve-local --table comeapi --endpoint-url http://127.0.0.1:5000 --port 3000
curl -s localhost:3000/generate -d '{"prompt": "..."}'
comeapi aws package deploy/aws/build/CacheFunction --table comeapi-cache   # before sam build
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from comeapi.cli.options import user_errors


@click.group()
def aws() -> None:
    """Run the AWS (Lambda + DynamoDB) path locally."""


@aws.command("serve-local")
@click.option("--table", required=True, help="DynamoDB table holding the cache.")
@click.option("--endpoint-url", default=None, help="DynamoDB endpoint (moto_server, ...).")
@click.option("--region", default=None, help="AWS region (default: AWS_REGION, else us-east-1).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=3000, show_default=True)
@click.option("--default-model", default=None, help="DEFAULT_MODEL of the handler.")
@click.option(
    "--snapshot",
    "snapshot_dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="Answer hits from this cache snapshot (a package's comeapi-snapshot/), as Lambda does.",
)
@click.option(
    "--on-miss",
    type=click.Choice(["reject", "start-backend"]),
    default="reject",
    show_default=True,
    help="ON_MISS of the handler; start-backend reads BACKEND_* from the environment.",
)
def serve_local(
    table: str,
    endpoint_url: str | None,
    region: str | None,
    host: str,
    port: int,
    default_model: str | None,
    snapshot_dir: Path | None,
    on_miss: str,
) -> None:
    """Serve the Lambda handler over HTTP, each request as an API Gateway v2 event."""
    from comeapi.cache.dynamo import make_client
    from comeapi.serverless.handler import ServerlessApp
    from comeapi.serverless.local import serve

    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    env = {**os.environ, "TABLE_NAME": table, "ON_MISS": on_miss}
    if default_model:
        env["DEFAULT_MODEL"] = default_model
    env["SNAPSHOT"], env["SNAPSHOT_DIR"] = (
        ("auto", str(snapshot_dir)) if snapshot_dir else ("off", "")
    )
    with user_errors():
        client = make_client(region or "us-east-1", endpoint_url)
        app = ServerlessApp.from_env(env, client=client)
    logging.getLogger("comeapi.serverless.local").setLevel(logging.INFO)
    click.echo(f"Lambda handler on http://{host}:{port} (table {table})", err=True)
    serve(app, host, port)


@aws.command("package")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--table", default=None, help="The DynamoDB table to take the snapshot from.")
@click.option("--region", default=None, help="AWS region (default: AWS_REGION or the profile's).")
@click.option("--endpoint-url", default=None, help="Another DynamoDB endpoint (moto_server, ...).")
@click.option(
    "--snapshot/--no-snapshot",
    default=True,
    show_default=True,
    help="Carry a snapshot of the table, so that a cold function answers hits without boto3.",
)
def package(
    out: Path, table: str | None, region: str | None, endpoint_url: str | None, snapshot: bool
) -> None:
    """Write the function package `sam build` ships (CodeUri): comeapi and a snapshot."""
    from comeapi.serverless.package import build_package

    if snapshot and not table:
        raise click.UsageError("--table is required (or --no-snapshot)")
    with user_errors():
        store = None
        if snapshot:
            from comeapi.cache.dynamo import DynamoStore, make_client

            # `make lambda-package` runs this command: say how a region goes through it too.
            how = "pass --region R (make lambda-package: LAMBDA_PACKAGE_ARGS='--region R')"
            store = DynamoStore(make_client(region, endpoint_url, how=how), str(table))
        taken = build_package(out, store)
    if taken is None:
        click.echo(f"function package in {out}, without a snapshot (hits read the table)")
    else:
        revision, _ = taken.state
        prompts = len(taken.catalogue().prompts)
        click.echo(
            f"function package in {out}, with a snapshot of table {taken.table} at catalogue "
            f"revision {revision}: {len(taken)} answers to {prompts} prompts"
        )


@aws.command("moto")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
def moto(host: str, port: int) -> None:
    """Run moto's server (DynamoDB, EC2, ...) on loopback: the same as `moto_server -p PORT`."""
    try:
        from moto.server import main as moto_main
    except ImportError:
        raise click.ClickException(
            "moto is not installed: pip install 'comeapi[local]' (`make run` installs it)"
        ) from None
    moto_main(["-H", host, "-p", str(port)])
