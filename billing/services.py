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
* A key's limits (spend caps, request rate) are checked in the same statement
  that takes the slot, against the key's meter row, whose spend counters move
  with the ledger row of every charge (see ``_admit_key``).
"""

from __future__ import annotations

import enum
import functools
import logging
import math
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, Protocol, overload

from django.db import DataError, IntegrityError, connection, models, transaction
from django.db.models import F, IntegerField, Q, Sum, Value
from django.db.models.functions import Greatest
from django.utils import timezone

from billing.conf import billing_settings
from billing.models import (
    CostSource,
    CreditAccount,
    CreditLedgerEntry,
    KeyMeter,
    LedgerKind,
    ModelPrice,
    Outcome,
    Settlement,
    UsageRecord,
)
from billing.money import MoneyField, from_units, quantize, to_units
from billing.signals import credits_low, key_limit_reached
from openrouter_proxy.metering import Admission, AdmissionResult, ReportedUsage, UsageDraft

logger = logging.getLogger(__name__)


# --- Admission: the 402 gate and the overspend bound -------------------------


class KeyLimitsLike(Protocol):
    """A key's limits, as the site's key verifier reports them (``None``: no limit)."""

    @property
    def spend_limit(self) -> Decimal | None: ...

    @property
    def daily_spend_limit(self) -> Decimal | None: ...

    @property
    def requests_per_minute(self) -> int | None: ...


# The most requests per minute a key's rate can allow: the meter keeps one
# admission time per allowed request (13 bytes each).
MAX_REQUESTS_PER_MINUTE = 10_000
# Digits of one admission time in a meter's ring: milliseconds since the epoch.
STAMP = 13
_ADMISSION_TRIES = 4


@overload
def admit_request(
    user_id: int,
    key_id: int | None = None,
    limits: KeyLimitsLike | None = None,
    *,
    detailed: Literal[False] = False,
) -> Admission: ...


@overload
def admit_request(
    user_id: int,
    key_id: int | None = None,
    limits: KeyLimitsLike | None = None,
    *,
    detailed: Literal[True],
) -> AdmissionResult: ...


def admit_request(
    user_id: int,
    key_id: int | None = None,
    limits: KeyLimitsLike | None = None,
    *,
    detailed: bool = False,
) -> Admission | AdmissionResult:
    """Admit one billed request of a user, through one of their keys.

    Without key limits this is the credit gate and the in-flight bound (see
    :func:`_admit_user`); with them, the key's spend caps and request rate are
    checked in the same atomic statement (see :func:`_admit_key`). With
    ``detailed`` the answer says when a refused request may be retried.
    """
    if key_id is None or limits is None or not _has_limits(limits):
        result = AdmissionResult(_admit_user(user_id))
    else:
        result = _admit_key(user_id, key_id, limits)
    return result if detailed else result.admission


def _has_limits(limits: KeyLimitsLike) -> bool:
    return (
        limits.spend_limit is not None
        or limits.daily_spend_limit is not None
        or limits.requests_per_minute is not None
    )


def _admit_user(user_id: int) -> Admission:
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


def _admit_key(user_id: int, key_id: int, limits: KeyLimitsLike) -> AdmissionResult:
    """Admit a request of a key with limits: the user's gate and the key's, atomically.

    One statement on PostgreSQL (one transaction of two on SQLite, whose
    writers are serialized) takes the user's in-flight slot and advances the
    key's meter only if everything holds at once: the user's credit and free
    slot, the key's spend below its cap (in total and today, UTC), and fewer
    than N = ``requests_per_minute`` of the key's admissions in the last
    ``BILLING_RATE_WINDOW_SECONDS``. The meter keeps the times of the key's
    last N admissions in a ring: a request is admitted only if the oldest of
    them is more than a window old, and its time replaces it. Both rows are
    locked by the ``UPDATE`` s (the account's first, in every statement that
    takes both, so they cannot deadlock), so the check and the change are
    exact across processes and hosts; times come from the database's clock.

    A refused request changes nothing. After a refusal the rows are read to
    say why; a meter that does not exist yet or whose ring has another size
    (the rate changed) is prepared and the admission tried again.
    """
    rate = limits.requests_per_minute
    if rate is not None and not 1 <= rate <= MAX_REQUESTS_PER_MINUTE:
        raise ValueError(f"requests_per_minute must be 1 to {MAX_REQUESTS_PER_MINUTE}: {rate}")
    for _ in range(_ADMISSION_TRIES):
        if _try_admit_key(user_id, key_id, limits):
            return AdmissionResult(Admission.ADMITTED)
        refusal = _key_refusal(user_id, key_id, limits)
        if refusal is not None:
            return refusal
    # Every try lost a race with the key's other requests: busy, retry shortly.
    return AdmissionResult(Admission.TOO_MANY_IN_FLIGHT, 1)


class _LostRace(Exception):
    pass


def _now_ms_sql() -> str:
    """The database's clock in whole milliseconds since the epoch."""
    if connection.vendor == "postgresql":
        return "CAST(FLOOR(EXTRACT(EPOCH FROM clock_timestamp()) * 1000) AS BIGINT)"
    return "CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER)"


