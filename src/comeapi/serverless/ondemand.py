"""A GPU backend on demand: a cache miss starts a stopped EC2 instance running
``comeapi backend``; a scheduled Lambda stops it again after IDLE_MINUTES without use.

API Gateway gives a request about 30 s, far less than an instance takes to boot, so while it
boots a miss is answered 503 with Retry-After; once it is running misses are forwarded to it.
Last use is an instance tag (``comeapi:last-used``), so the table stays read-only for Lambda.

Configured by ``config.BackendConfig`` (BACKEND_INSTANCE_ID, BACKEND_PORT, BACKEND_HOST,
BACKEND_ADDRESS, BACKEND_API_KEY, FORWARD_TIMEOUT, BOOT_RETRY_AFTER) and, for the idle stop,
``config.IdleStopConfig`` (BACKEND_INSTANCE_ID, IDLE_MINUTES).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from comeapi.errors import ConfigError, UnavailableError, UpstreamError
from comeapi.serverless.config import BackendConfig, IdleStopConfig
from comeapi.serverless.events import HttpRequest, Reply

log = logging.getLogger(__name__)

LAST_USED_TAG = "comeapi:last-used"
FORWARDED_HEADERS = ("content-type", "accept")


class OnDemandBackend:
    """The miss handler of ``ON_MISS=start-backend``. The EC2 client is injected (or made on
    the first miss: EC2's service model is large, and a hit should not pay for loading it)."""

    def __init__(
        self,
        instance_id: str,
        *,
        ec2: Any = None,
        port: int = 8080,
        host: str | None = None,
        address: str = "public",
        api_key: str | None = None,
        forward_timeout: float = 25.0,
        boot_retry_after: float = 30.0,
        touch_interval: float = 60.0,
        clock: Callable[[], float] = time.time,
    ):
        if address not in ("public", "private"):
            raise ConfigError(f"BACKEND_ADDRESS={address!r}: expected public or private")
        self.instance_id = instance_id
        self._ec2 = ec2
        self.port = port
        self.host = host
        self.address = address
        self.api_key = api_key
        self.forward_timeout = forward_timeout
        self.boot_retry_after = boot_retry_after
        self.touch_interval = touch_interval
        self._clock = clock
        self._touched_at = float("-inf")

    @classmethod
    def from_config(cls, config: BackendConfig) -> OnDemandBackend:
        return cls(
            config.backend_instance_id,
            port=config.backend_port,
            host=config.backend_host,
            address=config.backend_address,
            api_key=config.backend_api_key,
            forward_timeout=config.forward_timeout,
            boot_retry_after=config.boot_retry_after,
        )

    @property
    def ec2(self) -> Any:
        if self._ec2 is None:
            self._ec2 = ec2_client()
        return self._ec2

    def __call__(self, request: HttpRequest) -> Reply:
        instance = describe(self.ec2, self.instance_id)
        state = instance["State"]["Name"]
        if state == "running":
            self._touch()
            return self._forward(instance, request)
        if state == "stopped":
            with ec2_errors("StartInstances"):
                self.ec2.start_instances(InstanceIds=[self.instance_id])
            self._touch(force=True)  # so the idle stop does not stop it before its first use
            log.warning("started backend instance %s on a cache miss", self.instance_id)
            raise self._booting("the backend is starting for this uncached prompt")
        if state == "pending":
            raise self._booting("the backend is starting")
        if state == "stopping":
            # It can be started again only once stopped; the next retry will do that.
            raise UnavailableError(
                "the backend is stopping; retry to start it again",
                retry_after=15,
                code="backend_stopping",
            )
        raise UnavailableError(
            f"backend instance {self.instance_id} is {state}; it cannot answer",
            retry_after=300,
            code="backend_unavailable",
        )

    def _booting(self, message: str) -> UnavailableError:
        return UnavailableError(
            f"{message}; retry after the time in Retry-After",
            retry_after=self.boot_retry_after,
            code="backend_starting",
        )

    def url(self, instance: dict[str, Any]) -> str:
        host = self.host
        if host is None:
            field = "PublicIpAddress" if self.address == "public" else "PrivateIpAddress"
            host = instance.get(field)
        if not host:
            raise UnavailableError(
                f"backend instance {self.instance_id} has no {self.address} address yet",
                retry_after=5,
                code="backend_starting",
            )
        return f"http://{host}:{self.port}"

    def _forward(self, instance: dict[str, Any], request: HttpRequest) -> Reply:
        # Imported on the first forwarded miss: urllib.request costs a cold start ~10 ms.
        import urllib.error
        import urllib.request

        url = self.url(instance) + request.path
        headers = {k: v for k, v in request.headers.items() if k in FORWARDED_HEADERS}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        forwarded = urllib.request.Request(url, data=request.body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(forwarded, timeout=self.forward_timeout) as response:
                return _reply(response.status, response.headers, response.read())
        except urllib.error.HTTPError as exc:  # the backend's own 4xx/5xx: pass it on
            with exc:
                return _reply(exc.code, exc.headers, exc.read())
        except TimeoutError:
            raise UpstreamError(
                f"the backend did not answer within {self.forward_timeout:.0f}s",
                code="backend_timeout",
            ) from None
        except (urllib.error.URLError, ConnectionError) as exc:
            # Running but not listening yet: `comeapi backend` is still loading the model.
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError):
                raise UpstreamError(
                    f"the backend did not answer within {self.forward_timeout:.0f}s",
                    code="backend_timeout",
                ) from None
            raise UnavailableError(
                f"the backend is running but not answering yet ({reason})",
                retry_after=10,
                code="backend_starting",
            ) from None

    def _touch(self, *, force: bool = False) -> None:
        """Record a use on the instance's tag, at most once per ``touch_interval``."""
        now = self._clock()
        if not force and now - self._touched_at < self.touch_interval:
            return
        with ec2_errors("CreateTags"):
            self.ec2.create_tags(
                Resources=[self.instance_id],
                Tags=[{"Key": LAST_USED_TAG, "Value": str(int(now))}],
            )
        self._touched_at = now


def _reply(status: int, headers: Any, body: bytes) -> Reply:
    out = {"X-Cache": "MISS"}
    if headers.get("content-type"):
        out["Content-Type"] = headers["content-type"]
    return Reply(status, body.decode("utf-8", errors="replace"), out)


def describe(ec2: Any, instance_id: str) -> dict[str, Any]:
    with ec2_errors("DescribeInstances"):
        reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    instances = [i for r in reservations for i in r["Instances"]]
    if not instances:
        raise UnavailableError(
            f"backend instance {instance_id} not found", retry_after=300, code="backend_unavailable"
        )
    instance: dict[str, Any] = instances[0]
    return instance


@contextlib.contextmanager
def ec2_errors(what: str) -> Iterator[None]:
    """The one place EC2's botocore errors become comeapi's: the backend is unavailable.
    (DynamoDB's have theirs, ``comeapi.cache.dynamo.dynamo_errors``: a store error.)"""
    try:
        yield
    except Exception as exc:
        # Imported here, not at the top: the handler imports this module at init, and a
        # botocore error can only come after boto3 was loaded to make the call.
        import botocore.exceptions

        if isinstance(exc, (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)):
            raise _ec2_error(what, exc) from exc
        raise


def _ec2_error(what: str, exc: Exception) -> UnavailableError:
    response = getattr(exc, "response", None)  # a ClientError's parsed error
    code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
    # IncorrectInstanceState: it changed state between our look and our call; retry soon.
    return UnavailableError(
        f"EC2 {what} failed ({code or exc}); the backend cannot be reached now",
        retry_after=10,
        code="backend_unavailable",
    )


def ec2_client() -> Any:
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 3})
    return boto3.client("ec2", config=config)


