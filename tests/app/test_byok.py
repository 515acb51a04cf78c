"""BYOK end to end: every way a request is charged charges the same total.

With BYOK the operator pays two bills for one generation: OpenRouter's fee
(``usage.cost``, ``total_cost`` in generation stats), from the OpenRouter
credits, and the provider's price (``cost_details.upstream_inference_cost``,
``upstream_inference_cost`` in generation stats), on the provider key. A
request is charged the sum, whether its response said it (a completion) or
it is settled later from generation stats (a disconnect, a cut stream,
``reconcile_usage``).

The expected amounts are read from what the fake reported, so these tests
keep their meaning whatever fee the fake charges.
"""

from __future__ import annotations

import io
import time
from decimal import Decimal
from typing import Any

import httpx
from django.core.management import call_command

from billing.models import CostSource, CreditAccount, Outcome, Settlement, UsageRecord
from billing.services import balance_of, bill, check_ledger
from devtools.fake_openrouter import GenerationStats
from tests.support.accounts import Account, Gateway
from tests.support.faults.common import CHAT, STREAM_CHAT, sse_events
from tests.support.waiting import wait_for


def chat_url(gateway: Gateway) -> str:
    return f"{gateway.proxy}/v1/chat/completions"


def byok_total(stats: GenerationStats) -> Decimal:
    """What the fake says the generation cost the operator: fee plus provider price."""
    assert stats.is_byok
    assert stats.upstream_inference_cost is not None
    return stats.total_cost + stats.upstream_inference_cost


def generation(gateway: Gateway, record: UsageRecord) -> GenerationStats:
    assert record.generation_id is not None, record.error_message
    return gateway.fake.app.generations[record.generation_id]


def settled_record() -> UsageRecord:
    return wait_for(
        lambda: UsageRecord.objects.filter(settlement=Settlement.SETTLED).first(),
        "the usage record to be settled",
    )


def assert_charged(account: Account, record: UsageRecord, total: Decimal) -> None:
    assert total > 0
    assert record.provider_cost == total
    assert record.billed == bill(total)
    assert balance_of(account.user) == Decimal(10) - record.billed
    assert CreditAccount.objects.get(user=account.user).in_flight == 0
    assert check_ledger() == []


def test_byok_completion_is_charged_fee_plus_provider_price(
    gateway: Gateway, live_account: Account
) -> None:
    response = httpx.post(
        chat_url(gateway), json=CHAT, headers={**live_account.headers, "X-Fake-Mode": "byok"}
    )
    assert response.status_code == 200
    usage = response.json(parse_float=Decimal)["usage"]
    assert usage["is_byok"] is True
    said = usage["cost"] + usage["cost_details"]["upstream_inference_cost"]
    record = settled_record()
    assert record.cost_source == CostSource.PROVIDER
    assert said == byok_total(generation(gateway, record))
    assert_charged(live_account, record, said)


def test_byok_stream_is_charged_fee_plus_provider_price(
    gateway: Gateway, live_account: Account
) -> None:
    response = httpx.post(
        chat_url(gateway),
        json=STREAM_CHAT,
        headers={**live_account.headers, "X-Fake-Mode": "byok"},
    )
    usage = sse_events(response.text)[-1]["usage"]
    said = usage["cost"] + usage["cost_details"]["upstream_inference_cost"]
    record = settled_record()
    assert record.cost_source == CostSource.PROVIDER
    assert_charged(live_account, record, said)


def test_byok_client_disconnect_is_settled_at_fee_plus_provider_price(
    gateway: Gateway, live_account: Account
) -> None:
    fake = gateway.fake.app
    with httpx.stream(
        "POST",
        chat_url(gateway),
        json=STREAM_CHAT,
        headers={**live_account.headers, "X-Fake-Mode": "byok,chunks=50,chunk-delay=0.05"},
    ) as response:
        pieces = response.iter_raw()
        assert next(pieces)
        assert next(pieces)
    wait_for(lambda: fake.disconnected_streams == 1, "the fake to see the client leave")
    record = settled_record()
    assert record.outcome == Outcome.CLIENT_DISCONNECTED
    assert record.cost_source == CostSource.GENERATION
    stats = generation(gateway, record)
    assert stats.cancelled
    assert_charged(live_account, record, byok_total(stats))


def test_byok_cut_stream_is_settled_at_fee_plus_provider_price(
    gateway: Gateway, live_account: Account
) -> None:
    response = httpx.post(
        chat_url(gateway),
        json=STREAM_CHAT,
        headers={**live_account.headers, "X-Fake-Mode": "byok,cut"},
    )
    assert sse_events(response.text)[-1]["error"]["code"] == "upstream_stream_error"
    record = settled_record()
    assert record.outcome == Outcome.UPSTREAM_ERROR
    assert record.cost_source == CostSource.GENERATION
    assert_charged(live_account, record, byok_total(generation(gateway, record)))


def test_byok_reconcile_settles_at_fee_plus_provider_price(
    gateway: Gateway, live_account: Account, settings: Any
) -> None:
    settings.OPENROUTER_PROXY_SETTLE_DELAYS = ()  # nothing settled in-process
    response = httpx.post(
        chat_url(gateway),
        json=STREAM_CHAT,
        headers={**live_account.headers, "X-Fake-Mode": "byok,cut"},
    )
    assert response.status_code == 200
    record = wait_for(UsageRecord.objects.first, "the usage record")
    assert record.settlement == Settlement.PENDING
    stats = generation(gateway, record)
    fake = gateway.fake.app
    wait_for(
        lambda: time.monotonic() - stats.finished_at > fake.generation_delay,
        "the generation stats to be published",
    )
    out = io.StringIO()
    call_command("reconcile_usage", min_age=0, stdout=out)
    assert "1 settled" in out.getvalue()
    record.refresh_from_db()
    assert record.settlement == Settlement.SETTLED
    assert record.cost_source == CostSource.GENERATION
    assert_charged(live_account, record, byok_total(stats))
