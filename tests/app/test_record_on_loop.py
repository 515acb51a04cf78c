"""A lone record on the event loop (PostgreSQL): exact as in a thread; the thread for the rest."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from billing import spool
from billing.meter import BillingMeter
from billing.models import (
    CreditAccount,
    CreditLedgerEntry,
    KeyMeter,
    ModelPrice,
    OpenRequest,
    UsageRecord,
)
from billing.services import balance_of, check_key_meters, check_ledger
from billing.services import recording_async as on_loop
from billing.signals import credits_low
from openrouter_proxy import db, exchange
from openrouter_proxy.metering import Receipt, UsageDraft
from tests.app.test_admission_async import _postgres_only, on_one_loop  # noqa: F401 (autouse)
from tests.app.test_prepared import its_draft, streamed_request
from tests.support.accounts import Account, make_account

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of what the meter handed to a database thread."""
    handed: list[str] = []
    real = db.run_db

    async def counted(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        handed.append(getattr(func, "__name__", repr(func)))
        return await real(func, *args, **kwargs)

    monkeypatch.setattr("billing.meter.run_db", counted)
    monkeypatch.setattr(on_loop, "run_db", counted)
    return handed


def admitted_draft(meter: BillingMeter, account: Account, cost: str) -> UsageDraft:
    request = streamed_request(account.user.pk, account.key.pk)
    assert meter.admit(request).admitted
    return its_draft(request, cost)


def test_a_record_on_the_loop_charges_exactly_and_ends_its_trace(threads: list[str]) -> None:
    meter = BillingMeter()
    account = make_account("alice", credit="10")
    drafts = [admitted_draft(meter, account, cost) for cost in ("0.0123", "0", "1")]

    async def steps() -> list[Receipt]:
        return [await meter.record_async(draft) for draft in drafts]

    receipts = on_one_loop(steps)
    assert threads == []  # all three went on the loop
    assert [receipt.settlement for receipt in receipts] == ["settled"] * 3
    assert [receipt.charged for receipt in receipts] == [Decimal("0.0123"), 0, Decimal(1)]
    assert balance_of(account.user) == Decimal("10") - Decimal("1.0123")
    assert UsageRecord.objects.count() == 3
    assert CreditLedgerEntry.objects.filter(kind="usage").count() == 2  # none for a free one
    assert KeyMeter.objects.get(api_key_id=account.key.pk).spent == Decimal("1.0123")
    assert not OpenRequest.objects.exists()
    assert CreditAccount.objects.get(user=account.user).in_flight == 0
    assert check_ledger() == []
    assert check_key_meters() == []


def test_a_charge_from_the_price_table_is_recorded_in_a_thread(threads: list[str]) -> None:
    meter = BillingMeter()
    account = make_account("bob", credit="10")
    ModelPrice.objects.create(
        model_id="x-ai/grok-code-fast-1", prompt=Decimal("0.000001"), completion=Decimal("0.000002")
    )
    draft = admitted_draft(meter, account, "0")
    estimated = dataclasses.replace(draft, usage=dataclasses.replace(draft.usage, cost=None))

    receipt = on_one_loop(lambda: meter.record_async(estimated))
    assert threads == ["record"]
    record = UsageRecord.objects.get()
    assert record.cost_source == "price_table"
    assert receipt.charged is None  # an estimate: not a reported cost
    assert balance_of(account.user) == Decimal(10) - record.billed
    assert record.billed == Decimal("0.1412")
    assert check_ledger() == []


def test_a_draft_already_recorded_goes_to_the_thread_which_says_so(threads: list[str]) -> None:
    meter = BillingMeter()
    account = make_account("carol", credit="10")
    draft = admitted_draft(meter, account, "0.5")
    assert meter.record(draft).settlement == "settled"

    receipt = on_one_loop(lambda: meter.record_async(draft))
    assert threads == ["record"]
    assert receipt.settlement == "already_recorded"
    assert balance_of(account.user) == Decimal("9.5")  # charged once
    assert check_ledger() == []


def test_a_charge_crossing_a_threshold_signals_from_a_thread(
    threads: list[str], settings: Any
) -> None:
    settings.BILLING_CREDITS_LOW_THRESHOLD = Decimal(1)
    meter = BillingMeter()
    account = make_account("dave", credit="2")
    heard: list[tuple[Decimal, bool]] = []

    def receiver(sender: Any, user_id: int, balance: Decimal, **kwargs: Any) -> None:
        # A receiver may use the ORM: it runs in a database thread, not on the loop.
        try:
            asyncio.get_running_loop()
            on_a_loop = True
        except RuntimeError:
            on_a_loop = False
        heard.append((balance, on_a_loop))

    credits_low.connect(receiver)
    try:
        drafts = [admitted_draft(meter, account, cost) for cost in ("0.5", "0.75", "0.25")]

        async def steps() -> None:
            for draft in drafts:
                await meter.record_async(draft)

        on_one_loop(steps)
    finally:
        credits_low.disconnect(receiver)
    assert heard == [(Decimal("0.75"), False)]  # once, at the crossing charge
    assert threads == ["_after_the_record"]
    assert balance_of(account.user) == Decimal("0.5")


def test_a_spooled_draft_is_replayed_after_a_record_on_the_loop(
    threads: list[str], settings: Any, tmp_path: Any
) -> None:
    settings.BILLING_SPOOL_DIR = tmp_path
    meter = BillingMeter()
    account = make_account("erin", credit="10")
    spooled, draft = (admitted_draft(meter, account, cost) for cost in ("0.25", "0.5"))
    spool.spool_draft(spooled)

    on_one_loop(lambda: meter.record_async(draft))
    assert threads == ["_after_the_record"]
    assert spool.spooled_paths() == []
    assert balance_of(account.user) == Decimal("9.25")
    assert check_ledger() == []


def test_a_database_error_on_the_loop_leaves_the_draft_to_the_thread(
    threads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    meter = BillingMeter()
    account = make_account("frank", credit="10")
    draft = admitted_draft(meter, account, "0.5")
    from billing.services.recording import _record_and_charge_statement as real

    def broken(*args: Any, **kwargs: Any) -> tuple[str, list[Any]]:
        sql, params = real(*args, **kwargs)
        return sql.replace("INSERT INTO", "INSERT INTO no_such_table_", 1), params

    monkeypatch.setattr(on_loop, "_record_and_charge_statement", broken)
    receipt = on_one_loop(lambda: meter.record_async(draft))
    assert threads == ["record"]
    assert receipt.settlement == "settled"
    assert balance_of(account.user) == Decimal("9.5")
    assert UsageRecord.objects.count() == 1
    assert check_ledger() == []


@pytest.mark.parametrize("busy", [False, True], ids=["idle-on-the-loop", "busy-in-threads"])
def test_the_proxy_records_on_the_loop_only_while_the_worker_is_not_busy(
    busy: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    meter = BillingMeter()
    account = make_account("gina", credit="10")
    draft = admitted_draft(meter, account, "0.5")
    calls: list[str] = []
    record_async, record = meter.record_async, meter.record

    async def on_the_loop(draft: UsageDraft) -> Receipt:
        calls.append("loop")
        return await record_async(draft)

    def in_a_thread(draft: UsageDraft) -> Receipt:
        calls.append("thread")
        return record(draft)

    monkeypatch.setattr(meter, "record_async", on_the_loop)
    monkeypatch.setattr(meter, "record", in_a_thread)
    monkeypatch.setattr(exchange, "LOOP_ADMISSION_BELOW", 0 if busy else 8)

    async def steps() -> Receipt:
        exchange.on_serving_loop()
        return await exchange._records().add(meter, draft)

    receipt = on_one_loop(steps)
    assert calls == (["thread"] if busy else ["loop"])
    assert receipt.settlement == "settled"
    assert balance_of(account.user) == Decimal("9.5")
