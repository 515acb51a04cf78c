"""Charges that survive the death of the worker relaying them.

A worker that is killed (``kill -9``, the out-of-memory killer, a deploy that
does not wait) takes the state of its requests with it: the generations it
was relaying happened, and the provider bills the operator for them, but the
worker will never write their usage records. So every admitted request leaves
a write-ahead trace, an :class:`~billing.models.OpenRequest` row, as soon as it
is admitted (beside the upstream call, not in its way); the row learns the
generation id when the upstream answers and is deleted once the usage record
is written. Every serving worker keeps a :class:`~billing.models.WorkerHeartbeat`
fresh.

:func:`recover_lost_requests` (run by every live worker from time to time and
by ``manage.py reconcile_usage``) finds the traces whose worker has stopped
beating and writes their records as the dead worker would have: pending when
a generation id is known, so the generation stats settle it and its slot
comes back; unpriced and visible when the upstream had not answered yet. A
trace whose record exists already (the worker died between the two writes)
is simply dropped. Everything is idempotent and safe on several hosts at once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import DatabaseError, IntegrityError, connection, transaction
from django.utils import timezone

from billing.conf import billing_settings
from billing.models import OpenRequest, Outcome, Settlement, UsageRecord, WorkerHeartbeat
from billing.services import Recorded, record_usage
from billing.services._sql import _prepared, _sql_names, hot_cursor
from openrouter_proxy.metering import (
    AnswerNote,
    MeteredRequest,
    PendingGeneration,
    ReportedUsage,
    UsageDraft,
)

logger = logging.getLogger(__name__)

_worker: tuple[int, uuid.UUID] | None = None
_worker_lock = threading.Lock()


def worker_id() -> uuid.UUID:
    """This process's identity in the heartbeat table (new in every process, forked ones too).

    The first calls come from several database threads at once: under the lock
    exactly one of them mints the identity, so the heartbeat, the traces and the
    retire all name the same worker.
    """
    global _worker
    pid = os.getpid()
    known = _worker
    if known is not None and known[0] == pid:
        return known[1]
    with _worker_lock:
        if _worker is None or _worker[0] != pid:
            _worker = (pid, uuid.uuid4())
        return _worker[1]


def trace_values(request: MeteredRequest) -> dict[str, Any]:
    """The fields of an admitted request's trace (``OpenRequest``)."""
    return {
        "request_id": request.request_id,
        "user": request.user_id,
        "api_key_id": request.api_key_id,
        "api_key_label": request.api_key_label[:40],
        "endpoint": request.endpoint,
        "requested_model": request.requested_model[:200],
        "streamed": request.streamed,
        "generation_id": "",
        "worker": worker_id(),
        "created_at": timezone.now(),
    }


def mark_answered(request_id: uuid.UUID, generation_id: str) -> None:
    """The upstream answered: from now on the generation stats can price the request.

    Once per streamed request, so a plain statement rather than an ORM update.
    """
    with hot_cursor() as cursor:
        cursor.execute(
            _answered_sql(connection.vendor),
            _answered_params(request_id, generation_id, timezone.now()),
        )


def _answered_params(request_id: uuid.UUID, generation_id: str, answered_at: datetime) -> list[Any]:
    """The values of :func:`_answered_sql`'s statement, adapted for the database."""
    values = {
        "generation_id": generation_id[:120],
        "answered_at": answered_at,
        "request_id": request_id,
    }
    return _prepared(OpenRequest, values)[1]


def mark_answered_many(notes: Sequence[AnswerNote]) -> None:
    """:func:`mark_answered` for several requests at once, each with its own time.

    One statement on PostgreSQL, whatever the number of notes (their values
    travel as three arrays); elsewhere one transaction of a statement each.
    """
    if connection.vendor == "postgresql":
        with hot_cursor() as cursor:
            cursor.execute(
                _answered_many_sql(),
                [
                    [note.request_id for note in notes],
                    [note.generation_id[:120] for note in notes],
                    [note.answered_at for note in notes],
                ],
            )
        return
    rows = [
        _answered_params(note.request_id, note.generation_id, note.answered_at) for note in notes
    ]
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.executemany(_answered_sql(connection.vendor), rows)


@functools.cache
def _answered_many_sql() -> str:
    table, column = _sql_names(OpenRequest)
    request_id, generation_id = column("request_id"), column("generation_id")
    answered_at = column("answered_at")
    pk = column("id")
    # The rows are locked in the order of their request ids, as a batch of
    # records locks the traces it deletes (billing.services.recording): the two
    # never wait on each other in a circle.
    return (
        f"UPDATE {table} SET {generation_id} = v.generation_id, "  # noqa: S608 (names from models)
        f"{answered_at} = v.answered_at "
        f"FROM (SELECT t.{pk}, u.generation_id, u.answered_at FROM {table} AS t "
        "JOIN unnest(%s::uuid[], %s::text[], %s::timestamptz[]) "
        f"AS u(request_id, generation_id, answered_at) ON t.{request_id} = u.request_id "
        f"ORDER BY t.{request_id} FOR UPDATE OF t) AS v "
        f"WHERE {table}.{pk} = v.{pk}"
    )


