"""Where a proxied request goes, and which headers cross the proxy.

The original route joined path segments into a URL and resolved it, so a
path starting with ``http:`` sent the server's OpenRouter key to any host.
Here the upstream URL is always ``BASE_URL + "/" + path`` where every path
segment has been checked on its raw bytes *and* percent-decoded: no dot
segments, no empty segments, no slashes or backslashes hidden in escapes, no
scheme, no control characters. The query string is forwarded byte for byte.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

import httpx

from openrouter_proxy.endpoints import DEFAULT_PATH

# RFC 3986 pchar: unreserved / pct-encoded / sub-delims / ":" / "@".
_RAW_SEGMENT = re.compile(rb"^(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})+$")
_RAW_QUERY = re.compile(rb"^(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


class UnsafePath(ValueError):
    """The requested path could escape the upstream base URL."""


def check_path(raw_path: bytes) -> str:
    """Validate the raw path below the proxy's prefix; return it as text.

    An empty path means the default endpoint.
    """
    if not raw_path:
        return DEFAULT_PATH
    if raw_path.startswith(b"/"):
        raise UnsafePath("absolute path")
    segments = raw_path.split(b"/")
    for index, raw in enumerate(segments):
        if not raw:
            raise UnsafePath("empty path segment")
        if not _RAW_SEGMENT.match(raw):
            raise UnsafePath("character not allowed in a path")
        try:
            decoded = unquote(raw.decode("ascii"), errors="strict")
        except UnicodeDecodeError as error:
            raise UnsafePath("escape that is not UTF-8") from error
        if decoded in {".", ".."}:
            raise UnsafePath("dot segment")
        if "/" in decoded or "\\" in decoded or "%" in decoded:
            raise UnsafePath("encoded separator or escape in a path segment")
        if _CONTROL.search(decoded):
            raise UnsafePath("control character")
        if index == 0 and ":" in decoded:
            raise UnsafePath("scheme in path")
    return raw_path.decode("ascii")


def _normalise_escape(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def canonical_path(checked: str) -> str:
    """The normal form of a checked path (RFC 3986 6.2.2.1 and 6.2.2.2).

    Percent-encoded unreserved characters are decoded (``complet%69ons`` is
    ``completions`` to every server) and the hex digits of the remaining
    escapes are upper-cased. The endpoint table is consulted with this form,
    and this form is what goes upstream, so no spelling of a metered path can
    reach the upstream as something else.
    """
    if "%" not in checked:
        return checked
    return _ESCAPE.sub(_normalise_escape, checked)


def check_query(raw_query: bytes) -> bytes:
    if not _RAW_QUERY.match(raw_query):
        raise UnsafePath("character not allowed in the query string")
    return raw_query


def build_upstream_url(base_url: str, raw_path: bytes, raw_query: bytes = b"") -> httpx.URL:
    """The upstream URL for a proxied request; raises :class:`UnsafePath`."""
    return upstream_target(base_url, raw_path, raw_query)[1]


# Coding agents call a handful of paths, most of them without a query: their
# checked targets are remembered (a pure function of its arguments; a refusal is
# not remembered, and httpx's URLs are immutable).
@functools.lru_cache(maxsize=256)
def upstream_target(
    base_url: str, raw_path: bytes, raw_query: bytes = b""
) -> tuple[str, httpx.URL]:
    """The canonical path (for the endpoint table) and the upstream URL it goes to.

    Raises :class:`UnsafePath`.
    """
    path = canonical_path(check_path(raw_path))
    query = check_query(raw_query)
    base = urlsplit(base_url)
    target = f"{base.path.rstrip('/')}/{path}".encode("ascii")
    if query:
        target += b"?" + query
    url = httpx.URL(scheme=base.scheme, host=base.hostname or "", port=base.port, raw_path=target)
    # Belt and braces: whatever the parsing above missed, the result must sit
    # under the base URL's origin and path.
    prefix = base.path.rstrip("/").encode() + b"/"
    if (
        url.scheme != base.scheme
        or url.host != base.hostname
        or url.port != base.port
        or not url.raw_path.startswith(prefix)
    ):
        raise UnsafePath("target outside the upstream base URL")
    return path, url


HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Never forwarded upstream: credentials of the caller, framing we redo, the
# client's address details (privacy), and encodings we negotiate ourselves.
_DROP_REQUEST = HOP_BY_HOP | {
    "host",
    "content-length",
    "authorization",
    "x-daemon-token",
    "x-api-key",
    "cookie",
    "accept-encoding",
    "expect",
    "forwarded",
    "x-real-ip",
}
# Never passed back: cookies, framing and encoding we redo, CORS we set
# ourselves, and the server's own identity headers.
_DROP_RESPONSE = HOP_BY_HOP | {
    "set-cookie",
    "set-cookie2",
    "content-length",
    "content-encoding",
    "server",
    "date",
}


def _connection_tokens(headers: Iterable[tuple[str, str]]) -> set[str]:
    named: set[str] = set()
    for name, value in headers:
        if name == "connection":
            named.update(token.strip().lower() for token in value.split(",") if token.strip())
    return named


def upstream_request_headers(
    headers: Iterable[tuple[str, str]], api_key: str, extra: dict[str, str] | None = None
) -> list[tuple[str, str]]:
    """Client headers (lower-case names) filtered for the upstream, with the server key."""
    headers = list(headers)
    drop = _DROP_REQUEST | _connection_tokens(headers)
    forwarded = [
        (name, value)
        for name, value in headers
        if name not in drop
        and not name.startswith(("proxy-", "x-forwarded-"))
        # Servers pass obs-text bytes through (decoded as latin-1), but the
        # HTTP client only sends ASCII: such a header would fail the request
        # with a 500. It is dropped instead.
        and value.isascii()
        and name.isascii()
    ]
    present = {name for name, _ in forwarded}
    for name, value in (extra or {}).items():
        if value and name not in present:
            forwarded.append((name, value))
    forwarded.append(("authorization", f"Bearer {api_key}"))
    return forwarded


def client_response_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Upstream response headers (lower-case names) filtered for the client."""
    headers = list(headers)
    drop = _DROP_RESPONSE | _connection_tokens(headers)
    return [
        (name, value)
        for name, value in headers
        if name not in drop and not name.startswith(("proxy-", "access-control-"))
    ]
