"""Admissions through the database threads, several in one call when they queue."""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import pytest
from django.db import OperationalError, connection
from django.test.utils import CaptureQueriesContext

from billing.meter import BillingMeter
from billing.models import CreditAccount, OpenRequest
from openrouter_proxy import exchange
from openrouter_proxy.callers import KeyLimits
from openrouter_proxy.metering import Admission, AdmissionResult, MeteredRequest
from tests.app.test_admission_async import request_of
from tests.support.accounts import make_account

transactional = pytest.mark.django_db(transaction=True)


def in_flight() -> dict[str, int]:
    return dict(CreditAccount.objects.values_list("user__username", "in_flight"))


@transactional
def test_admitted_together_as_each_would_be_alone(settings: Any) -> None:
    """The bound holds inside the batch; a key with limits is admitted alone, after it."""
    settings.BILLING_MAX_IN_FLIGHT = 2
    alice, bob = make_account("alice"), make_account("bob")
    broke = make_account("broke", credit=None)
    meter = BillingMeter()
    limited = request_of(bob, limits=KeyLimits(requests_per_minute=1))
    requests = [
        request_of(alice),
        limited,
        request_of(alice),
        request_of(broke),
        request_of(alice),
        request_of(bob),
    ]
    with CaptureQueriesContext(connection) as queries:
        outcomes = meter.admit_many(requests)
    assert all(isinstance(outcome, AdmissionResult) for outcome in outcomes)
    answers = [outcome.admission for outcome in outcomes if isinstance(outcome, AdmissionResult)]
    assert answers == [
        Admission.ADMITTED,
        Admission.ADMITTED,
        Admission.ADMITTED,
        Admission.NO_CREDIT,
        Admission.TOO_MANY_IN_FLIGHT,
        Admission.ADMITTED,
    ]
    assert in_flight() == {"alice": 2, "bob": 2}
    admitted = {
        r.request_id for r, a in zip(requests, answers, strict=True) if a.name == "ADMITTED"
    }
    assert set(OpenRequest.objects.values_list("request_id", flat=True)) == admitted
    if connection.vendor == "postgresql":
        together = [q for q in queries if (q["sql"] or "").startswith("5 times: ")]
        assert len(together) == 1


@transactional
def test_an_error_of_one_admitted_alone_stays_its_own() -> None:
    account = make_account()
    meter: Any = BillingMeter()
    real_admit = meter.admit
    limited = request_of(account, limits=KeyLimits(requests_per_minute=5))

    def admit(request: MeteredRequest) -> AdmissionResult:
        if request is limited:
            raise OperationalError("the key's meter could not be read")
        result: AdmissionResult = real_admit(request)
        return result

    meter.admit = admit
    outcomes = meter.admit_many([request_of(account), limited, request_of(account)])
    assert isinstance(outcomes[1], OperationalError)
    assert [outcomes[0].admitted, outcomes[2].admitted] == [True, True]
    assert in_flight() == {"alice": 2}


# --- The proxy's side: one event loop's admissions through the threads -----------------


class Meter:
    """Answers admissions; holds its first calls until let go."""

    def __init__(self, *, many: bool, failing: frozenset[str] = frozenset()) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.held = threading.Semaphore(0)
        self.started = threading.Semaphore(0)
        self.holding = exchange.THREAD_ADMISSIONS
        self.failing = failing
        self.lock = threading.Lock()
        if many:
            self.admit_many = self._admit_many

    def _hold(self) -> None:
        with self.lock:
            hold = self.holding > 0
            self.holding -= 1
        if hold:
            self.started.release()
            assert self.held.acquire(timeout=10)

    def admit(self, request: MeteredRequest) -> AdmissionResult:
        self._hold()
        with self.lock:
            self.calls.append(("one", [request.endpoint]))
        if request.endpoint in self.failing:
            raise OperationalError(f"cannot admit {request.endpoint}")
        return AdmissionResult(Admission.ADMITTED)

    def _admit_many(self, requests: list[MeteredRequest]) -> list[AdmissionResult]:
        self._hold()
        with self.lock:
            self.calls.append(("many", [request.endpoint for request in requests]))
        if any(request.endpoint in self.failing for request in requests):
            raise OperationalError("the transaction failed")
        return [AdmissionResult(Admission.ADMITTED, retry_after=n) for n in range(len(requests))]


def named(name: str) -> MeteredRequest:
    return MeteredRequest(
        request_id=uuid.uuid4(), user_id=1, endpoint=name, streamed=False, api_key_id=None
    )


def admit(meter: Meter, later: list[str], *, leaving: str = "") -> list[Any]:
    """Send ``a`` and ``b`` (held in their threads), then ``later``; let go; every outcome."""

    async def serving() -> list[Any]:
        admissions = exchange._admissions()
        first = [admissions.admit(meter, named(name)) for name in ("a", "b")]  # type: ignore[arg-type]
        for _ in first:
            assert await asyncio.to_thread(meter.started.acquire, True, 10)
        rest = [admissions.admit(meter, named(name)) for name in later]  # type: ignore[arg-type]
        for admitting in rest:
            if admitting.request.endpoint == leaving:
                assert admissions.withdraw(admitting)  # queued: it never runs
        for _ in first:
            meter.held.release()
        waited = [a.answer for a in first + rest if a.request.endpoint != leaving]
        return await asyncio.gather(*waited, return_exceptions=True)

    return asyncio.run(serving())


def test_admissions_queued_behind_the_ones_on_their_way_go_together() -> None:
    meter = Meter(many=True)
    outcomes = admit(meter, ["c", "d", "e"], leaving="d")
    # c and e go in one call once a or b has returned; d's caller left while it was queued.
    assert sorted(meter.calls) == [("many", ["c", "e"]), ("one", ["a"]), ("one", ["b"])]
    assert [o.retry_after for o in outcomes] == [None, None, 0, 1]


def test_a_meter_without_admit_many_gets_each_alone() -> None:
    meter = Meter(many=False)
    meter.holding = 0
    outcomes = admit_all_at_once(meter, ["a", "b", "c"])
    assert sorted(meter.calls) == [("one", ["a"]), ("one", ["b"]), ("one", ["c"])]
    assert all(o.admitted for o in outcomes)


def test_a_batch_that_fails_is_admitted_alone_and_only_the_bad_one_fails() -> None:
    meter = Meter(many=True, failing=frozenset({"d"}))
    outcomes = admit(meter, ["c", "d", "e"])
    assert [call for call in meter.calls if call[1][0] not in "ab"] == [
        ("many", ["c", "d", "e"]),
        ("one", ["c"]),
        ("one", ["d"]),
        ("one", ["e"]),
    ]
    assert [type(o).__name__ for o in outcomes] == [
        "AdmissionResult",
        "AdmissionResult",
        "AdmissionResult",
        "OperationalError",
        "AdmissionResult",
    ]


def admit_all_at_once(meter: Meter, names: list[str]) -> list[Any]:
    async def serving() -> list[Any]:
        admissions = exchange._admissions()
        sent = [admissions.admit(meter, named(name)) for name in names]  # type: ignore[arg-type]
        return await asyncio.gather(*(a.answer for a in sent))

    return asyncio.run(serving())
