"""Charges survive a worker crash and a deploy.

Every admitted request leaves a write-ahead trace; a worker that dies stops
beating, and its traces become usage records (pending when the upstream had
answered, settled from generation stats). Here: the trace's life through the
gateway, recovery rules in-process, a worker killed with SIGKILL mid-stream on
two workers, a user's slots coming back, and SIGTERM letting streams finish.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal
from io import StringIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.core.management import call_command
from django.db import DatabaseError, OperationalError, connection
from django.utils import timezone

from billing import recovery
from billing.meter import BillingMeter
from billing.models import (
    CreditAccount,
    OpenRequest,
    Outcome,
    Settlement,
    UsageRecord,
    WorkerHeartbeat,
)
from billing.recovery import (
    beat,
    mark_answered,
    recover_lost_requests,
    worker_id,
)
from billing.services import balance_of, check_ledger, record_usage
from devtools.fake_openrouter import RunningFake
from openrouter_proxy.metering import MeteredRequest, UsageDraft
from tests.support.accounts import SERVER_KEY, Account, Gateway, make_account
from tests.support.books import assert_each_request_charged_once
from tests.support.faults.common import report
from tests.support.faults.launch import server_process
from tests.support.requests import STREAM_CHAT, post
from tests.support.waiting import wait_for

PATH = "/api/proxy/openrouter/v1/chat/completions"
#: Two-second streams: 50 pieces 40 ms apart.
SLOW = "chunks=50,chunk-delay=0.04"
# A live worker's beat can wait seconds for SQLite's write lock while 60 streams record:
# the staleness delay leaves room for that, or a live worker's streams would be recovered.
FAST_RECOVERY = {"BILLING_WORKER_HEARTBEAT": "0.3", "BILLING_WORKER_STALE_AFTER": "3"}


# --- The trace through the gateway, and the recovery rules ------------------------------


def test_a_request_leaves_no_trace_once_recorded(gateway: Gateway, live_account: Account) -> None:
    response = post(gateway, live_account, STREAM_CHAT)
    assert response.status_code == 200
    record = wait_for(lambda: UsageRecord.objects.first(), "the usage record")
    wait_for(lambda: not OpenRequest.objects.exists(), "the trace to be removed")
    assert record.outcome == Outcome.COMPLETED
    # The worker that served it beats (its first beat starts beside the first admission).
    wait_for(
        lambda: WorkerHeartbeat.objects.filter(worker=worker_id()).exists(),
        "the worker's first heartbeat",
    )


def test_the_trace_knows_the_generation_while_the_stream_runs(
    gateway: Gateway, live_account: Account
) -> None:
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            f"{gateway.proxy}/v1/chat/completions",
            json=STREAM_CHAT,
            headers={**live_account.headers, "X-Fake-Mode": SLOW},
        ) as response,
    ):
        generation_id = response.headers["x-generation-id"]
        trace = wait_for(
            lambda: OpenRequest.objects.filter(generation_id=generation_id).first(),
            "the trace to learn the generation id",
        )
        assert trace.user_id == live_account.user.pk
        assert trace.endpoint == "chat/completions"
        assert trace.streamed
        assert not UsageRecord.objects.exists()
        response.read()
    wait_for(lambda: not OpenRequest.objects.exists(), "the trace to be removed")


def dead_trace(account: Account, *, generation_id: str = "", age: float = 120) -> OpenRequest:
    """A trace left by a worker that stopped beating ``age`` seconds ago."""
    dead = uuid.uuid4()
    then = timezone.now() - timedelta(seconds=age)
    WorkerHeartbeat.objects.create(worker=dead, host="gone", pid=1, seen_at=then)
    return OpenRequest.objects.create(
        request_id=uuid.uuid4(),
        user=account.user,
        api_key_id=account.key.pk,
        endpoint="chat/completions",
        requested_model="x-ai/grok-code-fast-1",
        streamed=True,
        generation_id=generation_id,
        worker=dead,
        created_at=then,
    )


def hold_slot(account: Account) -> None:
    CreditAccount.objects.filter(user=account.user).update(
        in_flight=1, in_flight_expires_at=timezone.now() + timedelta(minutes=30)
    )


def test_a_dead_workers_answered_request_becomes_pending_and_keeps_its_slot(
    account: Account,
) -> None:
    hold_slot(account)
    trace = dead_trace(account, generation_id="gen-lost-1")
    [recovered] = recover_lost_requests()
    record = UsageRecord.objects.get(request_id=trace.request_id)
    assert recovered.generation_id == "gen-lost-1"
    assert record.outcome == Outcome.WORKER_LOST
    assert record.settlement == Settlement.PENDING
    assert record.generation_id == "gen-lost-1"
    assert record.holds_slot
    assert record.api_key_id == account.key.pk
    assert record.created_at == trace.created_at
    assert CreditAccount.objects.get(user=account.user).in_flight == 1
    assert not OpenRequest.objects.exists()
    assert recover_lost_requests() == []  # idempotent


def test_a_dead_workers_unanswered_request_is_unpriced_and_frees_its_slot(
    account: Account,
) -> None:
    hold_slot(account)
    trace = dead_trace(account)
    recover_lost_requests()
    record = UsageRecord.objects.get(request_id=trace.request_id)
    assert record.settlement == Settlement.UNPRICED
    assert record.billed == 0
    assert "before the upstream answered" in record.error_message
    assert CreditAccount.objects.get(user=account.user).in_flight == 0
    assert check_ledger() == []


def test_a_trace_whose_record_exists_is_only_dropped(account: Account) -> None:
    trace = dead_trace(account, generation_id="gen-done")
    record_usage(
        UsageDraft(
            request_id=trace.request_id,
            user_id=account.user.pk,
            endpoint="chat/completions",
            streamed=True,
            outcome=Outcome.COMPLETED,
            holds_slot=False,
        )
    )
    assert recover_lost_requests() == []
    assert UsageRecord.objects.count() == 1
    assert not OpenRequest.objects.exists()


def test_live_and_young_traces_are_left_alone(account: Account) -> None:
    alive = dead_trace(account)
    WorkerHeartbeat.objects.filter(worker=alive.worker).update(seen_at=timezone.now())
    young = dead_trace(account, age=0.5)
    mine = MeteredRequest(uuid.uuid4(), account.user.pk, "messages", streamed=False)
    assert BillingMeter().admit(mine).admitted  # writes its trace, as for a request
    mark_answered(mine.request_id, "gen-mine")
    OpenRequest.objects.filter(request_id=mine.request_id).update(
        created_at=timezone.now() - timedelta(hours=1)
    )
    beat()
    assert recover_lost_requests() == []
    assert OpenRequest.objects.count() == 3
    assert set(OpenRequest.objects.values_list("pk", flat=True)) >= {young.pk, alive.pk}


def test_a_worker_back_from_an_outage_waits_a_staleness_delay_before_judging_others(
    account: Account, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an outage every heartbeat is stale: a worker whose beat failed recovers no one's
    requests until it has beaten for the staleness delay, by which time a live worker has too."""
    settings.BILLING_WORKER_STALE_AFTER = 0.5
    meter = BillingMeter()
    quiet = dead_trace(account, age=120)  # its worker stale through the outage

    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise OperationalError("the database is unreachable")

    with monkeypatch.context() as outage:
        outage.setattr(WorkerHeartbeat.objects, "filter", unreachable)
        with pytest.raises(DatabaseError):
            meter.beat()
    assert meter.beat() == []
    assert OpenRequest.objects.filter(pk=quiet.pk).exists()
    # The quiet worker was alive: it beats again within the delay, and its request is left.
    time.sleep(0.6)
    WorkerHeartbeat.objects.filter(worker=quiet.worker).update(seen_at=timezone.now())
    assert recovery.judges_liveness()
    assert meter.beat() == []
    assert OpenRequest.objects.filter(pk=quiet.pk).exists()
    assert not UsageRecord.objects.exists()
    # A worker that stays quiet past the delay is dead: its request is recovered.
    WorkerHeartbeat.objects.filter(worker=quiet.worker).update(
        seen_at=timezone.now() - timedelta(seconds=5)
    )
    meter.beat()
    assert UsageRecord.objects.get(request_id=quiet.request_id).outcome == Outcome.WORKER_LOST
    assert not OpenRequest.objects.exists()


