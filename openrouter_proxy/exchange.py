"""One metered request, from its admission to the meter's record of its end.

The proxy asks the meter (``metering.py``) to admit the request before it goes
upstream, tells it the generation id when the upstream answers (beside the
relay, never in its way), and hands it the request's draft exactly once when
the request ends, however it ends. A record that waits for its cost is settled
later from generation stats (``settlement.py``).

The record is written after the response has ended, not before its last byte:
the client does not wait for it. Until it is written the request's admission
trace stands for it (a worker that dies meanwhile leaves the trace to
recovery, see ``metering.Meter.recover``), and a stopping worker waits for it
like any background task. The caller's next admission on this worker is told
how many of its requests are ended but not yet recorded, so their slots do not
count against its bound on requests in flight. A busy worker records its ended
requests in batches: the drafts that end while one call is on its way go
together in the next (``record_many``, where the meter has it). One that is
not busy awaits a lone draft's record on the loop (``record_async``, where the
meter has it), as it does its admissions.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from contextlib import suppress
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

from django.db import DatabaseError
from django.utils import timezone

from openrouter_proxy import observability
from openrouter_proxy.callers import Caller
from openrouter_proxy.capture import CaptureResult
from openrouter_proxy.db import run_db, submit_db
from openrouter_proxy.loops import PerLoop
from openrouter_proxy.metering import (
    AdmissionResult,
    AnswerNote,
    Meter,
    MeteredRequest,
    Receipt,
    ReportedUsage,
    UsageDraft,
)
from openrouter_proxy.settlement import run_in_background, settle_from_generation

logger = logging.getLogger("openrouter_proxy.requests")

E = TypeVar("E")

#: Records this worker is still writing, by caller, each with its key and its
#: reported cost (None: not reported) (see ``MeteredRequest.ending``).
_recording: dict[int, dict[asyncio.Future[Receipt], tuple[int | None, Decimal | None]]] = {}
_serving_loop: ContextVar[bool] = ContextVar("serving_loop", default=False)


def on_serving_loop() -> None:
    """Mark the current task as running on a loop that outlives its responses.

    The fast path (``asgi.py``) calls this. There a response ends before its
    record is written (the record is written beside the next requests), and
    the meter's coroutines (``admit_async``) are awaited on the loop itself.
    Elsewhere (Django's own handler, the test client, WSGI, whose loop may end
    with the response) a response ends after its record, and the meter runs in
    the proxy's database threads only.
    """
    _serving_loop.set(True)


def is_serving_loop() -> bool:
    """Whether the current task runs on a loop that outlives its responses."""
    return _serving_loop.get()


#: Metered requests this process is serving, from admission to their end.
_running = 0
#: Up to this many, a meter's ``admit_async`` is awaited on the loop: the
#: request is spared two thread hops (about 0.7 ms here). Past it the worker is
#: busy and the database threads cost it less CPU per admission (their driver
#: waits in C without the loop), so the threads take over.
LOOP_ADMISSION_BELOW = 8


def _on_the_loop() -> bool:
    """Whether this serving loop's worker is not busy: its database work is awaited on the loop.

    That is a meter's ``admit_async`` and, for a lone draft, its ``record_async``.
    """
    return _serving_loop.get() and _running < LOOP_ADMISSION_BELOW


def records_in_progress() -> int:
    """How many ended requests this process has yet to record (every loop)."""
    return sum(len(receipts) for receipts in list(_recording.values()))


def _start_record(meter: Meter, draft: UsageDraft) -> asyncio.Future[Receipt]:
    """Hand the draft to this loop's records; the rest is done when its receipt comes.

    No task of its own: the receipt's future carries the request to its end
    (counted among the caller's ending requests until then, see
    :func:`_ending`), and a stopping worker waits for the records' writer.
    """
    # The record carries the generation id itself: a note of it still waiting
    # is dropped, and one already on its way lands on the request's trace
    # or, once the record has ended the trace, on nothing. Either way the
    # request never waits for it.
    _answer_notes().drop(draft.request_id)
    receipt = _records().add(meter, draft)
    user_id = draft.user_id
    pending = _recording.setdefault(user_id, {})
    pending[receipt] = (draft.api_key_id, draft.usage.provider_cost)

    def written(done: asyncio.Future[Receipt]) -> None:
        pending.pop(done, None)
        if not pending and _recording.get(user_id) is pending:
            del _recording[user_id]
        _recorded(meter, draft, done)

    receipt.add_done_callback(written)
    return receipt


def _recorded(meter: Meter, draft: UsageDraft, receipt: asyncio.Future[Receipt]) -> None:
    """What follows a request's record: its metrics and log line, its settlement if it waits."""
    if receipt.cancelled():
        return  # a stop that would not wait longer: the trace is left to recovery
    error = receipt.exception()
    if error is not None:
        # The response has ended; the request's trace is left to recovery.
        logger.error("could not record request %s", draft.request_id, exc_info=error)
        return
    recorded = receipt.result()
    observability.billed_request_finished(draft, recorded)
    if recorded.awaits_cost and draft.usage.generation_id:
        run_in_background(
            settle_from_generation(meter, draft.request_id, draft.usage.generation_id)
        )


