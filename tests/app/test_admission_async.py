"""Admission on the event loop (PostgreSQL): the same answers as in a thread, and it heals."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any, TypeVar

import pytest
from django.db import DatabaseError, connection

from billing import recovery
from billing.meter import BillingMeter
from billing.models import CreditAccount, LedgerKind, OpenRequest
from billing.services import admission_async, grant_credits
from billing.services.admission import in_flight_bound
from openrouter_proxy.callers import KeyLimits
from openrouter_proxy.metering import Admission, MeteredRequest
from tests.support.accounts import Account, make_account

T = TypeVar("T")

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _postgres_only() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("psycopg's asynchronous connections are PostgreSQL's")


def on_one_loop(steps: Callable[[], Awaitable[T]]) -> T:
    """Run ``steps`` on a fresh loop, closing its admission connections after."""

    async def run() -> T:
        try:
            return await steps()
        finally:
            await admission_async.close()

    return asyncio.run(run())


def request_of(account: Account, **kwargs: Any) -> MeteredRequest:
    return MeteredRequest(
        request_id=uuid.uuid4(),
        user_id=account.user.pk,
        endpoint="chat/completions",
        streamed=False,
        api_key_id=account.key.pk,
        **kwargs,
    )


def test_the_loop_admits_bounds_and_traces_like_the_thread(settings: Any) -> None:
    settings.BILLING_MAX_IN_FLIGHT = 2
    account = make_account()
    meter = BillingMeter()
    requests = [request_of(account) for _ in range(4)]

    async def steps() -> list[Admission]:
        answers = [(await meter.admit_async(r)).admission for r in requests[:3]]
        # One of them has ended and is being recorded: its slot does not count.
        answers.append((await meter.admit_async(request_of(account, ending=1))).admission)
        return answers

    assert on_one_loop(steps) == [
        Admission.ADMITTED,
        Admission.ADMITTED,
        Admission.TOO_MANY_IN_FLIGHT,
        Admission.ADMITTED,
    ]
    assert CreditAccount.objects.get(user=account.user).in_flight == 3
    traced = set(OpenRequest.objects.values_list("request_id", flat=True))
    assert {requests[0].request_id, requests[1].request_id} <= traced
    assert requests[2].request_id not in traced  # refused: no trace
    assert len(traced) == 3


def test_no_credit_is_refused_on_the_loop() -> None:
    broke = make_account("broke", credit=None)
    grant_credits(broke.user, Decimal("0.01"))
    grant_credits(broke.user, Decimal("-0.01"), kind=LedgerKind.ADJUSTMENT)
    meter = BillingMeter()
    request = request_of(broke)
    answer = on_one_loop(lambda: meter.admit_async(request))
    assert answer.admission is Admission.NO_CREDIT
    assert not OpenRequest.objects.exists()
    assert CreditAccount.objects.get(user=broke.user).in_flight == 0


def test_a_key_with_limits_is_admitted_by_the_thread_path(settings: Any) -> None:
    """The key gate is several statements: it keeps its thread (and answers the same)."""
    account = make_account()
    meter = BillingMeter()
    limited = request_of(account, limits=KeyLimits(requests_per_minute=1))
    first = on_one_loop(lambda: meter.admit_async(limited))
    again = on_one_loop(lambda: meter.admit_async(request_of(account, limits=limited.limits)))
    assert first.admitted
    assert again.admission is Admission.RATE_LIMITED
    assert OpenRequest.objects.filter(request_id=limited.request_id).exists()


def test_a_broken_connection_is_refused_once_then_replaced() -> None:
    """The database dropped the loop's connection: that admission fails, the next reconnects."""
    account = make_account()
    meter = BillingMeter()

    async def steps() -> tuple[bool, str, bool]:
        first = await meter.admit_async(request_of(account))
        loop_connections = admission_async._connections()
        (kept, _) = loop_connections._idle[-1]
        pid = kept.info.backend_pid
        await asyncio.to_thread(_terminate, pid)
        try:
            await meter.admit_async(request_of(account))
        except DatabaseError as error:
            failed = str(error)
        else:
            failed = ""
        healed = await meter.admit_async(request_of(account))
        return first.admitted, failed, healed.admitted

    first, failed, healed = on_one_loop(steps)
    assert first
    assert failed.startswith("admission failed")
    assert healed
    assert CreditAccount.objects.get(user=account.user).in_flight == 2


def _terminate(pid: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [pid])


def test_an_unreachable_database_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    account = make_account()
    request = request_of(account)
    trace = recovery.trace_values(request)
    real = admission_async._Connections._params
    # A port nothing listens on, in the settings the loop's connections are built from.
    monkeypatch.setattr(
        admission_async._Connections,
        "_params",
        staticmethod(lambda: {**real(), "host": "127.0.0.1", "port": "1"}),
    )

    async def steps() -> float:
        started = asyncio.get_running_loop().time()
        with pytest.raises(DatabaseError, match="cannot reach the database"):
            await admission_async.admit_user(request.user_id, trace, in_flight_bound(0))
        return asyncio.get_running_loop().time() - started

    assert on_one_loop(steps) < 5
    assert CreditAccount.objects.get(user=account.user).in_flight == 0
