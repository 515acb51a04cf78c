"""Settling from generation stats: what an answer of ``/v1/generation`` is worth,
and what happens when the record or the database is not what settlement expects."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from decimal import Decimal
from typing import Any

import pytest
from django.db import OperationalError

from billing import services
from billing.meter import BillingMeter
from billing.models import CostSource, Outcome, Settlement, UsageRecord
from billing.services import balance_of, check_ledger, record_usage
from devtools.fake_openrouter import GenerationStats, RunningFake
from openrouter_proxy.metering import GenerationCost, ReportedUsage, UsageDraft
from openrouter_proxy.settlement import parse_generation, settle_from_generation
from tests.support.accounts import Account

# The fields of a real answer (OpenRouter's OpenAPI document, GenerationResponse),
# trimmed to those settlement reads plus a few it must ignore.
NOT_BYOK = {
    "id": "gen-3bhGkxlo4XFrqiabUM7NDtwDzWwG",
    "total_cost": 0.0015,
    "usage": 0.0015,
    "cache_discount": None,
    "upstream_inference_cost": None,
    "is_byok": False,
    "tokens_prompt": 10,
    "tokens_completion": 25,
    "native_tokens_prompt": 12,
    "native_tokens_completion": 27,
    "native_tokens_reasoning": 5,
    "native_tokens_cached": 3,
    "cancelled": False,
    "streamed": True,
}


def answer(**data: Any) -> bytes:
    return json.dumps({"data": {**NOT_BYOK, **data}}).encode()


# --- parse_generation ---------------------------------------------------------------


def test_without_byok_the_cost_is_total_cost_exactly() -> None:
    stats = parse_generation(b'{"data": {"total_cost": 3.3e-05, "is_byok": false}}')
    assert stats is not None
    assert isinstance(stats.cost, Decimal)
    assert stats.cost.as_tuple() == Decimal("3.3E-5").as_tuple()


def test_without_byok_upstream_inference_cost_is_not_added() -> None:
    # Outside BYOK the field is a breakdown of the same money (or 0, or null).
    stats = parse_generation(answer(total_cost=0.0015, upstream_inference_cost=0.0015))
    assert stats is not None
    assert stats.cost == Decimal("0.0015")


def test_byok_costs_the_fee_plus_the_provider_price() -> None:
    body = answer(is_byok=True, total_cost=0.00006, upstream_inference_cost=0.0012)
    stats = parse_generation(body)
    assert stats is not None
    assert stats.cost == Decimal("0.00126")


def test_byok_inside_the_free_allowance_costs_the_provider_price() -> None:
    stats = parse_generation(answer(is_byok=True, total_cost=0, upstream_inference_cost=0.0012))
    assert stats is not None
    assert stats.cost == Decimal("0.0012")


@pytest.mark.parametrize(
    "data",
    [
        {"is_byok": True, "upstream_inference_cost": None},
        {"is_byok": True, "upstream_inference_cost": -1},
        {"is_byok": True, "upstream_inference_cost": "0.001"},
        {"is_byok": True, "total_cost": None, "upstream_inference_cost": 0.001},
    ],
    ids=["provider-price-null", "provider-price-negative", "provider-price-string", "no-fee"],
)
def test_byok_with_half_the_price_unknown_is_no_cost(data: dict[str, Any]) -> None:
    # Charging only the half that is known would be a silent under-charge.
    assert parse_generation(answer(**data)) is None


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b'{"data": []}',
        b'{"error": {"code": 404, "message": "Generation not found"}}',
        b'{"data": {"total_cost": null}}',
        b'{"data": {"total_cost": "0.001"}}',
        b'{"data": {"total_cost": true}}',
        b'{"data": {"total_cost": -0.001}}',
        b'{"data": {}}',
    ],
)
def test_answers_without_a_usable_cost_are_none(body: bytes) -> None:
    assert parse_generation(body) is None


def test_an_explicit_zero_is_free_not_unknown() -> None:
    stats = parse_generation(b'{"data": {"total_cost": 0}}')
    assert stats is not None
    assert stats.cost == 0


def test_native_token_counts_are_preferred_and_bad_counts_dropped() -> None:
    stats = parse_generation(answer())
    assert stats == GenerationCost(
        cost=Decimal("0.0015"),
        prompt_tokens=12,
        completion_tokens=27,
        reasoning_tokens=5,
        cached_tokens=3,
    )
    fallback = parse_generation(
        b'{"data": {"total_cost": 1, "tokens_prompt": 4, "tokens_completion": 6,'
        b' "native_tokens_reasoning": -1, "native_tokens_cached": true}}'
    )
    assert fallback == GenerationCost(Decimal(1), 4, 6, None, None)


# --- ReportedUsage.provider_cost: the same rule for a response's own usage -------------


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (ReportedUsage(cost=Decimal("0.002")), Decimal("0.002")),
        (
            ReportedUsage(cost=Decimal("0.002"), upstream_inference_cost=Decimal("0.002")),
            Decimal("0.002"),
        ),
        (ReportedUsage(cost=Decimal(0)), Decimal(0)),
        (ReportedUsage(), None),
        (
            ReportedUsage(
                is_byok=True, cost=Decimal("0.0001"), upstream_inference_cost=Decimal("0.002")
            ),
            Decimal("0.0021"),
        ),
        (
            ReportedUsage(is_byok=True, cost=Decimal(0), upstream_inference_cost=Decimal("0.002")),
            Decimal("0.002"),
        ),
        (ReportedUsage(is_byok=True, cost=Decimal("0.0001")), None),
        (ReportedUsage(is_byok=True, upstream_inference_cost=Decimal("0.002")), None),
    ],
    ids=[
        "cost",
        "cost-with-breakdown",
        "explicit-zero",
        "nothing",
        "byok-fee-plus-provider",
        "byok-free-allowance",
        "byok-provider-price-missing",
        "byok-fee-missing",
    ],
)
def test_provider_cost_rule(usage: ReportedUsage, expected: Decimal | None) -> None:
    assert usage.provider_cost == expected


# --- settle_from_generation against the fake -------------------------------------------


def pending_record(account: Account, generation_id: str) -> UsageRecord:
    request_id = uuid.uuid4()
    recorded = record_usage(
        UsageDraft(
            request_id=request_id,
            user_id=account.user.pk,
            endpoint="chat/completions",
            streamed=True,
            outcome=Outcome.CLIENT_DISCONNECTED,
            usage=ReportedUsage(generation_id=generation_id),
        )
    )
    assert recorded.awaits_cost
    return UsageRecord.objects.get(request_id=request_id)


def known_generation(fake: RunningFake, generation_id: str, cost: str) -> None:
    now = time.monotonic()
    fake.app.generations[generation_id] = GenerationStats(
        id=generation_id,
        model="x-ai/grok-code-fast-1",
        total_cost=Decimal(cost),
        tokens_prompt=10,
        tokens_completion=4,
        tokens_reasoning=0,
        tokens_cached=0,
        cancelled=True,
        streamed=True,
        created_at=time.time(),
        finished_at=now - 60,
    )


@pytest.fixture
def stats_from_fake(fake: RunningFake, settings: Any) -> RunningFake:
    settings.OPENROUTER_PROXY_BASE_URL = fake.base_url
    settings.OPENROUTER_PROXY_SETTLE_DELAYS = (0, 0)
    return fake


def settle(request_id: uuid.UUID, generation_id: str) -> bool:
    async def run() -> bool:
        from openrouter_proxy.upstream import close_clients

        try:
            return await settle_from_generation(BillingMeter(), request_id, generation_id)
        finally:
            await close_clients()

    return asyncio.run(run())


def test_settles_a_pending_record_and_frees_its_slot(
    stats_from_fake: RunningFake, live_account: Account
) -> None:
    record = pending_record(live_account, "gen-settle-1")
    known_generation(stats_from_fake, "gen-settle-1", "0.0042")
    assert settle(record.request_id, "gen-settle-1") is True
    record.refresh_from_db()
    assert record.settlement == Settlement.SETTLED
    assert record.cost_source == CostSource.GENERATION
    assert record.billed == Decimal("0.0042")
    assert record.prompt_tokens == 10
    assert balance_of(live_account.user) == Decimal(10) - Decimal("0.0042")
    assert check_ledger() == []


def test_a_record_no_longer_pending_is_left_alone(
    stats_from_fake: RunningFake, live_account: Account
) -> None:
    record = pending_record(live_account, "gen-settle-2")
    known_generation(stats_from_fake, "gen-settle-2", "0.0042")
    # Settled meanwhile elsewhere (reconcile_usage on another host, say).
    stats = parse_generation(answer(total_cost=0.001))
    assert stats is not None
    assert BillingMeter().settle(record.request_id, stats)
    assert settle(record.request_id, "gen-settle-2") is False
    record.refresh_from_db()
    assert record.billed == Decimal("0.001")  # charged once, by the first settler
    assert balance_of(live_account.user) == Decimal(10) - Decimal("0.001")
    assert check_ledger() == []


def test_a_record_settled_between_lookup_and_settling_is_charged_once(
    stats_from_fake: RunningFake, live_account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = pending_record(live_account, "gen-settle-3")
    known_generation(stats_from_fake, "gen-settle-3", "0.0042")
    real = services.settle_pending

    def another_host_first(record_id: int, cost: Decimal, *args: Any, **kwargs: Any) -> bool:
        assert real(record_id, Decimal("0.001"), CostSource.GENERATION)
        return real(record_id, cost, *args, **kwargs)

    monkeypatch.setattr("billing.meter.settle_pending", another_host_first)
    assert settle(record.request_id, "gen-settle-3") is False
    record.refresh_from_db()
    assert record.billed == Decimal("0.001")
    assert balance_of(live_account.user) == Decimal(10) - Decimal("0.001")


def test_a_database_failure_while_settling_leaves_the_record_to_reconcile(
    stats_from_fake: RunningFake,
    live_account: Account,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    record = pending_record(live_account, "gen-settle-4")
    known_generation(stats_from_fake, "gen-settle-4", "0.0042")

    def database_gone(*args: Any, **kwargs: Any) -> bool:
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr("billing.meter.settle_pending", database_gone)
    with caplog.at_level(logging.ERROR, logger="openrouter_proxy.settlement"):
        assert settle(record.request_id, "gen-settle-4") is False
    assert "reconcile_usage will retry" in caplog.text
    record.refresh_from_db()
    assert record.settlement == Settlement.PENDING
    assert record.billed == 0
    assert balance_of(live_account.user) == Decimal(10)
