"""Credit grants, balances, and the audits of the ledger and the key meters."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db import transaction
from django.db.models import F, Q, Sum, Value
from django.utils import timezone

from billing.conf import billing_settings
from billing.models import CreditAccount, CreditLedgerEntry, KeyMeter, LedgerKind
from billing.money import MoneyField, quantize
from billing.services._sql import _sql_names, _utc_day
from billing.signals import credits_low


def grant_credits(
    user: Any,
    amount: Decimal,
    *,
    note: str = "",
    actor: Any = None,
    kind: str = LedgerKind.GRANT,
    reference: str | None = None,
) -> CreditLedgerEntry:
    """Add (or, with a negative amount, remove) credit, with its ledger row.

    ``reference`` makes a grant idempotent: granting twice with the same
    reference raises ``IntegrityError`` and changes nothing.
    """
    amount = quantize(Decimal(amount))
    if amount == 0:
        raise ValueError("A credit movement needs a non-zero amount.")
    user_id = user if isinstance(user, int) else user.pk
    with transaction.atomic():
        CreditAccount.objects.get_or_create(user_id=user_id)
        entry = CreditLedgerEntry.objects.create(
            user_id=user_id,
            kind=kind,
            amount=amount,
            reference=reference or f"{kind}:{uuid.uuid4()}",
            note=note[:255],
            actor=actor,
        )
        CreditAccount.objects.filter(user_id=user_id).update(
            balance=F("balance") + Value(amount, output_field=MoneyField())
        )
        if amount < 0:
            _notify_if_low(user_id, balance_of(user_id), -amount)
    return entry


def _notify_if_low(user_id: int, balance: Decimal, decrease: Decimal) -> None:
    """Send ``credits_low`` after commit if this decrease crossed the threshold."""
    threshold = billing_settings.CREDITS_LOW_THRESHOLD
    if crosses_low_threshold(balance, decrease):
        transaction.on_commit(
            lambda: credits_low.send(
                sender=CreditAccount, user_id=user_id, balance=balance, threshold=threshold
            )
        )


def crosses_low_threshold(balance: Decimal, decrease: Decimal) -> bool:
    """Whether a decrease that left ``balance`` took it below ``BILLING_CREDITS_LOW_THRESHOLD``."""
    threshold = billing_settings.CREDITS_LOW_THRESHOLD
    return balance < threshold <= balance + decrease


def balance_of(user: Any) -> Decimal:
    user_id = user if isinstance(user, int) else user.pk
    value = CreditAccount.objects.filter(user_id=user_id).values_list("balance", flat=True).first()
    return value if value is not None else Decimal(0)


def _account_upsert_sql() -> str:
    """Move a user's balance by a signed amount, opening the account if needed.

    Parameters: user id, amount in pico-dollars (signed), the time (for a new
    account), whether to give back one in-flight slot. Returns the new balance.
    A new account starts at the amount itself, so it equals its ledger.
    """
    table, column = _sql_names(CreditAccount)
    user, balance, in_flight = column("user"), column("balance"), column("in_flight")
    return (
        f"INSERT INTO {table} ({user}, {balance}, {in_flight}, {column('created_at')}) "  # noqa: S608
        f"VALUES (%s, %s, 0, %s) ON CONFLICT ({user}) DO UPDATE SET "
        f"{balance} = {table}.{balance} + excluded.{balance}, "
        f"{in_flight} = CASE WHEN %s AND {table}.{in_flight} > 0 "
        f"THEN {table}.{in_flight} - 1 ELSE {table}.{in_flight} END "
        f"RETURNING {balance}"
    )


# --- Audit ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LedgerMismatch:
    user_id: int
    balance: Decimal
    ledger_total: Decimal

    @property
    def difference(self) -> Decimal:
        return self.balance - self.ledger_total


def check_ledger() -> list[LedgerMismatch]:
    """Accounts whose balance differs from the sum of their ledger."""
    totals = dict(
        CreditLedgerEntry.objects.order_by()
        .values("user_id")
        .annotate(total=Sum("amount"))
        .values_list("user_id", "total")
    )
    mismatches = []
    for user_id, balance in CreditAccount.objects.values_list("user_id", "balance"):
        total = totals.pop(user_id, Decimal(0))
        if balance != total:
            mismatches.append(LedgerMismatch(user_id, balance, total))
    for user_id, total in totals.items():
        mismatches.append(LedgerMismatch(user_id, Decimal(0), total))
    return sorted(mismatches, key=lambda m: m.user_id)


@dataclass(frozen=True, slots=True)
class KeyMeterMismatch:
    api_key_id: int
    counter: str  # "spent" or "spent_today"
    meter: Decimal
    ledger: Decimal


def check_key_meters(day: date | None = None) -> list[KeyMeterMismatch]:
    """Key meters whose spend differs from the key's usage charges in the ledger.

    ``spent`` is compared with all of the key's charges, ``spent_today`` with
    those of the UTC day ``day`` (today by default).
    """
    day = day or _utc_day(timezone.now())
    start = datetime.combine(day, datetime.min.time(), tzinfo=UTC)
    on_day = Q(created_at__gte=start, created_at__lt=start + timedelta(days=1))
    rows = (
        CreditLedgerEntry.objects.filter(
            kind=LedgerKind.USAGE, usage_record__api_key_id__isnull=False
        )
        .order_by()
        .values_list("usage_record__api_key_id")
        .annotate(total=Sum("amount"), day_total=Sum("amount", filter=on_day))
    )
    ledger = {key: (-total, -(day_total or Decimal(0))) for key, total, day_total in rows}
    mismatches = []
    meters = KeyMeter.objects.values_list("api_key_id", "spent", "spent_today", "spent_day")
    for key, spent, spent_today, spent_day in meters:
        total, today = ledger.pop(key, (Decimal(0), Decimal(0)))
        if spent != total:
            mismatches.append(KeyMeterMismatch(key, "spent", spent, total))
        counted = spent_today if spent_day == day else Decimal(0)
        if counted != today:
            mismatches.append(KeyMeterMismatch(key, "spent_today", counted, today))
    for key, (total, _) in ledger.items():
        mismatches.append(KeyMeterMismatch(key, "spent", Decimal(0), total))
    return sorted(mismatches, key=lambda m: (m.api_key_id, m.counter))
