"""Error paths of the proxy, its ASGI layer, billing and the spool, each made to happen.

Every test here forces one failure and checks what the client saw, what was
recorded and that nothing was left held (an in-flight slot, a connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from django.core.exceptions import BadRequest, PermissionDenied, SuspiciousOperation
from django.db import DatabaseError, OperationalError
from django.http import Http404

import billing.spool
from billing.models import CreditAccount, ModelPrice, Outcome, Settlement, UsageRecord
from billing.services import RecordResult, balance_of, grant_credits, price_table_cost, record_usage
from billing.signals import credits_low
from billing.spool import (
    UNREADABLE_SUFFIX,
    record_usage_durably,
    replay_spool,
    spool_draft,
    spooled_paths,
)
from devtools.fake_openrouter import bind_socket
from openrouter_proxy import asgi, settlement
from openrouter_proxy.metering import ReportedUsage, UsageDraft
from openrouter_proxy.transport import AiohttpTransport
from openrouter_proxy.wire import NativeTransport
from tests.support.accounts import Account, Gateway
from tests.support.faults.common import CHAT, CHAT_PATH, STREAM_CHAT, port_of
from tests.support.logs import no_errors_logged
from tests.support.waiting import async_wait_for, wait_for


def chat_url(gateway: Gateway) -> str:
    return f"{gateway.proxy}/v1/chat/completions"


def raw_chat_request(token: str) -> bytes:
    """A chat completion as bytes, for a client that leaves without reading the answer."""
    body = json.dumps(CHAT).encode()
    return (
        b"POST " + CHAT_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n"
        b"X-Daemon-Token: " + token.encode() + b"\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


def in_flight(account: Account) -> int:
    return CreditAccount.objects.get(user=account.user).in_flight


@contextlib.contextmanager
def upstream_that_hangs_up() -> Iterator[str]:
    """An upstream that reads each request and closes the connection without a word."""
    server = bind_socket("127.0.0.1", 0)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    piece = conn.recv(65536)
                    if not piece:
                        break
                    data += piece

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/api"
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


# --- views.py ---------------------------------------------------------------------------


def test_upstream_hanging_up_before_headers_is_a_502_not_to_retry(
    gateway: Gateway, live_account: Account, settings: Any
) -> None:
    with upstream_that_hangs_up() as base_url:
        settings.OPENROUTER_PROXY_BASE_URL = base_url
        response = httpx.post(chat_url(gateway), json=CHAT, headers=live_account.headers)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
    # The request was sent: the upstream may be generating (and billing) it.
    assert response.headers["x-should-retry"] == "false"
    record = wait_for(UsageRecord.objects.first, "the usage record")
    assert record.outcome == Outcome.UPSTREAM_ERROR
    assert record.settlement == Settlement.UNPRICED  # never a silent zero
    assert in_flight(live_account) == 0


def test_exhausted_upstream_pool_is_503_gateway_busy(
    gateway: Gateway, live_account: Account, settings: Any
) -> None:
    settings.OPENROUTER_PROXY_MAX_CONNECTIONS = 1
    settings.OPENROUTER_PROXY_POOL_TIMEOUT = 0.3
    fake = gateway.fake.app
    with httpx.stream(
        "POST",
        chat_url(gateway),
        json=STREAM_CHAT,
        headers={**live_account.headers, "X-Fake-Mode": "chunks=50,chunk-delay=0.1"},
    ) as holding:
        pieces = holding.iter_raw()  # kept: a dropped iterator would close the stream
        assert next(pieces)
        busy = httpx.post(chat_url(gateway), json=CHAT, headers=live_account.headers)
        assert busy.status_code == 503, busy.text
        assert busy.json()["error"]["code"] == "gateway_busy"
        assert busy.headers["x-should-retry"] == "true"  # nothing was sent upstream
        assert fake.open_streams == 1
    wait_for(lambda: fake.open_streams == 0, "the held stream to close upstream")
    # The slot came back with the closed stream.
    assert httpx.post(chat_url(gateway), json=CHAT, headers=live_account.headers).is_success
    wait_for(lambda: UsageRecord.objects.count() == 3, "three usage records")
    refused = UsageRecord.objects.get(http_status=503)
    assert refused.billed == 0
    wait_for(lambda: in_flight(live_account) == 0, "every in-flight slot back")


@pytest.mark.parametrize("kind", [NativeTransport, AiohttpTransport])
async def test_transport_pool_wait_times_out_as_pool_timeout(kind: type[Any]) -> None:
    """Unit: the wait for a connection is a PoolTimeout, and a closed response frees its slot."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": False})

    from devtools.servers import serve_in_thread

    with serve_in_thread(app, lifespan="off") as url:
        transport = kind(httpx.Limits(max_connections=1))
        timeout = httpx.Timeout(5, pool=0.2)
        async with httpx.AsyncClient(transport=transport, timeout=timeout) as client:
            first = await client.send(client.build_request("GET", url), stream=True)
            with pytest.raises(httpx.PoolTimeout):
                await client.get(url)
            await first.aclose()
            assert (await client.get(url)).status_code == 200
            # A response dropped without being closed gives its slot back once collected.
            dropped = await client.send(client.build_request("GET", url), stream=True)
            del dropped
            gc.collect()
            assert (await client.get(url)).status_code == 200


