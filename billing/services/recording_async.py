"""A usage record on the proxy's event loop, on PostgreSQL, for a worker that is not busy.

A record in a database thread costs the worker more than its statement: the
thread and the event loop hand the interpreter's lock to each other around
every socket call the thread makes (some forty lock calls a request, measured
at one connection), while the loop serves the next request. A worker that is
not busy (the proxy decides, see ``openrouter_proxy.exchange``) therefore
sends a lone record's one statement (:func:`billing.services.recording.record_usage`'s,
the same text and parameters) over the loop's own connections, the
admission's (``billing.services.admission_async``).

Only the plain case goes this way: a record whose charge needs no price-table
look-up, written by a statement that succeeds. Anything else (an estimate
from the price table, any database error, a draft already recorded, a
generation reported twice) answers ``None``, and the caller records the draft
in a thread as before, with its retries, its spool and its answers for those
cases; a statement that failed wrote nothing, being one statement in
autocommit. The signals a charge may send (``credits_low``,
``key_limit_reached``) and a replay of spooled drafts run in a database thread
after it, where their receivers may use the ORM.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.db import DatabaseError

from billing.conf import billing_settings
from billing.services.admission_async import _connections, _offline
from billing.services.recording import (
    Recorded,
    RecordResult,
    _notify_after_charge,
    _Plan,
    _plan,
    _record_and_charge_statement,
    _signals_due,
)
from billing.spool import _replay_after_recording, spooled_paths
from openrouter_proxy.db import run_db
from openrouter_proxy.metering import ReportedUsage, UsageDraft


class _NeedsThePriceTable(Exception):
    """The charge is an estimate from the price table: an ORM query, for a thread."""


def _no_price_table(usage: ReportedUsage, model: str) -> Decimal | None:
    raise _NeedsThePriceTable


async def record_usage(draft: UsageDraft) -> Recorded | None:
    """The draft's record and charge in one statement on the loop; None: record it in a thread."""
    try:
        plan = _plan(draft, _no_price_table)
    except _NeedsThePriceTable:
        return None
    sql, params = _record_and_charge_statement(plan, on=_offline())
    try:
        async with _connections().connection() as kept:
            cursor = kept.cursor()
            await cursor.execute(sql, params, prepare=billing_settings.PREPARED_STATEMENTS)
            row = await cursor.fetchone()
    except DatabaseError:
        return None
    if _signals_due(plan, row) or spooled_paths():
        await run_db(_after_the_record, plan, row)
    return Recorded(RecordResult.RECORDED, plan.charge.settlement)


def _after_the_record(plan: _Plan, row: Any) -> None:
    """In a database thread: the charge's signals (its statement has committed), then the spool."""
    _notify_after_charge(plan, row)
    _replay_after_recording()
