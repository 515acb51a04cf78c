"""The operators' admin: pages, permissions, granting credits, totals, CSV export."""

from __future__ import annotations

import csv
import io
import re
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.db import connection
from django.test import Client, RequestFactory
from django.test.utils import CaptureQueriesContext
from django.urls import resolve, reverse
from django.utils import timezone

from billing.admin import CreditAccountAdmin
from billing.admin_tools import with_period_probing
from billing.models import (
    CreditAccount,
    CreditLedgerEntry,
    KeyMeter,
    LedgerKind,
    ModelPrice,
    Outcome,
    Settlement,
    UsageRecord,
)
from billing.services import balance_of, check_ledger
from devtools.fake_openrouter import RunningFake
from terragon.apikeys.models import ApiKey
from terragon.apikeys.verifier import verify_api_key
from tests.support.accounts import Account, add_usage, make_account

User = get_user_model()


def csv_rows(response: Any) -> list[dict[str, str]]:
    body = b"".join(response.streaming_content).decode()
    return list(csv.DictReader(io.StringIO(body)))


def staff(username: str, *perms: str) -> Any:
    user = User.objects.create_user(username=username, password="pw", is_staff=True)
    for perm in perms:
        app_label, codename = perm.split(".")
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )
    return user


@pytest.fixture
def operator(db: None) -> Client:
    user = User.objects.create_superuser("ops", "ops@example.com", "pw")
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def usage(account: Account) -> Account:
    add_usage(account.user, "1.25", days_ago=0)
    add_usage(account.user, "2.50", model="z-ai/glm-4.6", days_ago=3)
    add_usage(account.user, "4.00", days_ago=20)
    add_usage(account.user, "0", outcome=Outcome.UPSTREAM_ERROR, days_ago=1, tokens=0)
    add_usage(account.user, "0", settlement=Settlement.PENDING, days_ago=0.01)
    return account


BILLING_PAGES = [
    "admin:billing_dashboard",
    "admin:billing_users",
    "admin:billing_usagerecord_changelist",
    "admin:billing_creditledgerentry_changelist",
    "admin:billing_creditaccount_changelist",
    "admin:billing_modelprice_changelist",
    "admin:apikeys_apikey_changelist",
]


@pytest.mark.parametrize("name", BILLING_PAGES)
def test_operator_pages_render(operator: Client, usage: Account, name: str) -> None:
    response = operator.get(reverse(name))
    assert response.status_code == 200


def test_admin_index_links_the_reports(operator: Client) -> None:
    body = operator.get(reverse("admin:index")).content.decode()
    assert reverse("admin:billing_dashboard") in body
    assert reverse("admin:billing_users") in body


def test_users_page_shows_spend_per_period(operator: Client, usage: Account) -> None:
    body = operator.get(reverse("admin:billing_users")).content.decode()
    # The records here are written directly, without charges: the balance is the grant.
    assert "$10.00" in body
    assert "$1.25" in body  # today
    assert "$3.75" in body  # 7 days
    assert "$7.75" in body  # 30 days and all time
    assert "x-ai/grok-code-fast-1" in body  # top model
    assert "20.0%" in body  # one failed request of five in 30 days
    assert reverse("admin:billing_grant", args=[usage.user.pk]) in body


def test_users_page_sorts_and_searches(operator: Client, usage: Account) -> None:
    make_account("bob", credit="50")
    url = reverse("admin:billing_users")
    # An email, not a bare name: "bob" can turn up inside a random CSRF token.
    found = operator.get(url, {"q": "alice"}).content.decode()
    assert "alice@example.com" in found
    assert "bob@example.com" not in found
    body = operator.get(url, {"o": "2"}).content.decode()  # balance, ascending
    assert body.index("alice@example.com") < body.index("bob@example.com")
    body = operator.get(url, {"o": "-2"}).content.decode()
    assert body.index("bob@example.com") < body.index("alice@example.com")


def test_users_page_queries_do_not_grow_with_users(operator: Client, usage: Account) -> None:
    url = reverse("admin:billing_users")
    operator.get(url)
    with CaptureQueriesContext(connection) as few:
        operator.get(url)
    for index in range(8):
        extra = make_account(f"user{index}")
        add_usage(extra.user, "0.5")
    with CaptureQueriesContext(connection) as many:
        operator.get(url)
    assert len(many.captured_queries) == len(few.captured_queries)


