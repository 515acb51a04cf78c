"""The non-public Django API the proxy's fast path uses, pinned per supported minor.

``openrouter_proxy.asgi.DJANGO_INTERNALS`` lists each name. For every minor
whose handler code was read against it (``PINNED_MINORS``) this checks
that the name is still there and still used the way the fast path uses it; a
Django that is not in the list fails here first, to be read and pinned.
"""

from __future__ import annotations

import inspect

import django
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.base import BaseHandler
from django.http.response import HttpResponseBase

from openrouter_proxy.asgi import DJANGO_INTERNALS, ProxyHandler

#: Minors whose handler code was read against the fast path.
PINNED_MINORS = {(5, 2)}


def _source(function: object) -> str:
    return inspect.getsource(function)  # type: ignore[arg-type]


def test_the_installed_django_is_a_pinned_minor() -> None:
    assert django.VERSION[:2] in PINNED_MINORS, (
        f"Django {django.get_version()}: read the handler internals in "
        "openrouter_proxy.asgi.DJANGO_INTERNALS against it, then add it to PINNED_MINORS"
    )


def test_every_internal_the_fast_path_names_is_pinned_here() -> None:
    assert {name for _, name, _ in DJANGO_INTERNALS} == {
        "_get_response_async",
        "_middleware_chain",
        "_view_middleware",
        "_template_response_middleware",
        "_exception_middleware",
        "_handler_class",
        "resolve_request",
    }


def test_the_response_path_the_fast_path_replaces() -> None:
    # get_response_async runs the middleware chain, which the fast path sets.
    assert "self._middleware_chain(request)" in _source(BaseHandler.get_response_async)
    respond = BaseHandler._get_response_async  # type: ignore[attr-defined]
    assert inspect.iscoroutinefunction(respond)
    assert list(inspect.signature(respond).parameters) == ["self", "request"]
    body = _source(respond)
    for name in ("_view_middleware", "_template_response_middleware"):
        assert f"self.{name}" in body, name
    assert "self.process_exception_by_middleware" in body
    exceptions = _source(BaseHandler.process_exception_by_middleware)
    assert "self._exception_middleware" in exceptions
    # load_middleware is what sets all four, and the fast path overrides it.
    loading = _source(BaseHandler.load_middleware)
    for name in ("_view_middleware", "_template_response_middleware", "_exception_middleware"):
        assert f"self.{name}" in loading, name
    assert "self._middleware_chain = " in loading
    assert ProxyHandler.load_middleware is not BaseHandler.load_middleware


def test_the_view_resolution_the_fast_path_remembers() -> None:
    # _get_response_async takes the view from resolve_request, which answers
    # a match that unpacks as (view, args, kwargs) and sets it on the request.
    respond = _source(BaseHandler._get_response_async)  # type: ignore[attr-defined]
    assert "self.resolve_request(request)" in respond
    resolving = _source(BaseHandler.resolve_request)
    assert list(inspect.signature(BaseHandler.resolve_request).parameters) == ["self", "request"]
    assert "request.resolver_match = resolver_match" in resolving
    assert 'hasattr(request, "urlconf")' in resolving
    assert ProxyHandler.resolve_request is not BaseHandler.resolve_request


def test_a_response_reports_its_handler_when_closed() -> None:
    assert "self._handler_class = None" in _source(HttpResponseBase.__init__)
    assert "sender=self._handler_class" in _source(HttpResponseBase.close)
    # Django's own ASGI handler does what the fast path's does.
    assert "response._handler_class = self.__class__" in _source(ASGIHandler.run_get_response)


def test_the_public_handler_api_the_fast_path_calls() -> None:
    for name, parameters in {
        "create_request": ["self", "scope", "body_file"],
        "send_response": ["self", "response", "send"],
        "handle": ["self", "scope", "receive", "send"],
    }.items():
        assert list(inspect.signature(getattr(ASGIHandler, name)).parameters) == parameters, name