def _stamp_sql(now_ms: str, previous: str) -> str:
    """An admission time for the ring: never before the previous one, 13 digits."""
    if connection.vendor == "postgresql":
        return f"lpad(CAST(GREATEST({now_ms}, {previous}) AS text), {STAMP}, '0')"
    return f"printf('%%0{STAMP}d', max({now_ms}, {previous}))"


def _utc_day(moment: datetime) -> date:
    return moment.astimezone(UTC).date()


def _key_sql(key_id: int, limits: KeyLimitsLike, prefix: str, today: Any) -> tuple[str, list[Any]]:
    """The key's conditions on its meter row (columns prefixed by ``prefix``)."""
    _, column = _sql_names(KeyMeter)

    def col(name: str) -> str:
        return f"{prefix}{column(name)}"

    parts = [f"{col('api_key_id')} = %s"]
    params: list[Any] = [key_id]
    if limits.spend_limit is not None:
        parts.append(f"{col('spent')} < %s")
        params.append(to_units(limits.spend_limit))
    if limits.daily_spend_limit is not None:
        day = col("spent_day")
        parts.append(f"({day} IS NULL OR {day} <> %s OR {col('spent_today')} < %s)")
        params += [today, to_units(limits.daily_spend_limit)]
    if limits.requests_per_minute is not None:
        times, oldest = col("rate_times"), col("rate_next")
        parts.append(
            f"CASE WHEN length({times}) = %s THEN "
            f"CAST(substr({times}, {oldest} * {STAMP} + 1, {STAMP}) AS BIGINT) "
            f"< {_now_ms_sql()} - %s ELSE 1 = 0 END"
        )
        params += [limits.requests_per_minute * STAMP, billing_settings.RATE_WINDOW_SECONDS * 1000]
    return " AND ".join(parts), params


def _try_admit_key(user_id: int, key_id: int, limits: KeyLimitsLike) -> bool:
    ops = connection.ops
    now = timezone.now()
    now_value = ops.adapt_datetimefield_value(now)
    lease_end = ops.adapt_datetimefield_value(
        now + timedelta(seconds=billing_settings.IN_FLIGHT_LEASE)
    )
    today = ops.adapt_datefield_value(_utc_day(now))
    account_table, account = _sql_names(CreditAccount)
    meter_table, meter = _sql_names(KeyMeter)
    in_flight, expires = account("in_flight"), account("in_flight_expires_at")
    precheck, precheck_params = _key_sql(key_id, limits, "k.", today)
    take_slot = (
        f"UPDATE {account_table} SET {in_flight} = CASE WHEN {expires} < %s THEN 1 "  # noqa: S608
        f"ELSE {in_flight} + 1 END, {expires} = %s "
        f"WHERE {account('user')} = %s AND {account('balance')} > 0 "
        f"AND ({in_flight} < %s OR {expires} < %s) "
        f"AND EXISTS (SELECT 1 FROM {meter_table} k WHERE {precheck})"
    )
    take_slot_params = [
        now_value,
        lease_end,
        user_id,
        billing_settings.MAX_IN_FLIGHT,
        now_value,
        *precheck_params,
    ]
    rate = limits.requests_per_minute
    sets = [
        f"{meter('spend_limit')} = %s",
        f"{meter('daily_spend_limit')} = %s",
        f"{meter('requests_per_minute')} = %s",
    ]
    set_params: list[Any] = [
        None if limits.spend_limit is None else to_units(limits.spend_limit),
        None if limits.daily_spend_limit is None else to_units(limits.daily_spend_limit),
        rate,
    ]
    if rate is not None:
        times, oldest = meter("rate_times"), meter("rate_next")
        previous = (
            f"CAST(substr({times}, (CASE WHEN {oldest} = 0 THEN %s ELSE {oldest} END - 1) "
            f"* {STAMP} + 1, {STAMP}) AS BIGINT)"
        )
        sets.append(
            f"{times} = substr({times}, 1, {oldest} * {STAMP}) || "
            f"{_stamp_sql(_now_ms_sql(), previous)} || "
            f"substr({times}, {oldest} * {STAMP} + {STAMP + 1})"
        )
        sets.append(f"{oldest} = CASE WHEN {oldest} + 1 >= %s THEN 0 ELSE {oldest} + 1 END")
        set_params += [rate, rate]
    condition, condition_params = _key_sql(key_id, limits, "", today)
    advance = f"UPDATE {meter_table} SET {', '.join(sets)} WHERE {condition}"  # noqa: S608
    advance_params = [*set_params, *condition_params]

    if connection.vendor == "postgresql":
        sql = (
            f"WITH slot AS ({take_slot} RETURNING 1), "  # noqa: S608  (names from models)
            f"meter AS ({advance} AND EXISTS (SELECT 1 FROM slot) RETURNING 1) "
            # A slot taken while the key's row refused (it changed after the
            # first check): divide by zero, so the whole statement undoes itself.
            "SELECT 1 / (SELECT count(*) FROM meter) FROM slot"
        )

        def execute() -> bool:
            with connection.cursor() as cursor:
                cursor.execute(sql, [*take_slot_params, *advance_params])
                return cursor.fetchone() is not None

        try:
            if connection.in_atomic_block:
                with transaction.atomic():
                    return execute()
            return execute()
        except DataError as error:
            if getattr(error.__cause__, "sqlstate", None) != "22012":  # division_by_zero
                raise
            return False
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(take_slot, take_slot_params)
            if not cursor.rowcount:
                return False
            cursor.execute(advance, advance_params)
            if cursor.rowcount != 1:
                raise _LostRace
    except _LostRace:
        return False
    return True