def test_dashboard_shows_models_users_and_attention(operator: Client, usage: Account) -> None:
    body = operator.get(reverse("admin:billing_dashboard")).content.decode()
    assert "<svg" in body
    assert "z-ai/glm-4.6" in body
    assert "x-ai/grok-code-fast-1" in body
    assert "alice" in body
    assert "1 pending" in body
    assert "Upstream error" in body
    mine = operator.get(reverse("admin:billing_dashboard"), {"user": usage.user.pk})
    assert "Spend dashboard — alice" in mine.content.decode()


def test_usage_changelist_shows_totals_of_the_filter(operator: Client, usage: Account) -> None:
    url = reverse("admin:billing_usagerecord_changelist")
    body = operator.get(url).content.decode()
    assert "$7.75" in body
    body = operator.get(url, {"model": "z-ai/glm-4.6"}).content.decode()
    assert "$2.50" in body
    assert "$7.75" not in body
    assert operator.get(url, {"q": "gen-missing"}).status_code == 200


def test_csv_export_streams_the_current_filter(operator: Client, usage: Account) -> None:
    url = reverse("admin:billing_usagerecord_export")
    response = operator.get(url, {"model": "x-ai/grok-code-fast-1"})
    assert response.status_code == 200
    assert response.streaming
    assert response["Content-Type"].startswith("text/csv")
    rows = csv_rows(response)
    assert len(rows) == 4
    assert {row["model"] for row in rows} == {"x-ai/grok-code-fast-1"}
    assert sorted(row["billed_usd"] for row in rows) == ["0.00", "0.00", "1.25", "4.00"]
    assert rows[0]["created_at"] > rows[-1]["created_at"]


