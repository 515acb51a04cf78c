"""Admission: the credit gate, the in-flight bound and a key's limits.

A request is admitted by one conditional statement that takes a slot in the
user's account row and, for a key with limits, advances the key's meter row.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, Protocol, overload

from django.db import DatabaseError, DataError, IntegrityError, connection, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import F, IntegerField, Value
from django.db.models.functions import Greatest
from django.utils import timezone

from billing.conf import billing_settings
from billing.models import CreditAccount, KeyMeter, OpenRequest
from billing.money import from_units, to_units
from billing.services._sql import (
    _execute_many_returning,
    _insert_returning_pk,
    _prepared,
    _sql_names,
    _utc_day,
    hot_cursor,
)
from openrouter_proxy.metering import Admission, AdmissionResult

logger = logging.getLogger(__name__)


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
    trace: dict[str, Any] | None = None,
    ending: int = 0,
    unrecorded: Decimal = Decimal(0),
    key_unrecorded: Decimal = Decimal(0),
) -> Admission: ...


@overload
def admit_request(
    user_id: int,
    key_id: int | None = None,
    limits: KeyLimitsLike | None = None,
    *,
    detailed: Literal[True],
    trace: dict[str, Any] | None = None,
    ending: int = 0,
    unrecorded: Decimal = Decimal(0),
    key_unrecorded: Decimal = Decimal(0),
) -> AdmissionResult: ...


def admit_request(
    user_id: int,
    key_id: int | None = None,
    limits: KeyLimitsLike | None = None,
    *,
    detailed: bool = False,
    trace: dict[str, Any] | None = None,
    ending: int = 0,
    unrecorded: Decimal = Decimal(0),
    key_unrecorded: Decimal = Decimal(0),
) -> Admission | AdmissionResult:
    """Admit one billed request of a user, through one of their keys.

    Without key limits this is the credit gate and the in-flight bound (see
    :func:`_admit_user`); with them, the key's spend caps and request rate are
    checked in the same atomic statement (see :func:`_admit_key`). With
    ``detailed`` the answer says when a refused request may be retried.

    ``ending`` is how many of the user's requests have ended while their
    records are still being written: their slots are not yet given back, but
    no longer in use, so the bound is raised by as many. What they will be
    charged is not in the books yet: ``unrecorded`` (``key_unrecorded`` of
    it through this key) counts as spent already, against the balance and
    the key's caps, so letting them out of the bound overspends nothing.
    """
    bound = in_flight_bound(ending)
    held = Held(to_units(unrecorded), to_units(key_unrecorded))
    gate = key_gate(key_id, limits)
    if gate is None:
        admission, traced = _admit_user(user_id, trace, bound, held.balance)
        result = AdmissionResult(admission)
    else:
        result, traced = _admit_key(user_id, *gate, bound, held), False
    if trace is not None and result.admitted and not traced:
        _write_trace(trace)
    return result if detailed else result.admission


def _write_trace(trace: dict[str, Any]) -> None:
    """The admitted request's write-ahead trace, as its own statement."""
    try:
        if connection.in_atomic_block:
            with transaction.atomic():  # a savepoint, so a failure leaves the caller usable
                _insert_returning_pk(OpenRequest, trace)
        else:
            _insert_returning_pk(OpenRequest, trace)
    except DatabaseError:
        logger.warning("could not write the trace of request %s", trace.get("request_id"))


@dataclass(frozen=True, slots=True)
class Held:
    """What ended requests will be charged, not yet in the books (pico-dollars)."""

    #: Of the user's balance.
    balance: int = 0
    #: Of the key's spend.
    key: int = 0


def in_flight_bound(ending: int) -> int:
    """The most unsettled requests a user may hold, ``ending`` of them already over."""
    return billing_settings.MAX_IN_FLIGHT + max(0, ending)


def key_gate(key_id: int | None, limits: KeyLimitsLike | None) -> tuple[int, KeyLimitsLike] | None:
    """The key and limits a request's admission checks too, or None if only the user's."""
    if key_id is None or limits is None or not _has_limits(limits):
        return None
    return key_id, limits


def _has_limits(limits: KeyLimitsLike) -> bool:
    return (
        limits.spend_limit is not None
        or limits.daily_spend_limit is not None
        or limits.requests_per_minute is not None
    )