#: How long a note of the upstream's generation id waits before it is told: a
#: request whose record starts meanwhile never needs it. A worker that dies before
#: its note is told (the wait, then the call) leaves a trace without the id,
#: recorded unpriced, as one that dies before the upstream answers.
NOTE_WAIT = 0.01


class _AnswerNotes:
    """The answer notes of one event loop's requests, told to their meter in batches.

    A note is told ``NOTE_WAIT`` after it comes, in a database thread,
    together with every note that came meanwhile (one statement for all,
    where the meter has ``answered_many``); the notes that come while that
    call is on its way wait as long again once it has returned. A note
    still waiting when its request's record is started is dropped: the
    record carries the generation id itself. So a request that ends within
    the wait (a JSON answer whose body came a turn after its headers, a
    brief stream) costs the database no statement for its note, and a busy
    worker tells its streams' notes a few batches a second, not one
    statement and one thread hop per stream.
    """

    def __init__(self) -> None:
        self._waiting: dict[uuid.UUID, tuple[Meter, AnswerNote]] = {}
        self._telling: asyncio.Task[None] | None = None

    def add(self, meter: Meter, note: AnswerNote) -> None:
        self._waiting[note.request_id] = (meter, note)
        if self._telling is None:
            self._telling = run_in_background(self._tell())

    def drop(self, request_id: uuid.UUID) -> None:
        self._waiting.pop(request_id, None)

    async def _tell(self) -> None:
        try:
            while True:
                await asyncio.sleep(NOTE_WAIT)
                if not self._waiting:
                    return  # every note was dropped by its record
                batch, self._waiting = self._waiting, {}
                for meter, entries in _by_meter(batch.values(), lambda entry: entry[0]):
                    notes = [note for _, note in entries]
                    try:
                        await run_db(_tell_meter, meter, notes)
                    except DatabaseError:
                        # The final records do not need them; only a crash from here on would.
                        logger.warning(
                            "could not tell the meter the generation of %d requests", len(notes)
                        )
        finally:
            self._telling = None


def _tell_meter(meter: Meter, notes: list[AnswerNote]) -> None:
    """Tell ``meter`` the notes, in one call where it takes several at once."""
    answered_many = getattr(meter, "answered_many", None)
    if answered_many is not None and len(notes) > 1:
        answered_many(notes)
        return
    for note in notes:
        meter.answered(note.request_id, note.generation_id)


_answer_notes = PerLoop(_AnswerNotes).get


class _Records:
    """The drafts of one event loop's ended requests, recorded in batches.

    When no call is on its way, a draft goes one turn of the loop after it
    comes: alone, on the loop itself while the worker is not busy (where the
    meter has ``record_async``), else to a database thread; the drafts that
    come meanwhile go together in the next call (one transaction for all,
    where the meter has ``record_many``). An idle worker records each request
    as it ends; a busy one spares the database a commit and itself a thread
    hop per request.
    """

    def __init__(self) -> None:
        self._waiting: list[tuple[Meter, UsageDraft, asyncio.Future[Receipt]]] = []
        self._writing: asyncio.Task[None] | None = None

    def add(self, meter: Meter, draft: UsageDraft) -> asyncio.Future[Receipt]:
        """The draft's receipt, once its batch is written."""
        receipt: asyncio.Future[Receipt] = asyncio.get_running_loop().create_future()
        self._waiting.append((meter, draft, receipt))
        if self._writing is None:
            self._writing = run_in_background(self._write())
        return receipt

    async def _write(self) -> None:
        try:
            await asyncio.sleep(0)  # the drafts of the requests ending in this turn
            while self._waiting:
                batch, self._waiting = self._waiting, []
                on_loop = _on_the_loop()
                for meter, entries in _by_meter(batch, lambda entry: entry[0]):
                    drafts = [draft for _, draft, _ in entries]
                    record_async = getattr(meter, "record_async", None) if on_loop else None
                    try:
                        if record_async is not None and len(drafts) == 1:
                            outcomes = [await record_async(drafts[0])]
                        else:
                            outcomes = await run_db(_record_all, meter, drafts)
                    except asyncio.CancelledError:
                        # A stop that would not wait longer: the thread still
                        # writes a batch it started; the rest is left to recovery.
                        for _, _, receipt in entries:
                            receipt.cancel()
                        raise
                    except Exception as error:
                        outcomes = [error] * len(entries)
                    for (_, _, receipt), outcome in zip(entries, outcomes, strict=True):
                        if receipt.done():
                            continue  # its request's record was cancelled meanwhile
                        if isinstance(outcome, Exception):
                            receipt.set_exception(outcome)
                        else:
                            receipt.set_result(outcome)
        finally:
            self._writing = None
            # Empty unless cancelled: what did not go is left to recovery.
            for _, _, receipt in self._waiting:
                receipt.cancel()
            self._waiting = []


