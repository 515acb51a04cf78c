"""Two "hosts": two separate server processes, one database.

Nothing a worker keeps in memory may matter for money: keys, balances,
in-flight counts and records live in the database. Here two independent
``uvicorn`` servers (one worker each, different ports, as two machines behind
a load balancer would be) share the test database, and the clients spread
their requests over both. Billing stays exact, and the in-flight bound, and
with it the overspend bound, holds across the two, not per host.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from decimal import Decimal
from typing import Any

import httpx
import pytest
from django.db.models import Sum

from billing.models import CreditAccount, Outcome, Settlement, UsageRecord
from billing.services import balance_of, check_ledger
from devtools.fake_openrouter import RunningFake
from tests.support.accounts import make_account
from tests.support.books import assert_each_request_charged_once
from tests.support.faults.common import CHAT, report
from tests.support.processes import uvicorn_workers
from tests.support.servers import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

PATH = "/api/proxy/openrouter/v1/chat/completions"
MODES = [
    ("chunks=3", False),
    ("chunks=4", True),
    ("usage-on-finish", True),
    ("gzip", False),
    ("status=502", False),
    ("chunks=30,chunk-delay=0.02", True),  # the client leaves after two reads
]


class PeakSampler:
    """Samples a counter in a thread and keeps its highest value."""

    def __init__(self, read: Any) -> None:
        self.read = read
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(0.002)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def test_billing_is_exact_across_two_hosts(fake: RunningFake) -> None:
    accounts = [make_account(f"host-user{n}") for n in range(10)]
    per_user = 12

    async def traffic(hosts: list[str]) -> list[tuple[str, int, bool]]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:

            async def one(index: int) -> tuple[str, int, bool]:
                account = accounts[index % len(accounts)]
                host = hosts[index % 2]
                mode, stream = MODES[index % len(MODES)]
                body = {**CHAT, "stream": stream, "metadata": {"i": index}}
                headers = {**account.headers, "X-Fake-Mode": mode}
                async with client.stream("POST", host + PATH, json=body, headers=headers) as r:
                    if "chunk-delay" in mode and r.status_code == 200:
                        pieces = r.aiter_raw()
                        await pieces.__anext__()
                        await pieces.__anext__()
                        return host, r.status_code, True
                    await r.aread()
                    return host, r.status_code, False

            return await asyncio.gather(*(one(i) for i in range(len(accounts) * per_user)))

    with (
        uvicorn_workers(1, fake.base_url) as host_a,
        uvicorn_workers(1, fake.base_url) as host_b,
    ):
        results = asyncio.run(traffic([host_a, host_b]))
        settled = wait_until(lambda: not UsageRecord.objects.pending().exists(), timeout=30)
    assert settled
    per_host = Counter(host for host, _, _ in results)
    assert per_host[host_a] == per_host[host_b] == len(results) // 2
    statuses = Counter(status for _, status, _ in results)
    # 429: more than BILLING_MAX_IN_FLIGHT of one user's requests at once.
    assert set(statuses) <= {200, 502, 429}
    records = list(UsageRecord.objects.all())
    assert len(records) == len(results) - statuses[429]
    generations = fake.app.generations
    with_generation = {r.generation_id: r for r in records if r.generation_id}
    assert set(with_generation) == set(generations)  # none lost, none invented
    # Charged once each: one ledger row per charged request, adding up to the fake's costs.
    ledger_total = assert_each_request_charged_once(generations)
    for generation_id, record in with_generation.items():
        assert record.billed == generations[generation_id].total_cost
        assert record.settlement == Settlement.SETTLED
    for account in accounts:
        billed = UsageRecord.objects.for_user(account.user).aggregate(s=Sum("billed"))["s"]
        assert balance_of(account.user) == Decimal(10) - billed
    assert set(CreditAccount.objects.values_list("in_flight", flat=True)) == {0}
    assert check_ledger() == []
    report(
        "two hosts, one database",
        requests=len(results),
        per_host=sorted(per_host.values()),
        statuses=dict(statuses),
        client_disconnects=sum(1 for *_, left in results if left),
        records=len(records),
        billed_total=ledger_total,
        ledger_mismatches=0,
    )


def test_in_flight_and_overspend_bounds_hold_across_hosts(fake: RunningFake) -> None:
    """A nearly empty account, N=2, 40 slow streams at once over two hosts."""
    limit, attempts = 2, 40
    start_balance = Decimal("0.000001")
    account = make_account("thin", credit=str(start_balance))

    async def fire(hosts: list[str]) -> list[tuple[str, int]]:
        async with httpx.AsyncClient(timeout=60) as client:

            async def one(index: int) -> tuple[str, int]:
                host = hosts[index % 2]
                response = await client.post(
                    host + PATH,
                    json={**CHAT, "stream": True, "metadata": {"i": index}},
                    headers={**account.headers, "X-Fake-Mode": "chunks=5,chunk-delay=0.1"},
                )
                return host, response.status_code

            return await asyncio.gather(*(one(i) for i in range(attempts)))

    env = {"BILLING_MAX_IN_FLIGHT": limit}
    with (
        uvicorn_workers(1, fake.base_url, **env) as host_a,
        uvicorn_workers(1, fake.base_url, **env) as host_b,
        PeakSampler(lambda: fake.app.open_streams) as streams,
    ):
        results = asyncio.run(fire([host_a, host_b]))
    statuses = Counter(status for _, status in results)
    admitted = statuses[200]
    assert set(statuses) <= {200, 402, 429}
    assert 1 <= admitted <= limit
    # Never more than N of this user's generations running at once, on both hosts together.
    assert streams.peak <= limit
    records = list(UsageRecord.objects.all())
    assert len(records) == admitted
    assert all(r.outcome == Outcome.COMPLETED for r in records)
    worst = max(r.billed for r in records)
    balance = balance_of(account.user)
    assert balance >= start_balance - limit * worst
    assert CreditAccount.objects.get(user=account.user).in_flight == 0
    assert check_ledger() == []
    report(
        "in-flight bound across two hosts",
        attempts=attempts,
        limit=limit,
        admitted=admitted,
        admitted_per_host=dict(Counter(h[-5:] for h, s in results if s == 200)),
        refused_429=statuses[429],
        refused_402=statuses[402],
        peak_concurrent_upstream_streams=streams.peak,
        start_balance=start_balance,
        final_balance=balance,
        overspend=max(Decimal(0), -balance),
        bound=limit * worst,
    )


def test_in_flight_bound_holds_across_hosts_under_sustained_load(fake: RunningFake) -> None:
    """A funded user, N=3, a new slow stream every 25 ms for 2 s, alternating hosts."""
    limit, attempts = 3, 80
    account = make_account("busy", credit="10")

    async def stagger(hosts: list[str]) -> list[tuple[str, int]]:
        async with httpx.AsyncClient(timeout=60) as client:

            async def one(index: int) -> tuple[str, int]:
                await asyncio.sleep(index * 0.025)
                host = hosts[index % 2]
                response = await client.post(
                    host + PATH,
                    json={**CHAT, "stream": True, "metadata": {"i": index}},
                    headers={**account.headers, "X-Fake-Mode": "chunks=4,chunk-delay=0.1"},
                )
                return host, response.status_code

            return await asyncio.gather(*(one(i) for i in range(attempts)))

    env = {"BILLING_MAX_IN_FLIGHT": limit}
    with (
        uvicorn_workers(1, fake.base_url, **env) as host_a,
        uvicorn_workers(1, fake.base_url, **env) as host_b,
        PeakSampler(lambda: fake.app.open_streams) as streams,
    ):
        results = asyncio.run(stagger([host_a, host_b]))
    admitted = Counter(host for host, status in results if status == 200)
    statuses = Counter(status for _, status in results)
    assert set(statuses) <= {200, 429}
    assert admitted[host_a] > 0
    assert admitted[host_b] > 0  # both hosts took requests...
    assert streams.peak <= limit  # ...and together never ran more than N at once
    assert UsageRecord.objects.count() == statuses[200]
    assert CreditAccount.objects.get(user=account.user).in_flight == 0
    assert check_ledger() == []
    report(
        "sustained in-flight bound across two hosts",
        attempts=attempts,
        limit=limit,
        admitted_host_a=admitted[host_a],
        admitted_host_b=admitted[host_b],
        refused_429=statuses[429],
        peak_concurrent_upstream_streams=streams.peak,
    )
