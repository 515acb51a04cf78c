"""SQL helpers the services modules share, and the UTC day a key meter counts in."""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connection, connections, models
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.utils import CursorWrapper

from billing.conf import billing_settings


def hot_cursor() -> CursorWrapper:
    """A cursor for the statements every proxied request runs.

    On PostgreSQL (psycopg 3) its statements are bound and prepared on the
    server: the server parses and plans each once per connection instead of
    on every request (about half of its work for a usage record), and the
    values travel without being quoted into the text first. It is Django's
    cursor wrapper around it, so errors are Django's and execute wrappers see
    every statement. ``BILLING_PREPARED_STATEMENTS = False`` (behind a pooler
    that keeps no prepared statements) or another database gets the
    connection's ordinary cursor.
    """
    if connection.vendor != "postgresql" or not billing_settings.PREPARED_STATEMENTS:
        return connection.cursor()
    preparing = _preparing_cursor()
    if preparing is None:
        return connection.cursor()
    connection.close_if_health_check_failed()
    connection.ensure_connection()
    raw = connection.connection
    if raw.prepare_threshold is None:
        # Django turns psycopg's preparing off (for poolers), and psycopg then
        # ignores ``prepare=True`` too. A threshold no count reaches turns it
        # back on for the statements that ask, and for them only.
        raw.prepare_threshold = NEVER_BY_COUNT
    with connection.wrap_database_errors:
        return connection._prepare_cursor(preparing(raw))  # type: ignore[attr-defined,no-any-return]


#: psycopg prepares a statement run this many times even unasked: never, in practice.
NEVER_BY_COUNT = 2**62


@functools.cache
def _preparing_cursor() -> type[Any] | None:
    """Django's server-binding cursor, preparing every statement (None without psycopg 3)."""
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    if not is_psycopg3:
        return None
    from django.db.backends.postgresql.base import ServerBindingCursor

    class PreparingCursor(ServerBindingCursor):
        def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
            kwargs.setdefault("prepare", True)
            return super().execute(query, params, **kwargs)  # type: ignore[misc]

    return PreparingCursor


def _utc_day(moment: datetime) -> date:
    return moment.astimezone(UTC).date()


def _sql_names(model: type[models.Model]) -> tuple[str, Any]:
    """The quoted table name of ``model`` and a function quoting its columns.

    Names come from the models' own metadata, never from input; every value
    goes into the statement as a parameter.
    """
    quote = connection.ops.quote_name

    def column(name: str) -> str:
        field = model._meta.get_field(name)
        assert isinstance(field, models.Field)
        return quote(str(field.column))

    return quote(model._meta.db_table), column


@functools.cache
def _fields_of(
    model: type[models.Model], names: tuple[str, ...]
) -> tuple[tuple[models.Field[Any, Any], ...], tuple[_Saver, ...]]:
    """The concrete fields of ``model`` that ``names`` names, in their order, and their savers.

    Looked up once per model and set of names (see :func:`_saver`).
    """
    found = tuple(model._meta.get_field(name) for name in names)
    fields = tuple(field for field in found if isinstance(field, models.Field))
    assert len(fields) == len(found), f"{model.__name__}: {names} names a relation's other side"
    return fields, tuple(map(_saver, fields))


#: A field's conversion of a value for the database: ``(value, connection) -> parameter``.
_Saver = Callable[[Any, BaseDatabaseWrapper], Any]

_TEXT_FIELDS = (models.CharField, models.TextField)
_INTEGER_FIELDS = (
    models.IntegerField,
    models.BigIntegerField,
    models.SmallIntegerField,
    models.PositiveIntegerField,
    models.PositiveBigIntegerField,
    models.PositiveSmallIntegerField,
)


