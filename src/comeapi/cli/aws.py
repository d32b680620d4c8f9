"""``comeapi aws``: the serverless path on a laptop, without an AWS account.

comeapi aws moto --port 5000            # moto's DynamoDB/EC2 emulator on loopback
comeapi cache push dynamodb --table comeapi --endpoint-url http://127.0.0.1:5000 --create
comeapi aws serve-local --table comeapi --endpoint-url http://127.0.0.1:5000 --port 3000
curl -s localhost:3000/generate -d '{"prompt": "..."}'
"""

from __future__ import annotations

import logging
import os

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
    with user_errors():
        client = make_client(region or "us-east-1", endpoint_url)
        app = ServerlessApp.from_env(env, client=client)
    logging.getLogger("comeapi.serverless.local").setLevel(logging.INFO)
    click.echo(f"Lambda handler on http://{host}:{port} (table {table})", err=True)
    serve(app, host, port)


@aws.command("moto")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
def moto(host: str, port: int) -> None:
    """Run moto's server (DynamoDB, EC2, ...) on loopback: the same as `moto_server -p PORT`."""
    try:
        from moto.server import main as moto_main
    except ImportError:
        raise click.ClickException("moto is not installed: pip install 'moto[server]'") from None
    moto_main(["-H", host, "-p", str(port)])
