"""The pieces that make the proxy fast keep it correct."""

from __future__ import annotations

import asyncio
import contextlib
import json
from decimal import Decimal
from typing import Any

import httpx
import pytest

from billing.models import CreditAccount, Outcome, Settlement, UsageRecord
from billing.services import balance_of, bill, check_ledger
from openrouter_proxy.callers import (
    FRESH,
    MISSING,
    ApiKeyRejected,
    verification_cache,
    verify_token,
)
from openrouter_proxy.db import run_db
from openrouter_proxy.exchange import on_serving_loop
from tests.support.accounts import BROKEN_VERIFIER, Account, Gateway
from tests.support.servers import wait_until
from tests.support.waiting import wait_for

CHAT = {"model": "x-ai/grok-code-fast-1", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture
def key_cache(settings: Any) -> Any:
    settings.OPENROUTER_PROXY_KEY_CACHE_SECONDS = 60
    verification_cache.clear()
    yield
    verification_cache.clear()


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Tokens the default verifier was asked about."""
    import terragon.apikeys.verifier as verifier
    from openrouter_proxy import callers

    calls: list[str] = []
    real = verifier.verify_api_key

    def counting(token: str) -> Any:
        calls.append(token)
        return real(token)

    monkeypatch.setattr(verifier, "verify_api_key", counting)
    callers._load_verifier.cache_clear()
    yield calls
    callers._load_verifier.cache_clear()


@pytest.mark.django_db(transaction=True)
def test_verified_tokens_are_remembered(
    live_account: Account, key_cache: None, verifications: list[str]
) -> None:
    calls = verifications
    first = asyncio.run(verify_token(live_account.token))
    second = asyncio.run(verify_token(live_account.token))
    assert first is not None
    assert second == first
    assert len(calls) == 1


@pytest.mark.django_db(transaction=True)
def test_refusals_are_remembered_and_raised_again(
    live_account: Account, key_cache: None, verifications: list[str]
) -> None:
    live_account.key.revoke()
    calls = verifications
    for _ in range(3):
        with pytest.raises(ApiKeyRejected, match="revoked"):
            asyncio.run(verify_token(live_account.token))
    assert asyncio.run(verify_token("tg_garbage")) is None
    assert asyncio.run(verify_token("tg_garbage")) is None
    assert len(calls) == 2


@pytest.mark.django_db(transaction=True)
def test_database_errors_are_not_remembered(
    live_account: Account, key_cache: None, settings: Any
) -> None:
    from django.db import OperationalError

    settings.OPENROUTER_PROXY_KEY_VERIFIER = BROKEN_VERIFIER
    for _ in range(2):
        with pytest.raises(OperationalError):
            asyncio.run(verify_token(live_account.token))
    settings.OPENROUTER_PROXY_KEY_VERIFIER = "terragon.apikeys.verifier.verify_api_key"
    assert asyncio.run(verify_token(live_account.token)) is not None


def test_the_cache_keeps_no_token_and_stays_bounded(key_cache: None) -> None:
    from openrouter_proxy.callers import VerificationCache

    cache = VerificationCache()
    cache.MAX_ENTRIES = 3
    for n in range(5):
        cache.put(f"tg_token_{n}", None, 60)
    assert len(cache._entries) == 3
    assert all(isinstance(key, bytes) and b"tg_" not in key for key in cache._entries)
    assert cache.get("tg_token_0") == (MISSING, None)
    assert cache.get("tg_token_4") == (FRESH, None)


@pytest.fixture
def keys_remembered_for(settings: Any) -> Any:
    """Set how long keys are remembered, starting from an empty cache."""

    def remember(seconds: float) -> None:
        settings.OPENROUTER_PROXY_KEY_CACHE_SECONDS = seconds
        verification_cache.clear()

    yield remember
    verification_cache.clear()


@pytest.mark.django_db(transaction=True)
def test_on_the_fast_path_a_key_past_its_time_goes_on_while_it_is_verified_again(
    live_account: Account, keys_remembered_for: Any, verifications: list[str]
) -> None:
    """Past its time, within twice it: answered at once, verified beside; a revocation lands."""
    from openrouter_proxy import callers

    keys_remembered_for(0.3)
    token = live_account.token

    async def serving() -> list[Any]:
        on_serving_loop()
        answers: list[Any] = [await verify_token(token)]  # verified: the first lookup
        await asyncio.sleep(0.4)  # past its time, within twice it
        answers.append(await verify_token(token))  # at once, from what is remembered
        assert len(verifications) == 1
        await asyncio.gather(*callers._reverifying.values())  # the lookup beside it
        assert len(verifications) == 2
        answers.append(await verify_token(token))  # fresh again: no lookup
        await run_db(live_account.key.revoke)  # the proxy's own database threads
        await asyncio.sleep(0.4)
        answers.append(await verify_token(token))  # the last one it goes on for
        await asyncio.gather(*callers._reverifying.values())
        with pytest.raises(ApiKeyRejected, match="revoked"):
            await verify_token(token)
        await asyncio.sleep(0.7)  # past twice its time: the refusal was never stale
        with pytest.raises(ApiKeyRejected, match="revoked"):
            await verify_token(token)
        return answers

    answers = asyncio.run(serving())
    assert all(answer is not None and answer.key_id == live_account.key.pk for answer in answers)
    assert len(verifications) == 4


@pytest.mark.django_db(transaction=True)
def test_a_key_unused_for_twice_its_time_or_off_the_fast_path_is_verified_first(
    live_account: Account, keys_remembered_for: Any, verifications: list[str]
) -> None:
    keys_remembered_for(0.2)
    token = live_account.token

    async def serving() -> None:
        on_serving_loop()
        await verify_token(token)
        await asyncio.sleep(0.5)  # past twice its time
        await verify_token(token)

    asyncio.run(serving())
    assert len(verifications) == 2  # both looked up before answering

    async def elsewhere() -> None:  # Django's own handler, the test client, WSGI
        await asyncio.sleep(0.3)  # past its time, within twice it
        await verify_token(token)

    asyncio.run(elsewhere())
    assert len(verifications) == 3


# --- httpx's own transport, the alternative to aiohttp -----------------------------------


@pytest.fixture
def httpx_transport(settings: Any) -> None:
    settings.OPENROUTER_PROXY_TRANSPORT = "httpx"


def test_httpx_transport_json_and_stream(
    httpx_transport: None, gateway: Gateway, live_account: Account
) -> None:
    url = f"{gateway.proxy}/v1/chat/completions"
    plain = httpx.post(url, json=CHAT, headers=live_account.headers)
    streamed = httpx.post(url, json={**CHAT, "stream": True}, headers=live_account.headers)
    assert plain.status_code == streamed.status_code == 200
    cost = json.loads(plain.content, parse_float=Decimal)["usage"]["cost"]
    assert streamed.text.rstrip().endswith("data: [DONE]")
    records = UsageRecord.objects.order_by("created_at")
    assert [r.streamed for r in records] == [False, True]
    assert records[0].billed == cost
    assert check_ledger() == []


def test_httpx_transport_query_string_is_byte_exact(
    httpx_transport: None, gateway: Gateway, live_account: Account
) -> None:
    query = "a=%20b+c&d=e%2Bf"
    response = httpx.get(f"{gateway.proxy}/echo/x?{query}", headers=live_account.headers)
    assert response.json()["query"] == query


def test_httpx_transport_disconnect_is_settled(
    httpx_transport: None, gateway: Gateway, live_account: Account
) -> None:
    headers = {**live_account.headers, "X-Fake-Mode": "chunks=50,chunk-delay=0.1"}
    with httpx.stream(
        "POST",
        f"{gateway.proxy}/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers=headers,
    ) as response:
        pieces = response.iter_raw()
        next(pieces)
        next(pieces)
    assert wait_until(lambda: gateway.fake.app.disconnected_streams == 1)
    assert wait_until(
        lambda: UsageRecord.objects.filter(settlement=Settlement.SETTLED).exists(), timeout=8
    )
    record = UsageRecord.objects.get()
    assert record.outcome == Outcome.CLIENT_DISCONNECTED
    assert balance_of(live_account.user) == Decimal(10) - record.billed
    assert CreditAccount.objects.get(user=live_account.user).in_flight == 0


@pytest.mark.parametrize("transport", ["native", "aiohttp", "httpx"])
def test_every_transport_reports_upstream_failures_alike(
    gateway: Gateway, live_account: Account, settings: Any, transport: str
) -> None:
    """Connect refused: retry is safe. Silence after sending: it is not."""
    settings.OPENROUTER_PROXY_TRANSPORT = transport
    settings.OPENROUTER_PROXY_READ_TIMEOUT = 0.3
    url = f"{gateway.proxy}/v1/chat/completions"
    silent = httpx.post(
        url, json=CHAT, headers={**live_account.headers, "X-Fake-Mode": "first-byte-delay=2"}
    )
    assert silent.status_code == 504
    assert silent.headers["x-should-retry"] == "false"
    settings.OPENROUTER_PROXY_BASE_URL = "http://127.0.0.1:9/api"
    refused = httpx.post(url, json=CHAT, headers=live_account.headers)
    assert refused.status_code == 502
    assert refused.headers["x-should-retry"] == "true"


@pytest.fixture
def held_records(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The meter's records wait until the test lets them through (``.set()``)."""
    import threading

    from billing.meter import BillingMeter

    gate = threading.Event()
    real = BillingMeter.record

    def held(self: BillingMeter, draft: Any) -> Any:
        assert gate.wait(timeout=20), "the test never let the record through"
        return real(self, draft)

    async def held_on_the_loop(self: BillingMeter, draft: Any) -> Any:
        assert await asyncio.to_thread(gate.wait, 20), "the test never let the record through"
        return await real_async(self, draft)

    real_async = BillingMeter.record_async
    monkeypatch.setattr(BillingMeter, "record", held)
    monkeypatch.setattr(BillingMeter, "record_async", held_on_the_loop)
    yield gate
    gate.set()


def test_a_response_ends_before_its_record_is_written(
    gateway: Gateway, live_account: Account, held_records: Any
) -> None:
    """The client has the whole answer while the record waits; the record then lands exactly."""
    from openrouter_proxy.exchange import records_in_progress

    answer = httpx.post(
        f"{gateway.proxy}/v1/chat/completions",
        json=CHAT,
        headers=live_account.headers,
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"]
    assert records_in_progress() == 1
    held_records.set()
    record = UsageRecord.objects.get()  # the test's queries wait for the record
    assert records_in_progress() == 0
    assert record.generation_id
    generation = gateway.fake.app.generations[record.generation_id]
    assert record.billed == bill(generation.charged)
    assert balance_of(live_account.user) == Decimal(10) - record.billed
    assert CreditAccount.objects.get(user=live_account.user).in_flight == 0
    assert check_ledger() == []


def test_a_caller_at_its_bound_goes_on_while_its_last_request_is_recorded(
    gateway: Gateway, live_account: Account, held_records: Any, settings: Any
) -> None:
    """An ended request's slot does not refuse the caller's next one; a running one's does."""
    from openrouter_proxy.exchange import records_in_progress

    settings.BILLING_MAX_IN_FLIGHT = 1
    url = f"{gateway.proxy}/v1/chat/completions"
    first = httpx.post(url, json=CHAT, headers=live_account.headers, timeout=10)
    assert first.status_code == 200, first.text
    assert records_in_progress() == 1
    second = httpx.post(url, json=CHAT, headers=live_account.headers, timeout=10)
    assert second.status_code == 200, second.text
    assert records_in_progress() == 2
    held_records.set()
    assert UsageRecord.objects.count() == 2
    assert CreditAccount.objects.get(user=live_account.user).in_flight == 0
    assert check_ledger() == []
    # A request still streaming holds its slot: the next is refused.
    with httpx.stream(
        "POST",
        url,
        json={**CHAT, "stream": True},
        headers={**live_account.headers, "X-Fake-Mode": "chunks=10,chunk-delay=0.1"},
        timeout=10,
    ) as streaming:
        assert streaming.status_code == 200
        refused = httpx.post(url, json=CHAT, headers=live_account.headers, timeout=10)
        assert refused.status_code == 429, refused.text
        streaming.read()


def test_a_caller_let_past_its_bound_cannot_spend_what_its_ended_requests_will_be_charged(
    gateway: Gateway, live_account: Account, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ended request's charge is not in the books yet: it counts against the balance."""
    import threading

    from billing.meter import BillingMeter
    from billing.models import LedgerKind
    from billing.services import grant_credits

    settings.BILLING_MAX_IN_FLIGHT = 1
    url = f"{gateway.proxy}/v1/chat/completions"
    user = live_account.user
    probe = httpx.post(url, json=CHAT, headers=live_account.headers, timeout=10)
    assert probe.status_code == 200, probe.text
    cost = bill(json.loads(probe.content, parse_float=Decimal)["usage"]["cost"])
    wait_for(lambda: UsageRecord.objects.count() == 1, "the record of the probe")
    # Exactly one more request's worth of credit.
    grant_credits(user, cost - balance_of(user), kind=LedgerKind.ADJUSTMENT, note="test")
    gate, real = threading.Event(), BillingMeter.record

    def held(self: BillingMeter, draft: Any) -> Any:
        assert gate.wait(timeout=20), "the test never let the record through"
        return real(self, draft)

    monkeypatch.setattr(BillingMeter, "record", held)
    try:
        first = httpx.post(url, json=CHAT, headers=live_account.headers, timeout=10)
        assert first.status_code == 200, first.text
        # Its slot no longer counts, but its charge does: nothing is left to spend.
        refused = httpx.post(url, json=CHAT, headers=live_account.headers, timeout=10)
        assert refused.status_code == 402, refused.text
        assert refused.json()["error"]["code"] == "insufficient_credits"
    finally:
        gate.set()
    wait_for(lambda: UsageRecord.objects.count() == 2, "the record of the first")
    assert balance_of(user) == 0
    assert CreditAccount.objects.get(user=user).in_flight == 0
    assert check_ledger() == []


@pytest.mark.parametrize("stream", [True, False], ids=["sse", "json"])
def test_the_last_chunk_goes_out_as_the_end_once_the_relay_has_ended(
    live_account: Account, fake: Any, settings: Any, stream: bool
) -> None:
    """Driven as a server drives it: the end rides on the last chunk; the record says completed."""
    from terragon.asgi import application

    settings.OPENROUTER_PROXY_BASE_URL = fake.base_url
    body = json.dumps({**CHAT, "stream": stream}).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/proxy/openrouter/v1/chat/completions",
        "raw_path": b"/api/proxy/openrouter/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-daemon-token", live_account.token.encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    sent: list[dict[str, Any]] = []

    async def drive() -> None:
        over = asyncio.Event()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await over.wait()  # as uvicorn does: the exchange is over once the response is
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                over.set()

        # Inside the lifespan, as a server runs it: its shutdown waits for the record and
        # closes what the request opened (the loop's database connections, the heartbeat).
        lifespan: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        answers: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        running: asyncio.Task[None] = asyncio.create_task(
            application({"type": "lifespan"}, lifespan.get, answers.put)  # type: ignore[arg-type]
        )
        await lifespan.put({"type": "lifespan.startup"})
        assert (await answers.get())["type"] == "lifespan.startup.complete"
        await application(scope, receive, send)
        await lifespan.put({"type": "lifespan.shutdown"})
        assert (await answers.get())["type"] == "lifespan.shutdown.complete"
        await running

    asyncio.run(drive())
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert sent[0]["status"] == 200
    assert [m.get("more_body", False) for m in bodies] == [True] * (len(bodies) - 1) + [False]
    assert bodies[-1]["body"]  # the last chunk itself, not an empty end
    whole = b"".join(m["body"] for m in bodies)
    if stream:
        assert whole.rstrip().endswith(b"data: [DONE]")
    else:
        assert json.loads(whole)["usage"]["cost"] > 0
    record = UsageRecord.objects.get()
    assert record.outcome == Outcome.COMPLETED
    assert record.billed > 0
    assert check_ledger() == []


@pytest.mark.parametrize("below", [8, 0], ids=["idle-worker-on-the-loop", "busy-worker-in-threads"])
def test_admission_runs_on_the_loop_only_while_the_worker_is_not_busy(
    gateway: Gateway, live_account: Account, monkeypatch: pytest.MonkeyPatch, below: int
) -> None:
    from billing.meter import BillingMeter
    from openrouter_proxy import exchange

    monkeypatch.setattr(exchange, "LOOP_ADMISSION_BELOW", below)
    calls: list[str] = []
    real_admit, real_async = BillingMeter.admit, BillingMeter.admit_async

    def admit(self: BillingMeter, request: Any) -> Any:
        calls.append("thread")
        return real_admit(self, request)

    async def admit_async(self: BillingMeter, request: Any) -> Any:
        calls.append("loop")
        return await real_async(self, request)

    monkeypatch.setattr(BillingMeter, "admit", admit)
    monkeypatch.setattr(BillingMeter, "admit_async", admit_async)
    answer = httpx.post(
        f"{gateway.proxy}/v1/chat/completions", json=CHAT, headers=live_account.headers, timeout=10
    )
    assert answer.status_code == 200, answer.text
    # On SQLite the loop's admission hands the work to a thread itself.
    assert calls[0] == ("loop" if below else "thread")
    assert calls.count("loop") == (1 if below else 0)
    assert UsageRecord.objects.count() == 1
    assert exchange._running == 0


# --- A stream keeps no copy of its prompt -------------------------------------------------


def test_a_request_body_is_let_go_once_read() -> None:
    from openrouter_proxy.asgi import RequestBody

    prompt = b"line one\nline two\n" + b"x" * 1000
    whole = RequestBody(prompt)
    assert whole.read(len(prompt) + 1) is prompt  # the bytes received, not a copy
    assert whole.read() == b""
    parts = RequestBody(prompt)
    assert parts.readline() == b"line one\n"
    assert parts.read(4) == b"line"
    assert parts.readline() == b" two\n"
    assert parts.read() == b"x" * 1000
    assert parts.readline() == b""
    closed = RequestBody(prompt)
    closed.close()
    assert closed.read() == b""


def _attributes(thing: object) -> dict[str, object]:
    """An object's instance attributes and slots, read without running any of its code."""
    import types

    found: dict[str, object] = {}
    with contextlib.suppress(AttributeError, TypeError):
        found.update(object.__getattribute__(thing, "__dict__"))
    kind = type(thing)
    for klass in kind.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            descriptor = klass.__dict__.get(slot)
            if isinstance(descriptor, types.MemberDescriptorType):
                with contextlib.suppress(AttributeError):
                    found[slot] = descriptor.__get__(thing, kind)
    return found


def _holders_of(size: int, *, besides: tuple[bytes, ...]) -> list[str]:
    """What in this process holds bytes of ``size`` or more (the fake's own copies aside)."""
    import gc
    import io
    import types

    def big(value: object) -> bool:
        # type(), never isinstance(): a lazy object's __class__ would evaluate it.
        if type(value) not in (bytes, bytearray):
            return False
        assert isinstance(value, bytes | bytearray)
        return len(value) >= size and not any(value is kept for kept in besides)

    gc.collect()  # an earlier test's client may linger in a cycle, its prompt with it
    found = []
    for thing in gc.get_objects():
        kind = type(thing)
        module = kind.__dict__.get("__module__")
        # By type() here too.
        if issubclass(kind, type) or (
            isinstance(module, str) and module.startswith(("devtools.", "tests."))
        ):
            continue
        if issubclass(kind, io.BytesIO) and not thing.closed and thing.getbuffer().nbytes >= size:
            found.append(f"{kind.__qualname__} buffer")
        frame = None
        if kind is types.CoroutineType:
            frame = thing.cr_frame
        elif kind is types.AsyncGeneratorType:
            frame = thing.ag_frame
        if frame is not None and "devtools" not in frame.f_code.co_filename:
            found += [
                f"{frame.f_code.co_qualname}: {name}"
                for name, value in frame.f_locals.items()
                if big(value)
            ]
        found += [
            f"{kind.__qualname__}.{name}"
            for name, value in _attributes(thing).items()
            if big(value)
        ]
    return found


@pytest.mark.parametrize("transport", ["native", "aiohttp", "httpx"])
def test_a_stream_keeps_no_copy_of_its_prompt(
    gateway: Gateway, live_account: Account, settings: Any, transport: str
) -> None:
    """A 400 KB prompt is forwarded, then let go while its answer streams for a second."""
    from benchmarks.run import prompt

    settings.OPENROUTER_PROXY_TRANSPORT = transport

    body = prompt(400_000, True)
    with httpx.stream(
        "POST",
        f"{gateway.proxy}/v1/chat/completions",
        content=body,
        headers={
            **live_account.headers,
            "Content-Type": "application/json",
            "X-Fake-Mode": "chunks=20,chunk-delay=0.05",
        },
        timeout=30,
    ) as streaming:
        assert streaming.status_code == 200
        pieces = streaming.iter_raw()
        next(pieces)
        assert gateway.fake.app.requests[-1].body == body  # forwarded whole
        assert _holders_of(len(body), besides=(body,)) == []
        for _ in pieces:
            pass
    assert UsageRecord.objects.get().outcome == Outcome.COMPLETED


# --- What a request leaves to the cycle collector -----------------------------------------


def test_a_request_leaves_no_cycles_of_its_own_for_the_collector(
    gateway: Gateway, live_account: Account
) -> None:
    """Requests, JSON and streamed, leave no request, exception or database wrapper in a cycle.

    Each used to leave Django's request, a ``RequestAborted`` with its traceback
    and frames (the disconnect watcher raised it after every response) and, on
    PostgreSQL, a whole database wrapper (the event loop's admission read
    ``django.db.connection``, new in each request's context): some eighty
    objects a request that only a collection could free.
    """
    import gc

    from django.core.exceptions import RequestAborted
    from django.core.handlers.asgi import ASGIRequest
    from django.db.backends.base.base import BaseDatabaseWrapper

    with httpx.Client(base_url=gateway.proxy, headers=live_account.headers, timeout=30) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200  # warm
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for number in range(20):
                streamed = {**CHAT, "stream": number % 2 == 1}
                answer = client.post("/v1/chat/completions", json=streamed)
                assert answer.status_code == 200
            assert UsageRecord.objects.count() == 21
            gc.collect()
            left = [type(thing) for thing in gc.garbage]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    kinds = {kind.__qualname__ for kind in left if issubclass(kind, ASGIRequest | RequestAborted)}
    kinds |= {kind.__qualname__ for kind in left if issubclass(kind, BaseDatabaseWrapper)}
    assert kinds == set()


@pytest.mark.parametrize("freeze", [True, False])
def test_a_worker_loads_its_parts_at_start_then_freezes_them(freeze: bool) -> None:
    """In a fresh process, as a worker starts: the parts are loaded, then (if asked) frozen."""
    import subprocess
    import sys

    script = (
        "import gc, sys, django\n"
        "django.setup()\n"
        "from django.conf import settings\n"
        f"settings.OPENROUTER_PROXY_GC_FREEZE = {freeze}\n"
        "from openrouter_proxy import callers, metering\n"
        "from openrouter_proxy.asgi import prepare_worker\n"
        "before = ('openrouter_proxy.wire' in sys.modules, gc.get_freeze_count())\n"
        "prepare_worker()\n"
        "print(before, 'openrouter_proxy.wire' in sys.modules, gc.get_freeze_count() > 0,"
        " metering.load_meter.cache_info().currsize, callers._load_verifier.cache_info().currsize)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["(False,", "0)", "True", str(freeze), "1", "1"], done.stderr


def test_a_part_that_fails_to_load_at_start_is_left_to_the_first_request(
    settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from openrouter_proxy import metering
    from openrouter_proxy.asgi import prepare_worker

    settings.OPENROUTER_PROXY_METER = "no.such.module.Meter"
    metering.load_meter.cache_clear()
    with caplog.at_level("ERROR", logger="openrouter_proxy.asgi"):
        prepare_worker()
    assert "could not load the proxy's meter at start-up" in caplog.text
    assert metering.load_meter.cache_info().currsize == 0
