"""The proxy handler remembers which view each path resolves to, as Django resolves it."""

from __future__ import annotations

from typing import Any

import pytest
from django.http import HttpRequest, HttpResponse
from django.test import RequestFactory
from django.urls import Resolver404, path

from openrouter_proxy import asgi
from openrouter_proxy.asgi import ProxyHandler
from openrouter_proxy.views import proxy

CHAT = "/api/proxy/openrouter/v1/chat/completions"


def _elsewhere(request: HttpRequest, **kwargs: Any) -> HttpResponse:
    return HttpResponse()


# A URLconf that sends the proxy's paths to another view (ROOT_URLCONF for one test).
urlpatterns = [path("api/proxy/openrouter/<path:rest>", _elsewhere)]


def _request(url: str) -> HttpRequest:
    return RequestFactory().post(url, b"{}", content_type="application/json")


def test_a_path_resolves_once_and_then_to_the_same_match() -> None:
    handler = ProxyHandler()
    first, second = _request(CHAT), _request(CHAT)
    match = handler.resolve_request(first)
    assert match.func is proxy
    assert match.kwargs == {"upstream_path": "v1/chat/completions"}
    assert first.resolver_match is match
    assert handler.resolve_request(second) is match
    assert second.resolver_match is match
    # What _get_response_async unpacks.
    view, args, kwargs = handler.resolve_request(_request(CHAT))
    assert (view, args, kwargs) == (proxy, (), {"upstream_path": "v1/chat/completions"})
    other = handler.resolve_request(_request("/api/proxy/openrouter/v1/responses"))
    assert other.kwargs == {"upstream_path": "v1/responses"}


def test_a_new_urlconf_is_resolved_afresh(settings: Any) -> None:
    handler = ProxyHandler()
    assert handler.resolve_request(_request(CHAT)).func is proxy
    settings.ROOT_URLCONF = __name__
    assert handler.resolve_request(_request(CHAT)).func is _elsewhere
    with pytest.raises(Resolver404):
        handler.resolve_request(_request("/nowhere"))


def test_a_request_with_its_own_urlconf_is_resolved_by_it() -> None:
    handler = ProxyHandler()
    handler.resolve_request(_request(CHAT))
    request = _request(CHAT)
    request.urlconf = __name__
    try:
        assert handler.resolve_request(request).func is _elsewhere
    finally:
        from django.urls import set_urlconf

        set_urlconf(None)
    assert handler.resolve_request(_request(CHAT)).func is proxy


def test_what_is_remembered_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asgi, "RESOLVED_PATHS", 3)
    handler = ProxyHandler()
    for n in range(10):
        match = handler.resolve_request(_request(f"{CHAT}/{n}"))
        assert match.kwargs == {"upstream_path": f"v1/chat/completions/{n}"}
    assert len(handler._matches) == 3
    long = f"{CHAT}/{'x' * asgi.RESOLVED_PATH_LENGTH}"
    fresh = ProxyHandler()
    assert fresh.resolve_request(_request(long)).func is proxy
    assert long not in fresh._matches
    # Not found is never remembered: it raises each time.
    with pytest.raises(Resolver404):
        fresh.resolve_request(_request("/nowhere"))
    assert "/nowhere" not in fresh._matches
