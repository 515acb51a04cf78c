"""The hot path's field savers convert every value exactly as ``get_db_prep_save`` does.

Run on SQLite and on PostgreSQL (whose integer parameters are typed), for
every field of the billing models and for each of Django's field classes the
savers shortcut, with values of the field's own type and of every other.
"""

from __future__ import annotations

import uuid
import warnings
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from django.apps import apps
from django.db import DEFAULT_DB_ALIAS, connections, models

from billing.services._sql import _fields_of, _prepared, _saver

NOW = datetime(2026, 12, 3, 12, 30, 5, 123456, tzinfo=UTC)


class _Label(str):
    pass


class _Count(int):
    pass


class _UpperCharField(models.CharField):  # type: ignore[type-arg]
    def get_prep_value(self, value: Any) -> Any:
        return None if value is None else str(value).upper()


VALUES: list[Any] = [
    None,
    "",
    "text",
    "12",
    _Label("label"),
    0,
    7,
    -3,
    2**40,
    _Count(5),
    True,
    False,
    1.5,
    Decimal("2"),
    NOW,
    NOW.astimezone(timezone(timedelta(hours=-5))),
    NOW.replace(tzinfo=None),
    date(2026, 12, 3),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "12345678-1234-5678-1234-567812345678",
    "12345678123456781234567812345678",
    b"bytes",
    [1, 2],
]

FIELDS: list[models.Field[Any, Any]] = [
    models.CharField(max_length=40),
    models.CharField(max_length=40, null=True),
    models.TextField(),
    models.IntegerField(),
    models.BigIntegerField(null=True),
    models.SmallIntegerField(),
    models.PositiveIntegerField(null=True),
    models.PositiveBigIntegerField(),
    models.PositiveSmallIntegerField(null=True),
    models.BooleanField(),
    models.BooleanField(null=True),
    models.DateTimeField(null=True),
    models.UUIDField(null=True),
    _UpperCharField(max_length=40),
]


def _billing_fields() -> list[models.Field[Any, Any]]:
    found = []
    for model in apps.get_app_config("billing").get_models():
        found += [field for field in model._meta.concrete_fields]
    return found


def _outcome(convert: Any, value: Any) -> tuple[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a naive datetime warns, through either path
        try:
            converted = convert(value)
        except Exception as error:
            return "raises", type(error)
    return type(converted).__qualname__, converted


@pytest.mark.parametrize(
    "field", FIELDS + _billing_fields(), ids=lambda field: f"{type(field).__name__}-{field.name}"
)
def test_a_saver_converts_every_value_as_the_field_does(field: models.Field[Any, Any]) -> None:
    on = connections[DEFAULT_DB_ALIAS]
    save = _saver(field)
    for value in VALUES:
        expected = _outcome(lambda v: field.get_db_prep_save(v, on), value)
        assert _outcome(lambda v: save(v, on), value) == expected, (field, value)


def test_plain_values_skip_the_fields_layers_and_others_do_not() -> None:
    calls: list[Any] = []

    class Counting(models.IntegerField):  # type: ignore[type-arg]
        def get_db_prep_save(self, value: Any, connection: Any) -> Any:
            calls.append(value)
            return super().get_db_prep_save(value, connection)

    on = connections[DEFAULT_DB_ALIAS]
    plain = models.IntegerField()
    plain.get_db_prep_save = Counting().get_db_prep_save  # type: ignore[method-assign]
    _saver(plain)(5, on)
    _saver(plain)(None, on)
    assert calls == []
    _saver(plain)("5", on)
    assert calls == ["5"]
    # A subclass converts its own way: always through its get_db_prep_save.
    _saver(Counting())(5, on)
    assert calls == ["5", 5]
    assert _saver(_UpperCharField(max_length=4))("ab", on) == "AB"


def test_a_models_fields_and_savers_are_looked_up_once() -> None:
    from billing.models import OpenRequest

    names = ("request_id", "endpoint", "streamed", "created_at")
    assert _fields_of(OpenRequest, names) is _fields_of(OpenRequest, names)
    fields, params = _prepared(
        OpenRequest,
        {"request_id": VALUES[18], "endpoint": "chat", "streamed": True, "created_at": NOW},
    )
    on = connections[DEFAULT_DB_ALIAS]
    assert [field.name for field in fields] == list(names)
    assert params == [
        field.get_db_prep_save(value, on)
        for field, value in zip(fields, [VALUES[18], "chat", True, NOW], strict=True)
    ]
