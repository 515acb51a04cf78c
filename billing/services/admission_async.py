"""Admission on the proxy's event loop, on PostgreSQL.

The admission of a request without key limits is one statement (see
:func:`billing.services.admission.user_admission`), prepared on the server as
the proxy's other hot statements are (``billing.services._sql.hot_cursor``).
Run in a database thread, the hop there and back costs more than the
statement itself; here it runs on
the worker's event loop, over psycopg's asynchronous connections, built from
the same ``DATABASES["default"]`` settings Django connects with.

Each event loop has its own small set of connections
(``BILLING_ADMISSION_CONNECTIONS``, default 8): a connection is opened when
none is idle, kept for the next admission, probed before use once it has been
idle for a while, and dropped after any error, so a restarted database heals
without a restart of the worker. When the database is unreachable, connecting
fails at once and the request is refused like any admission that could not
reach the database (``django.db.DatabaseError``).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import psycopg
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections
from django.db.backends.base.base import BaseDatabaseWrapper

from billing.conf import billing_settings
from billing.services._sql import NEVER_BY_COUNT
from billing.services.admission import user_admission
from openrouter_proxy.loops import PerLoop
from openrouter_proxy.metering import Admission

# An idle connection older than this is probed before use (as the proxy's threads do).
IDLE_CHECK_SECONDS = 30.0


@functools.cache
def _offline() -> BaseDatabaseWrapper:
    """A wrapper of the default database that never connects, for its vendor and adapters.

    ``django.db.connection`` is local to each asynchronous context: read on the
    event loop, it builds a new wrapper in every request's context (and leaves
    it as cyclic garbage). Building a statement needs no connection, only the
    backend's value adapters, which this one wrapper per process serves.
    """
    return connections.create_connection(DEFAULT_DB_ALIAS)


def available() -> bool:
    """Whether admissions can run on the event loop here (PostgreSQL with psycopg 3)."""
    return _offline().vendor == "postgresql"


class _Connections:
    """The admission connections of one event loop."""

    def __init__(self, size: int) -> None:
        self._idle: list[tuple[psycopg.AsyncConnection[Any], float]] = []
        self._slots = asyncio.Semaphore(size)
        self._open: set[psycopg.AsyncConnection[Any]] = set()

    @staticmethod
    def _params() -> dict[str, Any]:
        # Not django.db.connection's: on the loop that is a new wrapper in each
        # request's context, left as cyclic garbage when a connection opens.
        params = _offline().get_connection_params()
        params.pop("cursor_factory", None)
        if billing_settings.PREPARED_STATEMENTS:
            # Bound and prepared on the server, as hot_cursor's statements are.
            params |= {"cursor_factory": psycopg.AsyncCursor, "prepare_threshold": NEVER_BY_COUNT}
        else:
            params |= {"cursor_factory": psycopg.AsyncClientCursor}
        return {**params, "autocommit": True}

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        opened = await psycopg.AsyncConnection.connect(**self._params())
        self._open.add(opened)
        return opened

    async def _idle_connection(self) -> psycopg.AsyncConnection[Any] | None:
        while self._idle:
            kept, since = self._idle.pop()
            if time.monotonic() - since < IDLE_CHECK_SECONDS:
                return kept
            try:
                await kept.execute("SELECT 1")
            except psycopg.Error:
                await self._discard(kept)
                continue
            return kept
        return None

    async def _discard(self, broken: psycopg.AsyncConnection[Any]) -> None:
        self._open.discard(broken)
        with suppress(psycopg.Error):
            await broken.close()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        async with self._slots:
            try:
                held = await self._idle_connection() or await self._connect()
            except psycopg.Error as error:
                raise DatabaseError(f"admission: cannot reach the database: {error}") from error
            try:
                yield held
            except psycopg.Error as error:
                await self._discard(held)
                raise DatabaseError(f"admission failed: {error}") from error
            except BaseException:
                # Cancelled mid-statement: the connection's state is unknown.
                await self._discard(held)
                raise
            self._idle.append((held, time.monotonic()))

    async def close(self) -> None:
        self._idle.clear()
        for opened in list(self._open):
            await self._discard(opened)


_by_loop = PerLoop(lambda: _Connections(billing_settings.ADMISSION_CONNECTIONS))
_connections = _by_loop.get


async def admit_user(
    user_id: int, trace: dict[str, Any] | None, bound: int, held: int = 0
) -> tuple[Admission, bool]:
    """:func:`billing.services.admission._admit_user`, awaited on the event loop."""
    statement = user_admission(user_id, trace, bound, with_trace=True, on=_offline(), held=held)
    async with _connections().connection() as kept:
        cursor = kept.cursor()
        await cursor.execute(
            statement.sql, statement.params, prepare=billing_settings.PREPARED_STATEMENTS
        )
        if cursor.rowcount:
            return Admission.ADMITTED, statement.traced
        await cursor.execute(statement.balance_sql, [user_id])
        return statement.refusal(await cursor.fetchone()), False


async def close() -> None:
    """Close the running loop's admission connections (at shutdown)."""
    found = _by_loop.pop()
    if found is not None:
        await found.close()
