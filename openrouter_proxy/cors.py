"""CORS for the proxy's URLs only, on every response including errors.

django-cors-headers is configured site-wide by one regex and one policy, and
answers preflights itself with 200 and a fixed header list. The proxy needs
its own policy on its own prefix without touching the host site's: mirror the
``Origin`` (with credentials) or ``*``, a 204 preflight that echoes the
requested headers, and the same headers on errors produced inside the view.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse

from openrouter_proxy.conf import DEFAULT_CORS_ALLOW_HEADERS, proxy_settings

ALLOW_METHODS = "GET,POST,PUT,PATCH,DELETE,OPTIONS"


def cors_headers(origin: str | None) -> dict[str, str]:
    if origin:
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Credentials": "true",
            "Vary": "Origin",
        }
    return {"Access-Control-Allow-Origin": "*"}


def preflight_response(request: HttpRequest) -> HttpResponse:
    response = HttpResponse(status=204)
    for name, value in cors_headers(request.headers.get("Origin")).items():
        response[name] = value
    requested = request.headers.get("Access-Control-Request-Headers", "").strip()
    response["Access-Control-Allow-Methods"] = ALLOW_METHODS
    response["Access-Control-Allow-Headers"] = requested or DEFAULT_CORS_ALLOW_HEADERS
    response["Access-Control-Max-Age"] = str(proxy_settings.CORS_MAX_AGE)
    return response
