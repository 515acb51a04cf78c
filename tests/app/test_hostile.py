"""Hostile input: paths, headers, tokens and bodies built to break out or break in.

Generated inputs (hypothesis) go to the pure routing function and to the
running proxy over raw sockets, so the bytes on the wire are exactly the
generated ones. A canary listens on a second loopback port: a request that
escaped the upstream's origin would land there, and the canary must see
nothing. Tables cover the cases that need names: tokens, bodies, secrets in
responses and logs, the admin.
"""

from __future__ import annotations

import json
import logging
import re
import string
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing.models import CreditAccount, UsageRecord
from openrouter_proxy.callers import ApiKeyRejected
from openrouter_proxy.routing import UnsafePath, build_upstream_url
from terragon.apikeys.models import ApiKey
from terragon.apikeys.tokens import PREFIX_ALPHABET, PREFIX_LENGTH, SECRET_ALPHABET
from terragon.apikeys.verifier import verify_api_key
from tests.support.accounts import SERVER_KEY, Account, Gateway, make_account
from tests.support.faults.common import CHAT, STREAM_CHAT, port_of, report
from tests.support.faults.rawhttp import RawResponse, build_request, send_raw
from tests.support.servers import wait_until
from tests.support.tcp_proxy import Canary, canary

PREFIX = b"/api/proxy/openrouter"
LIVE = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Pieces that have broken path handling somewhere: dot segments in every
# spelling, separators hidden in escapes, authority and scheme markers,
# control characters, double encoding, unicode look-alikes, fragments.
PATH_FRAGMENTS = [
    *[".", "..", "%2e", "%2E", "%2e%2e", ".%2e", "%2e.", "%252e", "%252e%252e"],
    *["/", "//", "\\", "%2f", "%2F", "%5c", "%5C", "%252f", "%u002f"],
    *["@", "%40", ":", "%3a", "http:", "https:", "file:", "javascript:", "HTTP:"],
    *["//evil.example", "evil.example", "user:pass@", "#", "%23", "?", "%3f", ";"],
    *["%00", "%0d%0a", "\r\n", "\t", " ", "%20", "\x00", "\x7f", "%7f", "%ff", "%c0%ae"],
    *["é", "%c3%a9", "\u2024", "\uff0e", "\u2215", "\uff0f", "\u3002", "\ufeff", "~"],
    *["v1", "models", "chat", "completions", "echo", "generation", "api", "key"],
    "a" * 5000,
    "%2e%2e/" * 300,
]


def fragments_aiming_at(port: int) -> list[str]:
    """Spellings of "go to 127.0.0.1:<port> instead"."""
    return [
        f"127.0.0.1:{port}",
        f"localhost:{port}",
        f"[::1]:{port}",
        f"http://127.0.0.1:{port}/",
        f"http:%2F%2F127.0.0.1:{port}",
        f"//127.0.0.1:{port}",
        f"@127.0.0.1:{port}",
        f"%40127.0.0.1%3a{port}",
        f"http:\\\\127.0.0.1:{port}",
    ]