def _saver(field: models.Field[Any, Any]) -> _Saver:
    """``field.get_db_prep_save``, with the layers it goes through skipped for plain values.

    The hot path converts some thirty values a request. For a field of one of
    Django's own classes (not a subclass, which may convert otherwise) and a
    value of the very type the field holds, the conversion is the last step
    Django's own would take (the same database operation, or none); any other
    value, and any other field, goes through ``get_db_prep_save`` itself.
    ``tests/unit/test_field_savers.py`` holds the two to the same answers.
    """
    slow = field.get_db_prep_save
    kind = type(field)
    if kind in _TEXT_FIELDS:
        return lambda value, on: value if value is None or type(value) is str else slow(value, on)
    if kind in _INTEGER_FIELDS:
        internal_type = field.get_internal_type()

        def integer(value: Any, on: BaseDatabaseWrapper) -> Any:
            if value is None or type(value) is int:
                return on.ops.adapt_integerfield_value(value, internal_type)
            return slow(value, on)

        return integer
    if kind is models.BooleanField:
        return lambda value, on: value if type(value) is bool else slow(value, on)
    if kind is models.DateTimeField:

        def moment(value: Any, on: BaseDatabaseWrapper) -> Any:
            if value is None or (type(value) is datetime and value.tzinfo is not None):
                return on.ops.adapt_datetimefield_value(value)
            return slow(value, on)

        return moment
    if kind is models.UUIDField:

        def identifier(value: Any, on: BaseDatabaseWrapper) -> Any:
            if value is None:
                return None
            if type(value) is uuid.UUID:
                return value if on.features.has_native_uuid_field else value.hex
            return slow(value, on)

        return identifier
    return slow


def _prepared(
    model: type[models.Model], values: dict[str, Any], on: BaseDatabaseWrapper | None = None
) -> tuple[tuple[models.Field[Any, Any], ...], list[Any]]:
    """The fields ``values`` names, and its values as those fields save them (for ``on``)."""
    # The wrapper itself, not the proxy: every field asks it for its operations.
    on = on or connections[DEFAULT_DB_ALIAS]
    fields, savers = _fields_of(model, tuple(values))
    pairs = zip(savers, values.values(), strict=True)
    return fields, [save(value, on) for save, value in pairs]


def _insert_returning_pk(model: type[models.Model], values: dict[str, Any]) -> int:
    """``INSERT ... RETURNING pk`` with each field's own conversion to the database.

    The hot path's insert without the ORM compiler; values are prepared by
    the fields exactly as the ORM would prepare them.
    """
    table, column = _sql_names(model)
    fields, params = _prepared(model, values)
    placeholders = ", ".join(["%s"] * len(fields))
    columns = ", ".join(column(field.name) for field in fields)
    with hot_cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} ({columns}) VALUES ({placeholders}) "  # noqa: S608
            f"RETURNING {column(model._meta.pk.name)}",
            params,
        )
        row = cursor.fetchone()
    assert row is not None
    return int(row[0])


def _execute_many_returning(cursor: CursorWrapper, sql: str, batch: list[list[Any]]) -> list[Any]:
    """Run one statement once per parameter list, pipelined; the first row of each run.

    Django's ``executemany`` keeps no statement's rows, so this calls psycopg's
    own, as Django's would: through the connection's execute wrappers
    (``connection.execute_wrapper``), with Django's database errors, and in
    ``connection.queries`` when they are logged.
    """
    raw = cursor.cursor
    rows: list[Any] = []

    def execute(sql: str, params: Any, many: bool, context: dict[str, Any]) -> None:
        started = time.monotonic()
        with connection.wrap_database_errors:
            raw.executemany(sql, params, returning=True)
            for _ in params:
                rows.append(raw.fetchone())
                raw.nextset()
        if connection.queries_logged:
            duration = time.monotonic() - started
            entry = {"sql": f"{len(params)} times: {sql}", "time": f"{duration:.3f}"}
            connection.queries_log.append(entry)

    executor: Any = execute
    for wrapper in reversed(connection.execute_wrappers):
        executor = functools.partial(wrapper, executor)
    executor(sql, batch, True, {"connection": connection, "cursor": cursor})
    return rows
