"""Tests of the fake OpenRouter itself, over real HTTP on loopback.

The proxy's tests and the benchmark trust this fake to speak OpenRouter's wire
format; these tests pin that format down (padding, keep-alives, usage chunks,
exact decimal costs) and every failure mode it can simulate. No database.
"""

from __future__ import annotations

import base64
import itertools
import json
import struct
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any, cast

import anthropic
import httpx
import openai
import pytest
from openai.types.responses import ResponseCompletedEvent

from devtools.fake_openrouter import (
    ANSWER_TEXT,
    FakeOpenRouter,
    GenerationStats,
    RunningFake,
    answer_chunks,
    byok_fee,
    compute_usage,
    format_decimal_exp,
    parse_mode,
    resolve_model,
    run_fake_openrouter,
)
from tests.support.waiting import wait_for

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
    data = client.get("/v1/key").json()["data"]
    assert data["label"] == "fake"
    assert data["limit"] is None
    assert data["is_free_tier"] is False
    assert data["is_management_key"] is False
    assert data["usage"] >= 0


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
        # OpenRouter's own fee; the provider's price is paid through the user's key.
        assert usage["cost"] == byok_fee(cost) > 0
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


class SendTimes(FakeOpenRouter):
    """The fake, noting when it hands each message of a response to the server.

    Timed where the fake sends them: arrivals in a client that shares this
    process's threads can bunch up, sends cannot.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.sent: list[tuple[str, float]] = []

    @property
    def body_sent_at(self) -> list[float]:
        return [at for kind, at in self.sent if kind == "http.response.body"]

    @property
    def started_at(self) -> float:
        (started,) = [at for kind, at in self.sent if kind == "http.response.start"]
        return started

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def timed(message: Any) -> None:
            self.sent.append((message["type"], time.monotonic()))
            await send(message)

        await super().__call__(scope, receive, timed)


#: An asyncio timer may fire up to a clock tick early; a millisecond covers it.
TICK = 0.001


def test_chunk_delay() -> None:
    """The fake waits ``chunk-delay`` between two events."""
    app = SendTimes()
    with (
        run_fake_openrouter(app) as running,
        httpx.Client(base_url=running.base_url, headers={"Authorization": "Bearer x"}) as http,
        http.stream(
            "POST",
            CHAT,
            content=request_body(stream=True),
            headers={"X-Fake-Mode": "chunk-delay=0.04,chunks=3"},
        ) as response,
    ):
        arrivals = []
        for _ in response.iter_raw():
            arrivals.append(time.monotonic())
    assert len(arrivals) == len(app.body_sent_at) == 7
    # Each event is due a delay after the one before it, counted from the first.
    first = app.body_sent_at[0]
    for index, sent in enumerate(app.body_sent_at):
        assert sent - first >= index * 0.04 - TICK
    # Each piece reached the client after it was sent, not before: one write each.
    assert all(arrived >= sent for arrived, sent in zip(arrivals, app.body_sent_at, strict=True))


class StallsOnce(SendTimes):
    """The fake, its event loop blocked for a while as it sends a stream's first event."""

    STALL = 0.15

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def stalling(message: Any) -> None:
            await send(message)
            if message["type"] == "http.response.body" and len(self.body_sent_at) == 1:
                time.sleep(self.STALL)  # the process busy with something else

        await super().__call__(scope, receive, stalling)


def test_chunk_delay_is_kept_by_the_clock() -> None:
    """A stall does not push the stream back: the events after it catch up, as a model's would."""
    app = StallsOnce()
    with (
        run_fake_openrouter(app) as running,
        httpx.Client(base_url=running.base_url, headers={"Authorization": "Bearer x"}) as http,
    ):
        response = http.post(
            CHAT,
            content=request_body(stream=True),
            headers={"X-Fake-Mode": "chunk-delay=0.05,chunks=3"},
        )
    assert response.status_code == 200
    sent = app.body_sent_at
    assert len(sent) == 7  # keep-alive, 3 contents, finish, usage, [DONE]
    # Event 1 was due at 0.05 s, during the stall: it goes out as the stall ends, and
    # event 2 (due at 0.10 s) with it, without a whole delay after event 1.
    assert sent[1] - sent[0] >= StallsOnce.STALL
    assert sent[2] - sent[1] < 0.05 - TICK
    # The stream ends when its last event is due (0.30 s), not a stall later.
    assert sent[-1] - sent[0] >= 6 * 0.05 - TICK
    assert sent[-1] - sent[0] < 6 * 0.05 + StallsOnce.STALL - 0.05


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


def test_generation_endpoint_lags_then_reports(prices: dict[str, dict[str, Decimal]]) -> None:
    # The lag starts longer than any test, so the early lookups are early whatever
    # the machine's load; then it is shortened to 0.2 s and the stats appear.
    app = FakeOpenRouter(generation_delay=3600)
    with (
        run_fake_openrouter(app) as running,
        httpx.Client(base_url=running.base_url, headers={"Authorization": "Bearer x"}) as http,
    ):
        body = request_body(KIMI, stream=True)
        response = post(http, body, "reasoning=2")
        generation_id = response.headers["x-generation-id"]

        early = http.get("/v1/generation", params={"id": generation_id})
        assert early.status_code == 404
        assert early.json() == {"error": {"code": 404, "message": "Generation not found"}}
        assert http.get("/v1/generation", params={"id": "gen-0-unknown"}).status_code == 404

        def published() -> httpx.Response | None:
            lookup = http.get("/v1/generation", params={"id": generation_id})
            return lookup if lookup.status_code == 200 else None

        app.generation_delay = 0.2
        stats = wait_for(published, "the generation's stats to be published")
        # Answered 200 only once the lag had passed since the generation ended.
        assert time.monotonic() - app.generations[generation_id].finished_at >= 0.2
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


# --------------------------------------------------------------------------- every endpoint

EMBED = "openai/text-embedding-3-small"
RERANK = "cohere/rerank-v3.5"
IMAGE = "bytedance-seed/seedream-4.5"
STT = "openai/whisper-large-v3"
TTS = "openai/gpt-4o-mini-tts"
WAV = b"RIFF" + bytes(63_996)  # 64,000 bytes: two seconds at 32,000 bytes a second


