"""A soak run: thousands of requests through two worker processes, then the books.

Short by default (``SOAK_REQUESTS``, 2,000, well under a minute); ``make soak``
runs 20,000. The mix is 10 % client disconnects and 5 % upstream failures
(see ``tests/support/soak.py``). The run is split in two halves; the workers are
sampled at the start and at the end of the second half, when allocators,
pools and caches have warmed up, and nothing may have grown: memory, open
file descriptors, sockets to the upstream, database connections (a worker's
may still fill up to its bound, one per database thread and per admission
connection of its event loop), background tasks. Then every request that
reached admission must have exactly one usage record, every generation the
fake served must be billed exactly what it cost, and every balance must equal
its ledger.
"""

from __future__ import annotations

import asyncio
import os
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.db.models import Sum

from billing.conf import billing_settings
from billing.models import CreditAccount, Outcome, Settlement, UsageRecord
from billing.services import balance_of, check_ledger
from devtools.fake_openrouter import FakeOpenRouter, run_fake_openrouter
from openrouter_proxy.conf import proxy_settings
from tests.support import soak
from tests.support.accounts import SERVER_KEY, make_account
from tests.support.books import assert_each_request_charged_once
from tests.support.faults.common import report
from tests.support.faults.launch import ServerProcess, server_process
from tests.support.faults.procfs import ProcUnavailable, connections_of_to, require_proc
from tests.support.servers import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

REQUESTS = int(os.environ.get("SOAK_REQUESTS", "2000"))
CONCURRENCY = int(os.environ.get("SOAK_CONCURRENCY", "24"))
# A hard stop for each half, whatever the machine: the run ends by itself.
DEADLINE = float(os.environ.get("SOAK_DEADLINE", str(max(120, REQUESTS / 10))))
USERS = 20
# Growth allowed between the two samples (the second half is as long as the first).
RSS_SLACK = 24 * 2**20


def database_connections() -> int | None:
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        )
        row = cursor.fetchone()
    return int(row[0]) if row else None


def database_sockets(server: ServerProcess) -> dict[int, int]:
    """Each worker's connections to the database server."""
    port = int(connection.settings_dict.get("PORT") or 5432)
    return {pid: connections_of_to(pid, port) for pid in server.workers}


def sample(server: ServerProcess, upstream_port: int) -> dict[str, Any]:
    probes = server.probe_all()
    assert set(probes) == set(server.workers), (probes, server.workers)
    upstream = {pid: connections_of_to(pid, upstream_port) for pid in server.workers}
    return {
        "rss": {pid: probe["rss"] for pid, probe in probes.items()},
        # Idle keep-alive connections to the upstream come and go with load;
        # they are counted (and bounded) separately.
        "fds": {pid: probe["fds"] - upstream[pid] for pid, probe in probes.items()},
        "pending_tasks": sum(probe["pending_tasks"] for probe in probes.values()),
        "asyncio_tasks": sum(probe["asyncio_tasks"] for probe in probes.values()),
        "upstream_sockets": sum(upstream.values()),
        "db_connections": database_connections(),
        "db_sockets": database_sockets(server),
    }


def idle(server: ServerProcess, upstream_port: int) -> dict[str, Any]:
    """A sample once every record is settled and the workers' tasks are done."""
    assert wait_until(lambda: not UsageRecord.objects.pending().exists(), timeout=60)
    assert wait_until(lambda: sample(server, upstream_port)["pending_tasks"] == 0, timeout=30)
    return sample(server, upstream_port)


def mb(value: int) -> float:
    return round(value / 2**20, 1)