@functools.cache
def _answered_sql(vendor: str) -> str:
    table, column = _sql_names(OpenRequest)
    return (
        f"UPDATE {table} SET {column('generation_id')} = %s, "  # noqa: S608 (names from models)
        f"{column('answered_at')} = %s WHERE {column('request_id')} = %s"
    )


def close_request(request_id: uuid.UUID) -> None:
    """The request's usage record is written: its trace is no longer needed."""
    OpenRequest.objects.filter(request_id=request_id).delete()


#: (pid, monotonic time) since which every beat of this process has reached the database.
_beating_since: tuple[int, float] | None = None


def beat() -> None:
    """Say this worker is alive (creating its heartbeat on the first call)."""
    global _beating_since
    now = timezone.now()
    me = worker_id()
    try:
        updated = WorkerHeartbeat.objects.filter(worker=me).update(seen_at=now)
        if not updated:
            # Two plain statements, no read-then-write transaction: SQLite refuses to
            # upgrade those under concurrent writers instead of waiting its turn.
            with contextlib.suppress(IntegrityError):
                WorkerHeartbeat.objects.create(
                    worker=me, host=socket.gethostname()[:255], pid=os.getpid(), seen_at=now
                )
    except DatabaseError:
        _beating_since = None
        raise
    pid = os.getpid()
    if _beating_since is None or _beating_since[0] != pid:
        _beating_since = (pid, time.monotonic())


def judges_liveness() -> bool:
    """Whether another worker's stale heartbeat means, to this worker, that it died.

    Only once every beat of this one has reached the database for
    ``WORKER_STALE_AFTER`` seconds. After an outage longer than that, every
    heartbeat is stale, the live workers' too: their requests are still
    streaming, and recovered now, the ones whose generation the trace had not
    learnt would be recorded unpriced, their real record (spooled, exact)
    refused as already written. Given a staleness delay of database time,
    a live worker has beaten again, and only the dead are recovered.
    """
    since = _beating_since
    if since is None or since[0] != os.getpid():
        return False
    return time.monotonic() - since[1] >= billing_settings.WORKER_STALE_AFTER


def retire() -> None:
    """A worker stopping cleanly forgets its heartbeat; traces left behind become recoverable."""
    WorkerHeartbeat.objects.filter(worker=worker_id()).delete()


@dataclass(frozen=True, slots=True)
class Recovered:
    request_id: uuid.UUID
    generation_id: str
    recorded: Recorded | None
    created_at: datetime


def lost_requests(limit: int = 500) -> list[OpenRequest]:
    """Traces whose worker is no longer alive: its heartbeat is stale or gone.

    A trace younger than the staleness delay is left alone too: its worker may
    not have written its first heartbeat yet. This process's own traces are
    never taken: it is alive, whatever its heartbeat says.
    """
    stale_before = timezone.now() - timedelta(seconds=billing_settings.WORKER_STALE_AFTER)
    alive = WorkerHeartbeat.objects.filter(seen_at__gte=stale_before).values("worker")
    return list(
        OpenRequest.objects.exclude(worker__in=alive)
        .exclude(worker=worker_id())
        .filter(created_at__lt=stale_before)
        .order_by("created_at")[:limit]
    )


def recover_lost_requests(limit: int = 500) -> list[Recovered]:
    """Write the usage records that dead workers never wrote; returns what was recovered."""
    recovered = []
    for trace in lost_requests(limit):
        with transaction.atomic():
            locked = (
                OpenRequest.objects.select_for_update(skip_locked=True).filter(pk=trace.pk).first()
            )
            if locked is None:
                continue  # another host is recovering it
            if UsageRecord.objects.filter(request_id=locked.request_id).exists():
                locked.delete()
                continue
            recorded = record_usage(_draft(locked))
            locked.delete()
        recovered.append(
            Recovered(locked.request_id, locked.generation_id, recorded, locked.created_at)
        )
        logger.warning(
            "request %s of a dead worker recovered as %s",
            locked.request_id,
            recorded.settlement if recorded else "duplicate",
        )
    return recovered


def _draft(trace: OpenRequest) -> UsageDraft:
    answered = bool(trace.generation_id)
    return UsageDraft(
        request_id=trace.request_id,
        user_id=trace.user_id,
        endpoint=trace.endpoint,
        streamed=trace.streamed,
        outcome=Outcome.WORKER_LOST,
        usage=ReportedUsage(generation_id=trace.generation_id or None),
        api_key_id=trace.api_key_id,
        api_key_label=trace.api_key_label,
        requested_model=trace.requested_model,
        created_at=trace.created_at,
        error_message=(
            "the worker relaying it died; priced from generation stats"
            if answered
            else "the worker died before the upstream answered; nothing known to bill"
        ),
        # The upstream may have started generating: never assume it was free.
        cost_unknown=True,
    )


def pending_after_recovery(recovered: list[Recovered]) -> list[PendingGeneration]:
    """Recovered requests waiting for their cost."""
    return [
        PendingGeneration(item.request_id, item.generation_id, item.created_at)
        for item in recovered
        if item.generation_id
        and item.recorded is not None
        and item.recorded.settlement == Settlement.PENDING
    ]