def _key_refusal(user_id: int, key_id: int, limits: KeyLimitsLike) -> AdmissionResult | None:
    """Why a key's request was refused, or ``None`` to try again."""
    now = timezone.now()
    account = (
        CreditAccount.objects.filter(user_id=user_id)
        .values_list("balance", "in_flight", "in_flight_expires_at")
        .first()
    )
    if account is None or account[0] <= 0:
        return AdmissionResult(Admission.NO_CREDIT)
    meter = (
        KeyMeter.objects.filter(api_key_id=key_id)
        .values_list("spent", "spent_today", "spent_day", "rate_times", "rate_next")
        .first()
    )
    rate = limits.requests_per_minute
    if meter is None:
        KeyMeter.objects.bulk_create(
            [KeyMeter(api_key_id=key_id, user_id=user_id, rate_times=_empty_ring(rate))],
            ignore_conflicts=True,
        )
        return None
    spent, spent_today, spent_day, times, oldest = meter
    if limits.spend_limit is not None and spent >= limits.spend_limit:
        return AdmissionResult(Admission.KEY_SPEND_LIMIT)
    today = _utc_day(now)
    if (
        limits.daily_spend_limit is not None
        and spent_day == today
        and spent_today >= limits.daily_spend_limit
    ):
        midnight = datetime.combine(today + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
        return AdmissionResult(
            Admission.KEY_DAILY_SPEND_LIMIT, max(1, math.ceil((midnight - now).total_seconds()))
        )
    if rate is not None:
        if len(times) != rate * STAMP:
            _resize_ring(key_id, rate)
            return None
        oldest_ms = int(times[oldest * STAMP : (oldest + 1) * STAMP])
        wait_ms = oldest_ms + billing_settings.RATE_WINDOW_SECONDS * 1000 + 1 - _database_ms()
        if wait_ms > 0:
            return AdmissionResult(Admission.RATE_LIMITED, max(1, math.ceil(wait_ms / 1000)))
    in_flight, expires = account[1], account[2]
    if in_flight >= billing_settings.MAX_IN_FLIGHT and (expires is None or expires >= now):
        return AdmissionResult(Admission.TOO_MANY_IN_FLIGHT, 1)
    return None


def _database_ms() -> int:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {_now_ms_sql()}")
        row = cursor.fetchone()
    assert row is not None
    return int(row[0])


def _empty_ring(rate: int | None) -> str:
    return "0" * STAMP * (rate or 0)


def _ring_times(times: str, oldest: int) -> list[str]:
    """A ring's admission times, oldest first (nothing if it is not a ring)."""
    if not times or len(times) % STAMP or not times.isdigit():
        return []
    stamps = [times[i : i + STAMP] for i in range(0, len(times), STAMP)]
    start = oldest % len(stamps)
    return stamps[start:] + stamps[:start]


def _resize_ring(key_id: int, rate: int) -> None:
    """Give a key's ring room for ``rate`` times, keeping the latest ones."""
    with transaction.atomic():
        meters = KeyMeter.objects.filter(api_key_id=key_id)
        meters.update(rate_next=F("rate_next"))  # the row's lock, before reading it
        row = meters.values_list("rate_times", "rate_next").first()
        if row is None or len(row[0]) == rate * STAMP:
            return
        kept = _ring_times(*row)[-rate:]
        meters.update(rate_times=_empty_ring(rate - len(kept)) + "".join(kept), rate_next=0)


def set_key_limits(
    key_id: int, user_id: int, limits: KeyLimitsLike | None, *, label: str = ""
) -> None:
    """Tell billing a key's limits (when the site creates or changes the key).

    Admission enforces the limits the key verifier reports with each request
    and records them on the meter; this makes the meter show them at once.
    """
    values: dict[str, Any] = {
        "user_id": user_id,
        "spend_limit": limits.spend_limit if limits else None,
        "daily_spend_limit": limits.daily_spend_limit if limits else None,
        "requests_per_minute": limits.requests_per_minute if limits else None,
    }
    if label:
        values["label"] = label[:40]
    for attempt in range(2):
        try:
            KeyMeter.objects.update_or_create(api_key_id=key_id, defaults=values)
            return
        except IntegrityError:  # created at the same time by a request
            if attempt:
                raise


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
                values,
                draft.user_id,
                charge.billed,
                draft.request_id,
                now,
                release,
                key=_key_of(draft.api_key_id, draft.api_key_label),
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
                    key=_key_of(draft.api_key_id, draft.api_key_label),
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
            key=_key_of(record.api_key_id, record.api_key_label),
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
    if amount > 0 and key is not None:
        with connection.cursor() as cursor:
            cursor.execute(
                _meter_upsert_sql("VALUES (%s, %s, %s, %s, %s, %s, '', 0, %s)"),
                _meter_upsert_params(key, user_id, amount, at),
            )
            counters = cursor.fetchone()
        _notify_if_key_limit(key[0], user_id, amount, _utc_day(at), counters)


def _key_of(api_key_id: int | None, label: str) -> tuple[int, str] | None:
    return None if api_key_id is None else (api_key_id, label[:40])


def _meter_upsert_params(
    key: tuple[int, str], user_id: int, amount: Decimal, at: datetime
) -> list[Any]:
    ops = connection.ops
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
    if counters is None or counters[0] is None:
        return
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
    for limit, value, bound in reached:
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


def _record_and_charge_in_one_statement(
    values: dict[str, Any],
    user_id: int,
    amount: Decimal,
    request_id: uuid.UUID,
    at: datetime,
    release_slot: bool,
    key: tuple[int, str] | None = None,
) -> None:
    """PostgreSQL: the record, its ledger row, the balance and the key's spend in one statement.

    Data-modifying ``WITH`` clauses run as one atomic statement: one round
    trip instead of five (BEGIN, three statements, COMMIT), with the same
    all-or-nothing effect as :func:`_charge_account` in a transaction. The
    account row is upserted, so a user without an account gets one whose
    balance is exactly its (negative) ledger; so is the key's meter.
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
    meter_upsert = _meter_upsert_sql(
        "SELECT %s, %s, %s, %s, %s, %s, '', 0, %s FROM account WHERE %s"
    )
    sql = (
        f"WITH record AS (INSERT INTO {record_table} "  # noqa: S608  (names from models)
        f"({', '.join(record_column(f.name) for f in record_fields)}) "
        f"VALUES ({', '.join(['%s'] * len(record_fields))}) "
        f"RETURNING {record_column('id')}), "
        f"entry AS (INSERT INTO {ledger_table} ({ledger_column('user')}, {ledger_column('kind')}, "
        f"{ledger_column('amount')}, {ledger_column('reference')}, {ledger_column('note')}, "
        f"{ledger_column('usage_record')}, {ledger_column('created_at')}) "
        f"SELECT %s, %s, %s, %s, '', {record_column('id')}, %s FROM record WHERE %s), "
        f"account AS ({_account_upsert_sql()}), "
        # After the account (it selects from it): rows are locked account first.
        f"meter AS ({meter_upsert}) "
        f"SELECT (SELECT {account_column('balance')} FROM account), meter.* "
        "FROM (SELECT 1) AS one LEFT JOIN meter ON true"
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
        *_meter_upsert_params(key or (0, ""), user_id, amount, at),
        key is not None and amount > 0,
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
    if amount > 0 and key is not None and row is not None:
        _notify_if_key_limit(key[0], user_id, amount, _utc_day(at), row[1:])


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
