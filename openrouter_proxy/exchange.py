"""One metered request, from its admission to the meter's record of its end.

The proxy asks the meter (``metering.py``) to admit the request before it goes
upstream, tells it the generation id when the upstream answers (beside the
relay, never in its way), and hands it the request's draft exactly once when
the request ends, however it ends. A record that waits for its cost is settled
later from generation stats (``settlement.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime

from django.db import DatabaseError
from django.utils import timezone

from openrouter_proxy import observability
from openrouter_proxy.callers import Caller
from openrouter_proxy.capture import CaptureResult
from openrouter_proxy.db import run_db
from openrouter_proxy.metering import (
    AdmissionResult,
    Meter,
    MeteredRequest,
    ReportedUsage,
    UsageDraft,
)
from openrouter_proxy.settlement import run_in_background, settle_from_generation

logger = logging.getLogger("openrouter_proxy.requests")


@dataclass(slots=True)
class Exchange:
    """The state of one metered request, from admission to its record."""

    meter: Meter
    caller: Caller
    endpoint: str
    requested_model: str
    streamed: bool
    request_id: uuid.UUID = field(default_factory=uuid.uuid4)
    created_at: datetime = field(default_factory=timezone.now)
    started: float = field(default_factory=time.monotonic)
    first_byte: float | None = None
    status: int | None = None
    header_generation_id: str | None = None
    #: Tells the meter the generation id beside the upstream call.
    _answering: asyncio.Task[None] | None = None
    #: Resolved with the generation id when the upstream answers (None: it did not).
    _answered: asyncio.Future[str | None] | None = None

    def metered_request(self) -> MeteredRequest:
        return MeteredRequest(
            request_id=self.request_id,
            user_id=self.caller.user_id,
            endpoint=self.endpoint,
            streamed=self.streamed,
            requested_model=self.requested_model,
            api_key_id=self.caller.key_id,
            api_key_label=self.caller.key_label,
            limits=self.caller.limits,
        )

    async def admit(self) -> AdmissionResult:
        """Ask the meter to admit the request; a caller leaving meanwhile gives it back."""
        request = self.metered_request()
        admitting = asyncio.ensure_future(run_db(self.meter.admit, request))
        try:
            result = await asyncio.shield(admitting)
        except asyncio.CancelledError:
            run_in_background(self._release_if_admitted(admitting, request))
            raise
        if result.admitted:
            loop = asyncio.get_running_loop()
            self._answered = loop.create_future()
            self._answering = run_in_background(self._tell_answered(self._answered))
            observability.billed_request_started()
        return result

    async def _release_if_admitted(
        self, admitting: asyncio.Future[AdmissionResult], request: MeteredRequest
    ) -> None:
        if (await admitting).admitted:
            await run_db(self.meter.release, request)

    async def _tell_answered(self, answered: asyncio.Future[str | None]) -> None:
        generation_id = await answered
        if not generation_id:
            return
        try:
            await run_db(self.meter.answered, self.request_id, generation_id)
        except DatabaseError:
            # The final record does not need it; only a crash from here on would.
            logger.warning("could not tell the meter the generation of %s", self.request_id)

    def upstream_answered(self, status: int, generation_id: str | None) -> None:
        self.status = status
        self.header_generation_id = generation_id
        if self._answered is not None and not self._answered.done():
            self._answered.set_result(generation_id)

    def draft(
        self,
        outcome: str,
        capture: CaptureResult | None,
        error: str = "",
        *,
        cost_unknown: bool = False,
    ) -> UsageDraft:
        usage = capture.usage if capture is not None else ReportedUsage()
        if usage.generation_id is None and self.header_generation_id:
            usage = replace(usage, generation_id=self.header_generation_id)
        now = time.monotonic()
        return UsageDraft(
            request_id=self.request_id,
            user_id=self.caller.user_id,
            api_key_id=self.caller.key_id,
            api_key_label=self.caller.key_label,
            endpoint=self.endpoint,
            streamed=self.streamed,
            outcome=outcome,
            usage=usage,
            requested_model=self.requested_model,
            http_status=self.status,
            created_at=self.created_at,
            upstream_latency_ms=int((now - self.started) * 1000),
            ttfb_ms=(
                int((self.first_byte - self.started) * 1000)
                if self.first_byte is not None
                else None
            ),
            error_message=error,
            cost_unknown=cost_unknown,
        )

    async def finish(
        self,
        outcome: str,
        capture: CaptureResult | None = None,
        error: str = "",
        *,
        cost_unknown: bool = False,
    ) -> None:
        """Record the request's end; the caller's cancellation cannot cut it short."""
        draft = self.draft(outcome, capture, error, cost_unknown=cost_unknown)
        task = run_in_background(self._record(draft))
        await asyncio.shield(task)

    async def _record(self, draft: UsageDraft) -> None:
        # The record carries the generation id itself: a note of it still queued
        # for a database thread is dropped, and one already running lands on the
        # request's trace or, once the record has ended the trace, on nothing.
        # Either way the request never waits for it.
        if self._answering is not None and not self._answering.done():
            self._answering.cancel()
        receipt = await run_db(self.meter.record, draft)
        observability.billed_request_finished(draft, receipt)
        if receipt.awaits_cost and draft.usage.generation_id:
            run_in_background(
                settle_from_generation(self.meter, draft.request_id, draft.usage.generation_id)
            )
