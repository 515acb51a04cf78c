"""Limits per key: spend caps, a daily cap and a request rate, enforced at admission."""

from __future__ import annotations

import asyncio
import importlib
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from io import StringIO
from typing import Any

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import IntegrityError, transaction
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from billing.checks import check_billing_settings
from billing.models import CreditAccount, KeyMeter, Outcome, UsageRecord
from billing.services import (
    STAMP,
    admit_request,
    check_key_meters,
    check_ledger,
    record_usage,
    release_request,
    settle_pending,
)
from billing.signals import key_limit_reached
from devtools.fake_openrouter import RunningFake
from openrouter_proxy import metrics
from openrouter_proxy.callers import KeyLimits
from openrouter_proxy.metering import Admission, ReportedUsage, UsageDraft
from terragon.apikeys.checks import check_apikey_settings
from terragon.apikeys.models import ApiKey
from terragon.apikeys.verifier import verify_api_key
from tests.support.accounts import Account, make_account
from tests.support.books import recorded
from tests.support.processes import uvicorn_workers

pytestmark = pytest.mark.django_db


def charge(account: Account, cost: str, key: ApiKey | None = None) -> None:
    key = key or account.key
    record_usage(
        UsageDraft(
            request_id=uuid.uuid4(),
            user_id=account.user.pk,
            api_key_id=key.pk,
            api_key_label=f"tg_{key.prefix}",
            endpoint="chat/completions",
            streamed=False,
            outcome=Outcome.COMPLETED,
            usage=ReportedUsage(generation_id=f"gen-{uuid.uuid4()}", cost=Decimal(cost)),
        )
    )


def admit(account: Account, limits: KeyLimits, key: ApiKey | None = None) -> Any:
    key = key or account.key
    return admit_request(account.user.pk, key.pk, limits, detailed=True)


def test_spend_cap_refuses_the_key_once_reached(account: Account) -> None:
    limits = KeyLimits(spend_limit=Decimal("0.01"))
    assert admit(account, limits).admitted
    charge(account, "0.006")
    assert admit(account, limits).admitted
    charge(account, "0.006")  # in flight when the cap was crossed: charged in full
    result = admit(account, limits)
    assert result.admission is Admission.KEY_SPEND_LIMIT
    meter = KeyMeter.objects.get(api_key_id=account.key.pk)
    assert meter.spent == Decimal("0.012")
    assert meter.spend_limit == Decimal("0.01")
    assert CreditAccount.objects.get(user=account.user).in_flight == 0


def test_daily_cap_counts_the_utc_day_only(account: Account) -> None:
    limits = KeyLimits(daily_spend_limit=Decimal("0.01"))
    admit(account, limits)
    charge(account, "0.02")
    result = admit(account, limits)
    assert result.admission is Admission.KEY_DAILY_SPEND_LIMIT
    assert 1 <= result.retry_after <= 86400
    KeyMeter.objects.filter(api_key_id=account.key.pk).update(
        spent_day=timezone.now().date() - timedelta(days=1)
    )
    assert admit(account, limits).admitted


def test_rate_admits_n_per_window_and_says_when(account: Account, settings: Any) -> None:
    settings.BILLING_RATE_WINDOW_SECONDS = 2
    limits = KeyLimits(requests_per_minute=3)
    started = time.monotonic()
    assert [admit(account, limits).admission for _ in range(3)] == [Admission.ADMITTED] * 3
    refused = admit(account, limits)
    assert refused.admission is Admission.RATE_LIMITED
    assert 1 <= refused.retry_after <= 2
    while time.monotonic() - started < 2.05:
        time.sleep(0.05)
    assert admit(account, limits).admitted


