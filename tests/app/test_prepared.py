"""The statements every request runs are prepared on PostgreSQL, and answer as before."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection

from billing import recovery
from billing.meter import BillingMeter
from billing.models import CreditAccount, UsageRecord
from billing.services import admission_async, balance_of, check_ledger
from billing.services.admission import in_flight_bound
from openrouter_proxy.metering import MeteredRequest, ReportedUsage, UsageDraft
from tests.support.accounts import make_account

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _postgres_only() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("prepared statements are PostgreSQL's")


def prepared_here() -> list[str]:
    """The statements this session has prepared."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        return [row[0] for row in cursor.fetchall()]


def streamed_request(user_id: int, key_id: int) -> MeteredRequest:
    return MeteredRequest(
        request_id=uuid.uuid4(),
        user_id=user_id,
        endpoint="chat/completions",
        streamed=True,
        api_key_id=key_id,
        api_key_label="test",
    )


def its_draft(request: MeteredRequest, cost: str) -> UsageDraft:
    return UsageDraft(
        request_id=request.request_id,
        user_id=request.user_id,
        api_key_id=request.api_key_id,
        api_key_label=request.api_key_label,
        endpoint=request.endpoint,
        streamed=True,
        outcome="completed",
        usage=ReportedUsage(
            model="x-ai/grok-code-fast-1",
            prompt_tokens=1200,
            completion_tokens=70_000,  # a larger integer type than the prompt's
            cost=Decimal(cost),
            generation_id=f"gen-{request.request_id}",
        ),
        requested_model="x-ai/grok-code-fast-1",
        http_status=200,
    )


@pytest.mark.parametrize("prepared", [True, False])
def test_a_request_s_statements_are_prepared_once_and_bill_exactly(
    settings: Any, prepared: bool
) -> None:
    settings.BILLING_PREPARED_STATEMENTS = prepared
    account = make_account(credit="10")
    with connection.cursor() as cursor:
        # Nothing prepared yet (a pooled session may have served another test).
        cursor.execute("DEALLOCATE ALL")
    meter = BillingMeter()
    costs = ["0.000123", "0.5", "0.000000001"]
    for cost in costs:
        request = streamed_request(account.user.pk, account.key.pk)
        assert meter.admit(request).admitted
        meter.answered(request.request_id, f"gen-{request.request_id}")
        receipt = meter.record(its_draft(request, cost))
        assert receipt.settlement == "settled"
        assert receipt.charged == Decimal(cost)
        # The same draft again is found recorded: a Django IntegrityError, as before.
        assert meter.record(its_draft(request, cost)).settlement == "already_recorded"
    statements = prepared_here()
    if prepared:
        starts = sorted(statement.split(" (")[0][:40] for statement in statements)
        assert any(s.startswith('WITH slot AS (UPDATE "billing_creditaccount"') for s in statements)
        assert any(
            s.startswith('WITH record AS (INSERT INTO "billing_usagerecord"') for s in statements
        )
        assert any(s.startswith('UPDATE "billing_openrequest"') for s in statements), starts
    else:
        assert statements == []
    assert balance_of(account.user) == Decimal("10") - sum(map(Decimal, costs))
    assert UsageRecord.objects.count() == len(costs)
    assert CreditAccount.objects.get(user=account.user).in_flight == 0
    assert check_ledger() == []


def test_the_loop_s_admissions_are_prepared_too(settings: Any) -> None:
    settings.BILLING_PREPARED_STATEMENTS = True
    account = make_account(credit="10")

    async def admit_twice_then_look() -> list[str]:
        try:
            for _ in range(2):
                request = streamed_request(account.user.pk, account.key.pk)
                admitted, traced = await admission_async.admit_user(
                    account.user.pk, recovery.trace_values(request), in_flight_bound(0)
                )
                assert (admitted.value, traced) == ("admitted", True)
            async with admission_async._connections().connection() as held:
                cursor = await held.execute("SELECT statement FROM pg_prepared_statements")
                return [row[0] for row in await cursor.fetchall()]
        finally:
            await admission_async.close()

    statements = asyncio.run(admit_twice_then_look())
    assert len(statements) == 1
    assert statements[0].startswith('WITH slot AS (UPDATE "billing_creditaccount"')
    assert CreditAccount.objects.get(user=account.user).in_flight == 2