def test_csv_export_batches_by_keyset(operator: Client, account: Account, monkeypatch: Any) -> None:
    monkeypatch.setattr("billing.exports.BATCH_SIZE", 3)
    moment = timezone.now()
    for index in range(7):
        record = add_usage(account.user, "0.01")
        # Ties on created_at must neither repeat nor lose rows.
        UsageRecord.objects.filter(pk=record.pk).update(
            created_at=moment - timedelta(minutes=index // 2)
        )
    response = operator.get(reverse("admin:billing_usagerecord_export"))
    rows = csv_rows(response)
    exported = sorted(row["request_id"] for row in rows)
    stored = UsageRecord.objects.values_list("request_id", flat=True)
    assert exported == sorted(str(request_id) for request_id in stored)
    assert len(exported) == 7  # each row once: no repeats across batches


def test_date_hierarchy_probes_give_the_same_periods(usage: Account) -> None:
    records = UsageRecord.objects.all()
    for kind in ("year", "month", "day"):
        expected = list(records.datetimes("created_at", kind))
        assert list(with_period_probing(records).datetimes("created_at", kind)) == expected


# --- Granting credits ------------------------------------------------------------------


def grant_form(client: Client, user: Any) -> dict[str, str]:
    response = client.get(reverse("admin:billing_grant", args=[user.pk]))
    assert response.status_code == 200
    token = response.context["form"]["token"].value()
    return {"token": str(token)}


def test_grant_form_writes_a_ledger_row_with_the_operator(
    operator: Client, account: Account
) -> None:
    data = grant_form(operator, account.user) | {"amount": "20", "kind": "grant", "note": "promo"}
    response = operator.post(reverse("admin:billing_grant", args=[account.user.pk]), data)
    assert response.status_code == 302
    assert balance_of(account.user) == Decimal(30)
    entry = CreditLedgerEntry.objects.filter(kind=LedgerKind.GRANT, note="promo").get()
    assert entry.actor is not None
    assert entry.actor.username == "ops"
    assert entry.amount == Decimal(20)
    page = operator.get(response["Location"]).content.decode()
    assert "$30.00" in page
    # The same form submitted twice writes one row.
    operator.post(reverse("admin:billing_grant", args=[account.user.pk]), data)
    assert CreditLedgerEntry.objects.filter(note="promo").count() == 1
    assert check_ledger() == []


@pytest.mark.parametrize(
    ("amount", "kind"), [("0", "grant"), ("-5", "grant"), ("-5", "refund"), ("abc", "grant")]
)
def test_grant_form_refuses_bad_amounts(
    operator: Client, account: Account, amount: str, kind: str
) -> None:
    data = grant_form(operator, account.user) | {"amount": amount, "kind": kind}
    response = operator.post(reverse("admin:billing_grant", args=[account.user.pk]), data)
    assert response.status_code == 200
    assert response.context["form"].errors
    assert balance_of(account.user) == Decimal(10)


def test_negative_adjustment_is_allowed(operator: Client, account: Account) -> None:
    data = grant_form(operator, account.user) | {"amount": "-2.5", "kind": "adjustment"}
    operator.post(reverse("admin:billing_grant", args=[account.user.pk]), data)
    assert balance_of(account.user) == Decimal("7.5")


def test_grant_action_on_the_users_page(operator: Client, account: Account) -> None:
    bob = make_account("bob", credit=None)
    url = reverse("admin:billing_users")
    ids = [str(account.user.pk), str(bob.user.pk)]
    form = operator.post(url, {"action": "grant_or_adjust", "_selected_action": ids})
    token = form.context["form"]["token"].value()
    response = operator.post(
        url,
        {
            "action": "grant_or_adjust",
            "_selected_action": ids,
            "apply": "1",
            "token": str(token),
            "amount": "5",
            "kind": "grant",
        },
    )
    assert response.status_code == 302
    assert balance_of(account.user) == Decimal(15)
    assert balance_of(bob.user) == Decimal(5)


def test_the_form_needs_csrf(account: Account) -> None:
    user = User.objects.create_superuser("ops", "ops@example.com", "pw")
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    url = reverse("admin:billing_grant", args=[account.user.pk])
    response = client.post(url, {"amount": "5", "kind": "grant", "token": str(uuid.uuid4())})
    assert response.status_code == 403
    assert balance_of(account.user) == Decimal(10)


# --- Permissions -----------------------------------------------------------------------


def test_staff_without_billing_permissions_sees_no_billing_page(usage: Account) -> None:
    client = Client()
    client.force_login(staff("helper"))
    for name in BILLING_PAGES[:-1]:
        assert client.get(reverse(name)).status_code == 403, name
    assert client.get(reverse("admin:billing_usagerecord_export")).status_code == 403
    index = client.get(reverse("admin:index")).content.decode()
    assert reverse("admin:billing_dashboard") not in index


def test_view_permission_is_read_only(usage: Account) -> None:
    client = Client()
    client.force_login(staff("auditor", "billing.view_usagerecord", "billing.view_creditaccount"))
    body = client.get(reverse("admin:billing_users")).content.decode()
    assert "$7.75" in body
    assert reverse("admin:billing_grant", args=[usage.user.pk]) not in body
    assert client.get(reverse("admin:billing_dashboard")).status_code == 200
    grant = reverse("admin:billing_grant", args=[usage.user.pk])
    assert client.get(grant).status_code == 403
    assert client.post(grant, {"amount": "5", "kind": "grant"}).status_code == 403
    assert balance_of(usage.user) == Decimal(10)


def test_non_staff_is_sent_to_login(usage: Account) -> None:
    client = Client()
    client.force_login(User.objects.create_user("outsider", password="pw"))
    response = client.get(reverse("admin:billing_dashboard"))
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]


# --- Admin objects are shared by every request ----------------------------------------

USERS_PAGE_PERMS = ("billing.view_creditaccount", "billing.view_usagerecord")


def billing_admins() -> list[Any]:
    """The billing admin objects: one each for the whole process, shared by all requests."""
    accounts = admin.site.get_model_admin(CreditAccount)
    assert isinstance(accounts, CreditAccountAdmin)
    others = [
        admin.site.get_model_admin(model) for model in (CreditLedgerEntry, UsageRecord, ModelPrice)
    ]
    return [accounts, accounts.users_admin, *others]


