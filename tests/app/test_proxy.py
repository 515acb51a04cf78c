"""The proxy end to end: a real uvicorn server, the fake OpenRouter on loopback."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from django.db import connections
from django.utils import timezone

from billing.models import CostSource, CreditAccount, ModelPrice, Outcome, Settlement, UsageRecord
from billing.services import balance_of, check_ledger
from terragon.apikeys.models import ApiKey
from tests.support.accounts import BROKEN_VERIFIER, SERVER_KEY, Account, Gateway, make_account
from tests.support.faults.common import open_raw_stream, port_of
from tests.support.requests import CHAT, STREAM_CHAT, assert_openai_error, decimal_json, post
from tests.support.servers import serve_in_thread, wait_until
from tests.support.waiting import wait_for


def sse_events(text: str) -> list[Any]:
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: ") and line != "data: [DONE]":
                try:
                    events.append(json.loads(line[6:], parse_float=Decimal))
                except ValueError:
                    continue  # the fake's deliberately malformed event
    return events


def generation_of(gateway: Gateway, record: UsageRecord) -> Any:
    assert record.generation_id is not None
    return gateway.fake.app.generations[record.generation_id]


# --- Authentication and the credit gate -------------------------------------------


def test_non_streaming_chat_is_proxied_and_billed_exactly(
    gateway: Gateway, live_account: Account
) -> None:
    response = post(gateway, live_account)
    assert response.status_code == 200
    body = decimal_json(response)
    assert body["object"] == "chat.completion"
    cost = body["usage"]["cost"]
    assert isinstance(cost, Decimal)
    assert cost > 0
    record = UsageRecord.objects.get()
    assert record.generation_id == body["id"] == response.headers["x-generation-id"]
    assert record.billed == cost
    assert record.cost_source == CostSource.PROVIDER
    assert record.outcome == Outcome.COMPLETED
    assert record.prompt_tokens == body["usage"]["prompt_tokens"]
    assert record.model == "x-ai/grok-code-fast-1"
    assert record.streamed is False
    assert record.api_key_label == f"tg_{live_account.key.prefix}"
    assert record.upstream_latency_ms is not None
    assert record.ttfb_ms is not None
    assert balance_of(live_account.user) == Decimal(10) - cost
    assert CreditAccount.objects.get(user=live_account.user).in_flight == 0
    assert check_ledger() == []


@pytest.mark.parametrize("scheme", ["x-daemon-token", "bearer"])
def test_both_token_headers_are_accepted(
    gateway: Gateway, live_account: Account, scheme: str
) -> None:
    headers = (
        {"X-Daemon-Token": live_account.token}
        if scheme == "x-daemon-token"
        else {"Authorization": f"Bearer {live_account.token}"}
    )
    assert post(gateway, None, headers=headers).status_code == 200
    seen = gateway.fake.app.requests[-1]
    assert seen.header("authorization") == f"Bearer {SERVER_KEY}"
    assert seen.header("x-daemon-token") is None


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"X-Daemon-Token": ""}, "missing_api_key"),
        ({"Authorization": "Basic abc"}, "missing_api_key"),
        ({"X-Daemon-Token": "tg_nope"}, "invalid_api_key"),
        ({"Authorization": "Bearer tg_aaaaaaaaaaaa_" + "b" * 43}, "invalid_api_key"),
    ],
)
def test_auth_failures_are_401_json_with_cors(
    gateway: Gateway, headers: dict[str, str], code: str
) -> None:
    response = post(gateway, None, headers={**headers, "Origin": "https://app.example"})
    assert_openai_error(response, 401, code)
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    assert len(gateway.fake.app.requests) == 0


def test_revoked_and_expired_keys_are_401(gateway: Gateway, live_account: Account) -> None:
    live_account.key.revoke()
    assert (
        "revoked"
        in assert_openai_error(post(gateway, live_account), 401, "invalid_api_key")["message"]
    )
    other = make_account("bob")
    ApiKey.objects.filter(pk=other.key.pk).update(expires_at=timezone.now() - timedelta(minutes=1))
    assert "expired" in assert_openai_error(post(gateway, other), 401, "invalid_api_key")["message"]


def test_missing_server_key_is_503(gateway: Gateway, live_account: Account, settings: Any) -> None:
    settings.OPENROUTER_PROXY_API_KEY = ""
    assert_openai_error(post(gateway, live_account), 503, "not_configured")


def test_no_credit_is_402(gateway: Gateway, transactional_db: None) -> None:
    broke = make_account("broke", credit=None)
    assert_openai_error(post(gateway, broke), 402, "insufficient_credits")
    assert len(gateway.fake.app.requests) == 0


def test_catalogue_reads_need_a_valid_key_but_no_credit(
    gateway: Gateway, transactional_db: None
) -> None:
    broke = make_account("broke", credit=None)
    response = httpx.get(f"{gateway.proxy}/v1/models", headers=broke.headers)
    assert response.status_code == 200, response.text
    assert response.json()["data"]
    assert [seen.path for seen in gateway.fake.app.requests] == ["/api/v1/models"]
    anonymous = httpx.get(f"{gateway.proxy}/v1/models", headers={"X-Daemon-Token": "tg_nope"})
    assert_openai_error(anonymous, 401, "invalid_api_key")
    assert len(gateway.fake.app.requests) == 1


def test_in_flight_limit_is_429_with_retry_after(
    gateway: Gateway, live_account: Account, settings: Any
) -> None:
    settings.BILLING_MAX_IN_FLIGHT = 1
    CreditAccount.objects.filter(user=live_account.user).update(
        in_flight=1, in_flight_expires_at=timezone.now() + timedelta(minutes=5)
    )
    response = post(gateway, live_account)
    assert_openai_error(response, 429, "too_many_in_flight")
    assert response.headers["retry-after"] == "1"


# --- The model allowlist ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"messages": []}, "missing_model"),
        ([1, 2], "missing_model"),
        ({"model": 42}, "invalid_model"),
        ({"model": ""}, "invalid_model"),
        ({"model": "openai/gpt-5"}, "model_not_allowed"),
        ({"model": "x-ai/grok-4"}, "model_not_allowed"),
    ],
)
def test_allowlist_refusals(gateway: Gateway, live_account: Account, body: Any, code: str) -> None:
    error = assert_openai_error(post(gateway, live_account, body), 400, code)
    if code == "model_not_allowed":
        assert body["model"] in error["message"]
    assert UsageRecord.objects.count() == 0
    assert CreditAccount.objects.get(user=live_account.user).in_flight == 0


@pytest.mark.parametrize(
    "model",
    [
        "x-ai/grok-code-fast-1",
        "qwen/qwen3-coder:exacto",
        "moonshotai/kimi-k2-0905:exacto",
        "z-ai/glm-4.6:exacto",
    ],
)
def test_seed_models_are_allowed(gateway: Gateway, live_account: Account, model: str) -> None:
    assert post(gateway, live_account, {**CHAT, "model": model}).status_code == 200


def test_allowlist_can_allow_everything(
    gateway: Gateway, live_account: Account, settings: Any
) -> None:
    settings.OPENROUTER_PROXY_ALLOWED_MODELS = ["*"]
    assert post(gateway, live_account, {**CHAT, "model": "openai/gpt-5"}).status_code == 200


def test_legacy_completions_are_checked_and_billed(gateway: Gateway, live_account: Account) -> None:
    body = {"model": "z-ai/glm-4.6", "prompt": "Say hi"}
    response = post(gateway, live_account, body, path="/v1/completions")
    assert response.status_code == 200
    assert decimal_json(response)["object"] == "text_completion"
    record = UsageRecord.objects.get()
    assert record.endpoint == "completions"
    assert record.billed == decimal_json(response)["usage"]["cost"]
    assert_openai_error(
        post(gateway, live_account, {"prompt": "x"}, path="/v1/completions"), 400, "missing_model"
    )


def test_a_body_that_is_not_json_goes_upstream_untouched(
    gateway: Gateway, live_account: Account
) -> None:
    raw = b"\x00not json at all \xff"
    post(gateway, live_account, raw, headers={"Content-Type": "text/plain"})
    assert gateway.fake.app.requests[-1].body == raw


def test_deeply_nested_json_is_refused_not_crashed(gateway: Gateway, live_account: Account) -> None:
    nested = b'{"model": "openai/gpt-5", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert_openai_error(post(gateway, live_account, nested), 400, "invalid_json")


# --- Paths, query strings, headers ------------------------------------------------------


def test_bare_prefix_is_chat_completions(gateway: Gateway, live_account: Account) -> None:
    response = post(gateway, live_account, path="")
    assert response.status_code == 200
    assert gateway.fake.app.requests[-1].path == "/api/v1/chat/completions"


@pytest.mark.parametrize(
    "path",
    [
        "/http:%2F%2Fevil.example/x",
        "/%2e%2e/%2e%2e/secret",
        "/v1/%2e%2e/x",
        "/v1//models",
        "/v1%2Fmodels",
        "/v1/%5Cx",
        "/v1/%00",
    ],
)
def test_hostile_paths_are_400_and_never_leave(
    gateway: Gateway, live_account: Account, path: str
) -> None:
    assert_openai_error(post(gateway, live_account, path=path), 400, "invalid_path")
    assert len(gateway.fake.app.requests) == 0


def test_query_string_is_forwarded_byte_for_byte(gateway: Gateway, live_account: Account) -> None:
    query = "a=%20b+c&d=e%2Bf&empty=&flag"
    url = httpx.URL(f"{gateway.proxy}/echo/x?{query}")
    response = httpx.get(url, headers=live_account.headers)
    assert response.status_code == 200
    assert response.json()["query"] == query
    assert response.json()["path"] == "/api/echo/x"


def test_headers_are_filtered_both_ways(gateway: Gateway, live_account: Account) -> None:
    response = httpx.get(
        f"{gateway.proxy}/echo/headers",
        headers={
            **live_account.headers,
            "Cookie": "sessionid=secret",
            "Proxy-Authorization": "Basic x",
            "X-Forwarded-For": "10.0.0.1",
            "X-Forwarded-Host": "evil.example",
            "Connection": "X-Secret-Hop",
            "X-Secret-Hop": "1",
            "X-Session-Id": "s-1",
            "User-Agent": "opencode/1.0",
        },
    )
    seen = dict(response.json()["headers"])
    assert seen["authorization"] == f"Bearer {SERVER_KEY}"
    for name in (
        "cookie",
        "proxy-authorization",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-daemon-token",
        "x-secret-hop",
    ):
        assert name not in seen
    assert seen["x-session-id"] == "s-1"
    assert seen["user-agent"] == "opencode/1.0"
    assert seen["host"].startswith("127.0.0.1:")
    assert "set-cookie" not in response.headers
    assert "x-hop" not in response.headers
    assert "keep-alive" not in response.headers
    assert response.headers["x-upstream"] == "echo"
    assert SERVER_KEY not in response.text.replace(f"Bearer {SERVER_KEY}", "")


def test_upstream_set_cookie_never_reaches_the_client(
    gateway: Gateway, live_account: Account
) -> None:
    response = post(gateway, live_account, headers={"X-Fake-Mode": "set-cookie"})
    assert response.status_code == 200
    assert "set-cookie" not in response.headers


def test_gzip_from_upstream_is_decoded_for_the_client(
    gateway: Gateway, live_account: Account
) -> None:
    response = post(gateway, live_account, headers={"X-Fake-Mode": "gzip"})
    assert response.status_code == 200
    assert "content-encoding" not in response.headers
    assert decimal_json(response)["usage"]["cost"] == UsageRecord.objects.get().billed


def test_proxy_path_skips_the_site_middleware(gateway: Gateway, live_account: Account) -> None:
    response = post(gateway, live_account)
    assert "x-frame-options" not in response.headers  # XFrameOptionsMiddleware not on the path
    assert "set-cookie" not in response.headers
    admin = httpx.get(f"{gateway.url}/admin/login/")
    assert admin.headers["x-frame-options"] == "DENY"


def test_works_with_atomic_requests(
    gateway: Gateway, live_account: Account, monkeypatch: Any
) -> None:
    monkeypatch.setitem(connections.settings["default"], "ATOMIC_REQUESTS", True)
    assert post(gateway, live_account).status_code == 200
    assert UsageRecord.objects.count() == 1


# --- CORS ----------------------------------------------------------------------------


def test_preflight_is_204_without_auth(gateway: Gateway) -> None:
    response = httpx.options(
        f"{gateway.proxy}/v1/chat/completions",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-daemon-token, content-type, x-session-id",
        },
    )
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    assert response.headers["access-control-allow-credentials"] == "true"
    assert response.headers["vary"] == "Origin"
    assert response.headers["access-control-allow-methods"] == "GET,POST,PUT,PATCH,DELETE,OPTIONS"
    assert (
        response.headers["access-control-allow-headers"]
        == "x-daemon-token, content-type, x-session-id"
    )
    assert int(response.headers["access-control-max-age"]) > 0


def test_preflight_default_headers_and_star_without_origin(gateway: Gateway) -> None:
    response = httpx.options(f"{gateway.proxy}/v1/models")
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in response.headers
    assert (
        response.headers["access-control-allow-headers"]
        == "authorization, content-type, x-daemon-token, x-api-key"
    )


def test_actual_responses_carry_cors(gateway: Gateway, live_account: Account) -> None:
    with_origin = post(gateway, live_account, headers={"Origin": "https://app.example"})
    assert with_origin.headers["access-control-allow-origin"] == "https://app.example"
    assert with_origin.headers["access-control-allow-credentials"] == "true"
    assert with_origin.headers["vary"] == "Origin"
    assert post(gateway, live_account).headers["access-control-allow-origin"] == "*"


# --- Failures ---------------------------------------------------------------------------


def test_body_over_the_limit_is_413(gateway: Gateway, live_account: Account, settings: Any) -> None:
    settings.OPENROUTER_PROXY_MAX_BODY_BYTES = 1000
    declared = post(gateway, live_account, {**CHAT, "pad": "x" * 2000})
    assert_openai_error(declared, 413, "body_too_large")

    def chunks() -> Any:
        yield json.dumps({**CHAT, "pad": "x" * 2000}).encode()

    streamed = httpx.post(
        f"{gateway.proxy}/v1/chat/completions", content=chunks(), headers=live_account.headers
    )
    assert_openai_error(streamed, 413, "body_too_large")
    assert len(gateway.fake.app.requests) == 0


def test_upstream_unreachable_is_502(
    gateway: Gateway, live_account: Account, settings: Any
) -> None:
    from devtools.fake_openrouter import bind_socket

    closed = bind_socket("127.0.0.1", 0)
    port = closed.getsockname()[1]
    closed.close()
    settings.OPENROUTER_PROXY_BASE_URL = f"http://127.0.0.1:{port}/api"
    response = post(gateway, live_account)
    assert_openai_error(response, 502, "upstream_unreachable")
    record = UsageRecord.objects.get()
    assert record.outcome == Outcome.UPSTREAM_UNREACHABLE
    assert record.billed == 0
    assert CreditAccount.objects.get(user=live_account.user).in_flight == 0


def test_upstream_silence_is_504_and_says_do_not_retry(
    gateway: Gateway, live_account: Account, settings: Any
) -> None:
    settings.OPENROUTER_PROXY_READ_TIMEOUT = 0.3
    response = post(gateway, live_account, headers={"X-Fake-Mode": "first-byte-delay=3"})
    assert_openai_error(response, 504, "timeout")
    assert response.headers["x-should-retry"] == "false"
    assert UsageRecord.objects.get().outcome == Outcome.UPSTREAM_ERROR


def test_upstream_429_passes_through_and_costs_nothing(
    gateway: Gateway, live_account: Account
) -> None:
    response = post(gateway, live_account, headers={"X-Fake-Mode": "status=429"})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == 429
    record = UsageRecord.objects.get()
    assert record.outcome == Outcome.UPSTREAM_ERROR
    assert record.http_status == 429
    assert record.billed == 0
    assert balance_of(live_account.user) == Decimal(10)


# --- Streaming --------------------------------------------------------------------------


def test_stream_is_forwarded_and_billed(gateway: Gateway, live_account: Account) -> None:
    response = post(gateway, live_account, STREAM_CHAT)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-accel-buffering"] == "no"
    assert response.headers["cache-control"] == "no-cache"
    assert response.text.startswith(": OPENROUTER PROCESSING")
    assert response.text.rstrip().endswith("data: [DONE]")
    usage = sse_events(response.text)[-1]["usage"]
    record = UsageRecord.objects.get()
    assert record.streamed is True
    assert record.billed == usage["cost"]
    assert balance_of(live_account.user) == Decimal(10) - usage["cost"]


@pytest.mark.parametrize(
    "mode", ["usage-on-finish", "crlf", "exp-cost", "keepalive=5", "malformed"]
)
def test_stream_shapes_are_billed_exactly(
    gateway: Gateway, live_account: Account, mode: str
) -> None:
    response = post(gateway, live_account, STREAM_CHAT, headers={"X-Fake-Mode": mode})
    assert response.status_code == 200
    costs = [e["usage"]["cost"] for e in sse_events(response.text) if e.get("usage")]
    assert len(costs) == 1
    assert UsageRecord.objects.get().billed == costs[0]


def test_chunks_arrive_as_they_are_sent(gateway: Gateway, live_account: Account) -> None:
    reads = []
    with httpx.stream(
        "POST",
        f"{gateway.proxy}/v1/chat/completions",
        json=STREAM_CHAT,
        headers={**live_account.headers, "X-Fake-Mode": "chunk-delay=0.15"},
    ) as response:
        for piece in response.iter_raw():
            reads.append(piece)
    assert len(reads) >= 5  # keep-alive, three tokens, finish, usage, done: not one buffered blob


def test_stream_bytes_pass_through_unchanged(transactional_db: None, settings: Any) -> None:
    """Odd splits (inside a UTF-8 character, CRLF, comments) arrive byte-identical."""
    usage = b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5,"cost":0.000001}'
    parts = [
        b": keep-alive\r\n\r\n",
        b'data: {"id":"gen-exact","model":"x-ai/grok-code-fast-1",'
        b'"choices":[{"delta":{"content":"Ol\xc3',
        b"\xa1 \xf0\x9f\x91",
        b'\x8b"},"finish_reason":null}]}\r\n\r\n',
        b'data: {"id":"gen-exact","choices":[],' + usage + b"}\n\n",
        b"data: [DONE]\n\n",
    ]

    async def upstream(scope: Any, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for part in parts:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    account = make_account()
    with serve_in_thread(upstream, lifespan="off") as upstream_url:
        settings.OPENROUTER_PROXY_BASE_URL = f"{upstream_url}/api"
        from terragon.asgi import application

        with serve_in_thread(application) as url:
            response = httpx.post(
                f"{url}/api/proxy/openrouter/v1/chat/completions",
                json=STREAM_CHAT,
                headers=account.headers,
            )
    assert response.content == b"".join(parts)
    assert UsageRecord.objects.get().billed == Decimal("0.000001")


def test_midstream_error_is_recorded_and_charged_as_reported(
    gateway: Gateway, live_account: Account
) -> None:
    response = post(
        gateway, live_account, STREAM_CHAT, headers={"X-Fake-Mode": "midstream-error-usage"}
    )
    events = sse_events(response.text)
    assert events[-1]["error"]["code"] == 502
    record = UsageRecord.objects.get()
    assert record.outcome == Outcome.UPSTREAM_ERROR
    assert record.billed == events[-1]["usage"]["cost"]
    assert record.settlement == Settlement.SETTLED


def test_midstream_error_without_usage_is_settled_from_generation_stats(
    gateway: Gateway, live_account: Account
) -> None:
    post(gateway, live_account, STREAM_CHAT, headers={"X-Fake-Mode": "midstream-error"})
    record = UsageRecord.objects.get()
    assert record.outcome == Outcome.UPSTREAM_ERROR
    assert wait_until(lambda: UsageRecord.objects.get().settlement == Settlement.SETTLED)
    record.refresh_from_db()
    assert record.cost_source == CostSource.GENERATION
    assert record.billed == generation_of(gateway, record).total_cost
    assert check_ledger() == []


def test_upstream_cut_mid_stream_ends_cleanly_and_is_settled(
    gateway: Gateway, live_account: Account
) -> None:
    response = post(gateway, live_account, STREAM_CHAT, headers={"X-Fake-Mode": "cut"})
    assert response.status_code == 200
    last = sse_events(response.text)[-1]
    assert last["error"]["code"] == "upstream_stream_error"
    record = UsageRecord.objects.get()
    assert record.outcome == Outcome.UPSTREAM_ERROR
    assert wait_until(lambda: UsageRecord.objects.get().settlement == Settlement.SETTLED)
    record.refresh_from_db()
    assert record.billed == generation_of(gateway, record).total_cost
    assert CreditAccount.objects.get(user=live_account.user).in_flight == 0


def test_upstream_cut_of_a_json_body_is_not_passed_off_as_complete(
    gateway: Gateway, live_account: Account
) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        post(gateway, live_account, headers={"X-Fake-Mode": "cut"})
    assert wait_until(lambda: UsageRecord.objects.filter(outcome=Outcome.UPSTREAM_ERROR).exists())


def test_client_disconnect_closes_upstream_and_settles_later(
    gateway: Gateway, live_account: Account
) -> None:
    fake = gateway.fake.app
    with httpx.stream(
        "POST",
        f"{gateway.proxy}/v1/chat/completions",
        json=STREAM_CHAT,
        headers={**live_account.headers, "X-Fake-Mode": "chunks=50,chunk-delay=0.1"},
    ) as response:
        pieces = response.iter_raw()
        first = next(pieces)
        second = next(pieces)
        assert first
        assert second
    assert wait_until(lambda: fake.disconnected_streams == 1, timeout=5)
    assert fake.open_streams == 0
    assert wait_until(lambda: UsageRecord.objects.exists())
    record = UsageRecord.objects.get()
    assert record.outcome == Outcome.CLIENT_DISCONNECTED
    assert wait_until(lambda: UsageRecord.objects.get().settlement == Settlement.SETTLED, timeout=8)
    record.refresh_from_db()
    generation = generation_of(gateway, record)
    assert generation.cancelled
    assert generation.tokens_completion < 100  # stopped early: nobody pays for unread tokens
    assert record.billed == generation.total_cost
    assert balance_of(live_account.user) == Decimal(10) - generation.total_cost
    assert CreditAccount.objects.get(user=live_account.user).in_flight == 0
    assert check_ledger() == []


def test_price_table_prices_a_stream_without_cost(gateway: Gateway, live_account: Account) -> None:
    ModelPrice.objects.create(
        model_id="x-ai/grok-code-fast-1",
        prompt=Decimal("0.0000002"),
        completion=Decimal("0.0000015"),
    )
    response = post(gateway, live_account, STREAM_CHAT, headers={"X-Fake-Mode": "no-cost"})
    usage = sse_events(response.text)[-1]["usage"]
    assert "cost" not in usage
    expected = usage["prompt_tokens"] * Decimal("0.0000002") + usage["completion_tokens"] * Decimal(
        "0.0000015"
    )
    record = UsageRecord.objects.get()
    assert record.cost_source == CostSource.PRICE_TABLE
    assert record.billed == expected


# --- Clients --------------------------------------------------------------------------


@pytest.mark.parametrize("auth", ["x-daemon-token", "bearer"])
def test_openai_sdk(gateway: Gateway, live_account: Account, auth: str) -> None:
    from openai import OpenAI

    if auth == "bearer":
        client = OpenAI(base_url=f"{gateway.proxy}/v1", api_key=live_account.token, max_retries=0)
    else:
        client = OpenAI(
            base_url=f"{gateway.proxy}/v1",
            api_key="unused",
            max_retries=0,
            default_headers={"X-Daemon-Token": live_account.token},
        )
    completion = client.chat.completions.create(
        model="x-ai/grok-code-fast-1", messages=[{"role": "user", "content": "Hi"}]
    )
    assert completion.choices[0].message.content == "Hello from the fake OpenRouter."
    stream = client.chat.completions.create(
        model="qwen/qwen3-coder:exacto",
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "Hello from the fake OpenRouter."
    # The stream's record is written as the response ends, just after [DONE] was read.
    assert wait_until(lambda: UsageRecord.objects.count() == 2)
    records = UsageRecord.objects.order_by("created_at")
    assert [r.streamed for r in records] == [False, True]
    assert all(r.settlement == Settlement.SETTLED and r.billed > 0 for r in records)
    assert check_ledger() == []


def test_openai_sdk_raises_on_402(gateway: Gateway, transactional_db: None) -> None:
    from openai import APIStatusError, OpenAI

    broke = make_account("broke", credit=None)
    client = OpenAI(base_url=f"{gateway.proxy}/v1", api_key=broke.token, max_retries=0)
    with pytest.raises(APIStatusError) as error:
        client.chat.completions.create(model="x-ai/grok-code-fast-1", messages=[])
    assert error.value.status_code == 402


def test_client_gone_before_upstream_headers_is_recorded_and_frees_its_slot(
    gateway: Gateway, live_account: Account
) -> None:
    fake = gateway.fake.app
    sock = open_raw_stream(port_of(gateway.url), live_account.token, "first-byte-delay=3")
    wait_for(lambda: fake.open_streams == 1, "the request to reach the fake")
    sock.close()
    wait_for(UsageRecord.objects.exists, "the usage record")
    record = UsageRecord.objects.get()
    assert record.outcome == Outcome.CLIENT_DISCONNECTED
    assert record.settlement == Settlement.UNPRICED  # nothing known: visible to operators
    assert CreditAccount.objects.get(user=live_account.user).in_flight == 0


def test_database_down_during_auth_is_503_json(
    gateway: Gateway, live_account: Account, settings: Any
) -> None:
    settings.OPENROUTER_PROXY_KEY_VERIFIER = BROKEN_VERIFIER
    response = post(gateway, live_account)
    assert_openai_error(response, 503, "db_down")
    assert response.headers["access-control-allow-origin"] == "*"
    assert len(gateway.fake.app.requests) == 0


@pytest.mark.django_db(transaction=True)
async def test_the_view_works_through_the_full_site_stack(
    async_client: Any, fake: Any, settings: Any
) -> None:
    """Without the ASGI fast path: every site middleware on the way, still correct."""
    from asgiref.sync import sync_to_async

    settings.OPENROUTER_PROXY_BASE_URL = fake.base_url
    account = await sync_to_async(make_account)()
    preflight = await async_client.options("/api/proxy/openrouter/v1/chat/completions")
    assert preflight.status_code == 204
    missing = await async_client.post(
        "/api/proxy/openrouter", CHAT, content_type="application/json"
    )
    assert missing.status_code == 401
    response = await async_client.post(
        "/api/proxy/openrouter/v1/chat/completions",
        STREAM_CHAT,
        content_type="application/json",
        headers=account.headers,
    )
    assert response.status_code == 200
    body = b"".join([chunk async for chunk in response.streaming_content])
    assert body.rstrip().endswith(b"data: [DONE]")
    record = await UsageRecord.objects.aget()
    assert record.billed == sse_events(body.decode())[-1]["usage"]["cost"]
    # The ORM calls above ran on asgiref's sync thread: let go of its connection;
    # and this test's event loop ends with the test: close its upstream client.
    await sync_to_async(connections.close_all)()
    from openrouter_proxy.upstream import close_clients

    await close_clients()