def generation_of(fake: RunningFake, generation_id: str) -> GenerationStats:
    """The fake records a generation just after writing its last bytes: wait for it."""
    assert wait_until(lambda: generation_id in fake.app.generations), generation_id
    return fake.app.generations[generation_id]


def responses_body(stream: bool = False, **extra: Any) -> bytes:
    return json.dumps({"model": GROK, "input": "Say hello.", "stream": stream, **extra}).encode()


def messages_body(stream: bool = False, model: str = GROK, **extra: Any) -> bytes:
    payload = {
        "model": model,
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "Say hello."}],
        "stream": stream,
        **extra,
    }
    return json.dumps(payload).encode()


def sse(raw: str) -> list[tuple[str | None, Any]]:
    """(event name, parsed data) of each data-carrying event; comments are skipped."""
    parsed = []
    for event in split_events(raw):
        name = None
        data = None
        for line in event.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data = line[len("data: ") :]
        if data is not None:
            parsed.append((name, data if data == "[DONE]" else money(data)))
    return parsed


def multipart_body(fields: dict[str, str], file: bytes) -> tuple[bytes, str]:
    boundary = "fake-boundary-1234"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n".encode()
        + file
        + b"\r\n"
    )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), boundary


# Every metered endpoint, with a body that works: (path, content, content type, api_type).
METERED: dict[str, tuple[str, bytes, str, str]] = {
    "chat": (CHAT, request_body(), "application/json", "completions"),
    "completions": (
        "/v1/completions",
        json.dumps({"model": GROK, "prompt": "Once"}).encode(),
        "application/json",
        "completions",
    ),
    "responses": ("/v1/responses", responses_body(), "application/json", "completions"),
    "messages": ("/v1/messages", messages_body(), "application/json", "completions"),
    "embeddings": (
        "/v1/embeddings",
        json.dumps({"model": EMBED, "input": ["one", "two"]}).encode(),
        "application/json",
        "embeddings",
    ),
    "rerank": (
        "/v1/rerank",
        json.dumps({"model": RERANK, "query": "capital", "documents": ["a", "b"]}).encode(),
        "application/json",
        "rerank",
    ),
    "images": (
        "/v1/images",
        json.dumps({"model": IMAGE, "prompt": "a red panda"}).encode(),
        "application/json",
        "image",
    ),
    "transcriptions": (
        "/v1/audio/transcriptions",
        json.dumps(
            {
                "model": STT,
                "input_audio": {"data": base64.b64encode(WAV).decode(), "format": "wav"},
            }
        ).encode(),
        "application/json",
        "stt",
    ),
    "speech": (
        "/v1/audio/speech",
        json.dumps({"model": TTS, "input": "Hello there", "voice": "alloy"}).encode(),
        "application/json",
        "tts",
    ),
}


def call_metered(client: httpx.Client, name: str, mode: str | None = None) -> httpx.Response:
    path, content, content_type, _ = METERED[name]
    headers = {"Content-Type": content_type}
    if mode is not None:
        headers["X-Fake-Mode"] = mode
    return client.post(path, content=content, headers=headers)


@pytest.mark.parametrize("name", list(METERED))
def test_every_metered_endpoint_has_a_generation(
    client: httpx.Client, fake: RunningFake, name: str
) -> None:
    response = call_metered(client, name)
    assert response.status_code == 200, response.text
    generation_id = response.headers["x-generation-id"]
    assert generation_id.startswith("gen-")
    stats = generation_of(fake, generation_id)
    assert stats.api_type == METERED[name][3]
    assert stats.total_cost > 0
    assert stats.charged == stats.total_cost
    assert not stats.cancelled

    # /generation lags, then reports the same exact cost.
    assert wait_until(
        lambda: client.get("/v1/generation", params={"id": generation_id}).status_code == 200
    )
    data = money(client.get("/v1/generation", params={"id": generation_id}).text)["data"]
    assert data["total_cost"] == stats.total_cost
    assert data["api_type"] == stats.api_type
    assert data["tokens_prompt"] == stats.tokens_prompt
    assert data["finish_reason"] == "stop"


@pytest.mark.parametrize("name", list(METERED))
def test_status_mode_on_every_metered_endpoint(
    client: httpx.Client, fake: RunningFake, name: str
) -> None:
    before = len(fake.app.generations)
    response = call_metered(client, name, "status=402")
    assert response.status_code == 402
    assert response.json()["error"]["code"] == 402
    assert "x-generation-id" not in response.headers
    assert len(fake.app.generations) == before


@pytest.mark.parametrize("name", [n for n in METERED if n != "speech"])
@pytest.mark.parametrize("mode", ["byok", "zero-cost", "no-cost", "no-usage", "exp-cost"])
def test_cost_modes_on_every_json_endpoint(
    client: httpx.Client, fake: RunningFake, name: str, mode: str
) -> None:
    plain = call_metered(client, name)
    cost = generation_of(fake, plain.headers["x-generation-id"]).total_cost
    response = call_metered(client, name, mode)
    document = money(response.text.strip())
    stats = generation_of(fake, response.headers["x-generation-id"])
    if mode == "no-usage":
        assert document.get("usage") is None
        assert '"cost"' not in response.text
        assert stats.total_cost == cost
        return
    usage = document["usage"]
    if mode == "exp-cost":
        assert '"cost":' + format_decimal_exp(cost) in response.text
        assert usage["cost"] == cost
    elif mode == "no-cost":
        assert "cost" not in usage
        assert "cost_details" not in usage
        assert stats.total_cost == cost
    elif mode == "zero-cost":
        assert usage["cost"] == 0
        assert stats.total_cost == 0
        assert stats.charged == 0
    else:
        assert usage["cost"] == byok_fee(cost)
        assert stats.is_byok
        assert stats.total_cost == byok_fee(cost)
        assert stats.upstream_inference_cost == cost
        assert stats.charged == cost + byok_fee(cost)
        if name != "rerank":  # rerank's usage has no place for the provider's price
            assert usage["is_byok"] is True
            assert usage["cost_details"]["upstream_inference_cost"] == cost