def idle_stop(ec2: Any, instance_id: str, *, idle_minutes: float, now: float | None = None) -> str:
    """Stop the backend if it has not been used for ``idle_minutes``; says what it did."""
    now = time.time() if now is None else now
    instance = describe(ec2, instance_id)
    state = instance["State"]["Name"]
    if state != "running":
        return f"{instance_id} is {state}: nothing to do"
    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
    try:
        last_used = float(tags[LAST_USED_TAG])
    except (KeyError, ValueError):
        launched = instance.get("LaunchTime")
        last_used = launched.timestamp() if isinstance(launched, datetime) else now
    idle = now - last_used
    if idle < idle_minutes * 60:
        return f"{instance_id} was used {idle / 60:.1f} min ago: kept running"
    with ec2_errors("StopInstances"):
        ec2.stop_instances(InstanceIds=[instance_id])
    return f"{instance_id} idle for {idle / 60:.1f} min: stopping"


def idle_stop_handler(event: Any, context: Any) -> dict[str, Any]:
    """The scheduled Lambda (``comeapi.serverless.ondemand.idle_stop_handler``)."""
    config = IdleStopConfig.from_env(os.environ)
    instance_id = config.backend_instance_id
    result = idle_stop(ec2_client(), instance_id, idle_minutes=config.idle_minutes)
    log.warning("%s", result)
    return {"result": result, "instance": instance_id}