def test_reconcile_usage_recovers_and_settles(
    fake: RunningFake, account: Account, settings: Any
) -> None:
    settings.OPENROUTER_PROXY_BASE_URL = fake.base_url
    # A generation the dead worker's request made at the provider.
    response = httpx.post(
        f"{fake.base_url}/v1/chat/completions",
        json=STREAM_CHAT,
        headers={"Authorization": f"Bearer {SERVER_KEY}"},
    )
    generation_id = response.headers["x-generation-id"]
    hold_slot(account)
    trace = dead_trace(account, generation_id=generation_id)
    wait_for(
        lambda: (
            time.monotonic() - fake.app.generations[generation_id].finished_at
            > fake.app.generation_delay
        ),
        "the generation stats to be published",
    )
    out = StringIO()
    call_command("reconcile_usage", "--min-age", "0", stdout=out)
    assert "1 recovered from dead workers" in out.getvalue()
    assert "1 settled" in out.getvalue()
    settled = UsageRecord.objects.get(request_id=trace.request_id)
    assert settled.settlement == Settlement.SETTLED
    assert settled.outcome == Outcome.WORKER_LOST
    assert settled.billed == fake.app.generations[generation_id].charged > 0
    assert CreditAccount.objects.get(user=account.user).in_flight == 0
    assert balance_of(account.user) == Decimal(10) - settled.billed
    assert check_ledger() == []


