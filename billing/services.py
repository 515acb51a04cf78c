"""Every movement of money, each in one transaction.

The proxy calls these through ``sync_to_async``; management commands and the
admin call them directly. The rules:

* A balance changes only here, together with the ledger row that explains it,
  through ``UPDATE ... SET balance = balance ± x`` (no read-modify-write), so
  concurrent requests of one user in several processes lose nothing.
* A usage record is written once: ``request_id`` is unique (replays of the
  spool are no-ops) and so is ``generation_id`` (a generation reported twice is
  charged once).
* Overspend is bounded by admitting at most ``BILLING_MAX_IN_FLIGHT`` unsettled
  requests per user, counted in the account row itself (see ``admit_request``).
"""

from __future__ import annotations

import enum
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db import IntegrityError, connection, models, transaction
from django.db.models import F, IntegerField, Sum, Value
from django.db.models.functions import Greatest
from django.utils import timezone

from billing.conf import billing_settings
from billing.models import (
    CostSource,
    CreditAccount,
    CreditLedgerEntry,
    LedgerKind,
    ModelPrice,
    Outcome,
    Settlement,
    UsageRecord,
)
from billing.money import MoneyField, from_units, quantize, to_units
from billing.signals import credits_low
from billing.usage import ReportedUsage

logger = logging.getLogger(__name__)


# --- Admission: the 402 gate and the overspend bound -------------------------


class Admission(enum.Enum):
    ADMITTED = "admitted"
    NO_CREDIT = "no_credit"
    TOO_MANY_IN_FLIGHT = "too_many_in_flight"


def admit_request(user_id: int) -> Admission:
    """Take one in-flight slot for the user if they have credit and a free slot.

    One conditional ``UPDATE``: row locking makes it exact across processes
    and hosts. A slot is given back when the request's usage is settled. If a
    worker dies holding slots, they are reclaimed once the user has started no
    request for ``BILLING_IN_FLIGHT_LEASE`` seconds.

    This runs on every proxied request, so it is one plain statement rather
    than an ORM query (which costs ten times as much Python here).
    """
    now = timezone.now()
    ops = connection.ops
    now_value = ops.adapt_datetimefield_value(now)
    lease_end = ops.adapt_datetimefield_value(
        now + timedelta(seconds=billing_settings.IN_FLIGHT_LEASE)
    )
    table, column = _sql_names(CreditAccount)
    in_flight, expires = column("in_flight"), column("in_flight_expires_at")
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET {in_flight} = CASE WHEN {expires} < %s THEN 1 "  # noqa: S608
            f"ELSE {in_flight} + 1 END, {expires} = %s "
            f"WHERE {column('user')} = %s AND {column('balance')} > 0 "
            f"AND ({in_flight} < %s OR {expires} < %s)",
            [now_value, lease_end, user_id, billing_settings.MAX_IN_FLIGHT, now_value],
        )
        if cursor.rowcount:
            return Admission.ADMITTED
        cursor.execute(
            f"SELECT {column('balance')} FROM {table} WHERE {column('user')} = %s",  # noqa: S608
            [user_id],
        )
        row = cursor.fetchone()
    if row is None or row[0] <= 0:
        return Admission.NO_CREDIT
    return Admission.TOO_MANY_IN_FLIGHT


def generation_belongs_to(user_id: int, generation_id: str) -> bool:
    """Whether one of the user's usage records names this generation."""
    return UsageRecord.objects.filter(user_id=user_id, generation_id=generation_id).exists()


def release_request(user_id: int) -> None:
    """Give back a slot taken by :func:`admit_request` when nothing is recorded."""
    CreditAccount.objects.filter(user_id=user_id).update(in_flight=_one_slot_less())


def _one_slot_less() -> Greatest:
    return Greatest(F("in_flight") - 1, Value(0), output_field=IntegerField())