def _admit_user(
    user_id: int, trace: dict[str, Any] | None, bound: int, held: int = 0
) -> tuple[Admission, bool]:
    """Take one in-flight slot for the user if they have credit and a free slot.

    One conditional ``UPDATE``: row locking makes it exact across processes
    and hosts. A slot is given back when the request's usage is settled. If a
    worker dies holding slots, they are reclaimed once the user has started no
    request for ``BILLING_IN_FLIGHT_LEASE`` seconds.

    This runs on every proxied request, so it is one plain statement rather
    than an ORM query (which costs ten times as much Python here). On
    PostgreSQL the request's write-ahead ``trace`` rides in the same statement
    (inserted only if the slot was taken); the answer says whether it did.
    """
    statement = user_admission(user_id, trace, bound, connection.vendor == "postgresql", held=held)
    with hot_cursor() as cursor:
        cursor.execute(statement.sql, statement.params)
        if cursor.rowcount:
            return Admission.ADMITTED, statement.traced
        cursor.execute(statement.balance_sql, [user_id])
        return statement.refusal(cursor.fetchone()), False


def admit_users_together(
    admissions: Sequence[tuple[int, dict[str, Any] | None, int, int]],
) -> list[Admission]:
    """PostgreSQL: several requests' admissions without key limits, in one transaction.

    Each of ``admissions`` is (user id, trace, bound, held), as
    :func:`_admit_user` takes them. Their statements (each the one an
    admission alone runs, trace and all) go pipelined, in the order of the
    users' rows, as every other writer of several accounts locks them; each
    sees the slots the ones before it took. The balances that tell why a
    refused one was refused are read in the same transaction, so an error
    leaves nothing of it written.
    """
    statements = [
        user_admission(user_id, trace, bound, with_trace=True, held=held)
        for user_id, trace, bound, held in admissions
    ]
    order = sorted(range(len(statements)), key=lambda index: statements[index].user_id)
    sql = statements[0].sql + " RETURNING 1"
    assert all(statement.sql == statements[0].sql for statement in statements)
    answers: list[Admission] = [Admission.ADMITTED] * len(statements)
    with transaction.atomic(), hot_cursor() as cursor:
        rows = _execute_many_returning(cursor, sql, [statements[i].params for i in order])
        for index, row in zip(order, rows, strict=True):
            if row is None:
                statement = statements[index]
                cursor.execute(statement.balance_sql, [statement.user_id])
                answers[index] = statement.refusal(cursor.fetchone())
    return answers


@dataclass(frozen=True, slots=True)
class UserAdmission:
    """The statement of :func:`_admit_user`, for whichever connection runs it."""

    user_id: int
    sql: str
    params: list[Any]
    #: Whether the statement also writes the request's trace.
    traced: bool
    #: After a refusal: the user's balance, to tell why.
    balance_sql: str
    #: Of the balance, what ended requests will be charged (pico-dollars).
    held: int = 0

    def refusal(self, balance_row: Any) -> Admission:
        if balance_row is None or balance_row[0] <= self.held:
            return Admission.NO_CREDIT
        return Admission.TOO_MANY_IN_FLIGHT


def user_admission(
    user_id: int,
    trace: dict[str, Any] | None,
    bound: int,
    with_trace: bool,
    on: BaseDatabaseWrapper | None = None,
    held: int = 0,
) -> UserAdmission:
    """The one statement admitting a request of a user (and writing its trace if asked).

    ``on`` is the database wrapper whose vendor and value adapters build it
    (``django.db.connection`` by default); the balance must stay above
    ``held`` (pico-dollars, see :class:`Held`).
    """
    on = on or connection
    now = timezone.now()
    ops = on.ops
    now_value = ops.adapt_datetimefield_value(now)
    lease_end = ops.adapt_datetimefield_value(
        now + timedelta(seconds=billing_settings.IN_FLIGHT_LEASE)
    )
    params = [now_value, lease_end, user_id, held, bound, now_value]
    trace_fields = None
    if trace is not None and with_trace:
        trace_fields = tuple(trace)
        params += _prepared(OpenRequest, trace, on)[1]
    take_slot, balance_sql = _admission_sql(on.vendor, trace_fields)
    return UserAdmission(user_id, take_slot, params, trace_fields is not None, balance_sql, held)


