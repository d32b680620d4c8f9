"""The gateway's request log: one record per request, the last N kept in memory (the
dashboard's table) and, with ``--access-log text|json``, each written as one line to stdout.

Recording is on the hot path, so a record keeps what is at hand (the parsed request, the
cache hit, what the forwarder reported) and goes into a bounded deque; its fields (model,
variant, tokens) are worked out when someone reads it. Only the access log, when it is on,
formats a line per request; its cost per cache hit is measured by
``benchmarks/access_log_cost.py`` (docs/operations.md).
"""

from __future__ import annotations

import logging
import string
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import Any, Literal

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from comeapi.balancer.relay import Forwarded, UpstreamStream
from comeapi.cache.replies import HitReply
from comeapi.protocol.requests import GenerationRequest
from comeapi.protocol.responses import Answer

#: Characters a key=value value may hold unquoted.
_PLAIN = frozenset(string.ascii_letters + string.digits + "-_.:/+@")
AccessLogFormat = Literal["off", "text", "json"]
ACCESS_LOGGER = "comeapi.access"
#: The fields of a record, in this order, in every reader: the JSON access log, the text
#: log's key=value part, the dashboard's rows.
FIELDS = (
    "time",
    "client",
    "method",
    "path",
    "status",
    "cache",
    "variant",
    "model",
    "backend",
    "duration_ms",
    "prompt_tokens",
    "completion_tokens",
    "match",  # how a hit was found: exact, or similar (a paraphrase of a known prompt)
)


class Miss:
    """What became of a generation request the cache did not answer: whether the cache was
    asked, the slot a trusted proxy forced, the backend that answered (the forwarder sets
    ``backend``: ``balancer.relay.ForwardReport``) and, once settled, the answer's tokens."""

    __slots__ = (
        "backend",
        "completion_tokens",
        "looked_up",
        "model",
        "prompt_tokens",
        "response",
        "variant",
    )

    def __init__(self, *, looked_up: bool, variant: int | None = None):
        self.looked_up = looked_up
        self.variant = variant
        self.backend: str | None = None
        #: The answer sent, until ``settle`` reads its usage (then dropped: bodies and
        #: streams are not kept in the log).
        self.response: Forwarded | UpstreamStream | None = None
        self.model: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    def settle(self) -> None:
        """Read the tokens (and the model) from the answer once it has been sent."""
        response, self.response = self.response, None
        if isinstance(response, UpstreamStream):
            events = response.events
            if events is not None:
                self.completion_tokens = events.tokens()
                if events.answer is not None:
                    self._read_answer(events.answer)
        elif response is not None and response.answer is not None:
            self._read_answer(response.answer)

    def _read_answer(self, answer: Answer) -> None:
        if answer.model is not None:
            self.model = answer.model
        self.prompt_tokens = answer.prompt_tokens
        self.completion_tokens = answer.completion_tokens


class RequestRecord:
    """One request: filled as it goes, finished by ``RequestLog.add``."""

    __slots__ = (
        "client",
        "method",
        "outcome",
        "path",
        "request",
        "seconds",
        "similar",
        "status",
        "time",
    )

    def __init__(self, method: str, path: str, client: tuple[str, int] | None):
        self.method = method
        self.path = path
        self.client = client
        self.request: GenerationRequest | None = None
        #: The cache's hit (the reply sent), or the ``Miss``; None where the cache had no part.
        self.outcome: HitReply | Miss | None = None
        #: The known prompt a similar hit answered as (``gateway.similar.SimilarHit``).
        self.similar: Any = None
        # time, status and seconds are set when the request ends (RequestLog.add).
        self.time: float
        self.status: int
        self.seconds: float

    @classmethod
    def of(cls, scope: Scope) -> RequestRecord:
        return cls(scope["method"], scope["path"], scope.get("client"))

    def fields(self) -> dict[str, Any]:
        """The record as ``FIELDS``; None where a field does not apply or is not known."""
        outcome = self.outcome
        request = self.request
        cache = variant = model = backend = prompt_tokens = completion_tokens = None
        if isinstance(outcome, HitReply):
            entry = outcome.entry
            cache, variant, model = "HIT", entry.variant, entry.model
            prompt_tokens, completion_tokens = entry.prompt_tokens, entry.completion_tokens
        elif outcome is not None:
            cache = "MISS" if outcome.looked_up else None
            variant, backend, model = outcome.variant, outcome.backend, outcome.model
            prompt_tokens, completion_tokens = outcome.prompt_tokens, outcome.completion_tokens
        if model is None and request is not None:
            model = request.model
        return {
            "time": self.time,
            "client": self.client[0] if self.client else None,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "cache": cache,
            "variant": variant,
            "model": model,
            "backend": backend,
            "duration_ms": round(self.seconds * 1000, 3),
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "match": None if cache != "HIT" else "similar" if self.similar else "exact",
        }