def _record_all(meter: Meter, drafts: list[UsageDraft]) -> list[Receipt | Exception]:
    """Each draft's receipt, or what stopped its record; together where the meter can."""
    return _together_or_each(getattr(meter, "record_many", None), meter.record, drafts, "record")


def _together_or_each(
    many: Callable[[list[Any]], Sequence[Any]] | None,
    one: Callable[[Any], Any],
    items: list[Any],
    what: str,
) -> list[Any]:
    """``many(items)``, or, if it fails or there is none, ``one`` of each: each's outcome or error.

    ``many`` must leave nothing written when it raises (the meter's promise).
    """
    if many is not None and len(items) > 1:
        try:
            outcomes = list(many(items))
        except Exception:
            logger.warning("could not %s %d requests together; each alone", what, len(items))
        else:
            if len(outcomes) == len(items):
                return outcomes
            logger.error("%s_many answered for %d of %d requests", what, len(outcomes), len(items))
    answers: list[Any] = []
    for item in items:
        try:
            answers.append(one(item))
        except Exception as error:
            answers.append(error)
    return answers


_records = PerLoop(_Records).get


#: Admissions of one loop that may wait on the database threads at once; past
#: it they queue, and the first of them to return sends the queue as one call.
THREAD_ADMISSIONS = 2


@dataclass(slots=True, eq=False)
class _Admitting:
    """One admission on its way through the database threads."""

    meter: Meter
    request: MeteredRequest
    answer: asyncio.Future[AdmissionResult]
    #: The thread call it went in, once it went (a call of its own can be
    #: cancelled while queued: it never runs).
    call: Future[Any] | None = None
    alone: bool = False


class _Admissions:
    """The admissions of one event loop that go through the database threads.

    An admission goes to a thread at once while fewer than
    ``THREAD_ADMISSIONS`` are on their way; past that it queues, and when one
    returns, every queued admission goes in one call (``admit_many``, one
    transaction on PostgreSQL, where the meter has it). A busy worker then
    spends one thread hop and one commit on several admissions, not one each.
    """

    def __init__(self) -> None:
        self._running = 0
        self._queued: list[_Admitting] = []

    def admit(self, meter: Meter, request: MeteredRequest) -> _Admitting:
        admitting = _Admitting(meter, request, asyncio.get_running_loop().create_future())
        if self._running < THREAD_ADMISSIONS or getattr(meter, "admit_many", None) is None:
            self._send([admitting])
        else:
            self._queued.append(admitting)
        return admitting

    def withdraw(self, admitting: _Admitting) -> bool:
        """Take back an admission whose caller left; True if it never ran (nothing taken)."""
        if admitting in self._queued:
            self._queued.remove(admitting)
            return True
        return admitting.alone and admitting.call is not None and admitting.call.cancel()

    def _send(self, batch: list[_Admitting]) -> None:
        loop = asyncio.get_running_loop()
        self._running += 1
        first = batch[0]
        if len(batch) == 1:
            call: Future[Any] = submit_db(first.meter.admit, first.request)
        else:
            call = submit_db(_admit_all, first.meter, [each.request for each in batch])
        for each in batch:
            each.call, each.alone = call, len(batch) == 1

        def returned(done: Future[Any]) -> None:
            # In the database thread (or here, if cancelled unrun).
            with suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(self._answer, batch, done)

        call.add_done_callback(returned)

    def _answer(self, batch: list[_Admitting], call: Future[Any]) -> None:
        self._running -= 1
        if call.cancelled():  # a call of its own, withdrawn while queued in its thread
            batch[0].answer.cancel()
        else:
            outcomes: list[Any]
            if (error := call.exception()) is not None:
                outcomes = [error] * len(batch)
            else:
                outcomes = [call.result()] if len(batch) == 1 else call.result()
            for admitting, outcome in zip(batch, outcomes, strict=True):
                if admitting.answer.done():
                    continue
                if isinstance(outcome, BaseException):
                    admitting.answer.set_exception(outcome)
                else:
                    admitting.answer.set_result(outcome)
        if self._queued and self._running < THREAD_ADMISSIONS:
            queued, self._queued = self._queued, []
            for _, together in _by_meter(queued, lambda admitting: admitting.meter):
                self._send(together)


