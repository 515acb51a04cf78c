"""Waiting for an event instead of sleeping and hoping it happened."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from openrouter_proxy.exchange import records_in_progress

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T | None], what: str, timeout: float = 10.0, interval: float = 0.01
) -> T:
    """Poll ``condition`` until it returns a true value, and return that value.

    Fails with ``AssertionError`` naming ``what`` (the event awaited) and the
    last value seen once ``timeout`` seconds have passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout} s waiting for {what} (last: {value!r})")
        time.sleep(interval)


async def async_wait_for(
    condition: Callable[[], T | None], what: str, timeout: float = 10.0, interval: float = 0.01
) -> T:
    """:func:`wait_for` inside an event loop: the loop keeps running while it waits."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout} s waiting for {what} (last: {value!r})")
        await asyncio.sleep(interval)


def after_records(execute: Callable[..., Any], *args: Any) -> Any:
    """A database execute wrapper: first wait until every ended request is recorded."""
    if records_in_progress():
        wait_for(lambda: not records_in_progress(), "the records of ended requests")
    return execute(*args)


class HeldFirstCall:
    """A test double whose first call (from a database thread) waits until let go.

    Its calls are noted in ``calls``, each as (how, names); ``first_call`` is
    set once the first has begun, and it returns once ``let_go`` is set.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.first_call = threading.Event()
        self.let_go = threading.Event()

    def _wait_if_first(self) -> None:
        if not self.calls:
            self.first_call.set()
            assert self.let_go.wait(10)
