"""A newcomer's first requests: the landing page and the health check."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.db import OperationalError
from django.test import Client


@pytest.mark.django_db
def test_the_landing_page_says_what_this_is_and_where_to_go(client: Client) -> None:
    answer = client.get("/")
    assert answer.status_code == 200
    html = answer.content.decode()
    assert "OpenRouter" in html
    links = set(re.findall(r'href="([^"]+)"', html))
    assert {"/admin/", "/api/schema/", "/healthz"} <= links
    for link in ("/admin/", "/api/schema/", "/healthz"):
        assert client.get(link, follow=True).status_code == 200, link


@pytest.mark.django_db(transaction=True)
def test_healthz_is_ok_without_a_key(client: Client) -> None:
    answer = client.get("/healthz")
    assert answer.status_code == 200
    assert answer.json() == {"status": "ok", "database": "ok", "upstream_key": "configured"}
    assert answer.headers["Cache-Control"] == "no-store"
    assert client.head("/healthz").status_code == 200
    assert client.post("/healthz").status_code == 405


@pytest.mark.django_db(transaction=True)
def test_healthz_says_when_the_upstream_key_is_missing(client: Client, settings: Any) -> None:
    settings.OPENROUTER_PROXY_API_KEY = ""
    answer = client.get("/healthz")
    assert answer.status_code == 503
    assert answer.json() == {
        "status": "unavailable",
        "database": "ok",
        "upstream_key": "missing",
    }


@pytest.mark.django_db(transaction=True)
def test_healthz_says_when_the_database_is_unreachable(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from openrouter_proxy import health

    def unreachable() -> None:
        raise OperationalError("could not connect to server: Connection refused")

    monkeypatch.setattr(health, "_ping_database", unreachable)
    answer = client.get("/healthz")
    assert answer.status_code == 503
    assert answer.json()["database"] == "unreachable"


@pytest.mark.django_db(transaction=True)
def test_the_site_serves_the_admin_css_itself_with_debug_off(settings: Any) -> None:
    """What `uvicorn terragon.asgi:application` serves: no collectstatic, no DEBUG."""
    import httpx

    from terragon.asgi import application
    from tests.support.servers import serve_in_thread

    assert settings.DEBUG is False
    with serve_in_thread(application) as url:
        login = httpx.get(f"{url}/admin/login/")
        sheets = re.findall(r'<link rel="stylesheet" href="([^"]+)"', login.text)
        assert "/static/admin/css/base.css" in sheets
        for sheet in sheets:
            css = httpx.get(f"{url}{sheet}")
            assert css.status_code == 200, sheet
            assert css.headers["content-type"].startswith("text/css")
        assert httpx.get(f"{url}/static/admin/css/no-such.css").status_code == 404
