"""Money movements: exact charges, idempotency, fallbacks, the gate, the audit."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import timedelta
from decimal import Decimal
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.db import DatabaseError
from django.utils import timezone

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
from billing.services import (
    RecordResult,
    admit_request,
    balance_of,
    check_ledger,
    give_up_pending,
    grant_credits,
    record_usage,
    settle_pending,
)
from billing.signals import credits_low
from billing.spool import record_usage_durably, replay_spool, spooled_paths
from openrouter_proxy.metering import Admission, ReportedUsage, UsageDraft
from tests.support.accounts import Account


def draft(account: Account, **usage: Any) -> UsageDraft:
    outcome = usage.pop("outcome", Outcome.COMPLETED)
    return UsageDraft(
        request_id=uuid.uuid4(),
        user_id=account.user.pk,
        endpoint="chat/completions",
        streamed=True,
        outcome=outcome,
        usage=ReportedUsage(**usage),
        requested_model="x-ai/grok-code-fast-1",
    )


def test_provider_cost_is_charged_exactly(account: Account) -> None:
    admit_request(account.user.pk)
    result = record_usage(
        draft(
            account,
            generation_id="gen-1",
            prompt_tokens=20,
            completion_tokens=3,
            cost=Decimal("0.0000195"),
        )
    )
    assert result.result is RecordResult.RECORDED
    record = UsageRecord.objects.get()
    assert record.billed == Decimal("0.0000195")
    assert record.cost_source == CostSource.PROVIDER
    assert record.settlement == Settlement.SETTLED
    assert balance_of(account.user) == Decimal("9.9999805")
    entry = CreditLedgerEntry.objects.get(kind=LedgerKind.USAGE)
    assert entry.amount == Decimal("-0.0000195")
    assert entry.usage_record == record
    assert CreditAccount.objects.get(user=account.user).in_flight == 0
    assert check_ledger() == []


def test_markup_applies(account: Account, settings: Any) -> None:
    settings.BILLING_MARKUP = "1.25"
    record_usage(draft(account, generation_id="g", cost=Decimal("0.0004"), prompt_tokens=1))
    assert UsageRecord.objects.get().billed == Decimal("0.0005")
    assert balance_of(account.user) == Decimal("9.9995")


def test_explicit_zero_cost_is_not_replaced_by_an_estimate(account: Account) -> None:
    ModelPrice.objects.create(model_id="x-ai/grok-code-fast-1", prompt=Decimal("0.001"))
    record_usage(
        draft(
            account,
            generation_id="g",
            prompt_tokens=100,
            cost=Decimal(0),
            model="x-ai/grok-code-fast-1",
        )
    )
    record = UsageRecord.objects.get()
    assert record.billed == 0
    assert record.cost_source == CostSource.PROVIDER
    assert record.settlement == Settlement.SETTLED
    assert not CreditLedgerEntry.objects.filter(kind=LedgerKind.USAGE).exists()


def test_byok_bills_the_upstream_inference_cost(account: Account) -> None:
    record_usage(
        draft(
            account,
            generation_id="g",
            prompt_tokens=1,
            cost=Decimal(0),
            is_byok=True,
            upstream_inference_cost=Decimal("0.002"),
        )
    )
    assert UsageRecord.objects.get().billed == Decimal("0.002")


def test_price_table_fallback_for_tokens_without_cost(account: Account) -> None:
    ModelPrice.objects.create(
        model_id="moonshotai/kimi-k2-0905",
        prompt=Decimal("0.0000006"),
        completion=Decimal("0.0000025"),
        input_cache_read=Decimal("0.00000015"),
        request=Decimal("0.0001"),
    )
    record_usage(
        draft(
            account,
            model="moonshotai/kimi-k2-0905:exacto",
            prompt_tokens=1000,
            cached_tokens=400,
            completion_tokens=200,
            reasoning_tokens=50,
        )
    )
    record = UsageRecord.objects.get()
    expected = 600 * Decimal("0.0000006") + 400 * Decimal("0.00000015")
    expected += 200 * Decimal("0.0000025") + Decimal("0.0001")
    assert record.cost_source == CostSource.PRICE_TABLE
    assert record.billed == expected
    assert balance_of(account.user) == Decimal(10) - expected


def test_tokens_without_cost_or_price_are_unpriced_not_free(account: Account) -> None:
    record_usage(draft(account, model="unknown/model", prompt_tokens=10, completion_tokens=5))
    record = UsageRecord.objects.get()
    assert record.settlement == Settlement.UNPRICED
    assert UsageRecord.objects.needing_attention().count() == 1


def test_no_cost_with_a_generation_id_waits_for_generation_stats(account: Account) -> None:
    admit_request(account.user.pk)
    recorded = record_usage(
        draft(account, generation_id="gen-p", outcome=Outcome.CLIENT_DISCONNECTED)
    )
    assert recorded.awaits_cost
    record = UsageRecord.objects.get()
    assert record.settlement == Settlement.PENDING
    assert record.holds_slot
    assert CreditAccount.objects.get(user=account.user).in_flight == 1
    assert settle_pending(record.pk, Decimal("0.0031"), completion_tokens=7) is True
    assert settle_pending(record.pk, Decimal("0.0031")) is False
    record.refresh_from_db()
    assert record.settlement == Settlement.SETTLED
    assert record.cost_source == CostSource.GENERATION
    assert record.completion_tokens == 7
    assert balance_of(account.user) == Decimal("9.9969")
    assert CreditAccount.objects.get(user=account.user).in_flight == 0
    assert check_ledger() == []


def test_giving_up_marks_unpriced_and_frees_the_slot(account: Account) -> None:
    admit_request(account.user.pk)
    record_usage(draft(account, generation_id="gen-lost", outcome=Outcome.CLIENT_DISCONNECTED))
    record = UsageRecord.objects.get()
    assert give_up_pending(record.pk, "never found") is True
    record.refresh_from_db()
    assert record.settlement == Settlement.UNPRICED
    assert CreditAccount.objects.get(user=account.user).in_flight == 0


def test_refused_upstream_request_costs_nothing_and_is_settled(account: Account) -> None:
    record_usage(draft(account, outcome=Outcome.UPSTREAM_ERROR, error_code="429"))
    record = UsageRecord.objects.get()
    assert record.settlement == Settlement.SETTLED
    assert record.cost_source == CostSource.NONE
    assert record.billed == 0


def test_the_same_draft_twice_is_recorded_once(account: Account) -> None:
    first = draft(account, generation_id="gen-x", cost=Decimal("0.01"), prompt_tokens=1)
    assert record_usage(first).result is RecordResult.RECORDED
    assert record_usage(first).result is RecordResult.ALREADY_RECORDED
    assert UsageRecord.objects.count() == 1
    assert balance_of(account.user) == Decimal("9.99")


def test_the_same_generation_seen_twice_is_charged_once(account: Account) -> None:
    admit_request(account.user.pk)
    admit_request(account.user.pk)
    record_usage(draft(account, generation_id="gen-dup", cost=Decimal("0.01"), prompt_tokens=1))
    again = record_usage(
        draft(account, generation_id="gen-dup", cost=Decimal("0.01"), prompt_tokens=1)
    )
    assert again.result is RecordResult.DUPLICATE_GENERATION
    assert UsageRecord.objects.count() == 1
    assert balance_of(account.user) == Decimal("9.99")
    assert CreditAccount.objects.get(user=account.user).in_flight == 0
    assert check_ledger() == []


def test_admission_gate(account: Account, settings: Any) -> None:
    settings.BILLING_MAX_IN_FLIGHT = 2
    uid = account.user.pk
    assert admit_request(uid) is Admission.ADMITTED
    assert admit_request(uid) is Admission.ADMITTED
    assert admit_request(uid) is Admission.TOO_MANY_IN_FLIGHT
    record_usage(draft(account, generation_id="g1", cost=Decimal("0.001"), prompt_tokens=1))
    assert admit_request(uid) is Admission.ADMITTED


@pytest.mark.parametrize("limited", [False, True], ids=["user", "key-with-limits"])
def test_slots_of_requests_still_being_recorded_do_not_count(
    account: Account, settings: Any, limited: bool
) -> None:
    """``ending`` requests hold a slot only until their records land: the bound allows them."""
    from openrouter_proxy.callers import KeyLimits

    settings.BILLING_MAX_IN_FLIGHT = 1
    uid = account.user.pk
    key, limits = (account.key.pk, KeyLimits(requests_per_minute=100)) if limited else (None, None)

    def admit(ending: int) -> Admission:
        return admit_request(uid, key, limits, ending=ending)

    assert admit(0) is Admission.ADMITTED
    assert admit(0) is Admission.TOO_MANY_IN_FLIGHT
    assert admit(1) is Admission.ADMITTED
    assert admit(1) is Admission.TOO_MANY_IN_FLIGHT
    assert admit(2) is Admission.ADMITTED
    assert CreditAccount.objects.get(user_id=uid).in_flight == 3


@pytest.mark.parametrize("limited", [False, True], ids=["user", "key-with-limits"])
def test_what_ending_requests_will_be_charged_counts_as_spent(
    account: Account, settings: Any, limited: bool
) -> None:
    """Let out of the bound, they overspend nothing: their charges count against the balance."""
    from openrouter_proxy.callers import KeyLimits

    settings.BILLING_MAX_IN_FLIGHT = 1
    uid = account.user.pk
    balance = balance_of(account.user)  # 10 USD
    key, limits = (account.key.pk, KeyLimits(requests_per_minute=100)) if limited else (None, None)

    def admit(unrecorded: str) -> Admission:
        return admit_request(uid, key, limits, ending=1, unrecorded=Decimal(unrecorded))

    assert admit(str(balance)) is Admission.NO_CREDIT
    assert admit("10.000000000001") is Admission.NO_CREDIT
    assert admit("9.999999999999") is Admission.ADMITTED
    assert CreditAccount.objects.get(user_id=uid).in_flight == 1


@pytest.mark.parametrize("cap", ["spend_limit", "daily_spend_limit"])
def test_what_ending_requests_will_be_charged_counts_against_the_key_s_caps(
    account: Account, cap: str
) -> None:
    from openrouter_proxy.callers import KeyLimits

    uid, key = account.user.pk, account.key.pk
    limits = (
        KeyLimits(spend_limit=Decimal("1"))
        if cap == "spend_limit"
        else KeyLimits(daily_spend_limit=Decimal("1"))
    )
    assert admit_request(uid, key, limits) is Admission.ADMITTED
    half = draft(account, cost=Decimal("0.5"), generation_id="gen-half")
    record_usage(dataclasses.replace(half, api_key_id=key))
    assert KeyMeter.objects.get(api_key_id=key).spent == Decimal("0.5")
    refused = Admission.KEY_SPEND_LIMIT if cap == "spend_limit" else Admission.KEY_DAILY_SPEND_LIMIT

    def admit(key_unrecorded: str) -> Admission:
        return admit_request(
            uid,
            key,
            limits,
            ending=1,
            unrecorded=Decimal(key_unrecorded),
            key_unrecorded=Decimal(key_unrecorded),
        )

    assert admit("0.5") is refused  # 0.5 spent and 0.5 on its way: the cap is reached
    assert admit("0.499999999999") is Admission.ADMITTED
    # Another key's ending requests weigh on the balance only, not on this key's caps.
    assert (
        admit_request(uid, key, limits, ending=1, unrecorded=Decimal("0.5")) is Admission.ADMITTED
    )


def test_no_credit_means_no_admission(db: None) -> None:
    from tests.support.accounts import make_account

    broke = make_account("broke", credit=None)
    assert admit_request(broke.user.pk) is Admission.NO_CREDIT
    grant_credits(broke.user, Decimal("0.01"))
    grant_credits(broke.user, Decimal("-0.01"), kind=LedgerKind.ADJUSTMENT)
    assert admit_request(broke.user.pk) is Admission.NO_CREDIT


def test_stale_slots_are_reclaimed_after_the_lease(account: Account, settings: Any) -> None:
    settings.BILLING_MAX_IN_FLIGHT = 1
    uid = account.user.pk
    assert admit_request(uid) is Admission.ADMITTED
    assert admit_request(uid) is Admission.TOO_MANY_IN_FLIGHT
    CreditAccount.objects.filter(user_id=uid).update(
        in_flight_expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert admit_request(uid) is Admission.ADMITTED
    assert CreditAccount.objects.get(user_id=uid).in_flight == 1


def test_credits_low_fires_once_when_crossing(account: Account, settings: Any) -> None:
    settings.BILLING_CREDITS_LOW_THRESHOLD = "9.5"
    seen: list[dict[str, Any]] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        seen.append(kwargs)

    credits_low.connect(receiver)
    try:
        with pytest.raises(AssertionError):
            assert seen  # nothing yet
        from django.test import TestCase

        with TestCase.captureOnCommitCallbacks(execute=True):
            record_usage(draft(account, generation_id="a", cost=Decimal("0.4"), prompt_tokens=1))
        assert seen == []
        with TestCase.captureOnCommitCallbacks(execute=True):
            record_usage(draft(account, generation_id="b", cost=Decimal("0.2"), prompt_tokens=1))
        with TestCase.captureOnCommitCallbacks(execute=True):
            record_usage(draft(account, generation_id="c", cost=Decimal("0.2"), prompt_tokens=1))
    finally:
        credits_low.disconnect(receiver)
    assert seen == [
        {
            "signal": credits_low,
            "user_id": account.user.pk,
            "balance": Decimal("9.4"),
            "threshold": Decimal("9.5"),
        }
    ]


def test_check_ledger_names_a_tampered_account(account: Account) -> None:
    CreditAccount.objects.filter(user=account.user).update(balance=Decimal("99"))
    mismatches = check_ledger()
    assert [(m.user_id, m.balance, m.ledger_total) for m in mismatches] == [
        (account.user.pk, Decimal("99"), Decimal("10"))
    ]
    err = StringIO()
    with pytest.raises(SystemExit) as exit_info:
        call_command("check_ledger", stdout=StringIO(), stderr=err)
    assert exit_info.value.code == 1
    assert "alice" in err.getvalue()


def test_check_ledger_command_passes_on_a_clean_ledger(account: Account) -> None:
    out = StringIO()
    call_command("check_ledger", stdout=out)
    assert "ledger OK" in out.getvalue()


def test_grant_credits_command(account: Account) -> None:
    out = StringIO()
    call_command("grant_credits", "alice", "20.50", "--note", "top-up", stdout=out)
    assert balance_of(account.user) == Decimal("30.50")
    entry = CreditLedgerEntry.objects.filter(kind=LedgerKind.GRANT).first()
    assert entry is not None
    assert entry.note == "top-up"
    assert entry.amount == Decimal("20.5")
    assert "balance now $30.50" in out.getvalue()


@pytest.mark.parametrize("amount", ["abc", "0", "NaN"])
def test_grant_credits_command_refuses_bad_amounts(account: Account, amount: str) -> None:
    from django.core.management.base import CommandError

    with pytest.raises(CommandError):
        call_command("grant_credits", "alice", amount, stdout=StringIO())


def test_grant_with_the_same_reference_twice_is_refused(account: Account) -> None:
    from django.db import IntegrityError

    grant_credits(account.user, Decimal(5), reference="invoice-1")
    with pytest.raises(IntegrityError):
        grant_credits(account.user, Decimal(5), reference="invoice-1")
    assert balance_of(account.user) == Decimal(15)


def test_database_down_spools_the_charge_and_replay_records_it_once(
    account: Account, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import billing.spool

    admit_request(account.user.pk)
    lost = draft(account, generation_id="gen-spool", cost=Decimal("0.25"), prompt_tokens=5)

    def broken(_: UsageDraft) -> None:
        raise DatabaseError("server closed the connection unexpectedly")

    monkeypatch.setattr(billing.spool, "record_usage", broken)
    assert record_usage_durably(lost) is None
    assert "spooled" in caplog.text
    assert len(spooled_paths()) == 1
    assert UsageRecord.objects.count() == 0

    monkeypatch.setattr(billing.spool, "record_usage", record_usage)
    assert replay_spool() == 1
    assert replay_spool() == 0
    assert spooled_paths() == []
    assert UsageRecord.objects.get().generation_id == "gen-spool"
    assert balance_of(account.user) == Decimal("9.75")
    assert CreditAccount.objects.get(user=account.user).in_flight == 0
    assert check_ledger() == []


def test_a_user_without_an_account_is_charged_once_into_a_new_account(db: None) -> None:
    """A host site may never have granted credit: the charge opens the account."""
    from tests.support.accounts import make_account

    newcomer = make_account("newcomer", credit=None)
    assert not CreditAccount.objects.filter(user=newcomer.user).exists()
    assert (
        record_usage(
            draft(newcomer, generation_id="gen-new", cost=Decimal("0.25"), prompt_tokens=3)
        ).result
        is RecordResult.RECORDED
    )
    record_usage(draft(newcomer, generation_id="gen-later", outcome=Outcome.CLIENT_DISCONNECTED))
    pending = UsageRecord.objects.get(generation_id="gen-later")
    assert settle_pending(pending.pk, Decimal("0.5")) is True
    assert balance_of(newcomer.user) == Decimal("-0.75")
    assert CreditLedgerEntry.objects.filter(user=newcomer.user, kind=LedgerKind.USAGE).count() == 2
    assert check_ledger() == []