class RequestLog:
    """The last ``size`` records, and the access log when one is on."""

    def __init__(self, size: int, access_log: AccessLogFormat = "off"):
        self.recent: deque[RequestRecord] = deque(maxlen=size)
        #: Requests recorded since start (the dashboard's requests per second).
        self.total = 0
        self.started = time.time()
        self.access = None if access_log == "off" else AccessLog(access_log)

    def add(self, record: RequestRecord, status: int, seconds: float) -> None:
        """Finish ``record`` (the response has been sent) and keep it."""
        record.status = status
        record.seconds = seconds
        record.time = time.time()
        outcome = record.outcome
        if isinstance(outcome, Miss):
            outcome.settle()
        self.total += 1
        self.recent.append(record)
        if self.access is not None:
            self.access.write(record)

    def latest(self, limit: int) -> Iterator[dict[str, Any]]:
        """The newest ``limit`` records as fields, newest first."""
        records = list(self.recent)
        for record in reversed(records[-limit:] if limit > 0 else []):
            yield record.fields()


class AccessLog:
    """One line per request on the ``comeapi.access`` logger (stdout unless it has handlers
    of its own): JSON with ``FIELDS``, or a common-log-format line with them as key=value.

    Records are made with ``makeRecord`` and passed to ``handle``: ``logger.info`` would
    also walk the stack for the caller's file and line, which an access line does not need.
    Timestamps are formatted down to the second once a second.
    """

    def __init__(self, style: Literal["text", "json"]):
        self.logger = access_logger()
        self.line = self.json_line if style == "json" else self.text_line
        self._second = -1
        self._iso = self._clf = ""

    def write(self, record: RequestRecord) -> None:
        logger = self.logger
        if logger.isEnabledFor(logging.INFO):
            line = self.line(record.fields())
            logger.handle(logger.makeRecord(ACCESS_LOGGER, logging.INFO, "", 0, line, (), None))

    def json_line(self, fields: dict[str, Any]) -> str:
        millis = self._tick(fields["time"])
        return orjson.dumps({**fields, "time": f"{self._iso}.{millis:03d}Z"}).decode()

    def text_line(self, f: dict[str, Any]) -> str:
        """``CLIENT - - [TIME] "METHOD PATH" STATUS - key=value ...``: the common log format
        (the size is not tracked: "-"), then the other fields. What a client controls (its
        forwarded address, the path, the model) is written bare only when it is a plain
        token, else quoted and escaped like a JSON string: no client can forge a field or
        the start of a line."""
        self._tick(f["time"])
        return (
            f"{_value(f['client'])} - - [{self._clf}] "
            f"{_quoted(f['method'] + ' ' + f['path'])} {f['status']} - "
            f"cache={_value(f['cache'])} variant={_value(f['variant'])} "
            f"model={_value(f['model'])} backend={_value(f['backend'])} "
            f"duration_ms={f['duration_ms']} prompt_tokens={_value(f['prompt_tokens'])} "
            f"completion_tokens={_value(f['completion_tokens'])} match={_value(f['match'])}"
        )

    def _tick(self, when: float) -> int:
        """Bring the second's strings up to ``when``; returns its milliseconds."""
        second = int(when)
        if second != self._second:
            gmt = time.gmtime(second)
            self._iso = time.strftime("%Y-%m-%dT%H:%M:%S", gmt)
            self._clf = time.strftime("%d/%b/%Y:%H:%M:%S +0000", gmt)
            self._second = second
        return int((when - second) * 1000)


def access_logger() -> logging.Logger:
    """The access logger, given a stdout handler of its own on first use. It does not
    propagate: access lines go to stdout whatever --log-level says about other logs."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


class RequestLogMiddleware:
    """Records the requests of the Starlette app's routes (the generation routes record
    their own). The dashboard's own requests go to the access log but not into the table,
    which would otherwise show little but its own polling."""

    def __init__(self, app: ASGIApp, log: RequestLog, unlisted: frozenset[str]):
        self.app = app
        self.log = log
        self.unlisted = unlisted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        record = RequestRecord.of(scope)
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - started
            if scope["path"] in self.unlisted:
                record.status, record.seconds, record.time = status, seconds, time.time()
                if self.log.access is not None:
                    self.log.access.write(record)
            else:
                self.log.add(record, status, seconds)


def _value(value: Any) -> str:
    """A key=value value: ``-`` for none, bare when safe, else quoted like JSON."""
    if value is None:
        return "-"
    text = str(value)
    if text and _PLAIN.issuperset(text):
        return text
    return _quoted(text)


def _quoted(text: str) -> str:
    # JSON string escaping: a client's path or model name cannot break a line or a field.
    return orjson.dumps(text).decode()
