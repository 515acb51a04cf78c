from __future__ import annotations

from decimal import Decimal

import pytest

from billing.models import CreditLedgerEntry, LedgerKind
from billing.money import format_usd, from_units, quantize, to_units


@pytest.mark.parametrize(
    ("amount", "units"),
    [
        (Decimal("0"), 0),
        (Decimal("1"), 10**12),
        (Decimal("0.0000195"), 19_500_000),
        (Decimal("3.3e-05"), 33_000_000),
        (Decimal("-0.00044304"), -443_040_000),
        (Decimal("0.0000000000005"), 1),  # half-up at the 13th place
        (Decimal("0.0000000000004"), 0),
        ("20", 20 * 10**12),
    ],
)
def test_units_round_trip(amount: Decimal | str, units: int) -> None:
    assert to_units(amount) == units
    assert from_units(units) == quantize(Decimal(amount))


def test_non_finite_amounts_are_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        to_units(Decimal("NaN"))


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        (Decimal("10"), "10.00"),
        (Decimal("9.9999805"), "9.9999805"),
        (Decimal("0.5"), "0.50"),
        (Decimal("-0.0000195"), "-0.0000195"),
        (Decimal("3.3E-5"), "0.000033"),
    ],
)
def test_format_usd(amount: Decimal, text: str) -> None:
    assert format_usd(amount) == text


def test_money_field_is_exact_through_the_database(db: None, django_user_model: object) -> None:
    user = django_user_model.objects.create(username="m")  # type: ignore[attr-defined]
    amounts = [Decimal("0.0000195"), Decimal("3.3e-05"), Decimal("0.00044304")] * 1000
    CreditLedgerEntry.objects.bulk_create(
        CreditLedgerEntry(user=user, kind=LedgerKind.USAGE, amount=a, reference=f"r{i}")
        for i, a in enumerate(amounts)
    )
    assert CreditLedgerEntry.objects.for_user(user).total() == sum(amounts, Decimal(0))
    assert CreditLedgerEntry.objects.get(reference="r1").amount == Decimal("0.000033")


def test_floats_are_refused_by_the_money_field(db: None, django_user_model: object) -> None:
    user = django_user_model.objects.create(username="f")  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="never a float"):
        # A float is exactly what this test feeds in, so the type checker objects.
        CreditLedgerEntry.objects.create(  # type: ignore[misc]
            user=user, kind=LedgerKind.GRANT, amount=0.1, reference="float"
        )