def test_unexpected_error_from_send_is_a_json_500_and_recorded(
    gateway: Gateway, live_account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: Any, request: httpx.Request) -> httpx.Response:
        raise RuntimeError("transport bug")

    monkeypatch.setattr(NativeTransport, "handle_async_request", broken)
    monkeypatch.setattr(AiohttpTransport, "handle_async_request", broken)
    monkeypatch.setattr(httpx.AsyncHTTPTransport, "handle_async_request", broken)
    response = httpx.post(chat_url(gateway), json=CHAT, headers=live_account.headers)
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert "transport bug" not in response.text  # no internals to the client
    record = wait_for(UsageRecord.objects.first, "the usage record")
    assert record.outcome == Outcome.UPSTREAM_ERROR
    assert "transport bug" in record.error_message
    assert in_flight(live_account) == 0
    assert len(gateway.fake.app.requests) == 0


def test_database_error_during_admission_is_503_db_down(
    gateway: Gateway, live_account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    admission_raises(monkeypatch, OperationalError("could not connect to server"))
    response = httpx.post(chat_url(gateway), json=CHAT, headers=live_account.headers)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "db_down"
    assert response.headers["access-control-allow-origin"] == "*"
    assert len(gateway.fake.app.requests) == 0
    assert not UsageRecord.objects.exists()


def test_client_leaving_during_admission_gives_the_slot_back(
    gateway: Gateway, live_account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    from billing import services
    from billing.services import admission_async

    real, real_on_loop = services.admit_request, admission_async.admit_user
    taken = threading.Event()
    answer = threading.Event()

    def held_admission(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        taken.set()
        answer.wait(timeout=30)  # the slot is taken; the view has not heard yet
        return result

    async def held_on_loop(*args: Any, **kwargs: Any) -> Any:
        result = await real_on_loop(*args, **kwargs)
        taken.set()
        await asyncio.to_thread(answer.wait, 30)
        return result

    monkeypatch.setattr("billing.meter.admit_request", held_admission)
    monkeypatch.setattr(admission_async, "admit_user", held_on_loop)
    try:
        with socket.create_connection(("127.0.0.1", port_of(gateway.url))) as sock:
            sock.sendall(raw_chat_request(live_account.token))
            wait_for(taken.is_set, "the admission to take a slot")
            assert in_flight(live_account) == 1
        # The client has left while its admission was still unanswered.
        wait_for(
            lambda: settlement.pending_tasks() > 0,
            "the proxy to see the client leave and queue the slot's release",
        )
    finally:
        answer.set()
    wait_for(lambda: in_flight(live_account) == 0, "the slot to come back")
    assert len(gateway.fake.app.requests) == 0
    assert not UsageRecord.objects.exists()


def test_client_leaving_while_its_admission_is_queued_leaves_it_unrun(
    gateway: Gateway, live_account: Account, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    """Every database thread busy: the admission waits in the queue, and its caller leaves."""
    from openrouter_proxy import db, exchange
    from openrouter_proxy.callers import verification_cache
    from openrouter_proxy.conf import proxy_settings

    settings.OPENROUTER_PROXY_KEY_CACHE_SECONDS = 60
    verification_cache.clear()
    from billing import services

    monkeypatch.setattr(exchange, "LOOP_ADMISSION_BELOW", 0)  # admissions in the threads
    real = services.admit_request
    admitted: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        admitted.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr("billing.meter.admit_request", counted)
    # The key is remembered first, so the request needs no thread before its admission.
    first = httpx.post(chat_url(gateway), json=CHAT, headers=live_account.headers)
    assert first.status_code == 200
    wait_for(lambda: settlement.pending_tasks() == 0, "the first request's record")
    assert admitted == [1]
    free = threading.Event()
    busy = [db.submit_db(free.wait, 30) for _ in range(proxy_settings.DB_THREADS)]
    try:
        with socket.create_connection(("127.0.0.1", port_of(gateway.url))) as sock:
            sock.sendall(raw_chat_request(live_account.token))
            wait_for(lambda: exchange._running == 1, "the admission to be queued")
        wait_for(lambda: exchange._running == 0, "the proxy to see the client leave")
    finally:
        free.set()
    for blocker in busy:
        blocker.result(timeout=10)
    wait_for(lambda: settlement.pending_tasks() == 0, "whatever the leaving queued")
    # Run again: the queue had only the cancelled call left in it.
    assert db.submit_db(lambda: 1).result(timeout=10) == 1
    assert admitted == [1]
    assert in_flight(live_account) == 0
    assert len(gateway.fake.app.requests) == 1
    verification_cache.clear()


@pytest.mark.django_db(transaction=True)
async def test_the_views_own_body_limit(async_client: Any, fake: Any, settings: Any) -> None:
    """Through the full site stack (no ASGI fast path), the view refuses a large body itself."""
    from asgiref.sync import sync_to_async
    from django.db import connections

    from tests.support.accounts import make_account

    settings.OPENROUTER_PROXY_BASE_URL = fake.base_url
    settings.OPENROUTER_PROXY_MAX_BODY_BYTES = 200
    account = await sync_to_async(make_account)()
    body = {**CHAT, "messages": [{"role": "user", "content": "x" * 400}]}
    response = await async_client.post(
        "/api/proxy/openrouter/v1/chat/completions",
        body,
        content_type="application/json",
        headers=account.headers,
    )
    assert response.status_code == 413
    assert json.loads(response.content)["error"]["code"] == "body_too_large"
    assert len(fake.app.requests) == 0
    assert not await UsageRecord.objects.aexists()
    await sync_to_async(connections.close_all)()


# --- asgi.py ----------------------------------------------------------------------------


def test_client_leaving_mid_upload_sends_nothing_upstream(
    gateway: Gateway, live_account: Account
) -> None:
    with no_errors_logged("uvicorn", "uvicorn.error"):
        with socket.create_connection(("127.0.0.1", port_of(gateway.url))) as sock:
            sock.sendall(
                b"POST " + CHAT_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                b"X-Daemon-Token: " + live_account.token.encode() + b"\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                b'{"model": "x-ai/grok-code-fast-1", "messages": ['
            )
        # The server is still well and answers the next request (after the one
        # left behind was dropped quietly: the connection is served in order).
        response = httpx.post(chat_url(gateway), json=CHAT, headers=live_account.headers)
    assert response.status_code == 200
    assert len(gateway.fake.app.requests) == 1
    assert UsageRecord.objects.count() == 1
    assert in_flight(live_account) == 0


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (PermissionDenied(), 403, "forbidden"),
        (SuspiciousOperation("bad host"), 400, "bad_request"),
        (BadRequest("odd"), 400, "bad_request"),
        (Http404(), 404, "not_found"),
        (KeyError("bug"), 500, "internal_error"),
    ],
)
def test_exceptions_escaping_the_view_map_to_json_statuses(
    gateway: Gateway,
    live_account: Account,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    status: int,
    code: str,
) -> None:
    admission_raises(monkeypatch, error)
    response = httpx.post(
        chat_url(gateway),
        json=CHAT,
        headers={**live_account.headers, "Origin": "https://app.example"},
    )
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == code
    assert response.headers["access-control-allow-origin"] == "https://app.example"


async def test_lifespan_shutdown_waits_up_to_the_grace_then_cuts_tasks_short(
    settings: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings.OPENROUTER_PROXY_SHUTDOWN_GRACE = 0.3
    closed: list[str] = []

    async def close_clients() -> None:
        closed.append("clients")

    monkeypatch.setattr(asgi, "close_clients", close_clients)
    monkeypatch.setattr("openrouter_proxy.db.shutdown", lambda: closed.append("db"))
    quick = settlement.run_in_background(asyncio.sleep(0.05))
    stuck = settlement.run_in_background(asyncio.sleep(30))
    messages = asyncio.Queue[dict[str, str]]()
    sent: list[str] = []

    async def send(message: dict[str, str]) -> None:
        sent.append(message["type"])

    await messages.put({"type": "lifespan.startup"})
    await messages.put({"type": "lifespan.shutdown"})
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="openrouter_proxy.settlement"):
        await asyncio.wait_for(asgi._lifespan(messages.get, send), timeout=5)
    elapsed = time.monotonic() - started
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert 0.25 <= elapsed < 2, elapsed
    assert quick.done()  # finished within the grace
    assert not quick.cancelled()
    await async_wait_for(stuck.done, "the stuck task to be cancelled")
    assert stuck.cancelled()
    assert "cut short by shutdown" in caplog.text
    assert closed == ["clients", "db"]


# --- billing/services.py ------------------------------------------------------------------


def test_price_table_prices_cache_writes_and_reasoning_at_their_own_prices(db: None) -> None:
    ModelPrice.objects.create(
        model_id="anthropic/claude-x",
        prompt=Decimal("0.000003"),
        completion=Decimal("0.000015"),
        input_cache_read=Decimal("0.0000003"),
        input_cache_write=Decimal("0.00000375"),
        internal_reasoning=Decimal("0.00002"),
        request=Decimal("0.001"),
    )
    usage = ReportedUsage(
        prompt_tokens=1000,
        cached_tokens=200,
        cache_write_tokens=300,
        completion_tokens=100,
        reasoning_tokens=40,
    )
    expected = (
        500 * Decimal("0.000003")
        + 200 * Decimal("0.0000003")
        + 300 * Decimal("0.00000375")
        + 40 * Decimal("0.00002")
        + 60 * Decimal("0.000015")
        + Decimal("0.001")
    )
    assert price_table_cost(usage, "anthropic/claude-x") == expected


def test_price_table_without_cache_write_or_reasoning_prices_uses_prompt_and_completion(
    db: None,
) -> None:
    ModelPrice.objects.create(
        model_id="x/plain", prompt=Decimal("0.000001"), completion=Decimal("0.000002")
    )
    usage = ReportedUsage(
        prompt_tokens=100, cache_write_tokens=30, completion_tokens=10, reasoning_tokens=4
    )
    assert price_table_cost(usage, "x/plain") == 100 * Decimal("0.000001") + 10 * Decimal(
        "0.000002"
    )


def test_negative_grant_crossing_the_threshold_sends_credits_low(
    account: Account, settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    settings.BILLING_CREDITS_LOW_THRESHOLD = Decimal(5)
    received: list[dict[str, Any]] = []

    def receiver(**kwargs: Any) -> None:
        received.append(kwargs)

    credits_low.connect(receiver, weak=False)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            grant_credits(account.user, Decimal("-2"), note="above the threshold still")
        assert received == []
        with django_capture_on_commit_callbacks(execute=True):
            grant_credits(account.user, Decimal("-4"), note="crosses it")
        with django_capture_on_commit_callbacks(execute=True):
            grant_credits(account.user, Decimal("-1"), note="already below")
    finally:
        credits_low.disconnect(receiver)
    assert len(received) == 1
    assert received[0]["user_id"] == account.user.pk
    assert received[0]["balance"] == Decimal(4) == balance_of(account.user) + 1
    assert received[0]["threshold"] == Decimal(5)


# --- billing/spool.py ---------------------------------------------------------------------


def spooled(account: Account, index: int, cost: str = "0.01") -> UsageDraft:
    draft = UsageDraft(
        request_id=uuid.uuid4(),
        user_id=account.user.pk,
        endpoint="chat/completions",
        streamed=False,
        outcome=Outcome.COMPLETED,
        usage=ReportedUsage(generation_id=f"gen-spool-{index}", cost=Decimal(cost)),
        holds_slot=False,
    )
    spool_draft(draft)
    return draft


def test_unreadable_spool_files_are_set_aside_once(
    account: Account, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    good = spooled(account, 1)
    directory = settings.BILLING_SPOOL_DIR
    garbled = directory / f"{uuid.uuid4()}.json"
    garbled.write_text('{"request_id": "not even a draft"')
    unreadable = directory / f"{uuid.uuid4()}.json"
    unreadable.mkdir()  # reading it fails with an OSError
    with caplog.at_level(logging.ERROR, logger="billing.spool"):
        assert replay_spool() == 1
        assert replay_spool() == 0  # set aside: not retried, not logged again
    set_aside = [r for r in caplog.records if "unreadable spooled usage" in r.getMessage()]
    assert len(set_aside) == 2
    assert garbled.with_name(garbled.name + UNREADABLE_SUFFIX).exists()
    assert unreadable.with_name(unreadable.name + UNREADABLE_SUFFIX).exists()
    assert spooled_paths() == []
    assert UsageRecord.objects.get().request_id == good.request_id


def test_database_error_mid_replay_keeps_the_rest_spooled(
    account: Account, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    drafts = [spooled(account, index) for index in range(3)]
    calls = 0

    def fails_after_one(draft: UsageDraft) -> Any:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise OperationalError("server closed the connection unexpectedly")
        return record_usage(draft)

    monkeypatch.setattr(billing.spool, "record_usage", fails_after_one)
    with caplog.at_level(logging.WARNING, logger="billing.spool"):
        assert replay_spool() == 1
    assert calls == 2  # stopped at the first failure, not hammering a dead database
    assert "stays spooled" in caplog.text
    assert len(spooled_paths()) == 2
    monkeypatch.setattr(billing.spool, "record_usage", record_usage)
    assert replay_spool() == 2
    assert spooled_paths() == []
    assert {r.request_id for r in UsageRecord.objects.all()} == {d.request_id for d in drafts}
    assert balance_of(account.user) == Decimal(10) - Decimal("0.03")


def test_recording_retries_then_succeeds_without_spooling(
    account: Account, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    settings.BILLING_RECORD_ATTEMPTS = 3
    failures = 2

    def flaky(draft: UsageDraft) -> Any:
        nonlocal failures
        if failures:
            failures -= 1
            raise DatabaseError("deadlock detected")
        return record_usage(draft)

    monkeypatch.setattr(billing.spool, "record_usage", flaky)
    draft = UsageDraft(
        request_id=uuid.uuid4(),
        user_id=account.user.pk,
        endpoint="chat/completions",
        streamed=False,
        outcome=Outcome.COMPLETED,
        usage=ReportedUsage(generation_id="gen-retried", cost=Decimal("0.02")),
        holds_slot=False,
    )
    recorded = record_usage_durably(draft)
    assert recorded is not None
    assert recorded.result is RecordResult.RECORDED
    assert failures == 0
    assert spooled_paths() == []
    assert UsageRecord.objects.get().billed == Decimal("0.02")


def admission_raises(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """The meter's admission raises ``error``, in its thread and on the loop (PostgreSQL)."""
    from billing.services import admission_async

    def raising(*args: Any, **kwargs: Any) -> Any:
        raise error

    async def raising_on_loop(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr("billing.meter.admit_request", raising)
    monkeypatch.setattr(admission_async, "admit_user", raising_on_loop)