def test_changing_the_rate_keeps_the_latest_admissions(account: Account) -> None:
    assert all(admit(account, KeyLimits(requests_per_minute=3)).admitted for _ in range(3))
    assert admit(account, KeyLimits(requests_per_minute=3)).admission is Admission.RATE_LIMITED
    five = KeyLimits(requests_per_minute=5)
    assert [admit(account, five).admission for _ in range(3)] == [
        Admission.ADMITTED,
        Admission.ADMITTED,
        Admission.RATE_LIMITED,
    ]
    meter = KeyMeter.objects.get(api_key_id=account.key.pk)
    assert len(meter.rate_times) == 5 * STAMP
    assert admit(account, KeyLimits(requests_per_minute=2)).admission is Admission.RATE_LIMITED


def test_a_refused_request_takes_neither_slot_nor_rate(account: Account, settings: Any) -> None:
    settings.BILLING_MAX_IN_FLIGHT = 1
    limits = KeyLimits(requests_per_minute=2)
    assert admit(account, limits).admitted
    assert admit(account, limits).admission is Admission.TOO_MANY_IN_FLIGHT
    release_request(account.user.pk)
    assert admit(account, limits).admitted  # the refusal did not count against the rate
    release_request(account.user.pk)
    assert admit(account, limits).admission is Admission.RATE_LIMITED
    assert CreditAccount.objects.get(user=account.user).in_flight == 0


def test_other_keys_of_the_user_go_on(account: Account) -> None:
    other, _ = ApiKey.objects.issue(account.user, name="other")
    capped = KeyLimits(spend_limit=Decimal("0.001"), requests_per_minute=1)
    admit(account, capped)
    charge(account, "0.002")
    assert admit(account, capped).admission is Admission.KEY_SPEND_LIMIT
    assert admit(account, KeyLimits(), other).admitted
    assert admit(account, KeyLimits(requests_per_minute=1), other).admitted


def test_no_credit_comes_first(db: None) -> None:
    broke = make_account("broke", credit=None)
    assert admit(broke, KeyLimits(requests_per_minute=5)).admission is Admission.NO_CREDIT
    assert not KeyMeter.objects.filter(api_key_id=broke.key.pk, rate_next__gt=0).exists()


def test_key_limit_reached_fires_once_per_cap(
    account: Account, django_capture_on_commit_callbacks: Any
) -> None:
    seen: list[dict[str, Any]] = []

    def receiver(**kwargs: Any) -> None:
        seen.append(kwargs)

    key_limit_reached.connect(receiver)
    try:
        account.key.spend_limit = Decimal("0.01")
        account.key.daily_spend_limit = Decimal("0.005")
        account.key.save()
        for _ in range(4):
            with django_capture_on_commit_callbacks(execute=True):
                charge(account, "0.004")
    finally:
        key_limit_reached.disconnect(receiver)
    assert [(s["limit"], s["spent"], s["cap"]) for s in seen] == [
        ("daily_spend_limit", Decimal("0.008"), Decimal("0.005")),
        ("spend_limit", Decimal("0.012"), Decimal("0.01")),
    ]
    assert seen[0]["api_key_id"] == account.key.pk
    assert seen[0]["user_id"] == account.user.pk


# --- Two worker processes, one database ---------------------------------------------------

CHAT = {"model": "x-ai/grok-code-fast-1", "messages": [{"role": "user", "content": "Hello"}]}


def limited_key(account: Account, name: str, **limits: Any) -> dict[str, str]:
    _, token = ApiKey.objects.issue(account.user, name=name, limits=KeyLimits(**limits))
    return {"X-Daemon-Token": token}


@dataclass
class Sent:
    started: float
    ended: float
    status: int
    code: str | None
    retry_after: str | None


async def send(client: httpx.AsyncClient, url: str, headers: dict[str, str], mode: str) -> Sent:
    started = time.monotonic()
    response = await client.post(url, json=CHAT, headers={**headers, "X-Fake-Mode": mode})
    ended = time.monotonic()
    code = None
    if response.status_code >= 400:
        code = response.json()["error"]["code"]
    return Sent(started, ended, response.status_code, code, response.headers.get("Retry-After"))