def _admit_all(meter: Meter, requests: list[MeteredRequest]) -> list[AdmissionResult | Exception]:
    """Each request's admission, or what stopped it; together where the meter can."""
    return _together_or_each(getattr(meter, "admit_many", None), meter.admit, requests, "admit")


_admissions = PerLoop(_Admissions).get


def _by_meter(entries: Iterable[E], meter_of: Callable[[E], Meter]) -> list[tuple[Meter, list[E]]]:
    """``entries`` grouped by their meter (one in practice), each group in its order."""
    groups: dict[int, tuple[Meter, list[E]]] = {}
    for entry in entries:
        meter = meter_of(entry)
        groups.setdefault(id(meter), (meter, []))[1].append(entry)
    return list(groups.values())


def _ending(user_id: int, key_id: int | None) -> tuple[int, Decimal, Decimal]:
    """How many of a caller's ended requests are being recorded with a known cost, and it.

    The total, and the part through ``key_id``. One whose cost is not reported
    is left out: its slot still counts against the caller's bound.
    """
    count, cost, key_cost = 0, Decimal(0), Decimal(0)
    for key, reported in _recording.get(user_id, {}).values():
        if reported is not None:
            count += 1
            cost += reported
            if key == key_id:
                key_cost += reported
    return count, cost, key_cost


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
    _admitted: bool = False
    _counted: bool = False

    def metered_request(self) -> MeteredRequest:
        ending, ending_cost, ending_key_cost = _ending(self.caller.user_id, self.caller.key_id)
        return MeteredRequest(
            request_id=self.request_id,
            user_id=self.caller.user_id,
            endpoint=self.endpoint,
            streamed=self.streamed,
            requested_model=self.requested_model,
            api_key_id=self.caller.key_id,
            api_key_label=self.caller.key_label,
            limits=self.caller.limits,
            ending=ending,
            ending_cost=ending_cost,
            ending_key_cost=ending_key_cost,
        )

    async def admit(self) -> AdmissionResult:
        """Ask the meter to admit the request; a caller leaving meanwhile gives it back."""
        request = self.metered_request()
        admit_async = None
        if _on_the_loop():
            admit_async = getattr(self.meter, "admit_async", None)
        admitting: asyncio.Future[AdmissionResult] | _Admitting
        if admit_async is not None:
            # A task of its own: a caller that leaves does not cut its statement short.
            task = asyncio.ensure_future(admit_async(request))
            admitting, waiting = task, asyncio.shield(task)
        else:
            # Through the database threads, together with the admissions
            # queued behind the ones on their way (see _Admissions). The loop
            # resumes the view one turn after its call returns.
            admitting = _admissions().admit(self.meter, request)
            waiting = asyncio.shield(admitting.answer)
        self._count(+1)
        try:
            result: AdmissionResult = await waiting
        except BaseException as error:
            self._count(-1)
            if isinstance(error, asyncio.CancelledError):
                if isinstance(admitting, _Admitting) and _admissions().withdraw(admitting):
                    raise  # queued, never ran: nothing was taken
                run_in_background(self._release_if_admitted(admitting, request))
            raise
        if not result.admitted:
            self._count(-1)
        else:
            self._admitted = True
            observability.billed_request_started()
        return result

    def _count(self, step: int) -> None:
        """Count the request among those running once, from admission to its end."""
        global _running
        if (step > 0) != self._counted:
            self._counted = step > 0
            _running += step

    async def _release_if_admitted(
        self, admitting: asyncio.Future[AdmissionResult] | _Admitting, request: MeteredRequest
    ) -> None:
        """Give back the slot of an admission whose caller left before hearing it."""
        # One withdrawn unrun never gets here (see admit): this one ran, or runs.
        result = await (admitting.answer if isinstance(admitting, _Admitting) else admitting)
        if result.admitted:
            await run_db(self.meter.release, request)

    def upstream_answered(self, status: int, generation_id: str | None) -> None:
        """The upstream's headers are in: the meter is told their generation, beside the relay."""
        self.status = status
        self.header_generation_id = generation_id
        if self._admitted and generation_id:
            note = AnswerNote(self.request_id, generation_id, timezone.now())
            _answer_notes().add(self.meter, note)

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
        """Record the request's end; the caller's cancellation cannot cut it short.

        On a serving loop (see :func:`on_serving_loop`) this only
        starts the record: the response ends without waiting for it.
        """
        self._count(-1)
        draft = self.draft(outcome, capture, error, cost_unknown=cost_unknown)
        receipt = _start_record(self.meter, draft)
        if not _serving_loop.get():
            # Its callback (metrics, log line) runs before this resumes; it logs an error.
            with suppress(Exception):
                await asyncio.shield(receipt)
