"""reconcile_usage and sync_model_prices against the fake OpenRouter."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal
from io import StringIO
from typing import Any

import httpx
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from billing.models import CostSource, CreditAccount, ModelPrice, Outcome, Settlement, UsageRecord
from billing.services import admit_request, balance_of, check_ledger, record_usage
from billing.spool import spool_draft, spooled_paths
from devtools.fake_openrouter import RunningFake
from openrouter_proxy.metering import ReportedUsage, UsageDraft
from tests.support.accounts import SERVER_KEY, Account
from tests.support.servers import wait_until


def pending_record(
    account: Account, generation_id: str, age: timedelta = timedelta(minutes=1)
) -> None:
    admit_request(account.user.pk)
    record_usage(
        UsageDraft(
            request_id=uuid.uuid4(),
            user_id=account.user.pk,
            endpoint="chat/completions",
            streamed=True,
            outcome=Outcome.CLIENT_DISCONNECTED,
            usage=ReportedUsage(generation_id=generation_id),
            created_at=timezone.now() - age,
        )
    )


def real_generation(fake: RunningFake) -> tuple[str, Decimal]:
    response = httpx.post(
        f"{fake.base_url}/v1/chat/completions",
        json={"model": "x-ai/grok-code-fast-1", "messages": [{"role": "user", "content": "x"}]},
        headers={"Authorization": f"Bearer {SERVER_KEY}"},
    )
    generation_id = response.json()["id"]
    assert wait_until(lambda: generation_id in fake.app.generations)
    return generation_id, fake.app.generations[generation_id].total_cost


def test_reconcile_settles_pending_records_once(
    account: Account, fake: RunningFake, settings: Any
) -> None:
    settings.OPENROUTER_PROXY_BASE_URL = fake.base_url
    generation_id, cost = real_generation(fake)
    pending_record(account, generation_id)
    pending_record(account, "gen-unknown-to-upstream")

    def reconcile() -> str:
        out = StringIO()
        call_command("reconcile_usage", "--min-age", "0", stdout=out, stderr=StringIO())
        return out.getvalue()

    assert wait_until(lambda: "1 settled" in reconcile(), timeout=5)
    assert "0 settled" in reconcile()  # idempotent
    settled = UsageRecord.objects.get(generation_id=generation_id)
    assert settled.settlement == Settlement.SETTLED
    assert settled.cost_source == CostSource.GENERATION
    assert settled.billed == cost
    assert balance_of(account.user) == Decimal(10) - cost
    assert (
        UsageRecord.objects.get(generation_id="gen-unknown-to-upstream").settlement
        == Settlement.PENDING
    )
    assert CreditAccount.objects.get(user=account.user).in_flight == 1
    assert check_ledger() == []


def test_reconcile_gives_up_on_old_unknown_generations(
    account: Account, fake: RunningFake, settings: Any
) -> None:
    settings.OPENROUTER_PROXY_BASE_URL = fake.base_url
    pending_record(account, "gen-lost", age=timedelta(hours=30))
    out = StringIO()
    call_command("reconcile_usage", stdout=out, stderr=StringIO())
    assert "1 marked unpriced" in out.getvalue()
    assert UsageRecord.objects.get().settlement == Settlement.UNPRICED
    assert CreditAccount.objects.get(user=account.user).in_flight == 0


def test_reconcile_replays_the_spool(account: Account, fake: RunningFake, settings: Any) -> None:
    settings.OPENROUTER_PROXY_BASE_URL = fake.base_url
    spool_draft(
        UsageDraft(
            request_id=uuid.uuid4(),
            user_id=account.user.pk,
            endpoint="chat/completions",
            streamed=False,
            outcome=Outcome.COMPLETED,
            usage=ReportedUsage(generation_id="gen-s", prompt_tokens=3, cost=Decimal("3.3E-5")),
            holds_slot=False,
        )
    )
    out = StringIO()
    call_command("reconcile_usage", stdout=out, stderr=StringIO())
    assert "1 spooled replayed" in out.getvalue()
    assert spooled_paths() == []
    assert UsageRecord.objects.get().billed == Decimal("0.000033")


def test_sync_model_prices_from_the_catalogue(db: None, fake: RunningFake, settings: Any) -> None:
    settings.OPENROUTER_PROXY_BASE_URL = fake.base_url
    out = StringIO()
    call_command("sync_model_prices", stdout=out, stderr=StringIO())
    grok = ModelPrice.objects.get(model_id="x-ai/grok-code-fast-1")
    assert grok.prompt == Decimal("0.0000002")
    assert grok.completion == Decimal("0.0000015")
    assert grok.input_cache_read == Decimal("0.00000002")
    assert "model price(s) written" in out.getvalue()
    count = ModelPrice.objects.count()
    call_command("sync_model_prices", stdout=StringIO(), stderr=StringIO())
    assert ModelPrice.objects.count() == count


def test_sync_model_prices_reports_an_unreachable_catalogue(db: None, settings: Any) -> None:
    settings.OPENROUTER_PROXY_BASE_URL = "http://127.0.0.1:9/api"
    with pytest.raises(CommandError, match="could not sync prices"):
        call_command("sync_model_prices", stdout=StringIO(), stderr=StringIO())
