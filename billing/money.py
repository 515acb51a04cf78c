"""Exact money storage.

Amounts are ``Decimal`` US dollars in Python and whole pico-dollars
(10⁻¹² USD) in the database, in a 64-bit integer column. Integers make
``balance = balance - x`` and ``SUM(amount)`` exact on every backend: SQLite
has no decimal type and would do that arithmetic in binary floating point.

The one rounding the project does is here: an amount with more than twelve
decimal places is rounded half-up to the nearest pico-dollar. Provider costs
have far fewer places. A 64-bit column holds ±9.2 million dollars per value.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any

from django import forms
from django.db import models
from django.db.backends.base.base import BaseDatabaseWrapper

PLACES = 12
SCALE = Decimal(10) ** PLACES
QUANTUM = Decimal(1).scaleb(-PLACES)


def to_units(amount: Decimal | int | str) -> int:
    """Dollars → integer pico-dollars (rounded half-up past twelve places)."""
    value = amount if isinstance(amount, Decimal) else Decimal(str(amount))
    if not value.is_finite():
        raise ValueError(f"Not a finite amount: {amount!r}")
    return int((value * SCALE).to_integral_value(rounding=ROUND_HALF_UP))


def from_units(units: int | Decimal) -> Decimal:
    """Integer pico-dollars → dollars, exactly."""
    return (Decimal(units) / SCALE).quantize(QUANTUM)


def quantize(amount: Decimal) -> Decimal:
    """Round an amount the way the database will store it."""
    return from_units(to_units(amount))


def format_usd(amount: Decimal) -> str:
    """A plain decimal string without exponent or trailing zeros past the cents."""
    text = format(quantize(amount).normalize(), "f")
    whole, _, fraction = text.partition(".")
    return f"{whole}.{fraction.ljust(2, '0')}"


if TYPE_CHECKING:
    from django.db.models.expressions import Combinable

    _MoneyBase = models.BigIntegerField[Decimal | int | str | Combinable, Decimal]
    _NullableMoneyBase = models.BigIntegerField[
        Decimal | int | str | Combinable | None, Decimal | None
    ]
else:
    _MoneyBase = _NullableMoneyBase = models.BigIntegerField


class _MoneyConversions:
    """Dollars in Python, integer pico-dollars in the database."""

    def from_db_value(
        self, value: Any, expression: Any, connection: BaseDatabaseWrapper
    ) -> Decimal | None:
        if value is None:
            return None
        return from_units(value)

    def to_python(self, value: Any) -> Decimal | None:
        if value is None or isinstance(value, Decimal):
            return value
        if isinstance(value, float):
            raise TypeError("Money is never a float: pass a Decimal or a string.")
        return Decimal(str(value))

    def get_prep_value(self, value: Any) -> Any:
        if value is None or hasattr(value, "resolve_expression"):
            return value
        if isinstance(value, float):
            raise TypeError("Money is never a float: pass a Decimal or a string.")
        return to_units(value)

    def formfield(self, **kwargs: Any) -> forms.Field:
        defaults: dict[str, Any] = {
            "form_class": forms.DecimalField,
            "decimal_places": PLACES,
            "max_digits": 19 + PLACES,
        }
        defaults.update(kwargs)
        return models.Field.formfield(self, **defaults)  # type: ignore[arg-type,return-value]

    def value_to_string(self, obj: models.Model) -> str:
        value = self.value_from_object(obj)  # type: ignore[attr-defined]
        return "" if value is None else str(value)


class MoneyField(_MoneyConversions, _MoneyBase):
    """US dollars as ``Decimal``, stored exactly as integer pico-dollars."""

    description = "Amount in US dollars (stored as integer pico-dollars)"


class NullableMoneyField(_MoneyConversions, _NullableMoneyBase):
    """A :class:`MoneyField` that may be empty (unknown, not zero)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("null", True)
        kwargs.setdefault("blank", True)
        super().__init__(*args, **kwargs)
