"""Usage records and their charges: written once, settled when the cost comes later."""

from __future__ import annotations

import enum
import functools
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from django.db import DEFAULT_DB_ALIAS, IntegrityError, connection, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.utils import timezone

from billing.models import (
    CostSource,
    CreditAccount,
    CreditLedgerEntry,
    KeyMeter,
    LedgerKind,
    ModelPrice,
    OpenRequest,
    Settlement,
    UsageRecord,
)
from billing.money import from_units, to_units
from billing.services._sql import (
    _execute_many_returning,
    _insert_returning_pk,
    _prepared,
    _sql_names,
    _utc_day,
    hot_cursor,
)
from billing.services.admission import release_request
from billing.services.ledger import _account_upsert_sql, _notify_if_low, crosses_low_threshold
from billing.services.pricing import Charge, bill, cost_at_price, determine_charge
from billing.signals import key_limit_reached
from openrouter_proxy.metering import ReportedUsage, UsageDraft

logger = logging.getLogger(__name__)


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


def price_table_cost(usage: ReportedUsage, model: str) -> Decimal | None:
    """Cost of the usage at the synced catalogue price, or ``None`` without one."""
    candidates = [model]
    base, _, variant = model.partition(":")
    if variant:
        candidates.append(base)
    price = ModelPrice.objects.filter(model_id__in=candidates).order_by("-model_id").first()
    if price is None:
        return None
    return cost_at_price(usage, price)


def generation_belongs_to(user_id: int, generation_id: str) -> bool:
    """Whether one of the user's usage records names this generation."""
    return UsageRecord.objects.filter(user_id=user_id, generation_id=generation_id).exists()


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one draft's record writes: the record's values and its charge."""

    draft: UsageDraft
    charge: Charge
    values: dict[str, Any]
    at: datetime
    release: bool
    key: tuple[int, str] | None


def _plan(
    draft: UsageDraft,
    price_table: Callable[[ReportedUsage, str], Decimal | None] = price_table_cost,
) -> _Plan:
    charge = determine_charge(draft, price_table)
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
    return _Plan(
        draft,
        charge,
        values,
        now,
        release=draft.holds_slot and not keeps_slot,
        key=_key_of(draft.api_key_id, draft.api_key_label),
    )


def record_usage(draft: UsageDraft) -> Recorded:
    """Write the usage record and its charge, once, and end the request's trace."""
    plan = _plan(draft)
    try:
        if connection.vendor == "postgresql":
            _record_and_charge_in_one_statement(plan)
        else:
            with transaction.atomic():
                record_id = _insert_returning_pk(UsageRecord, plan.values)
                _charge_account(
                    draft.user_id,
                    plan.charge.billed,
                    record_id=record_id,
                    request_id=draft.request_id,
                    at=plan.at,
                    release_slot=plan.release,
                    key=plan.key,
                )
                OpenRequest.objects.filter(request_id=draft.request_id).delete()
    except IntegrityError:
        if UsageRecord.objects.filter(request_id=draft.request_id).exists():
            return Recorded(RecordResult.ALREADY_RECORDED)
        if draft.holds_slot:
            release_request(draft.user_id)
        logger.warning(
            "generation %s was reported twice; recorded and charged once",
            draft.usage.generation_id,
        )
        return Recorded(RecordResult.DUPLICATE_GENERATION)
    return Recorded(RecordResult.RECORDED, plan.charge.settlement)