def test_costs_sum_up() -> None:
    app = FakeOpenRouter(generation_delay=0)
    with (
        run_fake_openrouter(app) as running,
        httpx.Client(base_url=running.base_url, headers={"Authorization": "Bearer x"}) as http,
    ):
        reported = Decimal(0)
        for name in METERED:
            response = call_metered(http, name)
            if name != "speech":
                reported += money(response.text.strip())["usage"]["cost"]
        byok = money(call_metered(http, "embeddings", "byok").text)["usage"]
        assert wait_until(lambda: len(app.generations) == len(METERED) + 1)
        speech = next(g for g in app.generations.values() if g.api_type == "tts")
        upstream = byok["cost_details"]["upstream_inference_cost"]
        assert upstream > 0
        fee = byok["cost"]
        assert fee == byok_fee(upstream)
        total = reported + speech.total_cost + fee + upstream
        assert app.charged_total() == total
        assert app.charged_total("tts") == speech.total_cost
        assert app.charged_total("embeddings") == 2 * upstream + fee
        # The same sum, by hand, as a test of another component would do it.
        by_hand = sum(
            (
                g.total_cost + (g.upstream_inference_cost or 0) if g.is_byok else g.total_cost
                for g in app.generations.values()
            ),
            Decimal(0),
        )
        assert by_hand == total
        # The account endpoints report OpenRouter's own charges.
        assert money(http.get("/v1/credits").text)["data"]["total_usage"] == total - upstream
        key = money(http.get("/v1/key").text)["data"]
        assert key["usage"] == total - upstream
        assert key["byok_usage"] == upstream


# --------------------------------------------------------------------------- Responses API

RESPONSES_SEQUENCE = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def test_responses_json(
    client: httpx.Client, fake: RunningFake, prices: dict[str, dict[str, Decimal]]
) -> None:
    body = responses_body(instructions="Be brief.", max_output_tokens=50)
    response = post(client, body, "reasoning=2,cached=3", path="/v1/responses")
    assert response.status_code == 200
    assert response.text.startswith("\n{")
    document = money(response.text)
    assert document["id"] == response.headers["x-generation-id"]
    assert document["object"] == "response"
    assert document["status"] == "completed"
    assert document["model"] == GROK
    assert document["instructions"] == "Be brief."
    assert document["max_output_tokens"] == 50
    assert document["error"] is None
    assert document["incomplete_details"] is None
    (item,) = document["output"]
    assert item["type"] == "message"
    assert item["role"] == "assistant"
    assert item["status"] == "completed"
    assert item["id"].startswith("msg_")
    assert item["content"] == [
        {"type": "output_text", "text": ANSWER_TEXT, "annotations": [], "logprobs": []}
    ]
    usage = document["usage"]
    prompt_tokens = len(body) // 4
    cost = expected_cost(prices[GROK], prompt_tokens, 8, cached_tokens=3)
    assert usage["input_tokens"] == prompt_tokens
    assert usage["input_tokens_details"] == {"cached_tokens": 3, "cache_write_tokens": 0}
    assert usage["output_tokens"] == 8
    assert usage["output_tokens_details"] == {"reasoning_tokens": 2}
    assert usage["total_tokens"] == prompt_tokens + 8
    assert usage["cost"] == cost
    assert usage["is_byok"] is False
    details = usage["cost_details"]
    assert details["upstream_inference_cost"] == cost
    assert details["upstream_inference_output_cost"] == 8 * prices[GROK]["completion"]
    assert details["upstream_inference_input_cost"] + details["upstream_inference_output_cost"] == (
        cost
    )
    stats = generation_of(fake, document["id"])
    assert stats.total_cost == cost
    assert not stats.streamed


def test_responses_stream_sequence(
    client: httpx.Client, fake: RunningFake, prices: dict[str, dict[str, Decimal]]
) -> None:
    body = responses_body(stream=True)
    response = post(client, body, path="/v1/responses")
    assert response.headers["content-type"] == "text/event-stream"
    assert split_events(response.text)[0] == ": OPENROUTER PROCESSING"
    events = sse(response.text)
    assert [name for name, _ in events] == RESPONSES_SEQUENCE
    assert all(data["type"] == name for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    by_type = {name: data for name, data in events}
    created = by_type["response.created"]["response"]
    assert created["status"] == "in_progress"
    assert created["usage"] is None
    assert created["id"] == response.headers["x-generation-id"]
    item_id = by_type["response.output_item.added"]["item"]["id"]
    deltas = [data for name, data in events if name == "response.output_text.delta"]
    assert all(d["item_id"] == item_id and d["output_index"] == 0 for d in deltas)
    assert "".join(d["delta"] for d in deltas) == ANSWER_TEXT
    assert by_type["response.output_text.done"]["text"] == ANSWER_TEXT
    assert by_type["response.content_part.done"]["part"]["text"] == ANSWER_TEXT
    assert by_type["response.output_item.done"]["item"]["status"] == "completed"
    completed = by_type["response.completed"]["response"]
    assert completed["status"] == "completed"
    assert completed["output"][0]["content"][0]["text"] == ANSWER_TEXT
    cost = expected_cost(prices[GROK], len(body) // 4, 6)
    assert completed["usage"]["cost"] == cost
    assert generation_of(fake, completed["id"]).total_cost == cost
    assert generation_of(fake, completed["id"]).streamed


def test_responses_stream_endings(client: httpx.Client, fake: RunningFake) -> None:
    incomplete = sse(post(client, responses_body(stream=True), "incomplete", "/v1/responses").text)
    name, data = incomplete[-1]
    assert name == data["type"] == "response.incomplete"
    assert data["response"]["status"] == "incomplete"
    assert data["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert data["response"]["usage"]["output_tokens"] == 6
    stats = generation_of(fake, data["response"]["id"])
    assert stats.finish_reason == "length"
    assert not stats.cancelled

    failed = sse(
        post(client, responses_body(stream=True), "midstream-error,chunks=2", "/v1/responses").text
    )
    assert [name for name, _ in failed][-2:] == ["response.output_text.delta", "response.failed"]
    response = failed[-1][1]["response"]
    assert response["status"] == "failed"
    assert response["error"] == {
        "code": "server_error",
        "message": "Provider disconnected unexpectedly",
    }
    assert response["usage"] is None
    assert generation_of(fake, response["id"]).tokens_completion == 4

    with_usage = sse(
        post(client, responses_body(stream=True), "midstream-error-usage", "/v1/responses").text
    )
    assert with_usage[-1][1]["response"]["usage"]["output_tokens"] == 6

    done = sse(post(client, responses_body(stream=True), "response-done", "/v1/responses").text)
    assert done[-1][0] == done[-1][1]["type"] == "response.done"
    assert done[-1][1]["response"]["usage"]["cost"] > 0


def test_responses_cut(client: httpx.Client, fake: RunningFake) -> None:
    received = bytearray()
    headers = {"X-Fake-Mode": "cut"}
    with client.stream(
        "POST", "/v1/responses", content=responses_body(stream=True), headers=headers
    ) as response:
        generation_id = response.headers["x-generation-id"]
        with pytest.raises(httpx.RemoteProtocolError):
            drain_into(response, received)
    assert b"response.output_text.delta" in received
    assert b"response.completed" not in received
    stats = generation_of(fake, generation_id)
    assert stats.cancelled
    assert stats.tokens_completion == 6


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({"store": True}, "stateless"),
        ({"previous_response_id": "resp_1"}, "stateless"),
        ({"input": []}, "input is required"),
    ],
)
def test_responses_rejects_stateful_and_empty_requests(
    client: httpx.Client, extra: dict[str, Any], problem: str
) -> None:
    response = post(client, responses_body(**extra), path="/v1/responses")
    assert response.status_code == 400
    assert problem in response.json()["error"]["message"]


def openai_client(fake: RunningFake) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fake.base_url}/v1", api_key="test", max_retries=0)


