"""Ended requests recorded in batches: one transaction for many, exact as each alone."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import uuid
from collections.abc import Callable
from decimal import Decimal
from functools import partial
from typing import Any

import pytest
from django.db import OperationalError, connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from billing import spool
from billing.meter import BillingMeter
from billing.models import CreditAccount, CreditLedgerEntry, KeyMeter, OpenRequest, UsageRecord
from billing.services import balance_of, check_key_meters, check_ledger
from billing.signals import credits_low, key_limit_reached
from openrouter_proxy import exchange
from openrouter_proxy.metering import AnswerNote, MeteredRequest, Receipt, UsageDraft
from terragon.apikeys.models import ApiKey
from tests.app.test_prepared import its_draft, streamed_request
from tests.support.accounts import Account, make_account
from tests.support.waiting import HeldFirstCall

transactional = pytest.mark.django_db(transaction=True)


def admitted(meter: BillingMeter, account: Account) -> MeteredRequest:
    request = streamed_request(account.user.pk, account.key.pk)
    assert meter.admit(request).admitted
    return request


def ledger_is_clean() -> None:
    assert check_ledger() == []
    assert check_key_meters() == []


@transactional
def test_a_batch_charges_each_draft_exactly_and_ends_every_trace() -> None:
    meter = BillingMeter()
    alice, bob = make_account("alice", credit="10"), make_account("bob", credit="5")
    # Interleaved users, so the batch writes its rows in an order of its own.
    plan = [(alice, "0.0123"), (bob, "0.5"), (alice, "0.000000000001"), (bob, "0"), (alice, "1")]
    drafts = [its_draft(admitted(meter, account), cost) for account, cost in plan]
    with CaptureQueriesContext(connection) as queries:
        receipts = meter.record_many(drafts)
    assert [receipt.settlement for receipt in receipts] == ["settled"] * len(drafts)
    assert [receipt.charged for receipt in receipts] == [Decimal(cost) for _, cost in plan]
    assert balance_of(alice.user) == Decimal("10") - Decimal("1.012300000001")
    assert balance_of(bob.user) == Decimal("4.5")
    records = UsageRecord.objects.in_bulk([d.request_id for d in drafts], field_name="request_id")
    for draft, (_, cost) in zip(drafts, plan, strict=True):
        assert records[draft.request_id].billed == Decimal(cost)
    # A free request writes no ledger row; every other writes exactly one.
    assert CreditLedgerEntry.objects.filter(kind="usage").count() == 4
    assert KeyMeter.objects.get(api_key_id=alice.key.pk).spent == Decimal("1.012300000001")
    assert not OpenRequest.objects.exists()
    assert set(CreditAccount.objects.values_list("in_flight", flat=True)) == {0}
    ledger_is_clean()
    if connection.vendor == "postgresql":
        records_written = [q for q in queries if "billing_usagerecord" in (q["sql"] or "")]
        assert len(records_written) == 1
        assert records_written[0]["sql"].startswith("5 times: ")


@transactional
def test_a_batch_writes_in_the_order_every_writer_locks_the_rows() -> None:
    """Users' accounts in ascending order, a user's keys likewise, whatever order they ended in.

    Two batches of two workers that wrote the same accounts in opposite orders
    waited on each other until PostgreSQL broke the deadlock, a second later.
    """
    meter = BillingMeter()
    accounts = [make_account(f"user{n}") for n in range(3)]
    second_key, _ = ApiKey.objects.issue(accounts[0].user, name="second")
    requests = [admitted(meter, account) for account in reversed(accounts)]
    other = dataclasses.replace(admitted(meter, accounts[0]), api_key_id=second_key.pk)
    drafts = [its_draft(request, "0.01") for request in [other, *requests]]
    batches: list[list[tuple[int, int]]] = []

    def watch(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if many:  # the record's fields come first: its user, then its key
            batches.append([(row[1], row[2]) for row in params])
        return execute(sql, params, many, context)

    with connection.execute_wrapper(watch):
        meter.record_many(drafts)
    if connection.vendor == "postgresql":
        assert batches == [sorted((d.user_id, d.api_key_id or 0) for d in drafts)]
    assert balance_of(accounts[0].user) == Decimal("9.98")
    ledger_is_clean()


@transactional
def test_a_draft_already_recorded_sends_the_batch_back_to_one_at_a_time() -> None:
    meter = BillingMeter()
    account = make_account(credit="10")
    first, second, third = (its_draft(admitted(meter, account), "0.25") for _ in range(3))
    assert meter.record(second).settlement == "settled"
    receipts = meter.record_many([first, second, third])
    assert [receipt.settlement for receipt in receipts] == [
        "settled",
        "already_recorded",
        "settled",
    ]
    assert balance_of(account.user) == Decimal("9.25")
    assert UsageRecord.objects.count() == 3
    assert not OpenRequest.objects.exists()
    assert CreditAccount.objects.get(user=account.user).in_flight == 0
    ledger_is_clean()


@transactional
def test_a_generation_reported_twice_in_one_batch_is_charged_once() -> None:
    meter = BillingMeter()
    account = make_account(credit="10")
    first, second = (its_draft(admitted(meter, account), "0.5") for _ in range(2))
    twice = dataclasses.replace(second, usage=first.usage)
    receipts = meter.record_many([first, twice])
    assert [receipt.settlement for receipt in receipts] == ["settled", "duplicate_generation"]
    assert balance_of(account.user) == Decimal("9.5")
    assert UsageRecord.objects.count() == 1
    assert CreditAccount.objects.get(user=account.user).in_flight == 0
    ledger_is_clean()


@transactional
def test_signals_see_each_charge_of_a_batch_in_turn(settings: Any) -> None:
    settings.BILLING_CREDITS_LOW_THRESHOLD = "9.5"
    meter = BillingMeter()
    account = make_account(credit="10")
    account.key.spend_limit = Decimal("0.5")
    account.key.save()
    low: list[Decimal] = []
    capped: list[tuple[str, Decimal]] = []

    def on_low(**kwargs: Any) -> None:
        low.append(kwargs["balance"])

    def on_cap(**kwargs: Any) -> None:
        capped.append((kwargs["limit"], kwargs["spent"]))

    credits_low.connect(on_low)
    key_limit_reached.connect(on_cap)
    try:
        drafts = [its_draft(admitted(meter, account), "0.3") for _ in range(3)]
        meter.record_many(drafts)
    finally:
        credits_low.disconnect(on_low)
        key_limit_reached.disconnect(on_cap)
    # 9.7, then 9.4: the second charge crossed the threshold, the third did not.
    assert low == [Decimal("9.4")]
    assert capped == [("spend_limit", Decimal("0.6"))]


@transactional
def test_a_database_that_fails_the_batch_gets_each_draft_alone(monkeypatch: Any) -> None:
    meter = BillingMeter()
    account = make_account(credit="10")
    drafts = [its_draft(admitted(meter, account), "0.1") for _ in range(3)]

    def broken(batch: Any) -> Any:
        raise OperationalError("the connection went away mid-batch")

    monkeypatch.setattr(spool, "record_usage_many", broken)
    receipts = meter.record_many(drafts)
    assert [receipt.settlement for receipt in receipts] == ["settled"] * 3
    assert balance_of(account.user) == Decimal("9.7")
    ledger_is_clean()


# --- The proxy's side: one event loop's records, in batches -------------------------------


class Meter(HeldFirstCall):
    """Records what it is given; its first call waits until let go."""

    def __init__(self, *, many: bool, failing: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.failing = failing
        if many:
            self.record_many = self._record_many

    def record(self, draft: UsageDraft) -> Receipt:
        self._wait_if_first()
        self.calls.append(("one", [draft.endpoint]))
        if draft.endpoint in self.failing:
            raise RuntimeError(f"cannot record {draft.endpoint}")
        return Receipt("settled")

    def _record_many(self, drafts: list[UsageDraft]) -> list[Receipt]:
        self._wait_if_first()
        self.calls.append(("many", [draft.endpoint for draft in drafts]))
        if any(draft.endpoint in self.failing for draft in drafts):
            raise RuntimeError("one of them cannot be recorded")
        return [Receipt(f"settled:{draft.endpoint}") for draft in drafts]


def ended(name: str) -> UsageDraft:
    return UsageDraft(
        request_id=uuid.uuid4(), user_id=1, endpoint=name, streamed=False, outcome="completed"
    )


def write(meter: Any, later: list[str]) -> list[Receipt | BaseException]:
    """Record ``a`` alone, then ``later`` while it is being written; every outcome in order."""

    async def serving() -> list[Receipt | BaseException]:
        records = exchange._records()
        first = records.add(meter, ended("a"))  # written at once: nothing is on its way
        assert await asyncio.to_thread(meter.first_call.wait, 10)
        rest = [records.add(meter, ended(name)) for name in later]
        meter.let_go.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    return asyncio.run(serving())


def test_records_that_end_while_one_is_written_go_together() -> None:
    meter = Meter(many=True)
    outcomes = write(meter, ["b", "c", "d"])
    assert meter.calls == [("one", ["a"]), ("many", ["b", "c", "d"])]
    assert outcomes == [Receipt("settled"), *(Receipt(f"settled:{n}") for n in "bcd")]


def test_a_meter_without_record_many_records_each_alone() -> None:
    meter = Meter(many=False)
    outcomes = write(meter, ["b", "c"])
    assert meter.calls == [("one", ["a"]), ("one", ["b"]), ("one", ["c"])]
    assert outcomes == [Receipt("settled")] * 3


def test_a_batch_that_fails_is_recorded_alone_and_only_the_bad_draft_fails() -> None:
    meter = Meter(many=True, failing=frozenset({"c"}))
    outcomes = write(meter, ["b", "c", "d"])
    assert meter.calls == [
        ("one", ["a"]),
        ("many", ["b", "c", "d"]),
        ("one", ["b"]),
        ("one", ["c"]),
        ("one", ["d"]),
    ]
    assert outcomes[:2] == [Receipt("settled")] * 2
    assert isinstance(outcomes[2], RuntimeError)
    assert outcomes[3] == Receipt("settled")


@transactional
def test_answer_notes_beside_a_batch_of_the_same_requests_never_deadlock(settings: Any) -> None:
    """The notes and the batch lock the requests' traces in one order: neither waits in a circle.

    Each round a batch of records and a note of every one of its requests go
    at once, from two connections, the notes in the opposite order.
    PostgreSQL counts every deadlock it broke.
    """
    if connection.vendor != "postgresql":
        pytest.skip("row locks across two connections: PostgreSQL's")
    settings.BILLING_MAX_IN_FLIGHT = 100
    meter = BillingMeter()
    accounts = [make_account(f"user{n}") for n in range(4)]
    before = _deadlocks()
    failures: list[BaseException] = []
    for _ in range(8):
        requests = [admitted(meter, accounts[n % 4]) for n in range(60)]
        drafts = [its_draft(request, "0.001") for request in requests]
        now = timezone.now()
        notes = [
            AnswerNote(request.request_id, f"gen-{request.request_id}", now)
            for request in sorted(requests, key=lambda r: r.request_id, reverse=True)
        ]
        sides: list[Callable[[], object]] = [
            partial(meter.answered_many, notes),
            partial(meter.record_many, drafts),
        ]
        _at_once(sides, failures)
    assert failures == []
    assert _deadlocks() == before
    assert UsageRecord.objects.count() == 8 * 60
    assert not OpenRequest.objects.exists()
    ledger_is_clean()


def _at_once(works: list[Callable[[], object]], failures: list[BaseException]) -> None:
    """Run each of ``works`` on a thread (a database connection) of its own, all at once."""
    start = threading.Barrier(len(works))

    def run(work: Callable[[], object]) -> None:
        start.wait(5)
        try:
            work()
        except BaseException as error:
            failures.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(work,)) for work in works]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)


def _deadlocks() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
        row = cursor.fetchone()
    assert row is not None
    return int(row[0])