def record_usage_many(drafts: Sequence[UsageDraft]) -> list[Recorded]:
    """Several drafts' records and charges in one transaction: one round trip, one commit.

    On PostgreSQL the drafts' statements (each :func:`record_usage`'s one
    statement) are sent together, pipelined, and committed together; where the
    two write the same account or key meter, the second sees the first. Any
    error (a draft already recorded, a generation reported twice, a lost
    connection) rolls all of them back and is raised: the caller then records
    each alone (:func:`record_usage`), which tells those cases apart. Elsewhere,
    or inside a caller's transaction, each is recorded alone here.
    """
    if len(drafts) < 2 or connection.vendor != "postgresql" or connection.in_atomic_block:
        return [record_usage(draft) for draft in drafts]
    # In the order of the rows they lock (account, then the key's meter), as every
    # other writer of them: two batches that share users never wait on each other
    # in a circle (a deadlock PostgreSQL would break only after deadlock_timeout).
    plans = sorted(
        (_plan(draft) for draft in drafts),
        key=lambda plan: (plan.draft.user_id, plan.key[0] if plan.key else 0),
    )
    statements = [_record_and_charge_statement(plan, closes=False) for plan in plans]
    sql = statements[0][0]
    assert all(text == sql for text, _ in statements)
    with transaction.atomic():
        with hot_cursor() as cursor:
            # The traces first, each locked in the order of its request id, as
            # the answer notes lock them (billing.recovery.mark_answered_many).
            cursor.execute(_close_traces_sql(), [[plan.draft.request_id for plan in plans]])
            rows = _execute_many_returning(cursor, sql, [params for _, params in statements])
        for plan, row in zip(plans, rows, strict=True):
            _notify_after_charge(plan, row)
    settlements = {plan.draft.request_id: plan.charge.settlement for plan in plans}
    return [Recorded(RecordResult.RECORDED, settlements[draft.request_id]) for draft in drafts]


def _locked_if_pending(record_id: int) -> UsageRecord | None:
    """The record, locked for this transaction, if it is still pending."""
    return (
        UsageRecord.objects.select_for_update()
        .filter(pk=record_id, settlement=Settlement.PENDING)
        .first()
    )


def settle_pending(
    record_id: int, cost: Decimal, source: str = CostSource.GENERATION, **tokens: int | None
) -> bool:
    """Settle a pending record at a cost learnt later. True if this call settled it.

    Safe to call concurrently from several hosts: the row lock lets exactly one
    caller find the record still pending.
    """
    with transaction.atomic():
        record = _locked_if_pending(record_id)
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
            key=_key_of(record.api_key_id, record.api_key_label),
        )
    return True


def give_up_pending(record_id: int, reason: str) -> bool:
    """Mark a pending record unpriced (for an operator) and free its slot."""
    with transaction.atomic():
        record = _locked_if_pending(record_id)
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
    key: tuple[int, str] | None = None,
) -> None:
    """The ledger row, balance and key spend of a usage charge (inside a transaction)."""
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
    with hot_cursor() as cursor:
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
    if amount > 0 and key is not None:
        with hot_cursor() as cursor:
            cursor.execute(
                _meter_upsert_sql("VALUES (%s, %s, %s, %s, %s, %s, '', 0, %s)"),
                _meter_upsert_params(key, user_id, amount, at),
            )
            counters = cursor.fetchone()
        _notify_if_key_limit(key[0], user_id, amount, _utc_day(at), counters)


def _key_of(api_key_id: int | None, label: str) -> tuple[int, str] | None:
    return None if api_key_id is None else (api_key_id, label[:40])


def _meter_upsert_params(
    key: tuple[int, str],
    user_id: int,
    amount: Decimal,
    at: datetime,
    on: BaseDatabaseWrapper | None = None,
) -> list[Any]:
    ops = (on or connections[DEFAULT_DB_ALIAS]).ops
    units = to_units(amount)
    day = ops.adapt_datefield_value(_utc_day(at))
    return [key[0], user_id, key[1], units, units, day, ops.adapt_datetimefield_value(at)]


