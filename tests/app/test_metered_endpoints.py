"""Every metered endpoint through the gateway: answered, recorded and billed exactly."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import httpx
import pytest

from billing.models import CostSource, CreditAccount, Outcome, Settlement, UsageRecord
from billing.services import balance_of, bill, check_ledger
from tests.support.accounts import Account, Gateway
from tests.support.requests import ALLOWED, CALLS, Call, assert_openai_error
from tests.support.waiting import wait_for


@pytest.fixture(autouse=True)
def _allow_every_endpoints_models(settings: Any) -> None:
    settings.OPENROUTER_PROXY_ALLOWED_MODELS = ALLOWED


def send(gateway: Gateway, account: Account, call: Call, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{gateway.proxy}/{call.path}",
        json=call.body,
        headers={**account.headers, **headers},
        timeout=30,
    )


def settled_record() -> UsageRecord:
    return wait_for(
        lambda: UsageRecord.objects.filter(settlement=Settlement.SETTLED).first(),
        "the usage record to be settled",
    )


@pytest.mark.parametrize("name", CALLS)
def test_metered_endpoint_is_billed_exactly(
    gateway: Gateway, live_account: Account, name: str
) -> None:
    call = CALLS[name]
    response = send(gateway, live_account, call)
    assert response.status_code == 200, response.text
    generation_id = response.headers["x-generation-id"]
    record = settled_record()
    generation = gateway.fake.app.generations[generation_id]
    assert record.generation_id == generation_id
    assert record.endpoint == call.endpoint
    assert record.streamed is call.streamed
    assert record.outcome == Outcome.COMPLETED
    assert record.billed == bill(generation.charged)
    assert record.billed > 0
    expected_source = CostSource.GENERATION if call.settles_later else CostSource.PROVIDER
    assert record.cost_source == expected_source
    assert balance_of(live_account.user) == Decimal(10) - record.billed
    assert CreditAccount.objects.get(user=live_account.user).in_flight == 0
    assert check_ledger() == []
    forwarded = [seen.path for seen in gateway.fake.app.requests]
    # Settlement later asks the generation endpoint; nothing else reaches the upstream.
    assert [path for path in forwarded if path != "/api/v1/generation"] == [f"/api/{call.path}"]
    assert ("/api/v1/generation" in forwarded) is call.settles_later


def test_multipart_transcription_is_checked_and_billed(
    gateway: Gateway, live_account: Account
) -> None:
    files = {"file": ("a.wav", b"\x00\x01" * 32_000, "audio/wav")}
    url = f"{gateway.proxy}/v1/audio/transcriptions"
    refused = httpx.post(
        url, files=files, data={"model": "openai/whisper-1"}, headers=live_account.headers
    )
    assert_openai_error(refused, 400, "model_not_allowed")
    response = httpx.post(
        url, files=files, data={"model": "openai/whisper-large-v3"}, headers=live_account.headers
    )
    assert response.status_code == 200, response.text
    record = settled_record()
    assert record.endpoint == "audio/transcriptions"
    assert record.requested_model == "openai/whisper-large-v3"
    assert record.billed == bill(gateway.fake.app.generations[record.generation_id or ""].charged)


@pytest.mark.parametrize("name", ["responses stream", "messages stream", "images stream"])
def test_a_client_leaving_a_stream_is_still_billed(
    gateway: Gateway, live_account: Account, name: str
) -> None:
    call = CALLS[name]
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            f"{gateway.proxy}/{call.path}",
            json=call.body,
            headers={**live_account.headers, "X-Fake-Mode": "chunks=40,chunk-delay=0.05"},
        ) as response,
    ):
        assert response.status_code == 200
        pieces = response.iter_raw()
        next(pieces)
        generation_id = response.headers["x-generation-id"]
    record = settled_record()
    generation = gateway.fake.app.generations[generation_id]
    assert record.outcome == Outcome.CLIENT_DISCONNECTED
    assert record.cost_source == CostSource.GENERATION
    assert record.billed == bill(generation.charged)
    assert CreditAccount.objects.get(user=live_account.user).in_flight == 0
    assert check_ledger() == []


@pytest.mark.parametrize("name", ["responses", "messages", "embeddings", "speech"])
def test_upstream_errors_on_every_endpoint_cost_nothing(
    gateway: Gateway, live_account: Account, name: str
) -> None:
    response = send(gateway, live_account, CALLS[name], **{"X-Fake-Mode": "status=502"})
    assert response.status_code == 502
    record = wait_for(lambda: UsageRecord.objects.first(), "the usage record")
    assert record.outcome == Outcome.UPSTREAM_ERROR
    assert record.billed == 0
    assert CreditAccount.objects.get(user=live_account.user).in_flight == 0
    assert check_ledger() == []


@pytest.mark.parametrize("name", ["responses", "messages", "embeddings", "images", "speech"])
def test_every_metered_endpoint_applies_the_allowlist_and_the_credit_gate(
    gateway: Gateway, live_account: Account, name: str
) -> None:
    call = CALLS[name]
    refused = httpx.post(
        f"{gateway.proxy}/{call.path}",
        json={**call.body, "model": "openai/gpt-4o"},
        headers=live_account.headers,
    )
    assert_openai_error(refused, 400, "model_not_allowed")
    fallback = httpx.post(
        f"{gateway.proxy}/{call.path}",
        json={**call.body, "models": ["openai/gpt-4o"]},
        headers=live_account.headers,
    )
    assert_openai_error(fallback, 400, "model_not_allowed")
    CreditAccount.objects.filter(user=live_account.user).update(balance=0)
    assert_openai_error(send(gateway, live_account, call), 402, "insufficient_credits")
    assert len(gateway.fake.app.requests) == 0


def test_anthropic_error_shape_mid_stream_is_an_upstream_error(
    gateway: Gateway, live_account: Account
) -> None:
    response = send(
        gateway, live_account, CALLS["messages stream"], **{"X-Fake-Mode": "midstream-error"}
    )
    assert response.status_code == 200
    events = [
        json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")
    ]
    assert events[-1]["type"] == "error"
    record = wait_for(
        lambda: UsageRecord.objects.exclude(settlement=Settlement.PENDING).first(),
        "the usage record to be settled",
    )
    assert record.outcome == Outcome.UPSTREAM_ERROR
    generation = gateway.fake.app.generations[record.generation_id or ""]
    assert record.billed == bill(generation.charged)
    assert check_ledger() == []
