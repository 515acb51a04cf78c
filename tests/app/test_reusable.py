"""The apps' own guarantees, whatever the host site's defaults.

A host may have no DRF defaults, no fast path in its ``asgi.py``, CSRF
middleware on, and no key admin: the proxy and the billing API must still
refuse and answer as documented. (``test_host_site`` proves the same in a real
bare site, from the wheel.)
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse
from django.test import AsyncClient, Client
from django.urls import path

from tests.support.accounts import make_account

PROXY = "/api/proxy/openrouter/v1/chat/completions"
CHAT = {"model": "x-ai/grok-code-fast-1", "messages": [{"role": "user", "content": "Hi"}]}


def _nothing(request: HttpRequest) -> HttpResponse:
    return HttpResponse()


# A URLconf without the proxy (ROOT_URLCONF for one test).
urlpatterns = [path("nothing-here", _nothing)]


@pytest.mark.django_db(transaction=True)
async def test_the_proxy_view_is_csrf_exempt_without_the_fast_path() -> None:
    """Through the site's full middleware (CSRF checks enforced), a keyed POST is not a 403."""
    from asgiref.sync import sync_to_async
    from django.db import connections

    account = await sync_to_async(make_account)("carol", credit=None)
    client = AsyncClient(enforce_csrf_checks=True)
    try:
        answer = await client.post(
            PROXY, CHAT, content_type="application/json", headers=account.headers
        )
    finally:
        # The ORM ran on asgiref's sync thread, which outlives the test, and Django's
        # test client closes no connections: let go of its one, or the test database
        # keeps a session when it is dropped.
        await sync_to_async(connections.close_all)()
    assert answer.status_code == 402
    assert answer.json()["error"]["code"] == "insufficient_credits"


def test_the_fast_path_learns_its_prefix_from_the_urlconf() -> None:
    from openrouter_proxy.asgi import mounted_prefix, with_proxy_fast_path

    assert mounted_prefix() == "/api/proxy/openrouter"

    async def site(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("not the site")

    with_proxy_fast_path(site)
    with_proxy_fast_path(site, "/api/proxy/openrouter/")
    with pytest.raises(ImproperlyConfigured, match=r"mounts openrouter_proxy\.urls at"):
        with_proxy_fast_path(site, "/api/proxy")


def test_the_fast_path_needs_the_proxy_in_the_urlconf(settings: Any) -> None:
    from openrouter_proxy.asgi import with_proxy_fast_path

    settings.ROOT_URLCONF = __name__
    with pytest.raises(ImproperlyConfigured, match=r"does not include openrouter_proxy\.urls"):
        with_proxy_fast_path(lambda *args: None)  # type: ignore[arg-type]


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["balance", "usage", "ledger", "keys"])
def test_the_billing_api_refuses_anonymous_callers_without_drf_defaults(
    settings: Any, path: str
) -> None:
    settings.REST_FRAMEWORK = {}
    answer = Client().get(f"/api/billing/{path}")
    assert answer.status_code == 401
    assert answer.json()["error"]["type"] == "authentication_error"
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.django_db
def test_the_billing_api_answers_a_key_without_drf_defaults(settings: Any) -> None:
    settings.REST_FRAMEWORK = {}
    account = make_account("dave", credit="3")
    answer = Client().get("/api/billing/balance", headers=account.headers)
    assert answer.status_code == 200
    assert answer.json()["balance"] == "3.00"


@pytest.mark.django_db
@pytest.mark.parametrize("key_admin", ["", "auth.Group"])
def test_billing_links_to_a_key_admin_only_when_one_is_named(
    settings: Any, admin_client: Client, key_admin: str
) -> None:
    settings.BILLING_KEY_ADMIN = key_admin
    account = make_account("erin", credit="1")
    for page in ("/admin/billing/creditaccount/users/", "/admin/billing/usagerecord/dashboard/"):
        answer = admin_client.get(page)
        assert answer.status_code == 200
        nav = re.search(r'<ul class="billing-nav".*?</ul>', answer.content.decode(), re.DOTALL)
        assert nav is not None
        assert ('href="/admin/auth/group/"' in nav.group(0)) == bool(key_admin)
    users = admin_client.get("/admin/billing/creditaccount/users/").content.decode()
    assert (f"/admin/auth/group/?user={account.user.pk}" in users) == bool(key_admin)


# --- The proxy alone: no meter, and nothing of billing or the site in its code -----------


def test_without_a_meter_the_proxy_forwards_for_any_valid_key(gateway: Any, settings: Any) -> None:
    """A plain authenticated proxy: no credit asked, nothing recorded, lookups closed."""
    import httpx

    from billing.models import CreditAccount, UsageRecord

    settings.OPENROUTER_PROXY_METER = ""
    broke = make_account("broke", credit=None)
    answer = httpx.post(f"{gateway.url}{PROXY}", json=CHAT, headers=broke.headers, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"]
    assert len(gateway.fake.app.requests) == 1
    assert not UsageRecord.objects.exists()
    assert not CreditAccount.objects.filter(in_flight__gt=0).exists()
    anonymous = httpx.post(f"{gateway.url}{PROXY}", json=CHAT, timeout=10)
    assert anonymous.status_code == 401
    lookup = httpx.get(
        f"{gateway.url}/api/proxy/openrouter/v1/generation?id=gen-1",
        headers=broke.headers,
        timeout=10,
    )
    assert lookup.status_code == 404
    assert lookup.json()["error"]["code"] == "endpoint_not_available"
    assert len(gateway.fake.app.requests) == 1


def _names_in(tree: Any) -> list[tuple[int, str]]:
    import ast

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, node.module or ""))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append((node.lineno, node.value))
    return found


def test_the_proxy_imports_and_names_nothing_of_billing_or_the_site() -> None:
    """No import, no dotted name in a string (a setting default, a reverse() name)."""
    import ast
    from pathlib import Path

    import openrouter_proxy

    root = Path(openrouter_proxy.__file__).parent
    sources = [source for source in root.rglob("*") if source.suffix in {".py", ".html", ".txt"}]
    assert any(source.name == "views.py" for source in sources)
    naming = re.compile(r"\b(billing|terragon)[.:]\w|^(billing|terragon)$|['\"](billing|terragon)")
    offences = []
    for source in sources:
        text = source.read_text()
        if source.suffix != ".py":
            offences += [(source, 0, line) for line in text.splitlines() if naming.search(line)]
            continue
        tree = ast.parse(text)
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for line, name in _names_in(node):
                    if name.split(".")[0] in {"billing", "terragon"}:
                        offences.append((source, line, name))
            elif (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docstrings
                and naming.search(node.value)
            ):
                offences.append((source, node.lineno, node.value))
    assert offences == []
