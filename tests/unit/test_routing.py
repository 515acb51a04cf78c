"""Path mapping, hostile paths and header filtering, as tables."""

from __future__ import annotations

import pytest

from openrouter_proxy.routing import (
    UnsafePath,
    build_upstream_url,
    client_response_headers,
    upstream_request_headers,
)

BASE = "https://openrouter.ai/api"


@pytest.mark.parametrize(
    ("raw_path", "query", "expected"),
    [
        (b"", b"", "https://openrouter.ai/api/v1/chat/completions"),
        (b"v1/chat/completions", b"", "https://openrouter.ai/api/v1/chat/completions"),
        (b"v1/completions", b"", "https://openrouter.ai/api/v1/completions"),
        (b"v1/models", b"", "https://openrouter.ai/api/v1/models"),
        (b"v1/generation", b"id=gen-1", "https://openrouter.ai/api/v1/generation?id=gen-1"),
        (b"v1/models", b"a=%20b+c&d=e%2Bf", "https://openrouter.ai/api/v1/models?a=%20b+c&d=e%2Bf"),
        # Escapes of unreserved characters are decoded: the canonical path goes upstream.
        (b"v1/models/x-ai%2Dgrok", b"", "https://openrouter.ai/api/v1/models/x-ai-grok"),
        (b"v1/files/a%3ab%7e", b"", "https://openrouter.ai/api/v1/files/a%3Ab~"),
        (b"v1/models/qwen:exacto", b"", "https://openrouter.ai/api/v1/models/qwen:exacto"),
        (b"v1/a@b", b"q=1?2/3", "https://openrouter.ai/api/v1/a@b?q=1?2/3"),
    ],
)
def test_upstream_url_is_base_plus_path_and_raw_query(
    raw_path: bytes, query: bytes, expected: str
) -> None:
    assert str(build_upstream_url(BASE, raw_path, query)) == expected


def test_base_url_with_port_and_path_is_kept() -> None:
    url = build_upstream_url("http://127.0.0.1:3999/api/", b"v1/models")
    assert str(url) == "http://127.0.0.1:3999/api/v1/models"


@pytest.mark.parametrize(
    "raw_path",
    [
        b"/etc/passwd",
        b"http:",
        b"http://evil.example/x",
        b"http:%2F%2Fevil.example",
        b"https:/evil.example",
        b"..",
        b"v1/../../secret",
        b"v1/./models",
        b"%2e%2e/x",
        b"%2E%2E/x",
        b".%2e/x",
        b"v1/%2e",
        b"v1%2F..%2Fx",
        b"v1%2fmodels",
        b"v1\\..\\x",
        b"v1%5C..%5Cx",
        b"v1//models",
        b"v1/models/",
        b"v1/%00",
        b"v1/%0d%0aHost:%20evil",
        b"v1/mo dels",
        b"v1/\x7f",
        b"v1/%252e%252e",
        b"v1/%ff",
        b"v1/\xc3\xa9",
        b"v1/models#frag",
        b"javascript:alert(1)",
        b"//evil.example/x",
    ],
)
def test_hostile_paths_are_refused(raw_path: bytes) -> None:
    with pytest.raises(UnsafePath):
        build_upstream_url(BASE, raw_path)


@pytest.mark.parametrize("query", [b"a=1#frag", b"a=\x00", b"a= b", b"a=\r\nb", b"a=%zz"])
def test_hostile_queries_are_refused(query: bytes) -> None:
    with pytest.raises(UnsafePath):
        build_upstream_url(BASE, b"v1/models", query)


def _names(headers: list[tuple[str, str]]) -> list[str]:
    return [name for name, _ in headers]


@pytest.mark.parametrize(
    "dropped",
    [
        "host",
        "content-length",
        "authorization",
        "x-daemon-token",
        "cookie",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "x-forwarded-for",
        "x-forwarded-host",
        "forwarded",
        "x-real-ip",
        "accept-encoding",
        "x-named-by-connection",
    ],
)
def test_request_headers_dropped(dropped: str) -> None:
    client = [
        (dropped, "value"),
        ("connection", "keep-alive, X-Named-By-Connection"),
        ("content-type", "application/json"),
    ]
    forwarded = upstream_request_headers(client, "sk-server")
    assert (dropped, "value") not in forwarded
    assert "connection" not in _names(forwarded)
    assert [v for n, v in forwarded if n == "authorization"] == ["Bearer sk-server"]
    assert ("content-type", "application/json") in forwarded


@pytest.mark.parametrize(
    "kept",
    [
        "content-type",
        "user-agent",
        "x-session-id",
        "x-session-affinity",
        "x-stainless-lang",
        "http-referer",
        "x-openrouter-title",
        "accept",
    ],
)
def test_request_headers_kept(kept: str) -> None:
    forwarded = upstream_request_headers([(kept, "v")], "sk-server")
    assert (kept, "v") in forwarded


def test_client_authorization_never_reaches_upstream() -> None:
    forwarded = upstream_request_headers([("authorization", "Bearer client-token")], "sk-server")
    assert forwarded == [("authorization", "Bearer sk-server")]


def test_attribution_headers_added_only_when_absent() -> None:
    extra = {"http-referer": "https://terragon.example", "x-openrouter-title": "Terragon"}
    forwarded = upstream_request_headers([("http-referer", "https://mine")], "k", extra)
    assert ("http-referer", "https://mine") in forwarded
    assert ("x-openrouter-title", "Terragon") in forwarded
    assert _names(forwarded).count("http-referer") == 1


@pytest.mark.parametrize(
    "dropped",
    [
        "set-cookie",
        "content-length",
        "content-encoding",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "proxy-authenticate",
        "access-control-allow-origin",
        "server",
        "date",
        "x-hop",
    ],
)
def test_response_headers_dropped(dropped: str) -> None:
    upstream = [(dropped, "v"), ("connection", "x-hop"), ("x-generation-id", "gen-1")]
    passed = client_response_headers(upstream)
    assert dropped not in _names(passed)
    assert ("x-generation-id", "gen-1") in passed


@pytest.mark.parametrize("kept", ["content-type", "x-generation-id", "retry-after", "x-request-id"])
def test_response_headers_kept(kept: str) -> None:
    assert client_response_headers([(kept, "1")]) == [(kept, "1")]
