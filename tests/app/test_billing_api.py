from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from billing.models import CostSource, Outcome, Settlement, UsageRecord
from billing.services import grant_credits
from openrouter_proxy.errors import INVALID_API_KEY
from tests.support.accounts import Account, make_account


@pytest.fixture
def api() -> APIClient:
    return APIClient()


def add_record(account: Account, minutes_ago: int, model: str, billed: str) -> UsageRecord:
    return UsageRecord.objects.create(
        request_id=uuid.uuid4(),
        user=account.user,
        model=model,
        requested_model=model,
        endpoint="chat/completions",
        streamed=True,
        outcome=Outcome.COMPLETED,
        settlement=Settlement.SETTLED,
        cost_source=CostSource.PROVIDER,
        generation_id=f"gen-{uuid.uuid4()}",
        prompt_tokens=10,
        completion_tokens=5,
        provider_cost=Decimal(billed),
        billed=Decimal(billed),
        created_at=timezone.now() - timedelta(minutes=minutes_ago),
    )


@pytest.mark.parametrize("header", ["X-Daemon-Token", "Authorization"])
def test_balance(api: APIClient, account: Account, header: str) -> None:
    value = account.token if header == "X-Daemon-Token" else f"Bearer {account.token}"
    response = api.get("/api/billing/balance", headers={header: value})
    assert response.status_code == 200
    assert response.json() == {"balance": "10.00", "currency": "USD", "user": "alice"}


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"X-Daemon-Token": "tg_bad"}, 401), ({"Authorization": "Bearer nope"}, 401)],
)
def test_unauthenticated_calls_get_openai_style_errors(
    api: APIClient, db: None, headers: dict[str, str], status: int
) -> None:
    response = api.get("/api/billing/balance", headers=headers)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == "authentication_error"
    assert error["message"]
    assert error["code"]


def test_a_bad_key_is_refused_as_the_proxy_refuses_it(api: APIClient, db: None) -> None:
    response = api.get("/api/billing/balance", headers={"X-Daemon-Token": "tg_bad"})
    assert response.status_code == INVALID_API_KEY.status
    assert response.json() == INVALID_API_KEY.payload()


def test_revoked_key_is_refused(api: APIClient, account: Account) -> None:
    account.key.revoke()
    response = api.get("/api/billing/balance", headers=account.headers)
    assert response.status_code == 401
    assert "revoked" in response.json()["error"]["message"]
    assert response.json()["error"]["code"] == INVALID_API_KEY.code


def test_usage_is_newest_first_paginated_and_only_the_callers(
    api: APIClient, account: Account
) -> None:
    other = make_account("bob")
    add_record(other, 1, "x-ai/grok-code-fast-1", "0.5")
    for minutes in range(60, 0, -1):
        add_record(account, minutes, "x-ai/grok-code-fast-1", "0.0000195")
    first = api.get("/api/billing/usage", {"page_size": 25}, headers=account.headers).json()
    assert first["count"] == 60
    assert len(first["results"]) == 25
    assert first["next"] is not None
    assert first["previous"] is None
    created = [row["created"] for row in first["results"]]
    assert created == sorted(created, reverse=True)
    row = first["results"][0]
    assert row["cost"] == "0.0000195"
    assert row["status"] == "completed"
    assert {
        "id",
        "model",
        "endpoint",
        "streamed",
        "prompt_tokens",
        "completion_tokens",
        "generation_id",
    } <= set(row)


def test_usage_filters(api: APIClient, account: Account) -> None:
    add_record(account, 5, "x-ai/grok-code-fast-1", "0.1")
    add_record(account, 50, "z-ai/glm-4.6", "0.2")
    add_record(account, 500, "z-ai/glm-4.6", "0.3")
    by_model = api.get(
        "/api/billing/usage", {"model": "z-ai/glm-4.6"}, headers=account.headers
    ).json()
    assert [r["cost"] for r in by_model["results"]] == ["0.20", "0.30"]
    since = (timezone.now() - timedelta(minutes=100)).isoformat()
    until = (timezone.now() - timedelta(minutes=10)).isoformat()
    window = api.get(
        "/api/billing/usage", {"since": since, "until": until}, headers=account.headers
    )
    assert [r["cost"] for r in window.json()["results"]] == ["0.20"]


def test_bad_time_filter_is_a_clear_400(api: APIClient, account: Account) -> None:
    response = api.get("/api/billing/usage", {"since": "yesterday"}, headers=account.headers)
    assert response.status_code == 400
    assert "ISO 8601" in response.json()["error"]["message"]


def test_ledger(api: APIClient, account: Account) -> None:
    grant_credits(account.user, Decimal("20"), note="top-up")
    body: Any = api.get("/api/billing/ledger", headers=account.headers).json()
    assert body["count"] == 2
    assert [(r["kind"], r["amount"]) for r in body["results"]] == [
        ("grant", "20.00"),
        ("grant", "10.00"),
    ]
    assert body["results"][0]["note"] == "top-up"
    assert api.get("/api/billing/balance", headers=account.headers).json()["balance"] == "30.00"


@pytest.mark.parametrize(
    "value",
    ["1115-12-31T22:34:18.84+16:05", "0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00"],
)
def test_time_filters_at_the_edges_are_400_or_answered_never_500(
    api: APIClient, account: Account, value: str
) -> None:
    response = api.get(
        "/api/billing/usage", {"until": value, "since": value}, headers=account.headers
    )
    assert response.status_code in {200, 400}
    if response.status_code == 400:
        assert "ISO 8601" in response.json()["error"]["message"]
