"""Billing as the proxy's meter: the one module where the two apps meet.

A host names it in its settings::

    OPENROUTER_PROXY_METER = "billing.meter.BillingMeter"

Each method maps one step of the proxy's meter interface
(``openrouter_proxy.metering.Meter``) onto billing's services: admission is
the credit gate and the key's limits plus the request's write-ahead trace (one
database call), recording is the durable usage record (spooled when the
database is down) and the end of the trace, settling prices a pending record
from generation stats.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from contextlib import suppress
from datetime import datetime
from typing import Any

from django.db import DatabaseError, connection

from billing import recovery
from billing.conf import billing_settings
from billing.models import CostSource, Settlement, UsageRecord
from billing.money import to_units
from billing.services import (
    Recorded,
    RecordResult,
    admission_async,
    admit_request,
    bill,
    generation_belongs_to,
    give_up_pending,
    recording_async,
    release_request,
    settle_pending,
)
from billing.services.admission import admit_users_together, in_flight_bound, key_gate
from billing.spool import record_usage_durably, record_usage_durably_many, replay_spool
from openrouter_proxy.db import run_db
from openrouter_proxy.metering import (
    AdmissionResult,
    AnswerNote,
    GenerationCost,
    MeteredRequest,
    PendingGeneration,
    Receipt,
    Recovery,
    UsageDraft,
)

logger = logging.getLogger(__name__)


def _user_admission(request: MeteredRequest) -> tuple[int, dict[str, Any], int, int]:
    """What the admission of a request without key limits takes: user, trace, bound, held."""
    return (
        request.user_id,
        recovery.trace_values(request),
        in_flight_bound(request.ending),
        to_units(bill(request.ending_cost)),
    )


class BillingMeter:
    """Credits, per-key limits and exact charges for the proxy's metered requests."""

    @property
    def heartbeat_interval(self) -> float | None:
        return billing_settings.WORKER_HEARTBEAT

    def admit(self, request: MeteredRequest) -> AdmissionResult:
        # The trace is written before the request goes upstream, so no generation
        # can start that a crash of this worker would leave unbilled.
        return admit_request(
            request.user_id,
            request.api_key_id,
            request.limits,
            detailed=True,
            trace=recovery.trace_values(request),
            ending=request.ending,
            unrecorded=bill(request.ending_cost),
            key_unrecorded=bill(request.ending_key_cost),
        )

    def admit_many(self, requests: Sequence[MeteredRequest]) -> list[AdmissionResult | Exception]:
        """:meth:`admit` for several requests: those without key limits in one transaction.

        That is on PostgreSQL, outside a caller's transaction; a request with
        key limits, or any request elsewhere, is admitted alone after them,
        its error (if any) in its place. Raises only when the transaction
        fails, before anything else is done: then nothing of it was written.
        """
        together = [
            index
            for index, request in enumerate(requests)
            if key_gate(request.api_key_id, request.limits) is None
        ]
        outcomes: dict[int, AdmissionResult | Exception] = {}
        if (
            len(together) > 1
            and connection.vendor == "postgresql"
            and not connection.in_atomic_block
        ):
            answers = admit_users_together([_user_admission(requests[i]) for i in together])
            for index, answer in zip(together, answers, strict=True):
                outcomes[index] = AdmissionResult(answer)
        for index, request in enumerate(requests):
            if index not in outcomes:
                try:
                    outcomes[index] = self.admit(request)
                except Exception as error:
                    outcomes[index] = error
        return [outcomes[index] for index in range(len(requests))]

    async def admit_async(self, request: MeteredRequest) -> AdmissionResult:
        """:meth:`admit` on the event loop: PostgreSQL, and a key without limits."""
        gate = key_gate(request.api_key_id, request.limits)
        if not admission_async.available() or gate is not None:
            return await run_db(self.admit, request)
        admission, _ = await admission_async.admit_user(*_user_admission(request))
        return AdmissionResult(admission)

    async def aclose(self) -> None:
        await admission_async.close()

    def release(self, request: MeteredRequest) -> None:
        release_request(request.user_id)
        recovery.close_request(request.request_id)

    def answered(self, request_id: uuid.UUID, generation_id: str) -> None:
        recovery.mark_answered(request_id, generation_id)

    def answered_many(self, notes: Sequence[AnswerNote]) -> None:
        recovery.mark_answered_many(notes)

    def record(self, draft: UsageDraft) -> Receipt:
        return self._receipt(draft, record_usage_durably(draft))

    async def record_async(self, draft: UsageDraft) -> Receipt:
        """:meth:`record` on the event loop (PostgreSQL); in a thread when it cannot be."""
        if admission_async.available():
            recorded = await recording_async.record_usage(draft)
            if recorded is not None:
                return self._receipt(draft, recorded)
        return await run_db(self.record, draft)

    def record_many(self, drafts: Sequence[UsageDraft]) -> list[Receipt]:
        """:meth:`record` for several drafts, in one transaction where the database allows."""
        return [
            self._receipt(draft, recorded)
            for draft, recorded in zip(drafts, record_usage_durably_many(drafts), strict=True)
        ]

    @staticmethod
    def _receipt(draft: UsageDraft, recorded: Recorded | None) -> Receipt:
        if recorded is None:
            # Spooled: the trace stays until the spool is replayed.
            return Receipt("spooled")
        if recorded.result is not RecordResult.RECORDED:
            # Found recorded: the trace has done its job (a new record ends it itself).
            with suppress(DatabaseError):
                recovery.close_request(draft.request_id)
            return Receipt(recorded.result.value)
        settlement = str(recorded.settlement)
        cost = draft.usage.provider_cost
        charged = bill(cost) if cost is not None and settlement == Settlement.SETTLED else None
        return Receipt(settlement, awaits_cost=recorded.awaits_cost, charged=charged)

    def _pending_record(self, request_id: uuid.UUID) -> int | None:
        return (
            UsageRecord.objects.pending()
            .filter(request_id=request_id)
            .values_list("pk", flat=True)
            .first()
        )

    def settle(self, request_id: uuid.UUID, cost: GenerationCost) -> bool:
        record_id = self._pending_record(request_id)
        if record_id is None:
            return False
        return settle_pending(
            record_id,
            cost.cost,
            CostSource.GENERATION,
            prompt_tokens=cost.prompt_tokens,
            completion_tokens=cost.completion_tokens,
            reasoning_tokens=cost.reasoning_tokens,
            cached_tokens=cost.cached_tokens,
        )

    def give_up(self, request_id: uuid.UUID, reason: str) -> bool:
        record_id = self._pending_record(request_id)
        return record_id is not None and give_up_pending(record_id, reason)

    def owns_generation(self, user_id: int, generation_id: str) -> bool:
        return generation_belongs_to(user_id, generation_id)

    def pending(self, older_than: datetime, limit: int) -> list[PendingGeneration]:
        rows = (
            UsageRecord.objects.pending()
            .filter(created_at__lte=older_than)
            .order_by("created_at")
            .values_list("request_id", "generation_id", "created_at")[:limit]
        )
        return [
            PendingGeneration(request_id, generation_id or None, created_at)
            for request_id, generation_id, created_at in rows
        ]

    def pending_count(self) -> int:
        return UsageRecord.objects.pending().count()

    def beat(self) -> list[PendingGeneration]:
        recovery.beat()
        if not recovery.judges_liveness():
            return []
        return recovery.pending_after_recovery(recovery.recover_lost_requests())

    def retire(self) -> None:
        recovery.retire()

    def recover(self, limit: int) -> Recovery:
        replayed = replay_spool()
        # Requests of workers that died: recorded now, pending when the upstream
        # had answered, so they settle like any other pending record.
        recovered = len(recovery.recover_lost_requests(limit=limit))
        return Recovery(replayed=replayed, recovered=recovered)
