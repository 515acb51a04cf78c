"""Operators and users see the endpoint of each record, and spend split by endpoint."""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal

from django.test import Client
from django.urls import reverse
from django.utils import timezone

from billing.models import UsageRecord
from billing.reports import spend_by_endpoint
from tests.support.accounts import Account, add_usage


def usage_on(account: Account, endpoint: str, billed: str, days_ago: float = 0) -> UsageRecord:
    record = add_usage(account.user, billed, days_ago=days_ago)
    UsageRecord.objects.filter(pk=record.pk).update(endpoint=endpoint)
    return record


def test_spend_by_endpoint_sums_the_last_period(account: Account) -> None:
    usage_on(account, "chat/completions", "1.25")
    usage_on(account, "chat/completions", "0.75")
    usage_on(account, "messages", "3")
    usage_on(account, "embeddings", "0.5", days_ago=40)  # outside the period
    rows = spend_by_endpoint(UsageRecord.objects.all(), timezone.now() - timedelta(days=30))
    assert [(r.endpoint, r.spent, r.requests) for r in rows] == [
        ("messages", Decimal(3), 1),
        ("chat/completions", Decimal(2), 2),
    ]


def test_dashboard_splits_spend_by_endpoint(admin_client: Client, account: Account) -> None:
    usage_on(account, "chat/completions", "1.25")
    usage_on(account, "messages", "3")
    usage_on(account, "responses", "0.5", days_ago=45)
    body = admin_client.get(reverse("admin:billing_dashboard")).content.decode()
    table = re.search(r'<table class="bars" id="spend-by-endpoint">(.*?)</table>', body, re.S)
    assert table is not None
    cells = re.findall(
        r"\?endpoint=[^\"]+\">([^<]+)</a>|<td class=\"amount\">([^<]+)</td>", table.group(1)
    )
    assert [link or amount for link, amount in cells] == [
        "messages",
        "1",
        "$3.00",
        "chat/completions",
        "1",
        "$1.25",
    ]
    changelist = admin_client.get(
        reverse("admin:billing_usagerecord_changelist"), {"endpoint": "messages"}
    )
    assert changelist.status_code == 200
    assert changelist.context["cl"].result_count == 1


def test_usage_api_shows_and_filters_by_endpoint(account: Account) -> None:
    usage_on(account, "chat/completions", "1")
    usage_on(account, "messages", "2")
    client = Client(headers={"X-Daemon-Token": account.token})
    everything = client.get("/api/billing/usage").json()["results"]
    assert sorted(row["endpoint"] for row in everything) == ["chat/completions", "messages"]
    only = client.get("/api/billing/usage", {"endpoint": "messages"}).json()["results"]
    assert [row["endpoint"] for row in only] == ["messages"]