def _meter_upsert_sql(source: str) -> str:
    """Add a charge to a key's spend, in total and on its UTC day, opening its meter if needed.

    ``source`` gives the row: key id, user id, label, the amount in
    pico-dollars (twice), the day, the time. A charge dated before the
    meter's day (a host whose clock is behind) counts in the total only.
    Returns the new counters and the key's caps.
    """
    table, column = _sql_names(KeyMeter)
    key, spent, today, day, label = (
        column(name) for name in ("api_key_id", "spent", "spent_today", "spent_day", "label")
    )
    new_day = f"{table}.{day} IS NULL OR {table}.{day} < excluded.{day}"
    return (
        f"INSERT INTO {table} ({key}, {column('user')}, {label}, {spent}, {today}, {day}, "
        f"{column('rate_times')}, {column('rate_next')}, {column('created_at')}) "
        f"{source} ON CONFLICT ({key}) DO UPDATE SET "
        f"{spent} = {table}.{spent} + excluded.{spent}, "
        f"{today} = CASE WHEN {table}.{day} = excluded.{day} "
        f"THEN {table}.{today} + excluded.{today} "
        f"WHEN {new_day} THEN excluded.{today} ELSE {table}.{today} END, "
        f"{day} = CASE WHEN {new_day} THEN excluded.{day} ELSE {table}.{day} END, "
        f"{label} = CASE WHEN excluded.{label} = '' THEN {table}.{label} "
        f"ELSE excluded.{label} END "
        f"RETURNING {spent}, {today}, {day}, {column('spend_limit')}, "
        f"{column('daily_spend_limit')}"
    )


def _notify_if_key_limit(
    key_id: int, user_id: int, amount: Decimal, day: date, counters: Any
) -> None:
    """Send ``key_limit_reached`` after commit for each cap this charge reached."""
    for limit, value, bound in _key_limits_reached(amount, day, counters):
        transaction.on_commit(
            functools.partial(
                key_limit_reached.send,
                sender=KeyMeter,
                api_key_id=key_id,
                user_id=user_id,
                limit=limit,
                spent=from_units(value),
                cap=from_units(bound),
                day=day,
            )
        )


def _key_limits_reached(amount: Decimal, day: date, counters: Any) -> list[tuple[str, int, int]]:
    """The caps a charge of ``amount`` reached, from its key meter's new counters."""
    if counters is None or counters[0] is None:
        return []
    spent, spent_today, counter_day, cap, daily_cap = counters
    units = to_units(amount)
    if isinstance(counter_day, str):
        counter_day = date.fromisoformat(counter_day)
    reached = []
    if cap is not None and spent >= cap > spent - units:
        reached.append(("spend_limit", spent, cap))
    if (
        daily_cap is not None
        and counter_day == day
        and spent_today >= daily_cap > spent_today - units
    ):
        reached.append(("daily_spend_limit", spent_today, daily_cap))
    return reached


@functools.cache
def _record_and_charge_sql(vendor: str, record_fields: tuple[str, ...], closes: bool) -> str:
    """The text of :func:`_record_and_charge_in_one_statement`: the same on every request.

    With ``closes``, the statement also deletes the request's trace (its last
    parameter); a batch deletes its traces itself, first (:func:`_close_traces_sql`).
    """
    record_table, record_column = _sql_names(UsageRecord)
    ledger_table, ledger_column = _sql_names(CreditLedgerEntry)
    _, account_column = _sql_names(CreditAccount)
    trace_table, trace_column = _sql_names(OpenRequest)
    meter_upsert = _meter_upsert_sql(
        "SELECT %s, %s, %s, %s, %s, %s, '', 0, %s FROM account WHERE %s"
    )
    clauses = [
        f"record AS (INSERT INTO {record_table} "  # noqa: S608  (names from models)
        f"({', '.join(map(record_column, record_fields))}) "
        f"VALUES ({', '.join(['%s'] * len(record_fields))}) "
        f"RETURNING {record_column('id')})",
        f"entry AS (INSERT INTO {ledger_table} ({ledger_column('user')}, "  # noqa: S608
        f"{ledger_column('kind')}, "
        f"{ledger_column('amount')}, {ledger_column('reference')}, {ledger_column('note')}, "
        f"{ledger_column('usage_record')}, {ledger_column('created_at')}) "
        f"SELECT %s, %s, %s, %s, '', {record_column('id')}, %s FROM record WHERE %s)",
        f"account AS ({_account_upsert_sql()})",
        # After the account (it selects from it): rows are locked account first.
        f"meter AS ({meter_upsert})",
    ]
    if closes:
        # The request's write-ahead trace has done its job (see billing.recovery).
        clauses.append(
            f"closed AS (DELETE FROM {trace_table} WHERE {trace_column('request_id')} = %s)"  # noqa: S608
        )
    return (
        f"WITH {', '.join(clauses)} "  # noqa: S608  (names from models)
        f"SELECT (SELECT {account_column('balance')} FROM account), meter.* "
        "FROM (SELECT 1) AS one LEFT JOIN meter ON true"
    )


