"""The settings every test runs with, accounts with credit and a key, and the live gateway."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.utils import timezone

from billing.models import CostSource, Outcome, Settlement, UsageRecord
from billing.services import grant_credits
from devtools.fake_openrouter import RunningFake
from terragon.apikeys.models import ApiKey

SERVER_KEY = "sk-or-test-server-key-0123456789"

#: The fake's echo route, opened for the tests of what crosses the proxy.
ECHO_ENDPOINTS = [{"path": "echo/**", "policy": "open", "methods": ["GET", "POST", "PUT"]}]


BROKEN_VERIFIER = "tests.support.accounts.broken_verifier"


def broken_verifier(token: str) -> None:
    """A key verifier whose database is unreachable (point the setting at BROKEN_VERIFIER)."""
    from django.db import OperationalError

    raise OperationalError("could not connect to server: Connection refused")


@dataclass
class Account:
    user: Any
    token: str
    key: ApiKey

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Daemon-Token": self.token}


def make_account(username: str = "alice", credit: Decimal | str | None = "10") -> Account:
    user = get_user_model().objects.create_user(username=username, email=f"{username}@example.com")
    if credit is not None and Decimal(credit) != 0:
        grant_credits(user, Decimal(credit), note="test credit")
    key, token = ApiKey.objects.issue(user, name="test")
    return Account(user=user, token=token, key=key)


def add_usage(
    user: Any,
    billed: str,
    *,
    model: str = "x-ai/grok-code-fast-1",
    outcome: str = Outcome.COMPLETED,
    settlement: str = Settlement.SETTLED,
    days_ago: float = 0,
    tokens: int = 100,
) -> UsageRecord:
    return UsageRecord.objects.create(
        request_id=uuid.uuid4(),
        user=user,
        model=model,
        requested_model=model,
        endpoint="chat/completions",
        streamed=True,
        outcome=outcome,
        settlement=settlement,
        cost_source=CostSource.PROVIDER,
        generation_id=f"gen-{uuid.uuid4()}",
        prompt_tokens=tokens,
        completion_tokens=tokens // 10,
        billed=Decimal(billed),
        provider_cost=Decimal(billed),
        created_at=timezone.now() - timedelta(days=days_ago),
    )


@dataclass
class Gateway:
    url: str
    fake: RunningFake

    @property
    def proxy(self) -> str:
        return f"{self.url}/api/proxy/openrouter"