# --- Recording usage ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UsageDraft:
    """Everything known about one proxied request when it ends."""

    request_id: uuid.UUID
    user_id: int
    endpoint: str
    streamed: bool
    outcome: str
    usage: ReportedUsage = field(default_factory=ReportedUsage)
    api_key_id: int | None = None
    api_key_label: str = ""
    requested_model: str = ""
    http_status: int | None = None
    created_at: datetime = field(default_factory=timezone.now)
    upstream_latency_ms: int | None = None
    ttfb_ms: int | None = None
    error_message: str = ""
    # The request holds an in-flight slot that recording gives back.
    holds_slot: bool = True
    # The request reached the upstream but no answer says what it cost (a
    # timeout or a broken connection after sending): never assume it was free.
    cost_unknown: bool = False


@dataclass(frozen=True, slots=True)
class Charge:
    settlement: str
    cost_source: str
    provider_cost: Decimal | None
    billed: Decimal


class RecordResult(enum.Enum):
    RECORDED = "recorded"
    ALREADY_RECORDED = "already_recorded"
    DUPLICATE_GENERATION = "duplicate_generation"


@dataclass(frozen=True, slots=True)
class Recorded:
    result: RecordResult
    settlement: str | None = None

    @property
    def awaits_cost(self) -> bool:
        return self.result is RecordResult.RECORDED and self.settlement == Settlement.PENDING


def bill(cost: Decimal) -> Decimal:
    """What the user pays for a provider cost."""
    return quantize(cost * billing_settings.MARKUP)


def price_table_cost(usage: ReportedUsage, model: str) -> Decimal | None:
    """Cost of the usage at the synced catalogue price, or ``None`` without one."""
    candidates = [model]
    base, _, variant = model.partition(":")
    if variant:
        candidates.append(base)
    price = ModelPrice.objects.filter(model_id__in=candidates).order_by("-model_id").first()
    if price is None:
        return None
    prompt = usage.prompt_tokens or 0
    completion = usage.completion_tokens or 0
    cached = min(usage.cached_tokens or 0, prompt)
    cache_write = min(usage.cache_write_tokens or 0, prompt - cached)
    reasoning = min(usage.reasoning_tokens or 0, completion)
    cache_read_price = price.prompt if price.input_cache_read is None else price.input_cache_read
    cache_write_price = price.prompt if price.input_cache_write is None else price.input_cache_write
    cost = (prompt - cached - cache_write) * price.prompt
    cost += cached * cache_read_price + cache_write * cache_write_price
    if price.internal_reasoning is not None and reasoning:
        cost += reasoning * price.internal_reasoning + (completion - reasoning) * price.completion
    else:
        cost += completion * price.completion
    return cost + price.request


def determine_charge(draft: UsageDraft) -> Charge:
    """How a request is billed, from the best source available.

    The provider's reported cost is the truth, an explicit zero included.
    Without it: the price table for reported tokens; the generation stats
    endpoint when a generation id is known (the record stays pending); else
    the record is unpriced, for an operator to see. Never a silent zero.
    """
    usage = draft.usage
    cost = usage.provider_cost
    if cost is not None:
        return Charge(Settlement.SETTLED, CostSource.PROVIDER, cost, bill(cost))
    if usage.cost_from_stats and usage.generation_id:
        return Charge(Settlement.PENDING, CostSource.NONE, None, Decimal(0))
    if usage.has_tokens:
        estimated = price_table_cost(usage, usage.model or draft.requested_model)
        if estimated is not None:
            return Charge(Settlement.SETTLED, CostSource.PRICE_TABLE, estimated, bill(estimated))
    if usage.generation_id:
        return Charge(Settlement.PENDING, CostSource.NONE, None, Decimal(0))
    if (
        usage.has_tokens
        or draft.cost_unknown
        or draft.outcome in (Outcome.COMPLETED, Outcome.CLIENT_DISCONNECTED)
    ):
        return Charge(Settlement.UNPRICED, CostSource.NONE, None, Decimal(0))
    # Refused or failed before anything was generated: nothing to pay.
    return Charge(Settlement.SETTLED, CostSource.NONE, None, Decimal(0))