def test_responses_with_the_openai_sdk(
    fake: RunningFake, prices: dict[str, dict[str, Decimal]]
) -> None:
    with openai_client(fake) as sdk:
        answer = sdk.responses.create(model=KIMI, input="Say hello.")
        assert answer.output_text == ANSWER_TEXT
        assert answer.status == "completed"
        assert answer.usage is not None
        assert answer.usage.output_tokens == 6
        assert answer.usage.input_tokens_details.cached_tokens == 0

        events = list(sdk.responses.create(model=KIMI, input="Say hello.", stream=True))
        assert [event.type for event in events] == RESPONSES_SEQUENCE
        completed = events[-1]
        assert isinstance(completed, ResponseCompletedEvent)
        assert completed.response.output_text == ANSWER_TEXT

        with sdk.responses.stream(model=KIMI, input="Say hello.") as stream:
            text = "".join(
                event.delta for event in stream if event.type == "response.output_text.delta"
            )
            final = stream.get_final_response()
        assert text == ANSWER_TEXT
        assert final.output_text == ANSWER_TEXT
        assert final.usage is not None
        stats = generation_of(fake, final.id)
        assert stats.tokens_completion == final.usage.output_tokens == 6


# --------------------------------------------------------------------------- Anthropic Messages

MESSAGES_SEQUENCE = [
    "message_start",
    "content_block_start",
    "ping",
    "content_block_delta",
    "content_block_delta",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
]


def test_messages_json(
    client: httpx.Client, fake: RunningFake, prices: dict[str, dict[str, Decimal]]
) -> None:
    body = messages_body(model=KIMI)
    response = post(client, body, "cached=5", path="/v1/messages")
    assert response.status_code == 200
    document = money(response.text)
    assert document["id"].startswith("msg_")
    assert document["type"] == "message"
    assert document["role"] == "assistant"
    assert document["model"] == KIMI
    assert document["content"] == [{"type": "text", "text": ANSWER_TEXT}]
    assert document["stop_reason"] == "end_turn"
    assert document["stop_sequence"] is None
    usage = document["usage"]
    prompt_tokens = len(body) // 4
    cost = expected_cost(prices[KIMI], prompt_tokens, 6, cached_tokens=5)
    # Anthropic counts input tokens without the cached ones.
    assert usage["input_tokens"] == prompt_tokens - 5
    assert usage["cache_read_input_tokens"] == 5
    assert usage["cache_creation_input_tokens"] == 0
    assert usage["output_tokens"] == 6
    assert usage["cost"] == cost
    assert usage["is_byok"] is False
    details = usage["cost_details"]
    assert details["upstream_inference_cost"] == cost
    assert details["upstream_inference_completions_cost"] == 6 * prices[KIMI]["completion"]
    stats = generation_of(fake, response.headers["x-generation-id"])
    assert stats.total_cost == cost
    assert stats.tokens_cached == 5

    limited = money(post(client, body, "incomplete", path="/v1/messages").text)
    assert limited["stop_reason"] == "max_tokens"