def test_a_worker_has_one_identity_however_many_threads_ask_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first admissions and the first beat ask from several database threads at once;
    # a slow mint widens the window in which each could mint its own identity, so the
    # heartbeat would name one worker and the retire another (its row left behind).
    minted = uuid.uuid4

    def slow_mint() -> uuid.UUID:
        time.sleep(0.02)
        return minted()

    monkeypatch.setattr(recovery, "_worker", None)
    monkeypatch.setattr(uuid, "uuid4", slow_mint)
    start = threading.Barrier(8)

    def ask() -> uuid.UUID:
        start.wait(timeout=5)
        return worker_id()

    with ThreadPoolExecutor(max_workers=8) as pool:
        identities = set(pool.map(lambda _: ask(), range(8)))
    assert len(identities) == 1
    assert worker_id() in identities


# --- Real workers: SIGKILL and SIGTERM ----------------------------------------------------


async def _streams(url: str, accounts: list[Account], count: int) -> list[str]:
    """``count`` slow streams; each ends "done" or with the error that cut it."""
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=count)) as client:

        async def one(index: int) -> str:
            account = accounts[index % len(accounts)]
            body = {**STREAM_CHAT, "metadata": {"i": index}}
            headers = {**account.headers, "X-Fake-Mode": SLOW}
            try:
                async with client.stream("POST", url + PATH, json=body, headers=headers) as r:
                    await r.aread()
                    return "done" if r.status_code == 200 else f"status {r.status_code}"
            except httpx.HTTPError as error:
                return type(error).__name__

        return await asyncio.gather(*(one(i) for i in range(count)))


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_sigkill_mid_stream_loses_no_charge(
    fake: RunningFake, tmp_path: Path, settings: Any
) -> None:
    # reconcile_usage below runs here: it asks the same fake for generation stats.
    settings.OPENROUTER_PROXY_BASE_URL = fake.base_url
    accounts = [make_account(f"crash{n}") for n in range(6)]
    env: dict[str, Any] = {**FAST_RECOVERY, "BILLING_MAX_IN_FLIGHT": 20}
    with server_process(2, fake.base_url, tmp_path / "server.log", **env) as server:

        def every_trace_knows_its_generation() -> bool:
            try:
                traces = OpenRequest.objects.all()
                return traces.count() == 60 and not traces.filter(generation_id="").exists()
            finally:
                connection.close()  # a thread of the event loop's executor

        async def traces_ready() -> bool:
            return await asyncio.to_thread(every_trace_knows_its_generation)

        def busiest_worker() -> int:
            """The pid of the worker relaying the most streams (the kernel may favour one)."""
            try:
                counts = Counter(OpenRequest.objects.values_list("worker", flat=True))
                worker, _ = counts.most_common(1)[0]
                return WorkerHeartbeat.objects.get(worker=worker).pid
            finally:
                connection.close()

        async def run() -> list[str]:
            streams = asyncio.ensure_future(_streams(server.url, accounts, 60))
            # The kill lands mid-stream, once every trace holds its generation id
            # (milliseconds after the upstream's headers; a crash inside that
            # window leaves an unpriced record, see the test of that case above).
            deadline = time.monotonic() + 30
            while not await traces_ready():
                assert time.monotonic() < deadline, "gave up waiting for every stream's trace"
                await asyncio.sleep(0.02)
            victim = await asyncio.to_thread(busiest_worker)
            assert victim in server.workers
            os.kill(victim, signal.SIGKILL)
            return await streams

        results = asyncio.run(run())
        wait_for(
            lambda: fake.app.open_streams == 0 and len(fake.app.generations) == 60,
            "every stream to end at the fake",
            timeout=30,
        )
        # Recovery by the surviving worker or by reconcile_usage, whichever comes first.
        time.sleep(float(FAST_RECOVERY["BILLING_WORKER_STALE_AFTER"]))

        def reconciled() -> bool:
            call_command("reconcile_usage", "--min-age", "0", stdout=StringIO())
            return not UsageRecord.objects.pending().exists() and not OpenRequest.objects.exists()

        wait_for(reconciled, "every record settled and every trace gone", timeout=60, interval=1)
    cut = sum(1 for outcome in results if outcome != "done")
    assert cut > 0, "the killed worker was relaying some of the streams"
    records = list(UsageRecord.objects.all())
    generations = fake.app.generations
    assert len(records) == 60
    assert {r.generation_id for r in records} == set(generations)
    charged = assert_each_request_charged_once(generations)
    assert set(CreditAccount.objects.values_list("in_flight", flat=True)) == {0}
    assert check_ledger() == []
    lost = [r for r in records if r.outcome == Outcome.WORKER_LOST]
    assert len(lost) == cut
    report(
        "SIGKILL of one of two workers mid-stream",
        streams=len(results),
        cut_by_the_kill=cut,
        recovered_records=len(lost),
        charged=charged,
        generated=sum((g.charged for g in generations.values()), Decimal(0)),
    )


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_crashed_workers_slots_come_back(fake: RunningFake, tmp_path: Path) -> None:
    account = make_account("slots")
    env: dict[str, Any] = {**FAST_RECOVERY, "BILLING_MAX_IN_FLIGHT": 2}
    with server_process(1, fake.base_url, tmp_path / "one.log", **env) as doomed:

        async def hold() -> list[str]:
            streams = asyncio.ensure_future(_streams(doomed.url, [account], 2))
            await asyncio.sleep(0.8)
            os.kill(doomed.workers[0], signal.SIGKILL)
            return await streams

        asyncio.run(hold())
    assert CreditAccount.objects.get(user=account.user).in_flight == 2
    with server_process(1, fake.base_url, tmp_path / "two.log", **env) as survivor:
        refused = httpx.post(survivor.url + PATH, json=STREAM_CHAT, headers=account.headers)
        assert refused.status_code == 429  # the dead worker's slots are still taken
        started = time.monotonic()

        def admitted() -> bool:
            response = httpx.post(
                survivor.url + PATH, json=STREAM_CHAT, headers=account.headers, timeout=30
            )
            return response.status_code == 200

        wait_for(admitted, "the user to be admitted again", timeout=30, interval=0.2)
        waited = time.monotonic() - started
    stale = float(FAST_RECOVERY["BILLING_WORKER_STALE_AFTER"])
    beat_every = float(FAST_RECOVERY["BILLING_WORKER_HEARTBEAT"])
    # Stale delay, one sweep, and the settlement from generation stats.
    assert waited < stale + beat_every + 5
    wait_for(lambda: not UsageRecord.objects.pending().exists(), "the recovered records to settle")
    assert {r.outcome for r in UsageRecord.objects.all()} == {
        Outcome.WORKER_LOST,
        Outcome.COMPLETED,
    }
    assert_each_request_charged_once(fake.app.generations)
    assert check_ledger() == []
    report("slots of a crashed worker", waited_seconds=round(waited, 2), stale_after=stale)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_sigterm_lets_streams_finish_and_records_them(fake: RunningFake, tmp_path: Path) -> None:
    accounts = [make_account(f"deploy{n}") for n in range(4)]
    env: dict[str, Any] = {"BILLING_MAX_IN_FLIGHT": 20}
    with server_process(2, fake.base_url, tmp_path / "server.log", **env) as server:

        async def run() -> list[str]:
            streams = asyncio.ensure_future(_streams(server.url, accounts, 24))
            await asyncio.sleep(0.8)
            server.process.send_signal(signal.SIGTERM)
            return await streams

        results = asyncio.run(run())
        server.process.wait(timeout=30)
    assert results == ["done"] * 24
    records = list(UsageRecord.objects.all())
    assert len(records) == 24
    assert all(r.settlement == Settlement.SETTLED for r in records)
    assert all(r.outcome == Outcome.COMPLETED for r in records)
    assert not OpenRequest.objects.exists()
    # Both workers retired cleanly.
    left = list(WorkerHeartbeat.objects.values("pid", "seen_at"))
    assert left == [], f"workers {server.workers} left heartbeats; their log:\n{server.log()}"
    assert_each_request_charged_once(fake.app.generations)
    assert check_ledger() == []