def record_usage(draft: UsageDraft) -> Recorded:
    """Write the usage record and its charge, once."""
    charge = determine_charge(draft)
    usage = draft.usage
    keeps_slot = draft.holds_slot and charge.settlement == Settlement.PENDING
    now = timezone.now()
    settled = charge.settlement == Settlement.SETTLED
    values = {
        "request_id": draft.request_id,
        "user": draft.user_id,
        "api_key_id": draft.api_key_id,
        "api_key_label": draft.api_key_label[:40],
        "requested_model": draft.requested_model[:200],
        "model": (usage.model or "")[:200],
        "endpoint": draft.endpoint,
        "streamed": draft.streamed,
        "outcome": draft.outcome,
        "settlement": charge.settlement,
        "cost_source": charge.cost_source,
        "http_status": draft.http_status,
        "generation_id": (usage.generation_id or None),
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": usage.cached_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "provider_cost": charge.provider_cost,
        "billed": charge.billed,
        "holds_slot": keeps_slot,
        "upstream_latency_ms": draft.upstream_latency_ms,
        "ttfb_ms": draft.ttfb_ms,
        "error_message": (draft.error_message or usage.error_message or "")[:500],
        "created_at": draft.created_at,
        "settled_at": now if settled else None,
    }
    release = draft.holds_slot and not keeps_slot
    try:
        if connection.vendor == "postgresql":
            _record_and_charge_in_one_statement(
                values, draft.user_id, charge.billed, draft.request_id, now, release
            )
        else:
            with transaction.atomic():
                record_id = _insert_returning_pk(UsageRecord, values)
                _charge_account(
                    draft.user_id,
                    charge.billed,
                    record_id=record_id,
                    request_id=draft.request_id,
                    at=now,
                    release_slot=release,
                )
    except IntegrityError:
        if UsageRecord.objects.filter(request_id=draft.request_id).exists():
            return Recorded(RecordResult.ALREADY_RECORDED)
        if draft.holds_slot:
            release_request(draft.user_id)
        logger.warning(
            "generation %s was reported twice; recorded and charged once",
            usage.generation_id,
        )
        return Recorded(RecordResult.DUPLICATE_GENERATION)
    return Recorded(RecordResult.RECORDED, charge.settlement)


def settle_pending(
    record_id: int, cost: Decimal, source: str = CostSource.GENERATION, **tokens: int | None
) -> bool:
    """Settle a pending record at a cost learnt later. True if this call settled it.

    Safe to call concurrently from several hosts: the row lock lets exactly one
    caller find the record still pending.
    """
    with transaction.atomic():
        record = (
            UsageRecord.objects.select_for_update()
            .filter(pk=record_id, settlement=Settlement.PENDING)
            .first()
        )
        if record is None:
            return False
        record.settlement = Settlement.SETTLED
        record.cost_source = source
        record.provider_cost = cost
        record.billed = bill(cost)
        record.settled_at = timezone.now()
        release = record.holds_slot
        record.holds_slot = False
        for name, value in tokens.items():
            if value is not None and getattr(record, name) is None:
                setattr(record, name, value)
        record.save()
        _charge_account(
            record.user_id,
            record.billed,
            record_id=record.pk,
            request_id=record.request_id,
            at=record.settled_at,
            release_slot=release,
        )
    return True


def give_up_pending(record_id: int, reason: str) -> bool:
    """Mark a pending record unpriced (for an operator) and free its slot."""
    with transaction.atomic():
        record = (
            UsageRecord.objects.select_for_update()
            .filter(pk=record_id, settlement=Settlement.PENDING)
            .first()
        )
        if record is None:
            return False
        release = record.holds_slot
        record.settlement = Settlement.UNPRICED
        record.holds_slot = False
        record.error_message = (record.error_message or reason)[:500]
        record.save(update_fields=["settlement", "holds_slot", "error_message"])
        if release:
            release_request(record.user_id)
    return True


