"""One invariant over every metered endpoint: what the fake generated is what was charged.

Two uvicorn workers on one database, a mixed run over every metered endpoint
(streamed and not, clients that leave mid-stream, mid-stream errors, upstream
5xx), with closed paths and catalogue reads mixed in. Afterwards the sum of
the ledger's usage rows equals the sum of the costs the fake generated,
exactly; every generation has its record; ``check_ledger`` is clean; no slot
is held; and no closed path ever reached the fake.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from decimal import Decimal
from typing import Any

import httpx
import pytest
from django.db.models import Sum

from billing.models import CreditAccount, Settlement, UsageRecord
from billing.services import balance_of, check_ledger
from devtools.fake_openrouter import RunningFake
from tests.support.accounts import make_account
from tests.support.books import assert_each_request_charged_once
from tests.support.endpoints import CLOSED, OPEN
from tests.support.faults.common import report
from tests.support.processes import uvicorn_workers
from tests.support.requests import ALLOWED, CALLS, Call
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

PREFIX = "/api/proxy/openrouter"
LEAVE = "chunks=30,chunk-delay=0.03"
#: (mode, leaves after the first chunk); streamed calls get every mode, JSON calls the first two.
MODES = [("", False), ("status=502", False), (LEAVE, True), ("midstream-error", False)]


def plan() -> list[tuple[Call, str, bool]]:
    runs: list[tuple[Call, str, bool]] = []
    for call in CALLS.values():
        modes = MODES if call.streamed else MODES[:2]
        runs += [(call, mode, leaves) for mode, leaves in modes]
    return runs


def test_every_generation_is_charged_exactly_once_and_closed_paths_stay_closed(
    fake: RunningFake,
) -> None:
    accounts = [make_account(f"mixed{n}") for n in range(4)]
    runs = plan() * 2

    async def traffic(url: str) -> list[int]:
        limits = httpx.Limits(max_connections=48)
        async with httpx.AsyncClient(base_url=url + PREFIX, timeout=60, limits=limits) as client:

            async def metered(index: int, call: Call, mode: str, leaves: bool) -> int:
                account = accounts[index % len(accounts)]
                headers = {**account.headers, **({"X-Fake-Mode": mode} if mode else {})}
                request = client.build_request(
                    "POST", f"/{call.path}", json=call.body, headers=headers
                )
                response = await client.send(request, stream=True)
                try:
                    if leaves and response.status_code == 200:
                        await response.aiter_raw().__anext__()
                    else:
                        await response.aread()
                finally:
                    await response.aclose()
                return response.status_code

            async def probe(index: int) -> int:
                account = accounts[index % len(accounts)]
                path = CLOSED[index % len(CLOSED)] if index % 2 else OPEN[index % len(OPEN)]
                response = await client.get(f"/{path}", headers=account.headers)
                return response.status_code

            jobs: list[Any] = [metered(i, *run) for i, run in enumerate(runs)]
            jobs += [probe(i) for i in range(60)]
            return list(await asyncio.gather(*jobs))

    env = {"OPENROUTER_ALLOWED_MODELS": ",".join(ALLOWED), "BILLING_MAX_IN_FLIGHT": 64}
    with uvicorn_workers(2, fake.base_url, **env) as url:
        statuses = Counter(asyncio.run(traffic(url)))
        wait_for(
            lambda: not UsageRecord.objects.pending().exists(),
            "every pending record to settle from generation stats",
            timeout=60,
        )

    assert set(statuses) <= {200, 404, 502}, statuses
    records = list(UsageRecord.objects.all())
    assert len(records) == len(runs)
    generations = fake.app.generations
    assert {r.generation_id for r in records if r.generation_id} == set(generations)
    assert not [r for r in records if r.settlement != Settlement.SETTLED]
    charged = assert_each_request_charged_once(generations)
    assert charged > 0
    for account in accounts:
        billed = UsageRecord.objects.for_user(account.user).aggregate(s=Sum("billed"))["s"]
        assert balance_of(account.user) == Decimal(10) - billed
    assert set(CreditAccount.objects.values_list("in_flight", flat=True)) == {0}
    assert check_ledger() == []
    reached = {seen.path.removeprefix("/api/") for seen in fake.app.requests}
    allowed = {call.path for call in CALLS.values()} | set(OPEN) | {"v1/generation"}
    assert reached <= allowed, reached - allowed
    assert not reached & set(CLOSED)
    report(
        "every metered endpoint, two workers",
        requests=sum(statuses.values()),
        statuses=dict(statuses),
        records=len(records),
        endpoints=dict(Counter(r.endpoint for r in records)),
        generations=len(generations),
        charged_total=charged,
        generated_total=sum((g.charged for g in generations.values()), Decimal(0)),
        closed_paths_reaching_the_fake=len(reached & set(CLOSED)),
    )