def _record_and_charge_statement(
    plan: _Plan, closes: bool = True, on: BaseDatabaseWrapper | None = None
) -> tuple[str, list[Any]]:
    """The text and parameters of :func:`_record_and_charge_in_one_statement`.

    ``on`` is the database wrapper whose vendor and value adapters build it
    (the thread's own connection by default).
    """
    on = on or connections[DEFAULT_DB_ALIAS]
    values, amount, at = plan.values, plan.charge.billed, plan.at
    user_id, request_id, key = plan.draft.user_id, plan.draft.request_id, plan.key
    sql = _record_and_charge_sql(on.vendor, tuple(values), closes)
    record_params = _prepared(UsageRecord, values, on)[1]
    at_value = on.ops.adapt_datetimefield_value(at)
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
        plan.release,
        *_meter_upsert_params(key or (0, ""), user_id, amount, at, on),
        key is not None and amount > 0,
    ]
    if closes:
        params.append(request_id)
    return sql, params


@functools.cache
def _close_traces_sql() -> str:
    """PostgreSQL: delete the traces of the requests an array names, locked in id order."""
    table, column = _sql_names(OpenRequest)
    pk, request_id = column("id"), column("request_id")
    return (
        f"DELETE FROM {table} WHERE {pk} IN (SELECT {pk} FROM {table} "  # noqa: S608
        f"WHERE {request_id} = ANY(%s::uuid[]) ORDER BY {request_id} FOR UPDATE)"
    )


def _record_and_charge_in_one_statement(plan: _Plan) -> None:
    """PostgreSQL: the record, its ledger row, the balance and the key's spend in one statement.

    Data-modifying ``WITH`` clauses run as one atomic statement: one round
    trip instead of five (BEGIN, three statements, COMMIT), with the same
    all-or-nothing effect as :func:`_charge_account` in a transaction. The
    account row is upserted, so a user without an account gets one whose
    balance is exactly its (negative) ledger; so is the key's meter.
    """
    sql, params = _record_and_charge_statement(plan)

    def execute() -> Any:
        with hot_cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone()

    if connection.in_atomic_block:
        with transaction.atomic():  # a savepoint, so a conflict leaves the caller usable
            row = execute()
    else:
        row = execute()
    _notify_after_charge(plan, row)


def _signals_due(plan: _Plan, row: Any) -> bool:
    """Whether :func:`_notify_after_charge` would send a signal for this charge's counters."""
    amount, key = plan.charge.billed, plan.key
    if amount <= 0 or row is None:
        return False
    if row[0] is not None and crosses_low_threshold(from_units(row[0]), amount):
        return True
    return key is not None and bool(_key_limits_reached(amount, _utc_day(plan.at), row[1:]))


def _notify_after_charge(plan: _Plan, row: Any) -> None:
    """The signals a charge's statement returned the counters for (sent after commit)."""
    amount, key = plan.charge.billed, plan.key
    if amount > 0 and row is not None and row[0] is not None:
        _notify_if_low(plan.draft.user_id, from_units(row[0]), amount)
    if amount > 0 and key is not None and row is not None:
        _notify_if_key_limit(key[0], plan.draft.user_id, amount, _utc_day(plan.at), row[1:])