@functools.cache
def _admission_sql(vendor: str, trace_fields: tuple[str, ...] | None) -> tuple[str, str]:
    """The text of :func:`user_admission`'s statements: the same on every request."""
    table, column = _sql_names(CreditAccount)
    in_flight, expires = column("in_flight"), column("in_flight_expires_at")
    take_slot = (
        f"UPDATE {table} SET {in_flight} = CASE WHEN {expires} < %s THEN 1 "  # noqa: S608
        f"ELSE {in_flight} + 1 END, {expires} = %s "
        f"WHERE {column('user')} = %s AND {column('balance')} > %s "
        f"AND ({in_flight} < %s OR {expires} < %s)"
    )
    if trace_fields is not None:
        trace_table, trace_column = _sql_names(OpenRequest)
        take_slot = (
            f"WITH slot AS ({take_slot} RETURNING 1) "  # noqa: S608 (names from models)
            f"INSERT INTO {trace_table} ({', '.join(map(trace_column, trace_fields))}) "
            f"SELECT {', '.join(['%s'] * len(trace_fields))} FROM slot"
        )
    balance_sql = f"SELECT {column('balance')} FROM {table} WHERE {column('user')} = %s"  # noqa: S608
    return take_slot, balance_sql


def _admit_key(
    user_id: int, key_id: int, limits: KeyLimitsLike, bound: int, held: Held = Held()
) -> AdmissionResult:
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
        if _try_admit_key(user_id, key_id, limits, bound, held):
            return AdmissionResult(Admission.ADMITTED)
        refusal = _key_refusal(user_id, key_id, limits, bound, held)
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


def _key_sql(
    key_id: int, limits: KeyLimitsLike, prefix: str, today: Any, held: int = 0
) -> tuple[str, list[Any]]:
    """The key's conditions on its meter row (columns prefixed by ``prefix``).

    ``held`` (pico-dollars) of the key's spend is not in its meter yet.
    """
    _, column = _sql_names(KeyMeter)

    def col(name: str) -> str:
        return f"{prefix}{column(name)}"

    parts = [f"{col('api_key_id')} = %s"]
    params: list[Any] = [key_id]
    if limits.spend_limit is not None:
        parts.append(f"{col('spent')} < %s")
        params.append(to_units(limits.spend_limit) - held)
    if limits.daily_spend_limit is not None:
        day = col("spent_day")
        parts.append(f"({day} IS NULL OR {day} <> %s OR {col('spent_today')} < %s)")
        params += [today, to_units(limits.daily_spend_limit) - held]
    if limits.requests_per_minute is not None:
        times, oldest = col("rate_times"), col("rate_next")
        parts.append(
            f"CASE WHEN length({times}) = %s THEN "
            f"CAST(substr({times}, {oldest} * {STAMP} + 1, {STAMP}) AS BIGINT) "
            f"< {_now_ms_sql()} - %s ELSE 1 = 0 END"
        )
        params += [limits.requests_per_minute * STAMP, billing_settings.RATE_WINDOW_SECONDS * 1000]
    return " AND ".join(parts), params


def _try_admit_key(
    user_id: int, key_id: int, limits: KeyLimitsLike, bound: int, held: Held
) -> bool:
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
    precheck, precheck_params = _key_sql(key_id, limits, "k.", today, held.key)
    take_slot = (
        f"UPDATE {account_table} SET {in_flight} = CASE WHEN {expires} < %s THEN 1 "  # noqa: S608
        f"ELSE {in_flight} + 1 END, {expires} = %s "
        f"WHERE {account('user')} = %s AND {account('balance')} > %s "
        f"AND ({in_flight} < %s OR {expires} < %s) "
        f"AND EXISTS (SELECT 1 FROM {meter_table} k WHERE {precheck})"
    )
    take_slot_params = [
        now_value,
        lease_end,
        user_id,
        held.balance,
        bound,
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
    condition, condition_params = _key_sql(key_id, limits, "", today, held.key)
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
            with hot_cursor() as cursor:
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


def _key_refusal(
    user_id: int, key_id: int, limits: KeyLimitsLike, bound: int, held: Held
) -> AdmissionResult | None:
    """Why a key's request was refused, or ``None`` to try again."""
    now = timezone.now()
    account = (
        CreditAccount.objects.filter(user_id=user_id)
        .values_list("balance", "in_flight", "in_flight_expires_at")
        .first()
    )
    if account is None or account[0] <= from_units(held.balance):
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
    key_held = from_units(held.key)
    if limits.spend_limit is not None and spent + key_held >= limits.spend_limit:
        return AdmissionResult(Admission.KEY_SPEND_LIMIT)
    today = _utc_day(now)
    if (
        limits.daily_spend_limit is not None
        and spent_day == today
        and spent_today + key_held >= limits.daily_spend_limit
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
    if in_flight >= bound and (expires is None or expires >= now):
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


def release_request(user_id: int) -> None:
    """Give back a slot taken by :func:`admit_request` when nothing is recorded."""
    CreditAccount.objects.filter(user_id=user_id).update(in_flight=_one_slot_less())


def _one_slot_less() -> Greatest:
    return Greatest(F("in_flight") - 1, Value(0), output_field=IntegerField())