def _charge_account(
    user_id: int,
    amount: Decimal,
    *,
    record_id: int,
    request_id: uuid.UUID,
    at: datetime,
    release_slot: bool,
) -> None:
    """The ledger row and balance update of a usage charge (inside a transaction)."""
    if not amount and not release_slot:
        return
    if amount:
        _insert_returning_pk(
            CreditLedgerEntry,
            {
                "user": user_id,
                "kind": LedgerKind.USAGE,
                "amount": -amount,
                "reference": f"usage:{request_id}",
                "note": "",
                "usage_record": record_id,
                "created_at": at,
            },
        )
    with connection.cursor() as cursor:
        cursor.execute(
            _account_upsert_sql(),
            [
                user_id,
                -to_units(amount),
                connection.ops.adapt_datetimefield_value(at),
                release_slot,
            ],
        )
        row = cursor.fetchone()
    assert row is not None
    if amount > 0:
        _notify_if_low(user_id, from_units(row[0]), amount)


def _record_and_charge_in_one_statement(
    values: dict[str, Any],
    user_id: int,
    amount: Decimal,
    request_id: uuid.UUID,
    at: datetime,
    release_slot: bool,
) -> None:
    """PostgreSQL: the record, its ledger row and the balance in one statement.

    Data-modifying ``WITH`` clauses run as one atomic statement: one round
    trip instead of five (BEGIN, three statements, COMMIT), with the same
    all-or-nothing effect as :func:`_charge_account` in a transaction. The
    account row is upserted, so a user without an account gets one whose
    balance is exactly its (negative) ledger.
    """
    record_table, record_column = _sql_names(UsageRecord)
    ledger_table, ledger_column = _sql_names(CreditLedgerEntry)
    _, account_column = _sql_names(CreditAccount)
    record_fields = [UsageRecord._meta.get_field(name) for name in values]
    record_params = [
        field.get_db_prep_save(values[field.name], connection)
        for field in record_fields
        if isinstance(field, models.Field)
    ]
    sql = (
        f"WITH record AS (INSERT INTO {record_table} "  # noqa: S608  (names from models)
        f"({', '.join(record_column(f.name) for f in record_fields)}) "
        f"VALUES ({', '.join(['%s'] * len(record_fields))}) "
        f"RETURNING {record_column('id')}), "
        f"entry AS (INSERT INTO {ledger_table} ({ledger_column('user')}, {ledger_column('kind')}, "
        f"{ledger_column('amount')}, {ledger_column('reference')}, {ledger_column('note')}, "
        f"{ledger_column('usage_record')}, {ledger_column('created_at')}) "
        f"SELECT %s, %s, %s, %s, '', {record_column('id')}, %s FROM record WHERE %s), "
        f"account AS ({_account_upsert_sql()}) "
        f"SELECT (SELECT {account_column('balance')} FROM account)"
    )
    at_value = connection.ops.adapt_datetimefield_value(at)
    params = [
        *record_params,
        user_id,
        LedgerKind.USAGE.value,
        -to_units(amount),
        f"usage:{request_id}",
        at_value,
        bool(amount),
        user_id,
        -to_units(amount),
        at_value,
        release_slot,
    ]

    def execute() -> Any:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone()

    if connection.in_atomic_block:
        with transaction.atomic():  # a savepoint, so a conflict leaves the caller usable
            row = execute()
    else:
        row = execute()
    if amount > 0 and row is not None and row[0] is not None:
        _notify_if_low(user_id, from_units(row[0]), amount)


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


def _insert_returning_pk(model: type[models.Model], values: dict[str, Any]) -> int:
    """``INSERT ... RETURNING pk`` with each field's own conversion to the database.

    The hot path's insert without the ORM compiler; values are prepared by
    the fields exactly as the ORM would prepare them.
    """
    table, column = _sql_names(model)
    fields = [model._meta.get_field(name) for name in values]
    params = [
        field.get_db_prep_save(values[field.name], connection)
        for field in fields
        if isinstance(field, models.Field)
    ]
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


# --- Grants and adjustments ------------------------------------------------------


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
    if balance < threshold <= balance + decrease:
        transaction.on_commit(
            lambda: credits_low.send(
                sender=CreditAccount, user_id=user_id, balance=balance, threshold=threshold
            )
        )


def balance_of(user: Any) -> Decimal:
    user_id = user if isinstance(user, int) else user.pk
    value = CreditAccount.objects.filter(user_id=user_id).values_list("balance", flat=True).first()
    return value if value is not None else Decimal(0)


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