def test_messages_stream_has_no_cost(
    client: httpx.Client, fake: RunningFake, prices: dict[str, dict[str, Decimal]]
) -> None:
    body = messages_body(stream=True)
    response = post(client, body, path="/v1/messages")
    assert response.headers["content-type"] == "text/event-stream"
    assert '"cost"' not in response.text
    events = sse(response.text)
    assert [name for name, _ in events] == MESSAGES_SEQUENCE
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert start["content"] == []
    assert start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == len(body) // 4
    assert start["usage"]["output_tokens"] == 1
    deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert all(delta["type"] == "text_delta" for delta in deltas)
    assert "".join(delta["text"] for delta in deltas) == ANSWER_TEXT
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 6
    # The cost is only in /generation.
    stats = generation_of(fake, response.headers["x-generation-id"])
    assert stats.total_cost == expected_cost(prices[GROK], len(body) // 4, 6)
    assert stats.streamed


def test_messages_midstream_error(client: httpx.Client, fake: RunningFake) -> None:
    response = post(client, messages_body(stream=True), "midstream-error,chunks=2", "/v1/messages")
    events = sse(response.text)
    name, error = events[-1]
    assert name == error["type"] == "error"
    assert error["error"]["type"] == "api_error"
    assert error["error"]["message"]
    assert "message_stop" not in [name for name, _ in events]
    assert generation_of(fake, response.headers["x-generation-id"]).tokens_completion == 4


def test_messages_with_the_anthropic_sdk(fake: RunningFake) -> None:
    with anthropic.Anthropic(base_url=fake.base_url, api_key="test", max_retries=0) as sdk:
        kwargs: dict[str, Any] = {
            "model": GROK,
            "max_tokens": 100,
            "messages": [{"role": "user", "content": "Say hello."}],
        }
        message = sdk.messages.create(**kwargs)
        assert message.content[0].type == "text"
        assert message.content[0].text == ANSWER_TEXT
        assert message.stop_reason == "end_turn"
        assert message.usage.output_tokens == 6
        seen = fake.app.requests[-1]
        # Depending on its version the SDK sends the key as x-api-key or as a bearer token.
        sent = (seen.header("x-api-key"), seen.header("authorization"))
        assert sent in (("test", None), (None, "Bearer test")), sent

        with sdk.messages.stream(**kwargs) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
            generation_id = stream.response.headers["x-generation-id"]
        assert text == ANSWER_TEXT
        assert final.stop_reason == "end_turn"
        assert final.usage.output_tokens == 6
        assert generation_of(fake, generation_id).tokens_completion == 6

        count = sdk.messages.count_tokens(
            model=GROK, messages=[{"role": "user", "content": "Say hello."}]
        )
        assert count.input_tokens == len(fake.app.requests[-1].body) // 4

    with anthropic.Anthropic(base_url=fake.base_url, auth_token="test", max_retries=0) as bearer:
        assert bearer.messages.create(**kwargs).content[0].text == ANSWER_TEXT
        assert fake.app.requests[-1].header("authorization") == "Bearer test"
    with (
        run_fake_openrouter(FakeOpenRouter(api_key="sk-or-right")) as strict,
        anthropic.Anthropic(base_url=strict.base_url, api_key="wrong", max_retries=0) as wrong,
        pytest.raises(anthropic.AuthenticationError),
    ):
        wrong.messages.create(**kwargs)


def test_messages_accept_x_api_key() -> None:
    """Anthropic clients may send their key as x-api-key; OpenRouter accepts it there only."""
    with (
        run_fake_openrouter(FakeOpenRouter(api_key="sk-or-right")) as strict,
        httpx.Client(base_url=strict.base_url) as http,
    ):
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            right = http.post(path, content=messages_body(), headers={"x-api-key": "sk-or-right"})
            assert right.status_code == 200, path
            wrong = http.post(path, content=messages_body(), headers={"x-api-key": "sk-or-wrong"})
            assert wrong.status_code == 401, path
        elsewhere = http.post(CHAT, content=request_body(), headers={"x-api-key": "sk-or-right"})
        assert elsewhere.status_code == 401


def test_count_tokens_is_free(client: httpx.Client, fake: RunningFake) -> None:
    before = len(fake.app.generations)
    body = messages_body()
    response = post(client, body, path="/v1/messages/count_tokens")
    assert response.status_code == 200
    assert response.json() == {"input_tokens": len(body) // 4}
    assert "x-generation-id" not in response.headers
    assert len(fake.app.generations) == before


# --------------------------------------------------------------------------- embeddings, rerank


def test_embeddings(
    client: httpx.Client, fake: RunningFake, prices: dict[str, dict[str, Decimal]]
) -> None:
    texts = ["The quick brown fox", "jumps over the lazy dog", "!"]
    response = client.post(
        "/v1/embeddings", json={"model": EMBED, "input": texts, "dimensions": 12}
    )
    floats = response.json()
    assert floats["object"] == "list"
    assert floats["model"] == EMBED
    assert [item["index"] for item in floats["data"]] == [0, 1, 2]
    assert all(item["object"] == "embedding" for item in floats["data"])
    vectors = [item["embedding"] for item in floats["data"]]
    assert all(len(vector) == 12 for vector in vectors)
    assert vectors[0] != vectors[1]
    encoded = client.post(
        "/v1/embeddings",
        json={"model": EMBED, "input": texts, "dimensions": 12, "encoding_format": "base64"},
    ).json()
    decoded = [
        list(struct.unpack("<12f", base64.b64decode(item["embedding"]))) for item in encoded["data"]
    ]
    assert decoded == vectors
    usage = money(response.text)["usage"]
    tokens = sum(max(1, len(text) // 4) for text in texts)
    assert usage["prompt_tokens"] == usage["total_tokens"] == tokens
    assert usage["cost"] == tokens * prices_of(EMBED)["prompt"]
    stats = generation_of(fake, response.headers["x-generation-id"])
    assert stats.total_cost == usage["cost"]
    assert stats.tokens_prompt == tokens

    single = client.post("/v1/embeddings", json={"model": EMBED, "input": "one"}).json()
    assert len(single["data"]) == 1
    assert len(single["data"][0]["embedding"]) == 8
    assert client.post("/v1/embeddings", json={"model": EMBED, "input": []}).status_code == 400


def prices_of(model_id: str) -> dict[str, Decimal]:
    entry = resolve_model(model_id)[1]
    return {"prompt": entry.prompt, "completion": entry.completion, "request": entry.request}


def test_embeddings_with_the_openai_sdk(fake: RunningFake) -> None:
    with openai_client(fake) as sdk:
        # The SDK asks for base64 by default and decodes float32 itself.
        default = sdk.embeddings.create(model=EMBED, input=["alpha", "beta"])
        floats = sdk.embeddings.create(
            model=EMBED, input=["alpha", "beta"], encoding_format="float"
        )
        assert json.loads(fake.app.requests[-2].body)["encoding_format"] == "base64"
        assert json.loads(fake.app.requests[-1].body)["encoding_format"] == "float"
    assert [item.embedding for item in default.data] == [item.embedding for item in floats.data]
    assert len(default.data) == 2
    assert default.usage.prompt_tokens == 2


def test_rerank(client: httpx.Client, fake: RunningFake) -> None:
    documents = [
        "Berlin is the capital of Germany.",
        "Paris is the capital of France.",
        {"text": "The capital of France is Paris, of course."},
        "Bananas are yellow.",
    ]
    body = {
        "model": RERANK,
        "query": "What is the capital of France?",
        "documents": documents,
        "top_n": 3,
    }
    response = client.post("/v1/rerank", json=body)
    document = money(response.text)
    assert document["id"] == response.headers["x-generation-id"]
    assert document["model"] == RERANK
    results = document["results"]
    assert len(results) == 3
    scores = [result["relevance_score"] for result in results]
    assert scores == sorted(scores, reverse=True)
    assert results[0]["index"] in (1, 2)
    assert 3 not in [result["index"] for result in results]
    assert results[-1]["document"] == {"text": documents[results[-1]["index"]]}
    usage = document["usage"]
    assert usage["search_units"] == 1
    tokens = len(response.request.content) // 4
    assert usage["total_tokens"] == tokens
    assert usage["cost"] == Decimal("0.002")
    assert generation_of(fake, document["id"]).total_cost == Decimal("0.002")

    many = client.post(
        "/v1/rerank", json={"model": RERANK, "query": "q", "documents": ["d"] * 150}
    ).json()
    assert many["usage"]["search_units"] == 2
    assert len(many["results"]) == 150
    missing = client.post("/v1/rerank", json={"model": RERANK, "documents": ["d"]})
    assert missing.status_code == 400


# --------------------------------------------------------------------------- images, audio


def test_images(client: httpx.Client, fake: RunningFake) -> None:
    prompt = "a red panda astronaut"
    response = client.post("/v1/images", json={"model": IMAGE, "prompt": prompt, "n": 2})
    document = money(response.text)
    assert document["created"] > 0
    assert len(document["data"]) == 2
    for image in document["data"]:
        assert base64.b64decode(image["b64_json"]).startswith(b"\x89PNG\r\n\x1a\n")
        assert image["media_type"] == "image/png"
    usage = document["usage"]
    prices = prices_of(IMAGE)
    prompt_tokens = len(prompt) // 4
    assert usage["prompt_tokens"] == prompt_tokens
    assert usage["completion_tokens"] == 2 * 4096
    cost = prompt_tokens * prices["prompt"] + 2 * 4096 * prices["completion"]
    assert usage["cost"] == cost
    assert generation_of(fake, response.headers["x-generation-id"]).total_cost == cost


def test_images_stream(client: httpx.Client, fake: RunningFake) -> None:
    body = {"model": IMAGE, "prompt": "a red panda astronaut", "stream": True}
    response = client.post("/v1/images", json=body, headers={"X-Fake-Mode": "chunks=2"})
    assert response.headers["content-type"] == "text/event-stream"
    events = [data for _, data in sse(response.text)]
    assert events[-1] == "[DONE]"
    kinds = [event["type"] for event in events[:-1]]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [event["partial_image_index"] for event in events[:2]] == [0, 1]
    completed = events[2]
    assert completed["b64_json"]
    assert completed["created"] > 0
    cost = generation_of(fake, response.headers["x-generation-id"]).total_cost
    assert completed["usage"]["cost"] == cost > 0

    with openai_client(fake) as sdk:
        parsed = sdk.post(
            "/images",
            body={"model": IMAGE, "prompt": "a cat"},
            cast_to=openai.types.ImagesResponse,
        )
        assert parsed.data is not None
        assert parsed.data[0].b64_json == completed["b64_json"]
        stream = sdk.post(
            "/images",
            body={"model": IMAGE, "prompt": "a cat", "stream": True},
            cast_to=cast(Any, openai.types.ImageGenStreamEvent),
            stream=True,
            stream_cls=openai.Stream[openai.types.ImageGenStreamEvent],
        )
        final = list(stream)[-1]
        assert final.type == "image_generation.completed"
        assert final.usage is not None
        assert final.usage.total_tokens == 4096 + 1


def test_transcriptions(client: httpx.Client, fake: RunningFake) -> None:
    content, boundary = multipart_body({"model": STT, "language": "en"}, WAV)
    response = client.post(
        "/v1/audio/transcriptions",
        content=content,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    document = money(response.text)
    assert document["text"] == ANSWER_TEXT
    usage = document["usage"]
    assert usage["seconds"] == 2
    assert usage["input_tokens"] == 20
    assert usage["output_tokens"] == 6
    assert usage["total_tokens"] == 26
    prices = prices_of(STT)
    cost = 20 * prices["prompt"] + 6 * prices["completion"]
    assert usage["cost"] == cost
    assert generation_of(fake, response.headers["x-generation-id"]).total_cost == cost

    as_json = money(call_metered(client, "transcriptions").text)
    assert as_json["usage"] == usage

    no_file = client.post("/v1/audio/transcriptions", json={"model": STT})
    assert no_file.status_code == 400
    with openai_client(fake) as sdk:
        transcript = sdk.audio.transcriptions.create(model=STT, file=("a.wav", WAV))
    assert transcript.text == ANSWER_TEXT


def test_speech(client: httpx.Client, fake: RunningFake) -> None:
    body = {"model": TTS, "input": "Hello there, friend", "voice": "alloy"}
    mp3 = client.post("/v1/audio/speech", json={**body, "response_format": "mp3"})
    assert mp3.status_code == 200
    assert mp3.headers["content-type"] == "audio/mpeg"
    assert mp3.content.startswith(b"\xff\xfb")
    assert len(mp3.content) == 3 * 417
    stats = generation_of(fake, mp3.headers["x-generation-id"])
    prices = prices_of(TTS)
    assert stats.total_cost == 4 * prices["prompt"] + 6 * prices["completion"]
    assert stats.api_type == "tts"

    pcm = client.post("/v1/audio/speech", json=body, headers={"X-Fake-Mode": "chunks=5"})
    assert pcm.headers["content-type"] == "audio/pcm"
    assert pcm.content == bytes(5 * 960)
    assert generation_of(fake, pcm.headers["x-generation-id"]).tokens_completion == 10

    with openai_client(fake) as sdk:
        spoken = sdk.audio.speech.create(
            model=TTS, input="Hello", voice="alloy", response_format="mp3"
        )
    assert spoken.content.startswith(b"\xff\xfb")

    with client.stream(
        "POST", "/v1/audio/speech", json=body, headers={"X-Fake-Mode": "cut,chunks=4"}
    ) as response:
        generation_id = response.headers["x-generation-id"]
        received = bytearray()
        with pytest.raises(httpx.RemoteProtocolError):
            drain_into(response, received)
    assert len(received) == 2 * 960
    assert generation_of(fake, generation_id).cancelled


# --------------------------------------------------------------------------- realism


def test_midstream_error_in_openrouter_shape(client: httpx.Client, fake: RunningFake) -> None:
    response = post(client, request_body(stream=True), "midstream-error-openrouter,chunks=2")
    assert response.status_code == 200
    chunks = data_events(response.text)
    error = chunks[-1]
    assert error["error"] == {
        "code": "server_error",
        "message": "Provider disconnected unexpectedly",
    }
    assert error["choices"] == [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]
    assert error["object"] == "chat.completion.chunk"
    assert "data: [DONE]" not in response.text
    stats = generation_of(fake, response.headers["x-generation-id"])
    assert stats.tokens_completion == 4
    assert stats.finish_reason == "error"

    document = money(post(client, request_body(), "midstream-error-openrouter").text)
    assert document["error"]["code"] == "server_error"
    assert document["choices"][0]["finish_reason"] == "error"


def test_incomplete_chat(client: httpx.Client) -> None:
    chunks = data_events(post(client, request_body(stream=True), "incomplete").text)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 6
    document = money(post(client, request_body(), "incomplete").text)
    assert document["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CHAT, request_body(stream=True)),
        ("/v1/responses", responses_body(stream=True)),
        ("/v1/messages", messages_body(stream=True)),
    ],
    ids=["chat", "responses", "messages"],
)
def test_keepalives_between_data_events(
    client: httpx.Client, fake: RunningFake, path: str, body: bytes
) -> None:
    plain = split_events(post(client, body, path=path).text)
    response = post(client, body, "keepalive-between,keepalive=2", path=path)
    events = split_events(response.text)
    comment = ": OPENROUTER PROCESSING"
    data = [event for event in events if event != comment]
    assert len(data) == len(plain) - 1
    assert events[:3] == [comment, comment, data[0]]
    assert events[-1] == data[-1]
    for first, second in itertools.pairwise(events[2:]):
        assert (first == comment) != (second == comment)
    # The same answer and the same bill as without.
    stats = generation_of(fake, response.headers["x-generation-id"])
    assert stats.tokens_completion == 6
    assert not stats.cancelled


def test_headers_first_then_padding_dribbled() -> None:
    app = SendTimes()
    with (
        run_fake_openrouter(app) as running,
        httpx.Client(base_url=running.base_url, headers={"Authorization": "Bearer x"}) as http,
    ):
        headers = {"X-Fake-Mode": "headers-first,first-byte-delay=0.5,keepalive=3"}
        with http.stream("POST", CHAT, content=request_body(), headers=headers) as response:
            assert response.headers["x-generation-id"]
            pieces = list(response.iter_raw())
        assert pieces[:3] == [b"\n", b"\n", b"\n"]
        assert money(b"".join(pieces).decode())["choices"][0]["message"]["content"] == ANSWER_TEXT
        # The headers at once, a line of padding every third of the delay, the body last.
        assert [kind for kind, _ in app.sent] == ["http.response.start"] + [
            "http.response.body"
        ] * 4
        started, bodies = app.started_at, app.body_sent_at
        assert all(
            later - earlier >= 0.5 / 3 - TICK for earlier, later in itertools.pairwise(bodies)
        )
        assert bodies[-1] - started >= 0.5 - TICK

        # A stream's headers come first too, then the silence.
        app.sent.clear()
        headers = {"X-Fake-Mode": "headers-first,first-byte-delay=0.5"}
        with http.stream(
            "POST", "/v1/messages", content=messages_body(stream=True), headers=headers
        ) as streamed:
            streamed.read()
        assert app.body_sent_at[0] - app.started_at >= 0.5 - TICK
        assert sse(streamed.text)[-1][0] == "message_stop"


def test_gzip_on_the_other_endpoints(client: httpx.Client) -> None:
    response = post(client, responses_body(), "gzip", path="/v1/responses")
    assert response.headers["content-encoding"] == "gzip"
    assert money(response.text)["status"] == "completed"
    with client.stream(
        "POST",
        "/v1/messages",
        content=messages_body(stream=True),
        headers={"X-Fake-Mode": "gzip,chunk-delay=0.01"},
    ) as streamed:
        assert streamed.headers["content-encoding"] == "gzip"
        decoded = list(streamed.iter_bytes())
    assert len(decoded) == 1 + len(MESSAGES_SEQUENCE)  # the keep-alive, then each event
    assert decoded[-1].startswith(b"event: message_stop")


def leave_after_data_events(http: httpx.Client, path: str, body: bytes, count: int) -> str:
    headers = {"X-Fake-Mode": "chunk-delay=0.05,chunks=40"}
    with http.stream("POST", path, content=body, headers=headers) as response:
        generation_id = response.headers["x-generation-id"]
        pieces = response.iter_raw()
        received = 0
        while received < count:
            if b"data: " in next(pieces):
                received += 1
    return generation_id


@pytest.mark.parametrize("policy", ["delivered", "full"])
@pytest.mark.parametrize(
    ("path", "body", "before_content"),
    [
        (CHAT, request_body(stream=True), 0),
        ("/v1/responses", responses_body(stream=True), 4),
        ("/v1/messages", messages_body(stream=True), 3),
    ],
    ids=["chat", "responses", "messages"],
)
def test_bill_cancelled(policy: str, path: str, body: bytes, before_content: int) -> None:
    app = FakeOpenRouter(generation_delay=0, bill_cancelled=policy)  # type: ignore[arg-type]
    with (
        run_fake_openrouter(app) as running,
        httpx.Client(base_url=running.base_url, headers={"Authorization": "Bearer x"}) as http,
    ):
        generation_id = leave_after_data_events(http, path, body, before_content + 2)
        assert wait_until(lambda: app.disconnected_streams == 1)
        stats = app.generations[generation_id]
        assert stats.cancelled
        assert stats.finish_reason is None
        if policy == "full":
            assert stats.tokens_completion == 80
        else:
            assert 4 <= stats.tokens_completion < 80
        model = resolve_model(GROK)[1]
        assert (
            stats.total_cost
            == compute_usage(
                model, len(body) // 4, stats.tokens_completion // 2, parse_mode("")
            ).cost
        )


def test_bill_cancelled_is_checked() -> None:
    with pytest.raises(ValueError, match="bill_cancelled"):
        FakeOpenRouter(bill_cancelled="some")  # type: ignore[arg-type]


def test_a_realistic_generation_lag() -> None:
    """A second of lag: a client retrying with backoff gets the stats, never early."""
    app = FakeOpenRouter(generation_delay=1.0)
    with (
        run_fake_openrouter(app) as running,
        httpx.Client(base_url=running.base_url, headers={"Authorization": "Bearer x"}) as http,
    ):
        response = post(http, responses_body(), path="/v1/responses")
        generation_id = response.headers["x-generation-id"]
        ended = app.generations[generation_id].finished_at
        delay, answers = 0.2, []
        while True:
            lookup = http.get("/v1/generation", params={"id": generation_id})
            answers.append((time.monotonic() - ended, lookup.status_code))
            if lookup.status_code == 200:
                break
            assert len(answers) < 20, answers  # about 30 s of backoff: the stats never came
            time.sleep(delay)  # the client's backoff
            delay *= 1.5
        # Refused until the lag had passed, then answered: never early.
        assert [status for _, status in answers[:-1]] == [404] * (len(answers) - 1)
        assert answers[-1][0] >= 1.0
        assert money(lookup.text)["data"]["total_cost"] == money(response.text)["usage"]["cost"]


# --------------------------------------------------------------------------- catalogue, account


def test_catalogue_endpoints(client: httpx.Client, fake: RunningFake) -> None:
    before = len(fake.app.generations)
    models = client.get("/v1/models").json()["data"]
    assert client.get("/v1/models/count").json() == {"data": {"count": len(models)}}
    assert client.get("/v1/models/user").json()["data"] == models
    for model in models:
        assert model["links"]["details"] == f"/api/v1/models/{model['id']}/endpoints"
        assert model["architecture"]["output_modalities"] == ["text"]

    endpoints = client.get(f"/v1/models/{KIMI}/endpoints").json()["data"]
    assert endpoints["id"] == KIMI
    (endpoint,) = endpoints["endpoints"]
    assert endpoint["provider_name"] == "FakeProvider"
    assert endpoint["pricing"]["completion"] == "0.0000025"
    assert client.get(f"/v1/model/{KIMI}").json()["data"]["id"] == KIMI
    assert client.get("/v1/models/acme/nothing/endpoints").status_code == 404

    embeddings = client.get("/v1/embeddings/models").json()["data"]
    assert EMBED in [model["id"] for model in embeddings]
    assert all(m["architecture"]["output_modalities"] == ["embeddings"] for m in embeddings)
    images = client.get("/v1/images/models").json()["data"]
    assert [model["id"] for model in images] == [IMAGE]
    providers = client.get("/v1/providers").json()["data"]
    assert providers[0]["name"] == "FakeProvider"
    zdr = client.get("/v1/endpoints/zdr").json()["data"]
    assert {entry["model_id"] for entry in zdr} == {model["id"] for model in models}
    assert client.get("/v1/videos/models").json() == {"data": []}
    assert len(fake.app.generations) == before


def test_account_endpoints(client: httpx.Client, fake: RunningFake) -> None:
    before = len(fake.app.generations)
    keys = client.get("/v1/keys").json()["data"]
    assert keys[0]["hash"]
    assert keys[0]["disabled"] is False
    credits = client.get("/v1/credits").json()["data"]
    assert credits["total_credits"] == 100
    assert credits["total_usage"] >= 0
    assert isinstance(client.get("/v1/activity").json()["data"], list)
    files = client.get("/v1/files").json()
    assert files["has_more"] is False
    file_id = files["data"][0]["id"]
    assert client.get(f"/v1/files/{file_id}").json()["filename"] == "notes.txt"
    assert client.get("/v1/files/or_file_other").status_code == 404
    presets = client.get("/v1/presets").json()
    assert presets["total_count"] == len(presets["data"]) == 1
    code = client.post("/v1/auth/keys/code", json={"callback_url": "http://localhost:1/cb"})
    assert code.json()["data"]["id"].startswith("auth_code_")
    assert client.post("/v1/auth/keys/code", json={}).status_code == 400
    with httpx.Client(base_url=fake.base_url) as anonymous:
        # The PKCE exchange needs no key: the code is the secret.
        minted = anonymous.post("/v1/auth/keys", json={"code": "auth_code_x"}).json()
        assert minted["key"].startswith("sk-or-v1-")
        assert len(minted["key"]) == len("sk-or-v1-") + 64
        assert anonymous.post("/v1/auth/keys", json={}).status_code == 400
        for path in ("/v1/key", "/v1/keys", "/v1/credits", "/v1/activity", "/v1/files"):
            assert anonymous.get(path).status_code == 401, path
    assert len(fake.app.generations) == before


def test_activity_and_generation_content(client: httpx.Client, fake: RunningFake) -> None:
    response = post(client, request_body("z-ai/glm-4.6"))
    generation_id = response.headers["x-generation-id"]
    generation_of(fake, generation_id)
    rows = {row["model"]: row for row in money(client.get("/v1/activity").text)["data"]}
    glm = [g for g in fake.app.generations.values() if g.model == "z-ai/glm-4.6"]
    assert rows["z-ai/glm-4.6"]["requests"] == len(glm)
    assert rows["z-ai/glm-4.6"]["usage"] == sum((g.total_cost for g in glm), Decimal(0))

    content = "/v1/generation/content"
    assert client.get(content).status_code == 400
    assert client.get(content, params={"id": "gen-0-none"}).status_code == 404
    assert wait_until(lambda: client.get(content, params={"id": generation_id}).status_code == 200)
    data = client.get(content, params={"id": generation_id}).json()["data"]
    assert data["output"]["completion"] == ANSWER_TEXT


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/v1/images/generations", 404),
        ("GET", "/v1/models/one-segment/endpoints", 404),
        ("GET", "/v1/files/a/b", 404),
        ("GET", "/v1/analytics/query", 404),
        ("GET", "/v1/responses", 405),
        ("GET", "/v1/auth/keys/code", 405),
        ("POST", "/v1/files", 405),
        ("DELETE", "/v1/keys", 405),
    ],
)
def test_more_routing_errors(client: httpx.Client, method: str, path: str, status: int) -> None:
    response = client.request(method, path)
    assert response.status_code == status
    assert response.json()["error"]["code"] == status