def test_soak_two_workers_nothing_lost_nothing_grows(tmp_path: Path) -> None:
    try:
        require_proc()
    except ProcUnavailable as missing:
        pytest.skip(str(missing))
    accounts = [make_account(f"soak{n}", credit="100") for n in range(USERS)]
    tokens = [account.token for account in accounts]
    kinds = soak.plan(REQUESTS, seed=7)
    half = len(kinds) // 2
    fake_app = FakeOpenRouter(generation_delay=0.2, api_key=SERVER_KEY)
    with (
        run_fake_openrouter(fake_app) as fake,
        server_process(2, fake.base_url, tmp_path / "server.log") as server,
    ):
        first = asyncio.run(soak.run(server.url, tokens, kinds[:half], CONCURRENCY, DEADLINE))
        middle = idle(server, fake.port)
        second = asyncio.run(
            soak.run(server.url, tokens, kinds[half:], CONCURRENCY, DEADLINE, offset=half)
        )
        end = idle(server, fake.port)
        log = server.log()
    outcomes = first.outcomes + second.outcomes
    assert not first.stopped_by_deadline
    assert not second.stopped_by_deadline
    assert len(outcomes) == len(kinds)

    # What the clients saw: only the statuses the mix asks for.
    errors = [o for o in outcomes if o.error]
    assert errors == [], errors[:5]
    for outcome in outcomes:
        expected = {200, 429}  # 429: a user's in-flight bound, never a failure
        if outcome.kind.mode.startswith("status="):
            expected = {int(outcome.kind.mode.split("=")[1]), 429}
        assert outcome.status in expected, (outcome.kind, outcome.status)
    refused = sum(1 for o in outcomes if o.status == 429)
    admitted = len(outcomes) - refused

    # Every admitted request recorded once; every generation billed exactly once.
    records = list(UsageRecord.objects.all())
    assert len(records) == admitted
    generations = fake_app.generations
    by_generation: dict[str, UsageRecord] = {}
    for record in records:
        assert record.settlement == Settlement.SETTLED, record
        if record.generation_id is None:
            assert record.outcome == Outcome.UPSTREAM_ERROR
            assert record.billed == 0
        else:
            by_generation[record.generation_id] = record
    assert set(by_generation) == set(generations)  # none lost, none invented
    # Charged once each: one ledger row per charged request, adding up to the fake's costs.
    assert_each_request_charged_once(generations)
    mismatched = [
        gid for gid, record in by_generation.items() if record.billed != generations[gid].total_cost
    ]
    assert mismatched == []
    disconnected = sum(1 for r in records if r.outcome == Outcome.CLIENT_DISCONNECTED)
    assert disconnected == sum(
        1 for o in outcomes if o.kind.group == "disconnect" and o.status == 200
    )
    for account in accounts:
        billed = UsageRecord.objects.for_user(account.user).aggregate(s=Sum("billed"))["s"]
        assert balance_of(account.user) == Decimal(100) - (billed or 0)
    assert set(CreditAccount.objects.values_list("in_flight", flat=True)) == {0}
    mismatches = check_ledger()
    assert mismatches == []

    # Nothing grew over the second half.
    growth = {pid: end["rss"][pid] - middle["rss"][pid] for pid in server.workers}
    assert all(delta < RSS_SLACK for delta in growth.values()), growth
    fd_growth = {pid: end["fds"][pid] - middle["fds"][pid] for pid in server.workers}
    assert all(delta <= 4 for delta in fd_growth.values()), (middle["fds"], end["fds"])
    assert end["upstream_sockets"] <= max(middle["upstream_sockets"], 2 * CONCURRENCY)
    assert end["pending_tasks"] == 0
    if end["db_connections"] is not None:
        # A worker opens its connections as load needs them, up to its bound (one per
        # database thread, and the event loop's admission connections): the second
        # half may still fill them up, never past it. Anyone else's must not grow.
        bound = proxy_settings.DB_THREADS + billing_settings.ADMISSION_CONNECTIONS
        assert all(count <= bound for count in end["db_sockets"].values()), end["db_sockets"]
        others = {
            name: taken["db_connections"] - sum(taken["db_sockets"].values())
            for name, taken in (("middle", middle), ("end", end))
        }
        assert others["end"] <= others["middle"] + 2, others
    assert "Traceback" not in log, log[-3000:]

    summary = {
        **{f"first_{k}": v for k, v in first.summary().items() if k in ("requests", "seconds")},
        **second.summary(),
    }
    report(
        f"soak {len(kinds)} requests, 2 workers, {connection.vendor}",
        requests=len(outcomes),
        admitted=admitted,
        refused_in_flight_429=refused,
        records=len(records),
        generations=len(generations),
        client_disconnects=disconnected,
        upstream_failures=sum(1 for o in outcomes if o.kind.group == "failure"),
        records_lost=len(set(generations) - set(by_generation)),
        charged_twice=0,
        billing_mismatches=len(mismatched),
        ledger_mismatches=len(mismatches),
        rss_mb_middle={pid: mb(v) for pid, v in middle["rss"].items()},
        rss_mb_end={pid: mb(v) for pid, v in end["rss"].items()},
        fds_middle=middle["fds"],
        fds_end=end["fds"],
        upstream_sockets=(middle["upstream_sockets"], end["upstream_sockets"]),
        db_connections=(middle["db_connections"], end["db_connections"]),
        db_connections_of_workers=(middle["db_sockets"], end["db_sockets"]),
        pending_tasks=(middle["pending_tasks"], end["pending_tasks"]),
        second_half=summary,
        total_seconds=round(first.elapsed + second.elapsed, 1),
        wall_clock=time.strftime("%H:%M:%S"),
    )
