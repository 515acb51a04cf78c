"""Faults, injected for real: a misbehaving upstream, clients that leave, a database
that goes away, a client that reads slowly.

Each test runs the site under uvicorn (in a thread, or as a separate process)
against the fake OpenRouter on loopback, injects one fault, and checks three
things: what the client saw, what the usage record says happened, and that
the charge equals what the fake recorded for the generation (or zero when
nothing was generated). Faults already covered by ``tests/app/test_proxy.py``
(upstream 429, JSON 504, cut streams and bodies, malformed events, mid-stream
errors, gzip JSON) are not repeated here.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.core.management import call_command
from django.db import connection

from billing.models import CostSource, CreditAccount, Outcome, Settlement, UsageRecord
from billing.services import balance_of, check_ledger
from billing.spool import spool_draft, spooled_paths
from devtools.fake_openrouter import FakeOpenRouter, RunningFake, bind_socket
from openrouter_proxy.metering import ReportedUsage, UsageDraft
from openrouter_proxy.settlement import pending_tasks
from tests.support.accounts import BROKEN_VERIFIER, Account, Gateway, make_account
from tests.support.faults.common import (
    CHAT,
    STREAM_CHAT,
    open_raw_stream,
    port_of,
    read_until,
    report,
    reset_close,
    sse_events,
)
from tests.support.faults.launch import database_url_via, server_process
from tests.support.faults.procfs import ProcUnavailable, connections_to, require_proc, rss_bytes
from tests.support.servers import wait_until
from tests.support.tcp_proxy import forwarding
from tests.support.waiting import wait_for


def chat_url(gateway: Gateway) -> str:
    return f"{gateway.proxy}/v1/chat/completions"


def settled_everything(timeout: float = 10) -> bool:
    return wait_until(lambda: not UsageRecord.objects.pending().exists(), timeout=timeout)


def no_background_tasks(timeout: float = 10) -> bool:
    return wait_until(lambda: pending_tasks() == 0, timeout=timeout)


def assert_billed_as_generated(gateway: Gateway, record: UsageRecord) -> Decimal:
    assert record.generation_id is not None, record.error_message
    generation = gateway.fake.app.generations[record.generation_id]
    assert record.settlement == Settlement.SETTLED
    assert record.billed == generation.total_cost, (record.billed, generation)
    return generation.total_cost


def assert_books_balance(account: Account) -> None:
    billed = sum((r.billed for r in UsageRecord.objects.for_user(account.user)), Decimal(0))
    assert balance_of(account.user) == Decimal(10) - billed
    assert CreditAccount.objects.get(user=account.user).in_flight == 0
    assert check_ledger() == []


def records_reach(count: int) -> Callable[[], bool]:
    return lambda: UsageRecord.objects.count() >= count


def require_linux_proc() -> None:
    try:
        require_proc()
    except ProcUnavailable as missing:
        pytest.skip(str(missing))


# --- The upstream misbehaves --------------------------------------------------------


def test_upstream_silent_between_chunks_ends_the_stream_and_bills_what_was_generated(
    gateway: Gateway, live_account: Account, settings: Any
) -> None:
    """Headers and a keep-alive, then silence longer than the read timeout."""
    settings.OPENROUTER_PROXY_READ_TIMEOUT = 0.5
    started = time.monotonic()
    response = httpx.post(
        chat_url(gateway),
        json=STREAM_CHAT,
        headers={**live_account.headers, "X-Fake-Mode": "chunks=5,chunk-delay=5"},
        timeout=10,
    )
    elapsed = time.monotonic() - started
    # The client: a 200 stream that ends promptly with an error event the SDKs raise.
    assert response.status_code == 200
    assert response.text.startswith(": OPENROUTER PROCESSING")
    assert sse_events(response.text)[-1]["error"]["code"] == "upstream_stream_error"
    assert elapsed < 3, elapsed
    # The upstream request was closed, not left to generate for nobody.
    fake = gateway.fake.app
    # open_streams falls before disconnected_streams rises: wait for both.
    wait_for(
        lambda: fake.disconnected_streams == 1 and fake.open_streams == 0,
        "the fake to see the proxy hang up",
    )
    # The record: what happened, and the charge once the generation is known.
    assert settled_everything()
    record = UsageRecord.objects.get()
    assert record.outcome == Outcome.UPSTREAM_ERROR
    assert record.http_status == 200
    assert "ReadTimeout" in record.error_message
    assert record.cost_source == CostSource.GENERATION
    charged = assert_billed_as_generated(gateway, record)
    assert fake.generations[record.generation_id or ""].cancelled
    assert_books_balance(live_account)
    assert no_background_tasks()
    report(
        "upstream silent between chunks",
        client_status=200,
        stream_ended_after_s=round(elapsed, 2),
        outcome=record.outcome,
        billed=charged,
    )


def test_upstream_silent_inside_a_json_body_aborts_it_and_bills_the_generation(
    gateway: Gateway, live_account: Account, settings: Any
) -> None:
    """OpenRouter pads JSON bodies while it generates; a gap there is a timeout too."""
    settings.OPENROUTER_PROXY_READ_TIMEOUT = 0.5
    # The generation ends about 2 s after the proxy hung up: settlement in the
    # proxy keeps asking for longer than that (no fallback to reconcile_usage,
    # which would hide a broken in-process path).
    settings.OPENROUTER_PROXY_SETTLE_DELAYS = (0.3,) * 30
    with pytest.raises(httpx.RemoteProtocolError):
        # A truncated JSON body must not look complete: the response is aborted.
        httpx.post(
            chat_url(gateway),
            json=CHAT,
            headers={**live_account.headers, "X-Fake-Mode": "keepalive=2,chunk-delay=1"},
            timeout=10,
        )
    assert wait_until(lambda: UsageRecord.objects.exists())
    record = UsageRecord.objects.get()
    assert record.outcome == Outcome.UPSTREAM_ERROR
    assert record.http_status == 200
    # The fake keeps generating after the proxy hung up (as a real provider may);
    # the record is settled from the generation stats once they exist.
    assert settled_everything(timeout=15)
    record.refresh_from_db()
    assert record.cost_source == CostSource.GENERATION
    charged = assert_billed_as_generated(gateway, record)
    assert_books_balance(live_account)
    report("upstream silent inside JSON", outcome=record.outcome, billed=charged)


def test_gzip_stream_from_upstream_is_decoded_and_billed(
    gateway: Gateway, live_account: Account
) -> None:
    response = httpx.post(
        chat_url(gateway),
        json=STREAM_CHAT,
        headers={**live_account.headers, "X-Fake-Mode": "gzip,chunks=4"},
        timeout=10,
    )
    assert response.status_code == 200
    assert "content-encoding" not in response.headers
    assert response.text.rstrip().endswith("data: [DONE]")
    usage = sse_events(response.text)[-1]["usage"]
    assert wait_until(lambda: UsageRecord.objects.exists())
    record = UsageRecord.objects.get()
    assert record.outcome == Outcome.COMPLETED
    assert record.billed == usage["cost"] == assert_billed_as_generated(gateway, record)
    assert_books_balance(live_account)


@pytest.mark.parametrize("status", [400, 401, 402, 403, 408, 500, 502, 503])
def test_upstream_error_statuses_pass_through_and_cost_nothing(
    gateway: Gateway, live_account: Account, status: int
) -> None:
    response = httpx.post(
        chat_url(gateway),
        json=STREAM_CHAT,
        headers={**live_account.headers, "X-Fake-Mode": f"status={status},set-cookie"},
        timeout=10,
    )
    assert response.status_code == status
    assert response.json()["error"]["code"] == status
    assert "set-cookie" not in response.headers
    assert response.headers["access-control-allow-origin"] == "*"
    record = UsageRecord.objects.get()
    assert record.outcome == Outcome.UPSTREAM_ERROR
    assert record.http_status == status
    assert record.settlement == Settlement.SETTLED
    assert record.billed == 0
    assert gateway.fake.app.generations == {}  # nothing was generated
    assert_books_balance(live_account)


def test_upstream_refusing_connections_is_a_quick_502_for_streams_too(
    gateway: Gateway, live_account: Account, settings: Any
) -> None:
    closed = bind_socket("127.0.0.1", 0)
    port = closed.getsockname()[1]
    closed.close()
    settings.OPENROUTER_PROXY_BASE_URL = f"http://127.0.0.1:{port}/api"
    started = time.monotonic()
    response = httpx.post(chat_url(gateway), json=STREAM_CHAT, headers=live_account.headers)
    elapsed = time.monotonic() - started
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unreachable"
    assert response.headers["x-should-retry"] == "true"  # nothing can have been spent
    record = UsageRecord.objects.get()
    assert record.outcome == Outcome.UPSTREAM_UNREACHABLE
    assert record.settlement == Settlement.SETTLED
    assert record.billed == 0
    assert_books_balance(live_account)
    assert no_background_tasks()
    report("upstream refuses connections", client_status=502, answered_in_s=round(elapsed, 3))


def test_upstream_silent_before_headers_closes_the_upstream_request(
    gateway: Gateway, live_account: Account, settings: Any
) -> None:
    settings.OPENROUTER_PROXY_READ_TIMEOUT = 0.5
    response = httpx.post(
        chat_url(gateway),
        json=STREAM_CHAT,
        headers={**live_account.headers, "X-Fake-Mode": "first-byte-delay=5"},
        timeout=10,
    )
    assert response.status_code == 504
    assert response.headers["x-should-retry"] == "false"
    fake = gateway.fake.app
    # open_streams falls before disconnected_streams rises: wait for both.
    wait_for(
        lambda: fake.disconnected_streams == 1 and fake.open_streams == 0,
        "the fake to see the proxy hang up",
    )
    record = UsageRecord.objects.get()
    assert record.outcome == Outcome.UPSTREAM_ERROR
    assert record.http_status == 504
    assert CreditAccount.objects.get(user=live_account.user).in_flight == 0
    assert no_background_tasks()


def test_upstream_timeout_before_headers_is_not_a_silent_zero(
    gateway: Gateway, live_account: Account, settings: Any
) -> None:
    settings.OPENROUTER_PROXY_READ_TIMEOUT = 0.5
    httpx.post(
        chat_url(gateway),
        json=STREAM_CHAT,
        headers={**live_account.headers, "X-Fake-Mode": "first-byte-delay=5"},
        timeout=10,
    )
    fake = gateway.fake.app
    assert wait_until(lambda: len(fake.generations) == 1, timeout=5)
    generation = next(iter(fake.generations.values()))
    assert generation.total_cost > 0  # the prompt was processed and billed upstream
    record = UsageRecord.objects.get()
    # Either priced right, or left for an operator: never a silent zero.
    assert record.settlement == Settlement.UNPRICED or record.billed == generation.total_cost


# --- The client leaves ------------------------------------------------------------------


def _leave_before_headers(sock: socket.socket, fake: FakeOpenRouter) -> None:
    # The request reached the upstream, which holds its headers back.
    wait_for(lambda: fake.open_streams == 1, "the request to reach the fake")


def _leave_after_first_byte(sock: socket.socket, fake: FakeOpenRouter) -> None:
    assert sock.recv(1)


def _leave_mid_stream(sock: socket.socket, fake: FakeOpenRouter) -> None:
    data = b""
    while data.count(b"data: ") < 6:
        piece = sock.recv(4096)
        assert piece
        data += piece


def _leave_during_last_chunk(sock: socket.socket, fake: FakeOpenRouter) -> None:
    # The usage event has arrived; [DONE] is still to come.
    data = read_until(sock, b'"usage"')
    assert b'"usage"' in data
    assert b"[DONE]" not in data


def _all_streams_left(fake: FakeOpenRouter, count: int) -> bool:
    # open_streams falls before disconnected_streams rises: wait for both.
    return fake.disconnected_streams == count and fake.open_streams == 0


def _server_send_queue(sock: socket.socket) -> int:
    """Bytes the server has written towards ``sock`` that the client has not taken."""
    client_port = sock.getsockname()[1]
    server_port = sock.getpeername()[1]
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.rsplit(":", 1)[1], 16) == server_port and (
            int(remote.rsplit(":", 1)[1], 16) == client_port
        ):
            return int(fields[4].split(":")[0], 16)
    return 0


def _leave_while_not_reading(sock: socket.socket, fake: FakeOpenRouter) -> None:
    # The server is blocked on a full socket buffer when the client goes.
    assert sock.recv(100)
    wait_for(lambda: _server_send_queue(sock) > 0, "the server's writes to back up")


DISCONNECTS = {
    # name: (fake mode, receive buffer, what the client does before leaving)
    "before-headers": ("first-byte-delay=2", None, _leave_before_headers),
    "after-first-byte": ("chunks=20,chunk-delay=0.1", None, _leave_after_first_byte),
    "mid-stream": ("chunks=40,chunk-delay=0.05", None, _leave_mid_stream),
    "during-last-chunk": ("chunks=3,chunk-delay=0.4", None, _leave_during_last_chunk),
    "while-not-reading": ("chunks=2000,pad=65536", 4096, _leave_while_not_reading),
}


@pytest.mark.parametrize("where", list(DISCONNECTS))
def test_client_disconnect_closes_upstream_leaks_nothing_and_settles(
    gateway: Gateway, live_account: Account, where: str
) -> None:
    require_linux_proc()
    mode, rcvbuf, leave = DISCONNECTS[where]
    fake = gateway.fake.app
    port = port_of(gateway.url)
    repeats = 3
    close_to_upstream_closed = []
    for attempt in range(repeats):
        sock = open_raw_stream(port, live_account.token, mode, rcvbuf=rcvbuf)
        leave(sock, fake)
        left = time.monotonic()
        # Alternate a clean close (FIN) and an abort (RST).
        if attempt % 2:
            reset_close(sock)
        else:
            sock.close()
        wait_for(
            functools.partial(_all_streams_left, fake, attempt + 1),
            f"the fake to see the client leave ({where}, attempt {attempt + 1})",
        )
        close_to_upstream_closed.append(time.monotonic() - left)
        assert wait_until(records_reach(attempt + 1), timeout=5)
    assert fake.disconnected_streams == repeats
    assert settled_everything()
    assert no_background_tasks()
    # Closed upstream connections are not kept: at most the idle keep-alive ones.
    upstream_sockets = connections_to(gateway.fake.port)
    assert upstream_sockets <= 2, upstream_sockets

    records = list(UsageRecord.objects.all())
    assert len(records) == repeats
    total = Decimal(0)
    for record in records:
        assert record.outcome == Outcome.CLIENT_DISCONNECTED
        if where == "before-headers":
            # No header, no generation id: nothing to price it by, so an operator
            # sees it. The fake did bill the prompt (see the report).
            assert record.generation_id is None
            assert record.settlement == Settlement.UNPRICED
            assert record.billed == 0
        else:
            total += assert_billed_as_generated(gateway, record)
            generation = fake.generations[record.generation_id or ""]
            if where != "during-last-chunk":
                # Stopped early: nobody pays for tokens nobody read.
                assert generation.cancelled
    if where == "during-last-chunk":
        assert all(r.cost_source == CostSource.PROVIDER for r in records)
    unbilled_prompts = sum(
        (g.total_cost for g in fake.generations.values() if g.tokens_completion == 0),
        Decimal(0),
    )
    assert_books_balance(live_account)
    report(
        f"client disconnect {where}",
        disconnects=repeats,
        upstream_closed_within_s=round(max(close_to_upstream_closed), 3),
        open_streams=fake.open_streams,
        upstream_sockets=upstream_sockets,
        pending_tasks=pending_tasks(),
        billed=total,
        unrecoverable_prompt_cost=unbilled_prompts if where == "before-headers" else 0,
    )


# --- The database goes away -----------------------------------------------------------


def test_billing_api_database_down_is_503_json(
    gateway: Gateway, live_account: Account, settings: Any
) -> None:
    settings.OPENROUTER_PROXY_KEY_VERIFIER = BROKEN_VERIFIER
    response = httpx.get(f"{gateway.url}/api/billing/balance", headers=live_account.headers)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "db_down"


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_database_outage_fails_fast_loses_nothing_and_recovers(
    fake: RunningFake, tmp_path: Path
) -> None:
    """PostgreSQL behind a loopback forwarder that the test cuts and restores."""
    if connection.vendor != "postgresql":
        pytest.skip("cutting the database's network needs PostgreSQL (SQLite is a local file)")
    settings_dict = connection.settings_dict
    account = make_account()
    spool = tmp_path / "spool"
    url_chat = "/api/proxy/openrouter/v1/chat/completions"
    host = settings_dict.get("HOST") or "127.0.0.1"
    db_port = int(settings_dict.get("PORT") or 5432)
    with (
        forwarding(host, db_port) as database,
        server_process(
            1,
            fake.base_url,
            tmp_path / "server.log",
            DATABASE_URL=database_url_via(database.port),
            BILLING_SPOOL_DIR=spool,
        ) as server,
        httpx.Client(base_url=server.url, timeout=30, headers=account.headers) as client,
    ):
        assert client.post(url_chat, json=CHAT).status_code == 200
        # A stream admitted before the cut that ends during it.
        with client.stream(
            "POST",
            url_chat,
            json=STREAM_CHAT,
            headers={"X-Fake-Mode": "chunks=20,chunk-delay=0.1"},
        ) as stream:
            pieces = stream.iter_raw()
            assert next(pieces)
            database.cut()
            cut_at = time.monotonic()
            refusals = []
            for _ in range(4):
                started = time.monotonic()
                refused = client.post(url_chat, json=CHAT)
                refusals.append(time.monotonic() - started)
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"]["code"] == "db_down"
                assert refused.headers["access-control-allow-origin"] == "*"
            rest = b"".join(pieces)
        # The client got its whole answer, outage or not.
        assert rest.rstrip().endswith(b"data: [DONE]")
        assert wait_until(lambda: list(spool.glob("*.json")), timeout=30), server.log()
        spooled = len(list(spool.glob("*.json")))
        database.restore()
        restored_at = time.monotonic()
        # Recovery without a restart: the pool reconnects by itself.
        recovered = None
        attempts_after = 0
        while time.monotonic() - restored_at < 30:
            attempts_after += 1
            if client.post(url_chat, json=CHAT).status_code == 200:
                recovered = time.monotonic() - restored_at
                break
            time.sleep(0.2)
        assert recovered is not None, server.log()
        # The next successful write replayed the spool.
        assert wait_until(lambda: not list(spool.glob("*.json")), timeout=10)
        log = server.log()
    assert "spooled to" in log  # logged at ERROR for operators
    call_command("reconcile_usage", min_age=0, stdout=open("/dev/null", "w"))  # noqa: SIM115
    records = list(UsageRecord.objects.all())
    streamed = [r for r in records if r.streamed]
    assert len(streamed) == 1
    assert streamed[0].outcome == Outcome.COMPLETED
    generations = fake.app.generations
    assert {r.generation_id for r in records} == set(generations)  # none lost, none twice
    for record in records:
        assert record.settlement == Settlement.SETTLED
        assert record.billed == generations[record.generation_id or ""].total_cost
    assert_books_balance(account)
    report(
        "database outage (PostgreSQL)",
        refusals=len(refusals),
        slowest_503_s=round(max(refusals), 2),
        fastest_503_s=round(min(refusals), 3),
        pool_timeout_s=2,
        spooled=spooled,
        replayed=spooled,
        outage_s=round(restored_at - cut_at, 1),
        recovered_after_restore_s=round(recovered, 2),
        requests_until_recovered=attempts_after,
        records_lost=0,
        ledger_mismatches=len(check_ledger()),
    )


LONG = os.environ.get("RELIABILITY_LONG") == "1"


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="a 45 s outage: long mode only (make soak)")
@pytest.mark.django_db(transaction=True)
def test_database_recovers_promptly_after_a_long_outage(fake: RunningFake, tmp_path: Path) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("cutting the database's network needs PostgreSQL (SQLite is a local file)")
    account = make_account()
    outage = 45.0
    with (
        forwarding(
            connection.settings_dict.get("HOST") or "127.0.0.1",
            int(connection.settings_dict.get("PORT") or 5432),
        ) as database,
        server_process(
            1,
            fake.base_url,
            tmp_path / "server.log",
            DATABASE_URL=database_url_via(database.port),
        ) as server,
        httpx.Client(timeout=30, headers=account.headers) as client,
    ):
        url = f"{server.proxy}/v1/chat/completions"
        assert client.post(url, json=CHAT).status_code == 200
        database.cut()
        cut_at = time.monotonic()
        while time.monotonic() - cut_at < outage:
            assert client.post(url, json=CHAT).status_code == 503
            time.sleep(0.5)
        database.restore()
        restored_at = time.monotonic()
        recovered = None
        while time.monotonic() - restored_at < 120:
            if client.post(url, json=CHAT).status_code == 200:
                recovered = time.monotonic() - restored_at
                break
            time.sleep(0.2)
    report("recovery after a 45 s database outage", recovered_after_s=recovered)
    assert recovered is not None
    assert recovered < 5


def test_spool_replay_under_load_records_each_draft_once_and_quietly(
    gateway: Gateway, live_account: Account, settings: Any, caplog: Any
) -> None:
    """Regression: every request that ended while drafts were spooled started its own
    pass over all of them, logging files other passes had just replayed as
    "unreadable" (hundreds of false ERROR tracebacks) and repeating the work; and a
    file that really was unreadable was retried, and logged, on every request."""
    caplog.set_level(logging.INFO, logger="billing.spool")
    spooled, cost = 300, Decimal("0.001")
    for index in range(spooled):
        spool_draft(
            UsageDraft(
                request_id=uuid.uuid4(),
                user_id=live_account.user.pk,
                endpoint="chat/completions",
                streamed=False,
                outcome=Outcome.COMPLETED,
                usage=ReportedUsage(generation_id=f"gen-spooled-{index}", cost=cost),
                holds_slot=False,
            )
        )
    poison = settings.BILLING_SPOOL_DIR / "00000000-0000-0000-0000-000000000000.json"
    poison.write_text("{not a draft")

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            responses = await asyncio.gather(
                *(
                    client.post(chat_url(gateway), json=CHAT, headers=live_account.headers)
                    for _ in range(16)
                )
            )
        return [response.status_code for response in responses]

    statuses = asyncio.run(burst())
    admitted = statuses.count(200)
    assert set(statuses) <= {200, 429}
    for _ in range(3):
        assert httpx.post(chat_url(gateway), json=CHAT, headers=live_account.headers).is_success
    call_command("reconcile_usage", min_age=0, stdout=io.StringIO())
    assert spooled_paths() == []
    assert UsageRecord.objects.count() == spooled + admitted + 3
    assert UsageRecord.objects.filter(generation_id__startswith="gen-spooled-").count() == spooled
    replayed = sum(int(n) for n in re.findall(r"replayed (\d+) spooled", caplog.text))
    assert replayed == spooled  # each draft written once, no pass repeating another's work
    unreadable = [r for r in caplog.records if "unreadable spooled usage" in r.getMessage()]
    assert len(unreadable) == 1  # the poison file, once
    assert poison.with_name(poison.name + ".unreadable").exists()
    assert_books_balance(live_account)
    report(
        "spool replay under load",
        spooled=spooled,
        concurrent_requests=16,
        replayed=replayed,
        unreadable_logged=len(unreadable),
    )


# --- A client that reads slowly ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_slow_reader_is_back_pressured_not_buffered(fake: RunningFake, tmp_path: Path) -> None:
    require_linux_proc()
    account = make_account()
    # About 260 MB of stream if it were all produced; the client reads a few MB.
    chunks, pad = 4000, 65536
    with server_process(1, fake.base_url, tmp_path / "server.log") as server:
        (pid,) = server.workers
        for _ in range(5):  # warm up: imports, pools, first allocations
            httpx.post(
                f"{server.proxy}/v1/chat/completions", json=STREAM_CHAT, headers=account.headers
            )
        before = rss_bytes(pid)
        sock = open_raw_stream(
            server.port, account.token, f"chunks={chunks},pad={pad}", rcvbuf=8192
        )
        peak = before
        read = 0
        samples = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak, samples
            while not stop.is_set():
                peak = max(peak, rss_bytes(pid))
                samples += 1
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        deadline = time.monotonic() + 3
        try:
            while time.monotonic() < deadline:
                piece = sock.recv(4096)
                assert piece
                read += len(piece)
                time.sleep(0.002)
        finally:
            stop.set()
            sampler.join()
            sock.close()
        assert wait_until(lambda: fake.app.open_streams == 0, timeout=10)
        assert wait_until(lambda: UsageRecord.objects.exists(), timeout=10)
        assert settled_everything()
        record = UsageRecord.objects.get(streamed=True, outcome=Outcome.CLIENT_DISCONNECTED)
        generation = fake.app.generations[record.generation_id or ""]
        produced = (generation.tokens_completion // 2) * pad
    growth = peak - before
    assert growth < 50 * 1024 * 1024, growth
    assert produced < chunks * pad / 4  # the upstream was slowed down, not drained
    assert record.billed == generation.total_cost
    report(
        "slow reader",
        rss_before_mb=round(before / 2**20, 1),
        rss_peak_mb=round(peak / 2**20, 1),
        growth_mb=round(growth / 2**20, 1),
        samples=samples,
        client_read_mb=round(read / 2**20, 1),
        upstream_produced_mb=round(produced / 2**20, 1),
        stream_size_if_drained_mb=round(chunks * pad / 2**20),
    )
