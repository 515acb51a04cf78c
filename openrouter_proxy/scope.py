"""What the proxy reads of the client's request: the raw path, query, headers and body.

Checks must see the bytes the client sent, so these read the ASGI scope when
Django's request carries one (under any ASGI server) and fall back to Django's
decoded values otherwise (the test client, WSGI).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from django.http import HttpRequest


class BodyTooLarge(Exception):
    pass


def header_lookup(request: HttpRequest) -> Callable[[str], str | None]:
    return lambda name: request.headers.get(name)


def _scope(request: HttpRequest) -> dict[str, Any] | None:
    scope = getattr(request, "scope", None)
    return scope if isinstance(scope, dict) else None


def _as_bytes(value: bytes | str) -> bytes:
    # Servers send bytes; some test clients put text in the scope.
    return value.encode("latin-1") if isinstance(value, str) else bytes(value)


def raw_remainder(request: HttpRequest, remainder: str) -> bytes:
    """The undecoded bytes of the path below the proxy's prefix.

    Checks must see what the client sent (``%2e%2e`` is not ``..`` after
    Django decoded it; ``%2F`` is not a separator), and the upstream must get
    it unchanged.
    """
    if not remainder:
        return b""
    scope = _scope(request)
    raw = scope.get("raw_path") if scope else None
    if not raw:
        return quote(remainder, safe="/!$&'()*+,;=:@~").encode("ascii")
    prefix = request.path[: len(request.path) - len(remainder)]
    parts = _as_bytes(raw).split(b"/", prefix.count("/"))
    return parts[-1] if len(parts) > prefix.count("/") else b""


def raw_query(request: HttpRequest) -> bytes:
    scope = _scope(request)
    if scope is not None and "query_string" in scope:
        return _as_bytes(scope["query_string"])
    return str(request.META.get("QUERY_STRING", "")).encode("latin-1")


def request_headers(request: HttpRequest) -> list[tuple[str, str]]:
    scope = _scope(request)
    if scope is not None and "headers" in scope:
        return [
            (name.decode("latin-1").lower(), value.decode("latin-1"))
            for name, value in scope["headers"]
        ]
    return [(name.lower(), value) for name, value in request.headers.items()]


async def read_body(request: HttpRequest, limit: int) -> bytes:
    declared = request.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    # request.read() bypasses DATA_UPLOAD_MAX_MEMORY_SIZE (2.5 MB by default,
    # far below what coding agents send); our own limit applies instead.
    body = request.read(limit + 1)
    if len(body) > limit:
        raise BodyTooLarge
    return body
