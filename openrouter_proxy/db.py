"""Running ORM work from the async proxy.

Database calls run on a small thread pool of the proxy's own rather than on
Django's "thread-sensitive" thread, so concurrent requests do not queue behind
one another. Each of these threads keeps its database connection between
calls: opening one (even from psycopg's pool) costs Django more than the
statements the proxy runs, and the pool is sized for one connection per thread
(``OPENROUTER_PROXY_DB_THREADS``, default 8, per worker process).

A kept connection is checked before use when it has been idle for a while, and
dropped after any database error, so a restarted or unreachable database heals
without a restart of the worker.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from typing import ParamSpec, TypeVar

from django.db import DatabaseError, connections

from openrouter_proxy.conf import proxy_settings

P = ParamSpec("P")
R = TypeVar("R")

# A connection idle for longer than this is probed before use.
IDLE_CHECK_SECONDS = 30.0

_executor: ThreadPoolExecutor | None = None
_threads = 0
_executor_lock = threading.Lock()
_state = threading.local()


def _get_executor() -> ThreadPoolExecutor:
    global _executor, _threads
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                _threads = proxy_settings.DB_THREADS
                _executor = ThreadPoolExecutor(max_workers=_threads, thread_name_prefix="proxy-db")
    return _executor


def _close_connections() -> None:
    for connection in connections.all(initialized_only=True):
        connection.close()


def _prepare_connections() -> None:
    """Drop kept connections that went bad while idle."""
    now = time.monotonic()
    last = getattr(_state, "last_used", None)
    if last is not None and now - last < IDLE_CHECK_SECONDS:
        return
    for connection in connections.all(initialized_only=True):
        if connection.connection is not None and not connection.is_usable():
            connection.close()


def _call_keeping_connection(func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    _prepare_connections()
    try:
        return func(*args, **kwargs)
    except DatabaseError:
        # The connection may be broken; the next call opens a fresh one.
        _close_connections()
        raise
    finally:
        _state.last_used = time.monotonic()


def submit_db(func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> Future[R]:
    """Queue ``func`` for a database thread; its future, to await through ``asyncio.wrap_future``.

    Cancelling the awaited future cancels a call still queued (it never runs);
    a call already running runs to its end, and this future still has its result.
    """
    call = functools.partial(_call_keeping_connection, func, *args, **kwargs)
    return _get_executor().submit(call)


async def run_db(func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run ``func`` on a database thread and return its result."""
    return await asyncio.wrap_future(submit_db(func, *args, **kwargs))


def shutdown() -> None:
    """Close every database thread's connection, stop the threads, close the pools."""
    global _executor
    executor, _executor = _executor, None
    if executor is not None:
        threads = _threads
        # Each thread must take exactly one closing task: they meet at a barrier.
        barrier = threading.Barrier(threads)

        def close_then_wait() -> None:
            _close_connections()
            with suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=10)

        futures = [executor.submit(close_then_wait) for _ in range(threads)]
        for future in futures:
            future.result(timeout=20)
        executor.shutdown(wait=True)
    for connection in connections.all():
        close_pool = getattr(connection, "close_pool", None)
        if close_pool is not None:
            close_pool()