def test_interleaved_requests_of_different_operators_get_their_own_pages(usage: Account) -> None:
    """Two users' pages, both built before either is rendered: nothing leaks between them."""
    bob = make_account("bob")
    KeyMeter.objects.create(api_key_id=900_001, user=usage.user, label="tg_alicemeter")
    KeyMeter.objects.create(api_key_id=900_002, user=bob.user, label="tg_bobmeter")
    granter = staff("granter", *USERS_PAGE_PERMS, "billing.change_creditaccount")
    viewer = staff("viewer", *USERS_PAGE_PERMS)
    url = reverse("admin:billing_users")
    view = resolve(url).func
    factory = RequestFactory()

    def build(user: Any, email: str) -> Any:
        request = factory.get(url, {"q": email})
        request.user = user
        return view(request)  # a TemplateResponse, not rendered yet

    granters = build(granter, "alice@example.com")
    viewers = build(viewer, "bob@example.com")
    granters_page = granters.render().content.decode()
    viewers_page = viewers.render().content.decode()
    assert reverse("admin:billing_grant", args=[usage.user.pk]) in granters_page
    assert "tg_alicemeter" in granters_page
    assert "tg_bobmeter" not in granters_page
    assert reverse("admin:billing_grant", args=[bob.user.pk]) not in viewers_page
    assert "Grant or adjust credits" not in viewers_page  # nor the action
    assert "Grant or adjust credits" in granters_page
    assert "tg_bobmeter" in viewers_page
    assert "tg_alicemeter" not in viewers_page


def test_admin_objects_keep_nothing_of_a_request(operator: Client, usage: Account) -> None:
    def state() -> list[dict[str, tuple[int, str]]]:
        return [
            {name: (id(value), repr(value)) for name, value in vars(model_admin).items()}
            for model_admin in billing_admins()
        ]

    before = state()
    viewer = Client()
    views = ("billing.view_creditledgerentry", "billing.view_modelprice", "apikeys.view_apikey")
    viewer.force_login(staff("auditor", *USERS_PAGE_PERMS, *views))
    users = reverse("admin:billing_users")
    for client in (operator, viewer):
        for name in BILLING_PAGES:
            assert client.get(reverse(name), {"o": "1"}).status_code == 200, name
        filtered = client.get(users, {"q": "alice", "balance": "low", "activity": "week"})
        assert filtered.status_code == 200
    export = operator.get(reverse("admin:billing_usagerecord_export"))
    assert csv_rows(export)
    grant = grant_form(operator, usage.user) | {"amount": "1", "kind": "grant"}
    operator.post(reverse("admin:billing_grant", args=[usage.user.pk]), grant)
    operator.post(users, {"action": "grant_or_adjust", "_selected_action": [usage.user.pk]})
    assert state() == before


# --- Keys and prices -------------------------------------------------------------------


def test_api_key_is_shown_once_and_revocation_is_one_way(
    operator: Client, account: Account
) -> None:
    response = operator.post(
        reverse("admin:apikeys_apikey_add"), {"user": account.user.pk, "name": "ci"}, follow=True
    )
    key = ApiKey.objects.get(name="ci")
    shown = re.search(rf"tg_{key.prefix}_[A-Za-z0-9_-]{{43}}", response.content.decode())
    assert shown is not None
    assert verify_api_key(shown.group(0)) is not None
    listing = operator.get(reverse("admin:apikeys_apikey_changelist")).content.decode()
    assert shown.group(0) not in listing
    operator.post(
        reverse("admin:apikeys_apikey_changelist"),
        {"action": "revoke_keys", "_selected_action": [key.pk]},
    )
    key.refresh_from_db()
    assert key.state == "revoked"
    changelist = reverse("admin:apikeys_apikey_changelist")
    revoked = operator.get(changelist, {"state": "revoked"})
    assert [k.pk for k in revoked.context["cl"].result_list] == [key.pk]
    active = operator.get(changelist, {"state": "active"})
    assert key.pk not in [k.pk for k in active.context["cl"].result_list]


def test_sync_prices_button(operator: Client, fake: RunningFake, settings: Any) -> None:
    settings.OPENROUTER_PROXY_BASE_URL = fake.base_url
    response = operator.post(reverse("admin:billing_modelprice_sync"), follow=True)
    assert "model price(s) written" in response.content.decode()
    assert ModelPrice.objects.filter(model_id="x-ai/grok-code-fast-1").exists()
    assert operator.get(reverse("admin:billing_modelprice_sync")).status_code == 405


def test_seed_usage_keeps_the_ledger_consistent(db: None) -> None:
    out = io.StringIO()
    call_command("seed_usage", records=600, users=4, days=5, stdout=out, stderr=io.StringIO())
    assert "600 usage records" in out.getvalue()
    assert UsageRecord.objects.count() == 600
    assert UsageRecord.objects.filter(settlement=Settlement.SETTLED).exists()
    assert check_ledger() == []
    billed = UsageRecord.objects.exclude(billed=0).count()
    assert CreditLedgerEntry.objects.filter(kind=LedgerKind.USAGE).count() == billed
