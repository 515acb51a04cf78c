"""Tests of the fake OpenRouter itself, over real HTTP on loopback.

The proxy's tests and the benchmark trust this fake to speak OpenRouter's wire
format; these tests pin that format down (padding, keep-alives, usage chunks,
exact decimal costs) and every failure mode it can simulate. No database.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from openrouter_proxy.testing.fake_openrouter import (
    ANSWER_TEXT,
    FakeOpenRouter,
    RunningFake,
    answer_chunks,
    format_decimal_exp,
    parse_mode,
    run_fake_openrouter,
)

CHAT = "/v1/chat/completions"
GROK = "x-ai/grok-code-fast-1"
KIMI = "moonshotai/kimi-k2-0905"


@pytest.fixture(scope="module")
def fake() -> Iterator[RunningFake]:
    with run_fake_openrouter(FakeOpenRouter(generation_delay=0.2)) as running:
        yield running


@pytest.fixture(scope="module")
def client(fake: RunningFake) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=fake.base_url, headers={"Authorization": "Bearer test"}, timeout=5
    ) as http:
        yield http


@pytest.fixture(scope="module")
def prices(client: httpx.Client) -> dict[str, dict[str, Decimal]]:
    models = client.get("/v1/models").json()["data"]
    return {
        model["id"]: {key: Decimal(value) for key, value in model["pricing"].items()}
        for model in models
    }


def request_body(model: str = GROK, stream: bool = False, **extra: Any) -> bytes:
    payload: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        **extra,
    }
    if stream:
        payload["stream"] = True
    return json.dumps(payload).encode()


def post(
    client: httpx.Client, body: bytes, mode: str | None = None, path: str = CHAT
) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if mode is not None:
        headers["X-Fake-Mode"] = mode
    return client.post(path, content=body, headers=headers)


def money(text: str) -> Any:
    return json.loads(text, parse_float=Decimal)


def split_events(raw: str) -> list[str]:
    """SSE events of a complete stream body (LF or CRLF line endings)."""
    return [event for event in raw.replace("\r\n", "\n").split("\n\n") if event]


def data_events(raw: str) -> list[Any]:
    events = []
    for event in split_events(raw):
        if event.startswith("data: ") and event != "data: [DONE]":
            events.append(money(event[len("data: ") :]))
    return events


def drain_into(response: httpx.Response, sink: bytearray) -> None:
    for piece in response.iter_raw():
        sink.extend(piece)


def expected_cost(
    pricing: dict[str, Decimal],
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
) -> Decimal:
    return (
        (prompt_tokens - cached_tokens) * pricing["prompt"]
        + cached_tokens * pricing["input_cache_read"]
        + completion_tokens * pricing["completion"]
    )


def wait_until(condition: Any, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return bool(condition())


# --------------------------------------------------------------------------- catalogue


def test_models_have_string_prices_per_token(client: httpx.Client) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200
    models = {model["id"]: model for model in response.json()["data"]}
    for model_id in (GROK, "qwen/qwen3-coder", KIMI, "z-ai/glm-4.6"):
        assert model_id in models
    keys = {
        "prompt",
        "completion",
        "request",
        "image",
        "input_cache_read",
        "input_cache_write",
        "internal_reasoning",
        "web_search",
    }
    for model in models.values():
        assert model["name"]
        assert model["context_length"] > 0
        assert set(model["pricing"]) >= keys
        for value in model["pricing"].values():
            assert isinstance(value, str)
            assert Decimal(value) >= 0
    grok = models[GROK]["pricing"]
    assert Decimal(grok["prompt"]) == Decimal("0.20") / 1_000_000
    assert Decimal(grok["completion"]) == Decimal("1.50") / 1_000_000
    assert Decimal(grok["input_cache_read"]) == Decimal("0.02") / 1_000_000
    assert grok["prompt"] == "0.0000002"
    kimi = models[KIMI]["pricing"]
    assert Decimal(kimi["completion"]) == Decimal("2.50") / 1_000_000
    free = [m for m in models.values() if all(v == "0" for v in m["pricing"].values())]
    assert free


def test_key_endpoint(client: httpx.Client) -> None:
    response = client.get("/v1/key")
    assert response.json() == {
        "data": {"label": "fake", "usage": 0, "limit": None, "is_free_tier": False}
    }


# --------------------------------------------------------------------------- JSON completions


def test_chat_json_has_padding_and_exact_cost(
    client: httpx.Client, prices: dict[str, dict[str, Decimal]]
) -> None:
    body = request_body(KIMI)
    response = post(client, body)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.text.startswith("\n{")
    document = money(response.text)
    assert document["object"] == "chat.completion"
    assert document["model"] == KIMI
    assert document["provider"] == "FakeProvider"
    assert document["id"] == response.headers["x-generation-id"]
    assert document["id"].startswith("gen-")
    assert len(document["id"].rsplit("-", 1)[1]) == 20
    choice = document["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": ANSWER_TEXT, "refusal": None}
    assert choice["finish_reason"] == "stop"
    usage = document["usage"]
    prompt_tokens = len(body) // 4
    assert usage["prompt_tokens"] == prompt_tokens
    assert usage["completion_tokens"] == 6
    assert usage["total_tokens"] == prompt_tokens + 6
    cost = expected_cost(prices[KIMI], prompt_tokens, 6)
    assert isinstance(usage["cost"], Decimal)
    assert usage["cost"] == cost
    assert usage["cost_details"] == {"upstream_inference_cost": cost}
    assert usage["is_byok"] is False
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": 0}
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 0}


@pytest.mark.parametrize(
    ("requested", "served", "priced_as"),
    [
        ("qwen/qwen3-coder:exacto", "qwen/qwen3-coder", "qwen/qwen3-coder"),
        ("z-ai/glm-4.6:nitro", "z-ai/glm-4.6", "z-ai/glm-4.6"),
        ("acme/unknown-model:floor", "acme/unknown-model", GROK),
        ("z-ai/glm-4.5-air:free", "z-ai/glm-4.5-air:free", "z-ai/glm-4.5-air:free"),
    ],
)
def test_served_model_and_its_price(
    client: httpx.Client,
    prices: dict[str, dict[str, Decimal]],
    requested: str,
    served: str,
    priced_as: str,
) -> None:
    body = request_body(requested)
    document = money(post(client, body).text)
    assert document["model"] == served
    assert document["usage"]["cost"] == expected_cost(prices[priced_as], len(body) // 4, 6)


def test_prompt_tokens_are_at_least_one(client: httpx.Client) -> None:
    document = money(post(client, b'{"model":"m","messages":[]}').text)
    assert document["usage"]["prompt_tokens"] == 6
    tiny = money(post(client, b'{"model":"m","prompt":""}', path="/v1/completions").text)
    assert tiny["usage"]["prompt_tokens"] == 6


def test_legacy_completions(client: httpx.Client) -> None:
    body = json.dumps({"model": GROK, "prompt": "Once upon a time"}).encode()
    document = money(post(client, body, path="/v1/completions").text)
    assert document["object"] == "text_completion"
    assert document["choices"][0]["text"] == ANSWER_TEXT
    assert document["usage"]["prompt_tokens"] == len(body) // 4

    streamed = post(
        client,
        json.dumps({"model": GROK, "prompt": "x", "stream": True}).encode(),
        path="/v1/completions",
    )
    chunks = data_events(streamed.text)
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == ANSWER_TEXT


def test_keepalive_padding_for_json(client: httpx.Client) -> None:
    response = post(client, request_body(), "keepalive=3")
    assert response.text.startswith("\n\n\n{")
    response = post(client, request_body(), "keepalive=0")
    assert response.text.startswith("{")


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'{"messages": []}', b'{"model": "m"}'],
)
def test_bad_completion_bodies_get_400(client: httpx.Client, body: bytes) -> None:
    response = post(client, body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == 400


# --------------------------------------------------------------------------- streaming


def test_stream_shape(client: httpx.Client, prices: dict[str, dict[str, Decimal]]) -> None:
    body = request_body(GROK, stream=True)
    response = post(client, body)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    events = split_events(response.text)
    assert events[0] == ": OPENROUTER PROCESSING"
    assert events[-1] == "data: [DONE]"
    chunks = data_events(response.text)
    assert all(chunk["id"] == response.headers["x-generation-id"] for chunk in chunks)
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    content = chunks[:-2]
    assert len(content) == 3
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in content)
    assert "".join(chunk["choices"][0]["delta"]["content"] for chunk in content) == ANSWER_TEXT
    finish, usage_chunk = chunks[-2:]
    assert finish["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert "usage" not in finish
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert usage["prompt_tokens"] == len(body) // 4
    assert usage["completion_tokens"] == 6
    assert usage["cost"] == expected_cost(prices[GROK], len(body) // 4, 6)


def test_stream_events_arrive_as_separate_writes(client: httpx.Client) -> None:
    with client.stream(
        "POST", CHAT, content=request_body(stream=True), headers={"X-Fake-Mode": "chunk-delay=0.02"}
    ) as response:
        pieces = list(response.iter_raw())
    assert len(pieces) == 7  # keep-alive, 3 contents, finish, usage, [DONE]
    assert pieces[0] == b": OPENROUTER PROCESSING\n\n"
    assert pieces[-1] == b"data: [DONE]\n\n"


@pytest.mark.parametrize("count", [0, 1, 2, 5, 8])
def test_chunks_directive(client: httpx.Client, count: int) -> None:
    response = post(client, request_body(stream=True), f"chunks={count},keepalive=2")
    events = split_events(response.text)
    assert events[:2] == [": OPENROUTER PROCESSING"] * 2
    chunks = data_events(response.text)
    content = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] is None]
    assert len(content) == count
    assert chunks[-1]["usage"]["completion_tokens"] == 2 * count
    text = "".join(c["choices"][0]["delta"]["content"] for c in content)
    assert text == "".join(answer_chunks(count))
    if 1 <= count <= 5:
        assert text == ANSWER_TEXT
    if count == 8:
        assert text.startswith(ANSWER_TEXT + " Hello")


def test_answer_chunks_cover_the_text() -> None:
    for count in range(1, 6):
        assert len(answer_chunks(count)) == count
        assert "".join(answer_chunks(count)) == ANSWER_TEXT
    assert answer_chunks(0) == ()
    assert len(answer_chunks(12)) == 12


def test_usage_on_finish(client: httpx.Client) -> None:
    chunks = data_events(post(client, request_body(stream=True), "usage-on-finish").text)
    finish = chunks[-1]
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert finish["usage"]["completion_tokens"] == 6
    assert all("usage" not in chunk for chunk in chunks[:-1])


def test_crlf(client: httpx.Client) -> None:
    raw = post(client, request_body(stream=True), "crlf").content
    assert raw.startswith(b": OPENROUTER PROCESSING\r\n\r\n")
    assert raw.endswith(b"data: [DONE]\r\n\r\n")
    assert b"\n\n" not in raw
    assert raw.count(b"\r\n\r\n") == 7


def test_malformed_event(client: httpx.Client) -> None:
    events = split_events(post(client, request_body(stream=True), "malformed").text)
    assert "data: {not json" in events
    assert events.index("data: {not json") == len(events) - 4  # before finish, usage, [DONE]


def test_midstream_error(client: httpx.Client, fake: RunningFake) -> None:
    body = request_body(KIMI, stream=True)
    response = post(client, body, "midstream-error,chunks=2")
    assert response.status_code == 200
    events = split_events(response.text)
    assert "data: [DONE]" not in events
    chunks = data_events(response.text)
    error = chunks[-1]
    assert error["error"] == {"code": 502, "message": "Provider disconnected"}
    assert error["choices"][0]["finish_reason"] == "error"
    assert "usage" not in error
    generation_id = response.headers["x-generation-id"]
    # The fake records the generation just after writing the last bytes.
    assert wait_until(lambda: generation_id in fake.app.generations)
    stats = fake.app.generations[generation_id]
    assert stats.tokens_completion == 4
    assert not stats.cancelled

    with_usage = data_events(post(client, body, "midstream-error-usage,chunks=2").text)
    assert with_usage[-1]["error"]["code"] == 502
    assert with_usage[-1]["usage"]["completion_tokens"] == 4


def test_midstream_error_in_json(client: httpx.Client) -> None:
    response = post(client, request_body(), "midstream-error")
    document = money(response.text)
    assert response.status_code == 200
    assert document["error"]["code"] == 502
    assert document["choices"][0]["finish_reason"] == "error"
    assert "usage" not in document


@pytest.mark.parametrize("stream", [True, False])
def test_cut_leaves_an_incomplete_response(
    client: httpx.Client,
    fake: RunningFake,
    prices: dict[str, dict[str, Decimal]],
    stream: bool,
) -> None:
    received = bytearray()
    body = request_body(GROK, stream=stream)
    with client.stream("POST", CHAT, content=body, headers={"X-Fake-Mode": "cut"}) as response:
        generation_id = response.headers["x-generation-id"]
        with pytest.raises(httpx.RemoteProtocolError):
            drain_into(response, received)
    assert received
    if stream:
        assert b"[DONE]" not in received
        assert b'"usage"' not in received
    stats = fake.app.generations[generation_id]
    assert stats.cancelled
    assert stats.tokens_completion == 6
    assert stats.total_cost == expected_cost(prices[GROK], len(body) // 4, 6)
    # The connection pool recovers: the next request works.
    assert client.get("/v1/key").status_code == 200


def test_gzip(client: httpx.Client) -> None:
    response = post(client, request_body(), "gzip")
    assert response.headers["content-encoding"] == "gzip"
    assert money(response.text)["choices"][0]["message"]["content"] == ANSWER_TEXT

    with client.stream(
        "POST", CHAT, content=request_body(stream=True), headers={"X-Fake-Mode": "gzip"}
    ) as streamed:
        assert streamed.headers["content-encoding"] == "gzip"
        decoded = list(streamed.iter_bytes())
    assert decoded[0] == b": OPENROUTER PROCESSING\n\n"
    assert decoded[-1] == b"data: [DONE]\n\n"
    assert len(decoded) == 7  # each event is flushed on its own


def test_set_cookie(client: httpx.Client) -> None:
    response = post(client, request_body(), "set-cookie")
    assert response.headers["set-cookie"] == "upstream=secret"
    assert "set-cookie" not in post(client, request_body()).headers


# --------------------------------------------------------------------------- cost modes


def usage_of(client: httpx.Client, mode: str, stream: bool, model: str = GROK) -> Any:
    body = request_body(model, stream=stream)
    response = post(client, body, mode)
    assert response.status_code == 200
    if stream:
        chunks = data_events(response.text)
        return body, response.text, chunks[-1].get("usage")
    return body, response.text, money(response.text).get("usage")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("mode", ["no-cost", "zero-cost", "byok", "exp-cost", "no-usage"])
def test_cost_modes(
    client: httpx.Client, prices: dict[str, dict[str, Decimal]], mode: str, stream: bool
) -> None:
    body, raw, usage = usage_of(client, mode, stream)
    cost = expected_cost(prices[GROK], len(body) // 4, 6)
    if mode == "no-usage":
        assert usage is None
        assert '"usage"' not in raw
        return
    assert usage["completion_tokens"] == 6
    if mode == "no-cost":
        assert "cost" not in usage
    elif mode == "zero-cost":
        assert usage["cost"] == 0
        assert usage["is_byok"] is False
    elif mode == "byok":
        assert usage["is_byok"] is True
        assert usage["cost"] == 0
        assert usage["cost_details"]["upstream_inference_cost"] == cost
    else:
        assert '"cost":' + format_decimal_exp(cost) in raw
        assert "e-" in format_decimal_exp(cost)
        assert usage["cost"] == cost


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("0.000033"), "3.3e-05"),
        (Decimal("0.0000164"), "1.64e-05"),
        (Decimal("0.00044304"), "4.4304e-04"),
        (Decimal("12.5"), "1.25e+01"),
        (Decimal("0.00000000000000000000123456789012345678"), "1.23456789012345678e-21"),
        (Decimal("0"), "0e+00"),
    ],
)
def test_exact_scientific_notation(value: Decimal, text: str) -> None:
    assert format_decimal_exp(value) == text
    assert json.loads(text, parse_float=Decimal) == value


def test_reasoning_and_cached_tokens(
    client: httpx.Client, prices: dict[str, dict[str, Decimal]]
) -> None:
    body, _, usage = usage_of(client, "reasoning=5,cached=4", False, KIMI)
    prompt_tokens = len(body) // 4
    assert usage["completion_tokens"] == 11
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 5
    assert usage["prompt_tokens_details"]["cached_tokens"] == 4
    assert usage["cost"] == expected_cost(prices[KIMI], prompt_tokens, 11, cached_tokens=4)

    _, _, capped = usage_of(client, "cached=100000", True, KIMI)
    assert capped["prompt_tokens_details"]["cached_tokens"] == capped["prompt_tokens"]


# --------------------------------------------------------------------------- errors and delays


@pytest.mark.parametrize(("status", "retry_after"), [(429, "1"), (402, None), (502, None)])
@pytest.mark.parametrize("stream", [False, True])
def test_status_mode(
    client: httpx.Client, fake: RunningFake, status: int, retry_after: str | None, stream: bool
) -> None:
    before = len(fake.app.generations)
    response = post(client, request_body(stream=stream), f"status={status}")
    assert response.status_code == status
    assert response.json() == {
        "error": {"code": status, "message": f"Fake error {status}", "metadata": {}}
    }
    assert response.headers.get("retry-after") == retry_after
    assert "x-generation-id" not in response.headers
    assert len(fake.app.generations) == before


def test_first_byte_delay(client: httpx.Client) -> None:
    started = time.monotonic()
    with client.stream(
        "POST", CHAT, content=request_body(), headers={"X-Fake-Mode": "first-byte-delay=0.2"}
    ) as response:
        elapsed = time.monotonic() - started
        response.read()
    assert elapsed >= 0.19
    assert response.status_code == 200


def test_chunk_delay(client: httpx.Client) -> None:
    arrivals = []
    with client.stream(
        "POST",
        CHAT,
        content=request_body(stream=True),
        headers={"X-Fake-Mode": "chunk-delay=0.04,chunks=3"},
    ) as response:
        for _ in response.iter_raw():
            arrivals.append(time.monotonic())
    assert len(arrivals) == 7
    assert arrivals[-1] - arrivals[0] >= 6 * 0.04 * 0.9
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert min(gaps) >= 0.02


def test_bad_mode_is_rejected(client: httpx.Client) -> None:
    response = post(client, request_body(), "explode")
    assert response.status_code == 400
    with pytest.raises(ValueError, match="unknown"):
        parse_mode("chunks=2,explode")
    with pytest.raises(ValueError, match="bad value"):
        parse_mode("status=42")


def test_default_mode_applies_without_header() -> None:
    app = FakeOpenRouter(default_mode="status=503")
    with run_fake_openrouter(app) as running:
        headers = {"Authorization": "Bearer x"}
        with httpx.Client(base_url=running.base_url, headers=headers, timeout=5) as http:
            assert post(http, request_body()).status_code == 503
            assert post(http, request_body(), "chunks=1").status_code == 200


# --------------------------------------------------------------------------- generations


def test_generation_endpoint_lags_then_reports(
    client: httpx.Client, prices: dict[str, dict[str, Decimal]]
) -> None:
    body = request_body(KIMI, stream=True)
    response = post(client, body, "reasoning=2")
    finished = time.monotonic()
    generation_id = response.headers["x-generation-id"]

    early = client.get("/v1/generation", params={"id": generation_id})
    assert early.status_code == 404
    assert early.json() == {"error": {"code": 404, "message": "Generation not found"}}
    assert client.get("/v1/generation", params={"id": "gen-0-unknown"}).status_code == 404

    assert wait_until(
        lambda: client.get("/v1/generation", params={"id": generation_id}).status_code == 200
    )
    assert time.monotonic() - finished >= 0.19
    stats = client.get("/v1/generation", params={"id": generation_id})
    data = money(stats.text)["data"]
    prompt_tokens = len(body) // 4
    assert data["id"] == generation_id
    assert data["model"] == KIMI
    assert isinstance(data["total_cost"], Decimal)
    assert data["total_cost"] == expected_cost(prices[KIMI], prompt_tokens, 8)
    assert data["tokens_prompt"] == data["native_tokens_prompt"] == prompt_tokens
    assert data["tokens_completion"] == data["native_tokens_completion"] == 8
    assert data["native_tokens_reasoning"] == 2
    assert data["native_tokens_cached"] == 0
    assert data["cancelled"] is False
    assert data["streamed"] is True
    assert data["provider_name"] == "FakeProvider"
    assert data["created_at"]


def test_client_disconnect_mid_stream() -> None:
    app = FakeOpenRouter(generation_delay=0)
    with (
        run_fake_openrouter(app) as running,
        httpx.Client(
            base_url=running.base_url, headers={"Authorization": "Bearer x"}, timeout=5
        ) as http,
    ):
        headers = {"X-Fake-Mode": "chunk-delay=0.05,chunks=40"}
        with http.stream("POST", CHAT, content=request_body(stream=True), headers=headers) as r:
            generation_id = r.headers["x-generation-id"]
            # Keep the iterator referenced: dropping it would close the stream early.
            pieces = r.iter_raw()
            received = 0
            while received < 2:
                if next(pieces).startswith(b"data: "):
                    received += 1
            assert app.open_streams == 1
            assert app.disconnected_streams == 0
        assert wait_until(lambda: app.disconnected_streams == 1)
        assert wait_until(lambda: app.open_streams == 0)
        assert app.completed_streams == 0
        stats = app.generations[generation_id]
        assert stats.cancelled
        assert stats.streamed
        assert 4 <= stats.tokens_completion < 80
        assert stats.tokens_completion % 2 == 0

        # A full stream afterwards is counted as completed.
        assert post(http, request_body(stream=True)).status_code == 200
        assert wait_until(lambda: app.completed_streams == 1)
        assert app.open_streams == 0


# --------------------------------------------------------------------------- echo, auth, routing


def test_echo_returns_the_raw_request(client: httpx.Client, fake: RunningFake) -> None:
    response = client.request(
        "PATCH",
        "/echo/some%2Fpath/x?a=%20b+c&d=e%2Bf",
        content=b"\xff\x00abc",
        headers={"X-Custom": "Value"},
    )
    assert response.status_code == 200
    echoed = response.json()
    assert echoed["method"] == "PATCH"
    assert echoed["path"] == "/api/echo/some%2Fpath/x"
    assert echoed["query"] == "a=%20b+c&d=e%2Bf"
    assert echoed["body"] == "\xff\x00abc"
    assert ["x-custom", "Value"] in echoed["headers"]
    assert response.headers["set-cookie"] == "fake=1"
    assert response.headers["x-hop"] == "1"
    assert response.headers["keep-alive"] == "timeout=5"
    assert response.headers["x-upstream"] == "echo"
    assert "x-hop" in response.headers["connection"].lower()

    seen = fake.app.requests[-1]
    assert seen.method == "PATCH"
    assert seen.path == "/api/echo/some%2Fpath/x"
    assert seen.query == "a=%20b+c&d=e%2Bf"
    assert seen.body == b"\xff\x00abc"
    assert seen.header("X-Custom") == "Value"


def test_requests_are_recorded(client: httpx.Client, fake: RunningFake) -> None:
    body = request_body()
    post(client, body, "chunks=1")
    seen = fake.app.requests[-1]
    assert (seen.method, seen.path, seen.query, seen.body) == (
        "POST",
        "/api/v1/chat/completions",
        "",
        body,
    )
    assert seen.header("authorization") == "Bearer test"
    assert seen.header("x-fake-mode") == "chunks=1"
    assert all(name == name.lower() for name, _ in seen.headers)


def test_missing_authorization_is_401(fake: RunningFake) -> None:
    with httpx.Client(base_url=fake.base_url, timeout=5) as anonymous:
        response = post(anonymous, request_body())
        assert response.status_code == 401
        assert response.json()["error"]["code"] == 401
        assert anonymous.get("/v1/models").status_code == 401
        basic = anonymous.get("/v1/models", headers={"Authorization": "Basic eDp5"})
        assert basic.status_code == 401


def test_api_key_is_enforced() -> None:
    with (
        run_fake_openrouter(FakeOpenRouter(api_key="sk-or-fake")) as running,
        httpx.Client(base_url=running.base_url, timeout=5) as http,
    ):
        wrong = http.get("/v1/key", headers={"Authorization": "Bearer other"})
        assert wrong.status_code == 401
        right = http.get("/v1/key", headers={"Authorization": "Bearer sk-or-fake"})
        assert right.status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/nothing", 404),
        ("GET", "/v2/models", 404),
        ("GET", CHAT, 405),
        ("POST", "/v1/models", 405),
    ],
)
def test_routing_errors(client: httpx.Client, method: str, path: str, status: int) -> None:
    response = client.request(method, path)
    assert response.status_code == status
    assert response.json()["error"]["code"] == status


def test_runner_is_reusable() -> None:
    ports = []
    for _ in range(2):
        with run_fake_openrouter() as running:
            assert running.base_url == f"http://127.0.0.1:{running.port}/api"
            response = httpx.get(
                running.base_url + "/v1/key", headers={"Authorization": "Bearer x"}, timeout=5
            )
            assert response.status_code == 200
            ports.append(running.port)
        with pytest.raises(httpx.ConnectError):
            httpx.get(running.base_url + "/v1/key", timeout=1)
    assert all(ports)
