"""Billing under real concurrency: two uvicorn worker processes, one database.

Every request is recorded once and charged exactly what the provider reported
(the fake OpenRouter, in this process, is the ground truth), every balance
equals its ledger, and the in-flight bound holds across processes.
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import httpx
import pytest
from django.db.models import Sum

from billing.models import CreditAccount, Outcome, Settlement, UsageRecord
from billing.services import balance_of, check_ledger
from devtools.fake_openrouter import RunningFake
from tests.support.accounts import Account, make_account
from tests.support.processes import uvicorn_workers
from tests.support.servers import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

CHAT = {"model": "x-ai/grok-code-fast-1", "messages": [{"role": "user", "content": "Hello"}]}
# (kind, X-Fake-Mode, streamed) by request index modulo 10.
KINDS = [
    ("stream", "chunks=4", True),
    ("stream", "chunks=2,crlf", True),
    ("stream", "usage-on-finish,exp-cost", True),
    ("stream", "keepalive=3", True),
    ("json", "chunks=3", False),
    ("json", "gzip", False),
    ("disconnect", "chunks=40,chunk-delay=0.05", True),
    ("upstream-502", "status=502", False),
    ("midstream-error", "midstream-error", True),
    ("json", "cached=2", False),
]


async def one_request(client: httpx.AsyncClient, url: str, account: Account, index: int) -> str:
    kind, mode, streamed = KINDS[index % len(KINDS)]
    body = {**CHAT, "stream": streamed, "metadata": {"i": index}}
    headers = {**account.headers, "X-Fake-Mode": mode}
    async with client.stream("POST", url, json=body, headers=headers) as response:
        if kind == "disconnect":
            pieces = response.aiter_raw()
            await pieces.__anext__()
            await pieces.__anext__()
            return f"disconnected:{response.status_code}"
        await response.aread()
        return f"{kind}:{response.status_code}"


async def burst(url: str, accounts: list[Account], per_account: int) -> list[str]:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        jobs = [
            one_request(client, url, account, index * len(accounts) + n)
            for index in range(per_account)
            for n, account in enumerate(accounts)
        ]
        return await asyncio.gather(*jobs)


def test_mixed_burst_across_two_workers_bills_every_request_once(fake: RunningFake) -> None:
    users, per_user = 25, 8
    accounts = [make_account(f"user{n}") for n in range(users)]
    started = time.monotonic()
    with uvicorn_workers(2, fake.base_url, BILLING_MAX_IN_FLIGHT=per_user) as url:
        results = asyncio.run(
            burst(f"{url}/api/proxy/openrouter/v1/chat/completions", accounts, per_user)
        )
        settled = wait_until(lambda: not UsageRecord.objects.pending().exists(), timeout=30)
    elapsed = time.monotonic() - started
    total = users * per_user
    assert len(results) == total
    assert results.count("upstream-502:502") == total // 10
    assert all(result.endswith(":200") for result in results if "502" not in result)
    assert settled, "pending records were not settled in-process"

    records = list(UsageRecord.objects.all())
    assert len(records) == total  # every request recorded, none twice
    generations = {gid: g for gid, g in fake.app.generations.items()}
    by_generation = {r.generation_id: r for r in records if r.generation_id}
    assert set(by_generation) == set(generations)
    for generation_id, generation in generations.items():
        assert by_generation[generation_id].billed == generation.total_cost, generation_id
    for record in records:
        if record.generation_id is None:
            assert record.outcome == Outcome.UPSTREAM_ERROR
            assert record.billed == 0
        assert record.settlement == Settlement.SETTLED
    disconnected = [r for r in records if r.outcome == Outcome.CLIENT_DISCONNECTED]
    assert len(disconnected) == total // 10
    for account in accounts:
        billed = UsageRecord.objects.for_user(account.user).aggregate(s=Sum("billed"))["s"]
        assert balance_of(account.user) == Decimal(10) - billed
    assert set(CreditAccount.objects.values_list("in_flight", flat=True)) == {0}
    assert check_ledger() == []
    grand_total = sum((g.total_cost for g in generations.values()), Decimal(0))
    print(
        f"\n{total} concurrent requests through 2 workers in {elapsed:.1f}s: "
        f"{len(records)} records, {len(disconnected)} client disconnects settled, "
        f"{total // 10} upstream errors, billed ${grand_total} == provider-reported, "
        f"ledger clean"
    )


def test_in_flight_bound_holds_across_workers(fake: RunningFake) -> None:
    account = make_account("tiny", credit="0.000001")
    limit, attempts = 2, 40

    async def fire(url: str) -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:

            async def one(index: int) -> int:
                response = await client.post(
                    url,
                    json={**CHAT, "stream": True, "metadata": {"i": index}},
                    headers={**account.headers, "X-Fake-Mode": "chunks=5,chunk-delay=0.1"},
                )
                return response.status_code

            return await asyncio.gather(*(one(i) for i in range(attempts)))

    with uvicorn_workers(2, fake.base_url, BILLING_MAX_IN_FLIGHT=limit) as url:
        statuses = asyncio.run(fire(f"{url}/api/proxy/openrouter/v1/chat/completions"))
    admitted = statuses.count(200)
    assert 1 <= admitted <= limit
    assert set(statuses) <= {200, 429, 402}
    records = list(UsageRecord.objects.all())
    assert len(records) == admitted
    worst_single = max(r.billed for r in records)
    balance = balance_of(account.user)
    assert balance >= Decimal("0.000001") - limit * worst_single
    assert check_ledger() == []
    print(
        f"\n{attempts} simultaneous requests at a balance of $0.000001, limit {limit} in flight: "
        f"{admitted} admitted, {statuses.count(429)} x 429, {statuses.count(402)} x 402, "
        f"final balance ${balance} (bound: -{limit} x ${worst_single})"
    )
