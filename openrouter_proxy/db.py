"""Running ORM work from the async proxy.

Database calls run in the event loop's default thread pool rather than
Django's single "thread-sensitive" thread, so concurrent requests do not queue
behind one another. Each call gives its connection back when it ends (to
psycopg's pool on PostgreSQL): a pool thread must not sit on a connection
between requests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.db import close_old_connections

P = ParamSpec("P")
R = TypeVar("R")


def _call_and_release(func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    try:
        return func(*args, **kwargs)
    finally:
        close_old_connections()


async def run_db(func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run ``func`` in a worker thread and return its result."""
    call = sync_to_async(_call_and_release, thread_sensitive=False)
    result: R = await call(func, *args, **kwargs)
    return result