def chat_url(base: str) -> str:
    return f"{base}/api/proxy/openrouter/v1/chat/completions"


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_spend_cap_holds_across_two_workers(fake: RunningFake) -> None:
    """Many parallel requests of a capped key: the cap is reached, and passed by in-flight only."""
    in_flight, concurrency = 4, 12
    account = make_account("capped")
    with uvicorn_workers(2, fake.base_url, BILLING_MAX_IN_FLIGHT=in_flight) as base:
        url = chat_url(base)
        probe = httpx.post(url, json=CHAT, headers={**account.headers}, timeout=30)
        assert probe.status_code == 200
        (first,) = recorded(1)
        cost = first.billed
        assert cost > 0
        cap = cost * Decimal("10.5")
        capped = limited_key(account, "capped", spend_limit=cap)

        async def hammer() -> list[Sent]:
            results: list[Sent] = []
            gate = asyncio.Semaphore(concurrency)
            async with httpx.AsyncClient(timeout=60) as client:

                async def one() -> None:
                    async with gate:
                        results.append(await send(client, url, capped, "chunks=3,chunk-delay=0.05"))

                for _ in range(8):  # waves until the cap refuses
                    await asyncio.gather(*(one() for _ in range(concurrency)))
                    if any(r.code == "key_spend_limit" for r in results):
                        break
            return results

        results = asyncio.run(hammer())
        after = httpx.post(url, json=CHAT, headers=capped, timeout=30)
        other = httpx.post(url, json=CHAT, headers=account.headers, timeout=30)
    codes = {r.code for r in results}
    assert codes <= {None, "key_spend_limit", "too_many_in_flight"}, codes
    assert after.status_code == 402
    assert after.json()["error"]["code"] == "key_spend_limit"
    assert other.status_code == 200  # the user's other key goes on

    capped_id = ApiKey.objects.get(name="capped").pk
    records = list(UsageRecord.objects.filter(api_key_id=capped_id))
    assert len(records) == sum(1 for r in results if r.status == 200)
    meter = KeyMeter.objects.get(api_key_id=capped_id)
    spent = sum((r.billed for r in records), Decimal(0))
    assert meter.spent == spent
    worst = max(r.billed for r in records)
    assert cap <= spent <= cap + in_flight * worst
    assert check_key_meters() == []
    assert check_ledger() == []
    assert set(CreditAccount.objects.values_list("in_flight", flat=True)) == {0}
    print(
        f"\ncap ${cap} on one key, {len(results)} requests, {concurrency} at a time, "
        f"{in_flight} in flight per user, 2 workers: {len(records)} admitted, "
        f"spent ${spent} (overspend ${spent - cap} <= {in_flight} x ${worst}), "
        f"{sum(r.code == 'key_spend_limit' for r in results)} x 402 key_spend_limit"
    )


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_request_rate_holds_across_two_workers(fake: RunningFake) -> None:
    """Clients hammer a key with a rate: never more than N admitted in any window."""
    rate, window, seconds, clients = 5, 2, 6.5, 10
    account = make_account("rated")
    rated = limited_key(account, "rated", requests_per_minute=rate)
    env = {"BILLING_RATE_WINDOW_SECONDS": window, "BILLING_MAX_IN_FLIGHT": 100}
    with uvicorn_workers(2, fake.base_url, **env) as base:
        url = chat_url(base)

        async def burst() -> list[Sent]:
            async with httpx.AsyncClient(timeout=60) as client:
                return list(
                    await asyncio.gather(*(send(client, url, rated, "") for _ in range(30)))
                )

        async def hammer() -> list[Sent]:
            results: list[Sent] = []
            end = time.monotonic() + seconds
            async with httpx.AsyncClient(timeout=60) as client:

                async def loop() -> None:
                    while time.monotonic() < end:
                        results.append(await send(client, url, rated, ""))
                        await asyncio.sleep(0.01)  # ignores Retry-After on purpose

                await asyncio.gather(*(loop() for _ in range(clients)))
            return results

        at_once = asyncio.run(burst())
        time.sleep(window + 0.1)
        results = asyncio.run(hammer())
        other = httpx.post(url, json=CHAT, headers=account.headers, timeout=30)
    assert other.status_code == 200

    assert sum(r.status == 200 for r in at_once) == rate
    refused = [r for r in at_once + results if r.status != 200]
    assert {(r.status, r.code) for r in refused} == {(429, "rate_limited")}
    waits = {int(r.retry_after or 0) for r in refused}
    assert min(waits) >= 1
    assert max(waits) <= window

    admitted = sorted((r for r in results if r.status == 200), key=lambda r: r.started)
    # Any N + 1 admissions span more than a window: no window [t, t + W] holds the
    # whole round trips of more than N admitted requests.
    for first in admitted:
        inside = [r for r in admitted if r.started >= first.started]
        inside = [r for r in inside if r.ended <= first.started + window]
        assert len(inside) <= rate, (first, inside)
    # ...and the limiter is not stricter than it says: about N per window.
    assert len(admitted) >= rate * (int(seconds // window) - 1)
    assert len(admitted) <= rate * (int(seconds // window) + 1)
    rated_id = ApiKey.objects.get(name="rated").pk
    assert UsageRecord.objects.filter(api_key_id=rated_id).count() == rate + len(admitted)
    assert check_key_meters() == []
    assert check_ledger() == []
    print(
        f"\n{rate} per {window} s on one key, 2 workers: a burst of 30 admitted exactly "
        f"{rate}; {clients} clients for {seconds} s sent {len(results)}, {len(admitted)} "
        f"admitted (at most {rate} in any {window} s), {len(refused)} x 429 rate_limited "
        f"with Retry-After {min(waits)}..{max(waits)} s"
    )


# --- Where limits are set and shown -------------------------------------------------------


def test_issue_api_key_sets_the_limits(account: Account) -> None:
    out, err = StringIO(), StringIO()
    call_command(
        "issue_api_key",
        account.user.username,
        "--spend-limit",
        "5",
        "--daily-spend-limit",
        "0.50",
        "--rpm",
        "30",
        stdout=out,
        stderr=err,
    )
    caller = verify_api_key(out.getvalue().strip().splitlines()[-1])
    assert caller is not None
    assert caller.key_id is not None
    assert caller.limits == KeyLimits(Decimal(5), Decimal("0.5"), 30)
    assert "$5 in total, $0.5 a day, 30 requests a minute" in err.getvalue()
    meter = KeyMeter.objects.get(api_key_id=caller.key_id)
    assert (meter.spend_limit, meter.daily_spend_limit, meter.requests_per_minute) == (
        Decimal(5),
        Decimal("0.5"),
        30,
    )


@pytest.mark.parametrize(
    "flags",
    [
        ["--spend-limit", "-1"],
        ["--spend-limit", "lots"],
        ["--daily-spend-limit", "nan"],
        ["--rpm", "0"],
        ["--rpm", "1.5"],
        ["--rpm", "10001"],
    ],
)
def test_issue_api_key_refuses_bad_limits(account: Account, flags: list[str]) -> None:
    with pytest.raises(CommandError):
        call_command("issue_api_key", account.user.username, *flags, stdout=StringIO())


def test_a_key_without_limits_verifies_without_limits(account: Account) -> None:
    caller = verify_api_key(account.token)
    assert caller is not None
    assert caller.limits is None


def test_daemon_token_endpoint_takes_its_limits_from_settings(
    client: Any, account: Account, settings: Any
) -> None:
    settings.DEBUG = True
    settings.TERRAGON_DAEMON_TOKEN_SPEND_LIMIT = "2"
    settings.TERRAGON_DAEMON_TOKEN_RPM = "20"
    client.force_login(account.user)
    body = client.get("/api/internal/daemon-token").json()
    assert body["limits"] == {
        "spend_limit": "2.00",
        "daily_spend_limit": None,
        "requests_per_minute": 20,
    }
    caller = verify_api_key(body["token"])
    assert caller is not None
    assert caller.limits == KeyLimits(spend_limit=Decimal(2), requests_per_minute=20)


@pytest.mark.parametrize(
    ("name", "value", "check_id"),
    [
        ("BILLING_RATE_WINDOW_SECONDS", 0, "billing.E004"),
        ("BILLING_RATE_WINDOW_SECONDS", "soon", "billing.E004"),
        ("BILLING_RATE_WINDOW_SECONDS", True, "billing.E004"),
        ("TERRAGON_DAEMON_TOKEN_SPEND_LIMIT", "-2", "apikeys.E001"),
        ("TERRAGON_DAEMON_TOKEN_DAILY_SPEND_LIMIT", 0.5, "apikeys.E001"),
        ("TERRAGON_DAEMON_TOKEN_RPM", "0", "apikeys.E001"),
    ],
)
def test_checks_of_the_limit_settings(settings: Any, name: str, value: Any, check_id: str) -> None:
    assert check_billing_settings() == []
    assert check_apikey_settings() == []
    setattr(settings, name, value)
    assert check_id in [m.id for m in check_billing_settings() + check_apikey_settings()]


def test_admin_sets_limits_and_shows_spend_beside_caps(client: Any, account: Account) -> None:
    ops = get_user_model().objects.create_superuser("ops", "ops@example.com", "pw")
    client.force_login(ops)
    key = account.key
    page = reverse("admin:apikeys_apikey_change", args=[key.pk])
    form = client.get(page)
    assert b'name="spend_limit"' in form.content
    assert b'name="requests_per_minute"' in form.content
    assert b'name="name"' not in form.content  # the rest stays read-only
    response = client.post(
        page,
        {"spend_limit": "0.01", "daily_spend_limit": "", "requests_per_minute": "12"},
        follow=True,
    )
    assert response.status_code == 200
    assert b"within" in response.content  # the note on the key cache
    key.refresh_from_db()
    assert key.limits == KeyLimits(spend_limit=Decimal("0.01"), requests_per_minute=12)
    admit(account, key.limits)
    charge(account, "0.0125")

    listing = client.get(reverse("admin:apikeys_apikey_changelist")).content.decode()
    assert "$0.0125 / $0.01" in listing
    assert "12/min" in listing
    users = client.get(reverse("admin:billing_users")).content.decode()
    assert f"tg_{key.prefix}" in users
    assert "$0.0125 / $0.01" in users
    assert "today $0.0125" in users


def test_billing_api_lists_the_callers_keys(account: Account) -> None:
    other, _ = ApiKey.objects.issue(
        account.user, name="capped", limits=KeyLimits(daily_spend_limit=Decimal(1))
    )
    stranger = make_account("stranger")
    charge(account, "0.25")
    charge(stranger, "1")
    api = APIClient()
    response = api.get("/api/billing/keys", headers={"X-Daemon-Token": account.token})
    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 2
    by_id = {row["key_id"]: row for row in body["results"]}
    assert by_id[account.key.pk] == {
        "key_id": account.key.pk,
        "label": f"tg_{account.key.prefix}",
        "current": True,
        "spent": "0.25",
        "spent_today": "0.25",
        "spend_limit": None,
        "daily_spend_limit": None,
        "requests_per_minute": None,
    }
    assert by_id[other.pk]["current"] is False
    assert by_id[other.pk]["daily_spend_limit"] == "1.00"
    assert by_id[other.pk]["spent"] == "0.00"


def test_key_meters_match_the_ledger(account: Account) -> None:
    charge(account, "0.5")
    charge(account, "0.25")
    assert check_key_meters() == []
    KeyMeter.objects.filter(api_key_id=account.key.pk).update(spent=Decimal("0.7"))
    [mismatch] = check_key_meters()
    assert (mismatch.counter, mismatch.meter, mismatch.ledger) == (
        "spent",
        Decimal("0.7"),
        Decimal("0.75"),
    )
    err = StringIO()
    with pytest.raises(SystemExit):
        call_command("check_ledger", stdout=StringIO(), stderr=err)
    assert f"MISMATCH key {account.key.pk}: spent" in err.getvalue()


def test_settling_a_pending_record_moves_the_key_meter(account: Account) -> None:
    record_usage(
        UsageDraft(
            request_id=uuid.uuid4(),
            user_id=account.user.pk,
            api_key_id=account.key.pk,
            endpoint="chat/completions",
            streamed=True,
            outcome=Outcome.COMPLETED,
            usage=ReportedUsage(generation_id="gen-pending"),
        )
    )
    record = UsageRecord.objects.get(generation_id="gen-pending")
    assert settle_pending(record.pk, Decimal("0.3"))
    assert KeyMeter.objects.get(api_key_id=account.key.pk).spent == Decimal("0.3")
    assert check_key_meters() == []


def test_the_proxy_refuses_by_reason_with_retry_after(gateway: Any, live_account: Account) -> None:
    rated = limited_key(live_account, "rated", requests_per_minute=1)
    broke = limited_key(live_account, "broke", spend_limit=Decimal(0))
    url = f"{gateway.proxy}/v1/chat/completions"
    before = {
        code: own_refusals(status, code)
        for status, code in [("429", "rate_limited"), ("402", "key_spend_limit")]
    }
    assert httpx.post(url, json=CHAT, headers=rated, timeout=30).status_code == 200
    limited = httpx.post(url, json=CHAT, headers=rated, timeout=30)
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limited"
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert 50 <= int(limited.headers["Retry-After"]) <= 60
    assert limited.headers["Access-Control-Allow-Origin"] == "*"
    capped = httpx.post(url, json=CHAT, headers=broke, timeout=30)
    assert capped.status_code == 402
    assert capped.json()["error"]["code"] == "key_spend_limit"
    assert httpx.post(url, json=CHAT, headers=live_account.headers, timeout=30).status_code == 200
    assert own_refusals("429", "rate_limited") == before["rate_limited"] + 1
    assert own_refusals("402", "key_spend_limit") == before["key_spend_limit"] + 1


def own_refusals(status: str, code: str) -> float:
    for family in metrics.REFUSED.collect():
        for found in family.samples:
            if found.name.endswith("_total") and found.labels == {"status": status, "code": code}:
                return float(found.value)
    return 0.0


def test_the_migration_opens_meters_for_keys_charged_before_it(account: Account) -> None:
    from django.apps import apps

    migration = importlib.import_module("billing.migrations.0003_key_limits")
    charge(account, "0.5")
    charge(account, "0.25")
    KeyMeter.objects.all().delete()
    migration.meters_from_the_ledger(apps, None)
    meter = KeyMeter.objects.get(api_key_id=account.key.pk)
    assert (meter.spent, meter.spent_today, meter.user_id) == (
        Decimal("0.75"),
        Decimal("0.75"),
        account.user.pk,
    )
    assert meter.label == f"tg_{account.key.prefix}"
    assert check_key_meters() == []


@pytest.mark.parametrize(
    "values",
    [{"requests_per_minute": 0}, {"requests_per_minute": 10_001}, {"spend_limit": Decimal(-1)}],
)
def test_the_database_refuses_limits_out_of_range(account: Account, values: Any) -> None:
    with pytest.raises(IntegrityError), transaction.atomic():
        ApiKey.objects.filter(pk=account.key.pk).update(**values)
