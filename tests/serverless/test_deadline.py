"""TableDeadline's logic, with calls that block on an event (tests/deploy/test_lambda_no_dns.py
runs the real thing: a container whose DNS never answers)."""

from __future__ import annotations

import threading
import time

import pytest

from comeapi.errors import StoreError, StoreUnavailableError
from comeapi.serverless.deadline import TableDeadline


def test_a_first_call_past_the_deadline_is_a_quick_503() -> None:
    deadline = TableDeadline("the table", seconds=0.2)
    release = threading.Event()
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as info:
        deadline.run(lambda: release.wait(30))
    assert time.monotonic() - started < 5
    assert "the table did not answer within 0.2 s" in info.value.message
    assert info.value.headers() == {"Retry-After": "2"}
    assert not deadline.reached
    release.set()  # the hung call finishes after all: the table can be reached
    for _ in range(100):
        if deadline.reached:
            break
        time.sleep(0.05)
    assert deadline.reached


def test_once_the_table_answered_calls_run_inline_until_one_fails() -> None:
    deadline = TableDeadline("the table", seconds=5)
    threads: list[threading.Thread] = []

    def call() -> int:
        threads.append(threading.current_thread())
        return len(threads)

    assert deadline.run(call) == 1
    assert threads[0] is not threading.current_thread()  # timed, in a thread of its own
    assert deadline.run(call) == 2
    assert threads[1] is threading.current_thread()  # reached: inline

    def unavailable() -> None:
        raise StoreUnavailableError("throttled")

    with pytest.raises(StoreUnavailableError, match="throttled"):
        deadline.run(unavailable)
    assert not deadline.reached
    assert deadline.run(call) == 3
    assert threads[2] is not threading.current_thread()  # timed again


def test_errors_of_a_timed_call_reach_the_caller() -> None:
    deadline = TableDeadline("the table", seconds=5)

    def corrupt() -> None:
        raise StoreError("corrupt item", code="corrupt")

    with pytest.raises(StoreError, match="corrupt item"):
        deadline.run(corrupt)
    assert not deadline.reached
