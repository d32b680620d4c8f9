"""A deadline on reaching the table, until it has answered once.

botocore's connect and read timeouts start once the host's address is known: name resolution
has no timeout of its own. In a container whose DNS does not answer (``sam local`` on a
machine without network) each lookup took 10 s (glibc: 5 s, twice) and botocore made three
attempts: 30 s, past API Gateway's 29, so SAM answered 502 instead of the documented quick
503 ``store_unavailable``. So until a call to the table has succeeded, and again after one
failed, a call runs in a thread of its own and gets ``seconds``: no answer by then is that
503 (the thread finishes, or hangs, on its own; ``getaddrinfo`` cannot be interrupted).
Once the table has answered, DNS has worked and the connection is kept: calls run inline,
at no cost. A mocked client (moto, botocore's Stubber) answers the first call at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from comeapi.errors import StoreUnavailableError

FIRST_CALL_SECONDS = 4.0  # DNS + connect (2 s, cache.dynamo.client_config) + a first answer
RETRY_AFTER = 2.0  # s, as for DynamoDB being unreachable (cache.dynamo.translate_error)

T = TypeVar("T")


class TableDeadline:
    """Runs calls to the table; ``what`` names the table in the 503's message."""

    def __init__(self, what: str, seconds: float = FIRST_CALL_SECONDS):
        self.what = what
        self.seconds = seconds
        self.reached = False  # the table has answered a call (and none has failed since)

    def run(self, call: Callable[[], T]) -> T:
        if self.reached:
            try:
                return call()
            except StoreUnavailableError:  # the network may be gone: the next call is timed
                self.reached = False
                raise
        attempt = _Attempt(call, self)
        if not attempt.done.wait(self.seconds):
            raise StoreUnavailableError(
                f"{self.what} did not answer within {self.seconds:g} s (no network, or no "
                "DNS answer?); retry",
                retry_after=RETRY_AFTER,
            )
        return attempt.result()


class _Attempt(Generic[T]):
    """One call in a daemon thread (Lambda freezes it with the container)."""

    def __init__(self, call: Callable[[], T], deadline: TableDeadline):
        self.done = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None
        self._deadline = deadline
        thread = threading.Thread(target=self._run, args=(call,), name="table-call", daemon=True)
        thread.start()

    def _run(self, call: Callable[[], T]) -> None:
        try:
            self._value = call()
            self._deadline.reached = True  # late or not, the table answers: calls go inline
        except BaseException as exc:  # handed to the caller, who raises it
            self._error = exc
        finally:
            self.done.set()

    def result(self) -> T:
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]