def path_strategy(extra: list[str]) -> st.SearchStrategy[str]:
    piece = st.one_of(
        st.sampled_from(PATH_FRAGMENTS + extra),
        st.text(max_size=6),
        st.text(alphabet="./%2eEfFcC5\\:@", max_size=8),
        # Only characters a request line may carry: these reach the proxy's checks.
        st.text(alphabet=string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@%/", max_size=8),
    )
    return st.lists(piece, max_size=10).map("".join)


# --- The pure function ----------------------------------------------------------------

BASES = [
    "https://openrouter.ai/api",
    "http://127.0.0.1:3999/api/",
    "https://gateway.example",
    "https://gateway.example:8443/a/b",
]


@settings(max_examples=3000, deadline=None)
@given(
    base=st.sampled_from(BASES),
    path=st.one_of(path_strategy(fragments_aiming_at(9)), st.binary(max_size=40).map(repr)),
    query=st.one_of(st.just(""), path_strategy([]), st.binary(max_size=20).map(repr)),
)
def test_build_upstream_url_never_leaves_the_base_url(base: str, path: str, query: str) -> None:
    raw_path = path.encode("utf-8", "surrogatepass")
    raw_query = query.encode("utf-8", "surrogatepass")
    try:
        url = build_upstream_url(base, raw_path, raw_query)
    except UnsafePath:
        return
    expected = urlsplit(base)
    prefix = expected.path.rstrip("/") + "/"
    # Same origin, checked on the object and on its text re-parsed from scratch.
    assert (url.scheme, url.host, url.port) == (expected.scheme, expected.hostname, expected.port)
    reparsed = urlsplit(str(url))
    assert (reparsed.scheme, reparsed.netloc) == (expected.scheme, expected.netloc)
    # Under the path prefix, with no segment that a server would resolve upwards.
    target = url.raw_path.decode("ascii")
    target_path, _, sent_query = target.partition("?")
    assert target_path.startswith(prefix)
    assert sent_query.encode() == raw_query
    for segment in target_path[len(prefix) :].split("/"):
        decoded = unquote(segment)
        assert segment
        assert decoded not in {".", ".."}
        # An escaped "#" or "?" stays escaped on the wire: data, not syntax.
        assert not {"/", "\\", "%"} & set(decoded)
        assert decoded.isprintable()


# --- The running proxy ----------------------------------------------------------------


def hosts_aiming_at(port: int, proxy_port: int) -> list[bytes]:
    return [
        f"127.0.0.1:{proxy_port}".encode(),
        f"127.0.0.1:{port}".encode(),
        b"evil.example",
        b"openrouter.ai",
        b"evil.example@127.0.0.1",
    ]


@pytest.fixture
def trap() -> Any:
    with canary() as listener:
        yield listener


def test_generated_requests_never_reach_anything_but_the_upstream(
    gateway: Gateway, live_account: Account, trap: Canary
) -> None:
    fake = gateway.fake.app
    proxy_port = port_of(gateway.url)
    upstream_host = f"127.0.0.1:{gateway.fake.port}"
    aims = fragments_aiming_at(trap.port)
    hosts = hosts_aiming_at(trap.port, proxy_port)
    token = live_account.token.encode()
    tally = {"tried": 0, "forwarded": 0, "refused_by_proxy": 0, "refused_by_http_server": 0}
    statuses: dict[int, int] = {}

    @LIVE
    @given(
        suffix=path_strategy(aims),
        query=st.one_of(st.none(), path_strategy(aims)),
        absolute=st.booleans(),
        host=st.sampled_from(hosts),
        forwarded=st.sampled_from(
            [
                [],
                [(b"X-Forwarded-Host", f"127.0.0.1:{trap.port}".encode())],
                [(b"Forwarded", f"host=127.0.0.1:{trap.port};proto=http".encode())],
                [(b"X-Original-URL", f"http://127.0.0.1:{trap.port}/".encode())],
                [(b"X-Forwarded-Proto", b"https"), (b"X-Forwarded-Port", b"1")],
            ]
        ),
        post=st.booleans(),
    )
    def attempt(
        suffix: str,
        query: str | None,
        absolute: bool,
        host: bytes,
        forwarded: list[tuple[bytes, bytes]],
        post: bool,
    ) -> None:
        target = PREFIX + b"/" + suffix.encode("utf-8", "surrogatepass")
        if absolute:
            target = f"http://127.0.0.1:{trap.port}".encode() + target
        if query is not None:
            target += b"?" + query.encode("utf-8", "surrogatepass")
        headers = [(b"X-Daemon-Token", token), *forwarded]
        body = json.dumps(CHAT).encode() if post else b""
        if post:
            headers.append((b"Content-Type", b"application/json"))
        method = b"POST" if post else b"GET"
        fake.requests.clear()
        response = send_raw(proxy_port, build_request(method, target, headers, body, host=host))
        tally["tried"] += 1
        statuses[response.status] = statuses.get(response.status, 0) + 1
        # Never a crash: a clean answer from the HTTP server, the proxy or the upstream.
        assert 400 <= response.status < 500 or response.status == 200, (target, response.raw)
        if fake.requests:
            tally["forwarded"] += 1
            for seen in fake.requests:
                assert seen.path.startswith("/api/"), seen.path
                assert seen.header("host") == upstream_host
                assert seen.header("authorization") == f"Bearer {SERVER_KEY}"
        elif response.header("content-type") == b"application/json":
            tally["refused_by_proxy"] += 1
        else:
            tally["refused_by_http_server"] += 1
        assert trap.hits == []

    attempt()
    assert trap.hits == []
    assert tally["forwarded"] > 0
    assert tally["refused_by_proxy"] > 0
    assert CreditAccount.objects.get(user=live_account.user).in_flight == 0
    report("generated paths at the running proxy", canary_hits=len(trap.hits), **tally)
    print(f"statuses: {dict(sorted(statuses.items()))}")


# --- Secrets: the server key, the client's credentials, cookies -----------------------


def test_secrets_never_leak_and_client_credentials_never_reach_upstream(
    gateway: Gateway, live_account: Account, settings: Any, caplog: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    settings.OPENROUTER_PROXY_READ_TIMEOUT = 0.5
    port = port_of(gateway.url)
    token = live_account.token.encode()
    secret = live_account.token.split("_", 2)[2]
    broke = make_account("broke", credit=None)
    chat = json.dumps(CHAT).encode()
    stream = json.dumps(STREAM_CHAT).encode()
    hostile_headers = [
        (b"Cookie", b"sessionid=client-session; csrftoken=client-csrf"),
        (b"Authorization", b"Bearer " + token),
        (b"Proxy-Authorization", b"Basic cHJveHk6c2VjcmV0"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"X-Forwarded-For", b"10.0.0.1"),
        (b"X-Forwarded-Host", b"evil.example"),
        (b"X-Forwarded-Proto", b"https"),
        (b"Forwarded", b"for=10.0.0.1;host=evil.example"),
        (b"X-Real-IP", b"10.0.0.2"),
    ]

    def call(
        method: bytes,
        path: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes = b"",
        host: bytes = b"127.0.0.1",
    ) -> RawResponse:
        return send_raw(port, build_request(method, PREFIX + path, headers, body, host=host))

    auth = [(b"X-Daemon-Token", token), (b"Content-Type", b"application/json")]
    responses: dict[str, RawResponse] = {
        "json": call(b"POST", b"/v1/chat/completions", auth, chat),
        "stream": call(b"POST", b"/v1/chat/completions", auth, stream),
        "stream with upstream cookie": call(
            b"POST", b"/v1/chat/completions", [*auth, (b"X-Fake-Mode", b"set-cookie")], stream
        ),
        "upstream 500 with cookie": call(
            b"POST",
            b"/v1/chat/completions",
            [*auth, (b"X-Fake-Mode", b"status=500,set-cookie")],
            chat,
        ),
        "cut stream": call(
            b"POST", b"/v1/chat/completions", [*auth, (b"X-Fake-Mode", b"cut")], stream
        ),
        "upstream timeout": call(
            b"POST", b"/v1/chat/completions", [*auth, (b"X-Fake-Mode", b"first-byte-delay=1")], chat
        ),
        "bad path": call(b"GET", b"/%2e%2e/v1/models", auth),
        "bad model": call(b"POST", b"", auth, b'{"model": "openai/gpt-5"}'),
        "missing key": call(b"GET", b"/v1/models", []),
        "bad key": call(b"GET", b"/v1/models", [(b"X-Daemon-Token", b"tg_nope")]),
        "no credit": call(
            b"POST", b"/v1/chat/completions", [(b"X-Daemon-Token", broke.token.encode())], chat
        ),
        "closed path": call(b"GET", b"/v1/key", auth),
        "hostile headers": call(b"GET", b"/echo/x", [(b"X-Daemon-Token", token), *hostile_headers]),
        "host trick": call(
            b"GET", b"/echo/x", [(b"X-Daemon-Token", token)], host=b"evil.example:443"
        ),
        "site 404": send_raw(port, build_request(b"GET", b"/nope", [])),
        "admin login": send_raw(port, build_request(b"GET", b"/admin/login/", [])),
    }
    slots = CreditAccount.objects.filter(user=live_account.user)
    held = slots.get().in_flight
    settings.BILLING_MAX_IN_FLIGHT = 8
    slots.update(in_flight=8, in_flight_expires_at=timezone.now() + timedelta(minutes=5))
    responses["in flight"] = call(b"POST", b"/v1/chat/completions", auth, chat)
    slots.update(in_flight=held)
    settings.DEBUG = True
    responses["debug 404"] = send_raw(port, build_request(b"GET", b"/nope", []))
    responses["debug proxy 404 upstream"] = call(b"GET", b"/v1/nothing-here", auth)
    settings.DEBUG = False
    settings.OPENROUTER_PROXY_MAX_BODY_BYTES = 5
    responses["too large"] = call(b"POST", b"/v1/chat/completions", auth, chat)

    statuses = {name: r.status for name, r in responses.items()}
    assert statuses["json"] == statuses["stream"] == 200
    assert statuses["upstream 500 with cookie"] == 500
    assert statuses["upstream timeout"] == 504
    assert statuses["bad path"] == statuses["bad model"] == 400
    assert statuses["missing key"] == statuses["bad key"] == 401
    assert statuses["no credit"] == 402
    assert statuses["too large"] == 413
    assert statuses["in flight"] == 429
    assert statuses["host trick"] == statuses["hostile headers"] == 200

    for name, response in responses.items():
        assert SERVER_KEY.encode() not in response.raw or name in {
            "hostile headers",
            "host trick",
        }, name
        assert response.header("set-cookie") is None or name.startswith(("admin", "site")), name
        assert secret.encode() not in response.raw, name
    # The echo route reflects what the upstream received: exactly one credential,
    # the server's, and none of the client's.
    for name in ("hostile headers", "host trick"):
        seen = json.loads(responses[name].body)["headers"]
        names = [header for header, _ in seen]
        assert [v for n, v in seen if n == "authorization"] == [f"Bearer {SERVER_KEY}"]
        for dropped in (
            "cookie",
            "x-daemon-token",
            "proxy-authorization",
            "proxy-connection",
            "x-forwarded-for",
            "x-forwarded-host",
            "x-forwarded-proto",
            "forwarded",
            "x-real-ip",
        ):
            assert dropped not in names, (name, dropped)
        assert dict(seen)["host"] == f"127.0.0.1:{gateway.fake.port}"
        assert json.loads(responses[name].body)["path"] == "/api/echo/x"
    log_text = "\n".join(
        record.getMessage() + (caplog_text(record) or "") for record in caplog.records
    )
    assert SERVER_KEY not in log_text
    assert secret not in log_text
    assert SERVER_KEY not in caplog.text
    report(
        "secrets",
        requests=len(responses),
        log_records=len(caplog.records),
        server_key_in_responses=0,
        server_key_in_logs=0,
        client_secret_in_logs=0,
    )


def caplog_text(record: logging.LogRecord) -> str:
    if record.exc_info:
        return logging.Formatter().formatException(record.exc_info)
    return ""


def raising_verifier(token: str) -> None:
    raise RuntimeError("a bug in a site's verifier")


def test_debug_error_page_does_not_show_the_server_key(
    gateway: Gateway, live_account: Account, settings: Any
) -> None:
    settings.DEBUG = True
    settings.OPENROUTER_PROXY_KEY_VERIFIER = "tests.app.test_hostile.raising_verifier"
    response = send_raw(
        port_of(gateway.url),
        build_request(b"GET", PREFIX + b"/v1/models", [(b"X-Daemon-Token", b"anything")]),
    )
    assert response.status == 500
    assert SERVER_KEY.encode() not in response.raw


def test_paths_the_url_pattern_does_not_match_are_a_4xx_not_a_500(
    gateway: Gateway, live_account: Account
) -> None:
    """A newline (``%0a``) in the path does not match the proxy's URL pattern: Django
    answers 404 before the view runs. That must stay a 4xx when the proxy turns its
    unexpected errors into JSON 500s (hypothesis found this one)."""
    for path in (PREFIX + b"/%0a", PREFIX + b"%0a", PREFIX + b"/v1/models%0a", PREFIX + b"/%0d%0a"):
        response = send_raw(
            port_of(gateway.url),
            build_request(b"GET", path, [(b"X-Daemon-Token", live_account.token.encode())]),
        )
        assert 400 <= response.status < 500, (path, response.raw[:300])
    assert len(gateway.fake.app.requests) == 0


@pytest.mark.parametrize(
    "value",
    [b"caf\xe9", "\u00e9t\u00e9 \U0001f600".encode(), b"\x80\xff", b"ok\xc3"],
)
def test_non_ascii_header_values_are_not_a_crash(
    gateway: Gateway, live_account: Account, settings: Any, value: bytes
) -> None:
    """Regression: an obs-text header value made the upstream request fail with a 500
    (and, with DEBUG on, a technical page that showed the server key)."""
    settings.DEBUG = True
    response = send_raw(
        port_of(gateway.url),
        build_request(
            b"GET",
            PREFIX + b"/echo/x",
            [(b"X-Daemon-Token", live_account.token.encode()), (b"X-Title", value)],
        ),
    )
    assert response.status == 200
    assert SERVER_KEY.encode() not in response.raw.replace(b"Bearer " + SERVER_KEY.encode(), b"")
    assert "x-title" not in dict(json.loads(response.body)["headers"])


# --- Tokens ---------------------------------------------------------------------------


def _other_users_prefix_with_forged_secret(account: Account) -> bytes:
    other = make_account("mallory")
    return f"tg_{account.key.prefix}_{other.token.split('_', 2)[2]}".encode()


def _revoked(account: Account) -> bytes:
    account.key.revoke()
    return account.token.encode()


def _expired(account: Account) -> bytes:
    ApiKey.objects.filter(pk=account.key.pk).update(expires_at=timezone.now() - timedelta(1))
    return account.token.encode()


def _inactive(account: Account) -> bytes:
    get_user_model().objects.filter(pk=account.user.pk).update(is_active=False)
    return account.token.encode()


TOKENS: dict[str, Callable[[Account], bytes]] = {
    "garbage": lambda a: b"garbage",
    "marker only": lambda a: b"tg_",
    "empty parts": lambda a: b"tg__",
    "wrong marker": lambda a: a.token.replace("tg_", "sk_", 1).encode(),
    "upper-cased": lambda a: a.token.upper().encode(),
    "truncated": lambda a: a.token[:-5].encode(),
    "one char changed": lambda a: (a.token[:-1] + ("A" if a.token[-1] != "A" else "B")).encode(),
    "trailing junk": lambda a: a.token.encode() + b"x" * 100,
    "1 MiB": lambda a: b"tg_" + b"a" * PREFIX_LENGTH + b"_" + b"b" * (1 << 20),
    "unicode look-alike": lambda a: ("tg_\u0430" + a.token[4:]).encode(),
    "raw utf-8": lambda a: a.token.encode()[:-2] + "é".encode(),
    "latin-1 byte": lambda a: a.token.encode()[:-1] + b"\xe9",
    "sql": lambda a: b"tg_' OR '1'='1_" + b"a" * 43,
    "another user's prefix": _other_users_prefix_with_forged_secret,
    "revoked": _revoked,
    "expired": _expired,
    "inactive user": _inactive,
}


def test_bad_tokens_are_401_json_and_go_nowhere(gateway: Gateway, transactional_db: None) -> None:
    port = port_of(gateway.url)
    tried = 0
    for index, (kind, make_token) in enumerate(TOKENS.items()):
        account = make_account(f"holder{index}")
        token = make_token(account)
        for name, value in ((b"X-Daemon-Token", token), (b"Authorization", b"Bearer " + token)):
            response = send_raw(
                port,
                build_request(
                    b"POST",
                    PREFIX + b"/v1/chat/completions",
                    [(name, value), (b"Content-Type", b"application/json")],
                    json.dumps(CHAT).encode(),
                ),
            )
            tried += 1
            assert response.status == 401, (kind, name, response.raw[:300])
            error = json.loads(response.body)["error"]
            assert error["code"] in {"invalid_api_key", "missing_api_key"}, kind
            assert response.header("access-control-allow-origin") == b"*", kind
            assert len(token) < 20 or token not in response.raw, kind
    assert len(gateway.fake.app.requests) == 0
    assert UsageRecord.objects.count() == 0
    report("bad tokens at the running proxy", kinds=len(TOKENS), requests=tried, all_401=True)


def near_tokens() -> st.SearchStrategy[str]:
    prefix = st.text(
        alphabet=sorted(PREFIX_ALPHABET), min_size=PREFIX_LENGTH, max_size=PREFIX_LENGTH
    )
    secret = st.text(alphabet=sorted(SECRET_ALPHABET), min_size=30, max_size=70)
    well_formed = st.builds(lambda p, s: f"tg_{p}_{s}", prefix, secret)
    return st.one_of(
        st.text(max_size=200),
        well_formed,
        well_formed.map(lambda t: t + "\x00"),
        st.builds(lambda a, b: f"{a}_{b}", st.text(max_size=20), st.text(max_size=60)),
    )


def test_a_flood_of_invalid_tokens_costs_at_most_one_indexed_lookup_each(account: Account) -> None:
    real_prefix = account.key.prefix
    tried = {"tokens": 0, "queries": 0, "without_query": 0}

    @settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        token=st.one_of(
            near_tokens(),
            # The real key's prefix with a forged secret: must still be one lookup.
            st.text(alphabet=sorted(SECRET_ALPHABET), min_size=32, max_size=60).map(
                lambda s: f"tg_{real_prefix}_{s}"
            ),
        )
    )
    def flood(token: str) -> None:
        with CaptureQueriesContext(connection) as queries:
            try:
                assert verify_api_key(token) is None
            except ApiKeyRejected:  # pragma: no cover - only a valid secret gets here
                raise AssertionError(token) from None
        assert len(queries) <= 1, queries.captured_queries
        for query in queries.captured_queries:
            # The lookup is by the unique (so indexed) prefix column.
            assert re.search(r'"prefix" = ', query["sql"]), query["sql"]
        tried["tokens"] += 1
        tried["queries"] += len(queries)
        tried["without_query"] += not queries

    flood()
    assert ApiKey._meta.get_field("prefix").unique
    report("invalid token flood", **tried)


# --- Bodies ---------------------------------------------------------------------------

OFF_LIST = "openai/gpt-5"


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


# name: (body, expected status from the proxy, or None for "forwarded untouched")
BODIES: dict[str, tuple[bytes, int | None]] = {
    "model is a list": (_json({**CHAT, "model": ["x-ai/grok-code-fast-1"]}), 400),
    "model is an object": (_json({**CHAT, "model": {"id": OFF_LIST}}), 400),
    "model is null": (_json({**CHAT, "model": None}), 400),
    "model is true": (_json({**CHAT, "model": True}), 400),
    "model is a float": (_json({**CHAT, "model": 1.5}), 400),
    "top-level string": (_json("x-ai/grok-code-fast-1"), 400),
    "top-level number": (b"42", 400),
    "off the list": (_json({**CHAT, "model": OFF_LIST}), 400),
    "off the list, 10k chars": (_json({**CHAT, "model": "x" * 10_000}), 400),
    "off the list, control chars": (_json({**CHAT, "model": "x-ai/grok\x00\n"}), 400),
    "off the list, utf-16": (json.dumps({**CHAT, "model": OFF_LIST}).encode("utf-16"), 400),
    "off the list, BOM": (b"\xef\xbb\xbf" + _json({**CHAT, "model": OFF_LIST}), 400),
    "off the list, padded": (b" \r\n\t" + _json({**CHAT, "model": OFF_LIST}) + b"\n", 400),
    "duplicate model key, last off": (
        b'{"model": "x-ai/grok-code-fast-1", "messages": [], "model": "openai/gpt-5"}',
        400,
    ),
    "nested 100k deep": (b'{"model": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),
    "off the list, lone surrogate escape": (
        b'{"model": "openai/gpt-5", "messages": [], "x": "\\ud800"}',
        400,
    ),
    "NaN and Infinity": (b'{"model": "x-ai/grok-code-fast-1", "t": NaN, "u": -Infinity}', None),
    "empty": (b"", None),
    "form-encoded": (b"model=x-ai%2Fgrok-code-fast-1&messages=hi", None),
    "binary": (bytes(range(256)) * 4, None),
}
BYPASSES = {
    "invalid utf-8 in a string, off the list": (
        b'{"model": "openai/gpt-5", "messages": [{"role": "user", "content": "\xff\xfe"}]}'
    ),
    "5000-digit integer, off the list": (
        b'{"model": "openai/gpt-5", "messages": [], "seed": ' + b"9" * 5000 + b"}"
    ),
}


def _post_raw(gateway: Gateway, account: Account, body: bytes) -> RawResponse:
    return send_raw(
        port_of(gateway.url),
        build_request(
            b"POST",
            PREFIX + b"/v1/chat/completions",
            [(b"X-Daemon-Token", account.token.encode()), (b"Content-Type", b"application/json")],
            body,
        ),
    )


def test_hostile_bodies_get_a_clear_answer_never_a_crash(
    gateway: Gateway, live_account: Account
) -> None:
    fake = gateway.fake.app
    outcomes: dict[str, int] = {}
    for kind, (body, expected) in BODIES.items():
        fake.requests.clear()
        response = _post_raw(gateway, live_account, body)
        outcomes[kind] = response.status
        if expected is not None:
            assert response.status == expected, (kind, response.raw[:300])
            assert json.loads(response.body)["error"]["code"] in {
                "invalid_model",
                "missing_model",
                "model_not_allowed",
                "invalid_json",
            }, kind
            assert len(fake.requests) == 0, kind
        else:
            # Not JSON to the proxy: forwarded byte for byte; the upstream decides.
            assert response.status < 500, (kind, response.raw[:300])
            assert [seen.body for seen in fake.requests] == [body], kind
        assert OFF_LIST.encode() not in b"".join(seen.body for seen in fake.requests), kind
    forwarded = sum(1 for _, expected in BODIES.values() if expected is None)
    assert wait_until(lambda: UsageRecord.objects.count() == forwarded)
    assert wait_until(
        lambda: CreditAccount.objects.get(user=live_account.user).in_flight == 0, timeout=5
    )
    report(
        "hostile bodies",
        bodies=len(BODIES),
        refused_4xx=len(BODIES) - forwarded,
        forwarded_untouched=forwarded,
        server_errors=sum(1 for status in outcomes.values() if status >= 500),
    )


@pytest.mark.parametrize("kind", list(BYPASSES))
def test_bodies_that_only_python_cannot_parse_do_not_bypass_the_allowlist(
    gateway: Gateway, live_account: Account, kind: str
) -> None:
    response = _post_raw(gateway, live_account, BYPASSES[kind])
    assert response.status == 400
    assert all(OFF_LIST.encode() not in seen.body for seen in gateway.fake.app.requests)


def test_body_declared_over_the_limit_is_refused_before_it_is_read(
    gateway: Gateway, live_account: Account
) -> None:
    # Declares 1 TB and sends nothing: the answer must not wait for the body.
    request = (
        b"POST " + PREFIX + b"/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"X-Daemon-Token: " + live_account.token.encode() + b"\r\n"
        b"Content-Length: 1000000000000\r\nConnection: close\r\n\r\n"
    )
    response = send_raw(port_of(gateway.url), request, timeout=5)
    assert response.status == 413
    assert json.loads(response.body)["error"]["code"] == "body_too_large"


# --- The admin and the development endpoint --------------------------------------------


def _login(client: httpx.Client, username: str, password: str) -> httpx.Response:
    page = client.get("/admin/login/")
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert csrf is not None
    return client.post(
        "/admin/login/?next=/admin/",
        data={
            "csrfmiddlewaretoken": csrf.group(1),
            "username": username,
            "password": password,
            "next": "/admin/",
        },
        headers={"Referer": f"{client.base_url}/admin/login/"},
    )


def test_admin_is_staff_only_and_its_forms_need_csrf(
    gateway: Gateway, live_account: Account, settings: Any
) -> None:
    users = get_user_model().objects
    users.create_user("walter", password="pw-walter-1234")  # not staff
    users.create_superuser("root", "root@example.com", "pw-root-1234")
    account_user = live_account.user.pk
    protected = [
        "/admin/",
        "/admin/billing/creditaccount/",
        f"/admin/billing/creditaccount/grant/{account_user}/",
        "/admin/billing/usagerecord/",
        "/admin/apikeys/apikey/",
    ]
    with httpx.Client(base_url=gateway.url, timeout=10) as anonymous:
        for url in protected:
            response = anonymous.get(url)
            assert response.status_code == 302, url
            assert response.headers["location"].startswith("/admin/login/")
    with httpx.Client(base_url=gateway.url, timeout=10) as walter:
        # A non-staff user cannot log in to the admin at all.
        login = _login(walter, "walter", "pw-walter-1234")
        assert login.status_code == 200
        assert "sessionid" not in walter.cookies
        for url in protected:
            response = walter.get(url)
            assert response.status_code == 302, url
            assert response.headers["location"].startswith("/admin/login/")
    with httpx.Client(base_url=gateway.url, timeout=10) as root:
        assert _login(root, "root", "pw-root-1234").status_code == 302
        assert root.get("/admin/").status_code == 200
        grant = f"/admin/billing/creditaccount/grant/{account_user}/"
        page = root.get(grant)
        assert page.status_code == 200
        assert SERVER_KEY not in page.text
        # The same form posted without its CSRF token is refused, and changes nothing.
        before = CreditAccount.objects.get(user_id=account_user).balance
        forged = root.post(
            grant,
            data={"amount": "1000", "kind": "grant", "note": "x", "token": "0" * 32},
            headers={"Referer": f"{gateway.url}{grant}"},
        )
        assert forged.status_code == 403
        assert CreditAccount.objects.get(user_id=account_user).balance == before
        # The daemon-token endpoint exists only with DEBUG.
        settings.DEBUG = False
        assert root.get("/api/internal/daemon-token").status_code == 404
        settings.DEBUG = True
        issued = root.get("/api/internal/daemon-token")
        assert issued.status_code == 200
        assert issued.json()["token"].startswith("tg_")
        settings.DEBUG = False
    with httpx.Client(base_url=gateway.url, timeout=10) as anonymous:
        settings.DEBUG = True
        refused = anonymous.get("/api/internal/daemon-token")
        assert refused.status_code == 401
        settings.DEBUG = False
        # A login without its CSRF token is refused too.
        assert (
            anonymous.post(
                "/admin/login/", data={"username": "root", "password": "pw-root-1234"}
            ).status_code
            == 403
        )
