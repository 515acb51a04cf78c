"""SQL helpers the services modules share, and the UTC day a key meter counts in."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from django.db import connection, models
from django.db.backends.base.base import BaseDatabaseWrapper


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


def _prepared(
    model: type[models.Model], values: dict[str, Any], on: BaseDatabaseWrapper | None = None
) -> tuple[list[Any], list[Any]]:
    """The fields ``values`` names, and its values as those fields save them (for ``on``)."""
    on = on or connection
    fields = [model._meta.get_field(name) for name in values]
    params = [
        field.get_db_prep_save(values[field.name], on)
        for field in fields
        if isinstance(field, models.Field)
    ]
    return fields, params


def _insert_returning_pk(model: type[models.Model], values: dict[str, Any]) -> int:
    """``INSERT ... RETURNING pk`` with each field's own conversion to the database.

    The hot path's insert without the ORM compiler; values are prepared by
    the fields exactly as the ORM would prepare them.
    """
    table, column = _sql_names(model)
    fields, params = _prepared(model, values)
    placeholders = ", ".join(["%s"] * len(fields))
    columns = ", ".join(column(field.name) for field in fields)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} ({columns}) VALUES ({placeholders}) "  # noqa: S608
            f"RETURNING {column(model._meta.pk.name)}",
            params,
        )
        row = cursor.fetchone()
    assert row is not None
    return int(row[0])
