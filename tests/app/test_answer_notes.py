"""The generation an upstream answered with reaches the request's trace, in batches when busy."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from billing.meter import BillingMeter
from billing.models import OpenRequest
from openrouter_proxy import exchange
from openrouter_proxy.metering import AnswerNote
from tests.app.test_prepared import streamed_request
from tests.support.accounts import make_account
from tests.support.waiting import HeldFirstCall


@pytest.mark.django_db(transaction=True)
def test_many_notes_land_on_their_traces_each_with_its_own_time() -> None:
    account = make_account(credit="10")
    meter = BillingMeter()
    requests = [streamed_request(account.user.pk, account.key.pk) for _ in range(3)]
    for request in requests:
        assert meter.admit(request).admitted
    untouched = requests.pop()
    began = timezone.now() - timedelta(seconds=5)
    notes = [
        AnswerNote(request.request_id, f"gen-{n}", began + timedelta(seconds=n))
        for n, request in enumerate(requests)
    ]
    # A note of a request already recorded (its trace gone) lands on nothing.
    notes.append(AnswerNote(uuid.uuid4(), "gen-recorded", began))
    with CaptureQueriesContext(connection) as queries:
        meter.answered_many(notes)
    traces = {trace.request_id: trace for trace in OpenRequest.objects.all()}
    assert len(traces) == 3
    for n, request in enumerate(requests):
        assert traces[request.request_id].generation_id == f"gen-{n}"
        assert traces[request.request_id].answered_at == began + timedelta(seconds=n)
    assert traces[untouched.request_id].generation_id == ""
    assert traces[untouched.request_id].answered_at is None
    if connection.vendor == "postgresql":
        assert len(queries) == 1  # whatever the number of notes


class RecordingMeter(HeldFirstCall):
    """A meter that keeps the notes it is told; its first call waits until let go."""

    def __init__(self, *, many: bool) -> None:
        super().__init__()
        if many:
            self.answered_many = self._answered_many

    def answered(self, request_id: uuid.UUID, generation_id: str) -> None:
        self._wait_if_first()
        self.calls.append(("one", [generation_id]))

    def _answered_many(self, notes: list[AnswerNote]) -> None:
        self._wait_if_first()
        self.calls.append(("many", [note.generation_id for note in notes]))


async def told(notes: Any) -> None:
    """Until the loop's notes have all been told."""
    while notes._telling is not None:
        await asyncio.sleep(0.01)


def note(generation_id: str) -> AnswerNote:
    return AnswerNote(uuid.uuid4(), generation_id, timezone.now())


@pytest.mark.parametrize("many", [True, False], ids=["in-one-call", "one-call-each"])
def test_notes_that_come_while_one_is_told_go_together_and_a_dropped_one_not_at_all(
    many: bool,
) -> None:
    meter: Any = RecordingMeter(many=many)

    async def serving() -> None:
        notes = exchange._answer_notes()
        notes.add(meter, note("gen-a"))  # told after the wait: nothing is on its way
        assert await asyncio.to_thread(meter.first_call.wait, 10)
        later = [note("gen-b"), note("gen-c"), note("gen-d")]
        for each in later:
            notes.add(meter, each)
        notes.drop(later[1].request_id)  # its record has started: the record says it
        meter.let_go.set()
        await told(notes)

    asyncio.run(serving())
    if many:
        assert meter.calls == [("one", ["gen-a"]), ("many", ["gen-b", "gen-d"])]
    else:
        assert meter.calls == [("one", ["gen-a"]), ("one", ["gen-b"]), ("one", ["gen-d"])]


def test_a_note_whose_record_starts_in_the_same_turn_is_never_told() -> None:
    """A short JSON answer comes whole with its headers: its record says the generation."""
    meter: Any = RecordingMeter(many=True)
    meter.let_go.set()  # no call waits

    async def serving() -> None:
        notes = exchange._answer_notes()
        whole = note("gen-whole")
        notes.add(meter, whole)
        # The record's first step, in the same turn of the loop as the telling's first.
        asyncio.get_running_loop().call_soon(notes.drop, whole.request_id)
        await told(notes)
        notes.add(meter, note("gen-streamed"))  # a stream's note, nothing drops it
        await told(notes)

    asyncio.run(serving())
    assert meter.calls == [("one", ["gen-streamed"])]


def test_a_note_waits_before_it_is_told_and_one_dropped_meanwhile_never_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request that ends within the wait (its body turns after its headers) costs no note."""
    monkeypatch.setattr(exchange, "NOTE_WAIT", 0.2)
    meter: Any = RecordingMeter(many=True)
    meter.let_go.set()

    async def serving() -> None:
        loop = asyncio.get_running_loop()
        notes = exchange._answer_notes()
        short, streamed = note("gen-short"), note("gen-streamed")
        began = loop.time()
        notes.add(meter, short)
        notes.add(meter, streamed)
        for _ in range(5):
            await asyncio.sleep(0)  # the short answer's body, turns later
        await asyncio.sleep(0.01)
        notes.drop(short.request_id)  # its record has started
        assert meter.calls == []
        await told(notes)
        assert loop.time() - began >= 0.2

    asyncio.run(serving())
    assert meter.calls == [("one", ["gen-streamed"])]
