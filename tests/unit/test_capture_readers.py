"""Usage readers of every metered endpoint, on bodies in OpenRouter's shapes."""

from __future__ import annotations

import json
import logging
from decimal import Decimal
from typing import Any

import pytest

from openrouter_proxy.capture import (
    BinaryCapture,
    CaptureResult,
    JSONCapture,
    SSECapture,
    capture_for,
)
from openrouter_proxy.endpoints import Reader

GEN = "gen-1764581234-AbCdEfGhIjKlMnOpQrSt"


def sse(*events: tuple[str | None, dict[str, Any] | str]) -> bytes:
    out = [": OPENROUTER PROCESSING\n\n"]
    for name, data in events:
        line = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
        out.append((f"event: {name}\n" if name else "") + f"data: {line}\n\n")
    return "".join(out).encode()


def feed_in_pieces(capture: Any, body: bytes, size: int) -> CaptureResult:
    for start in range(0, len(body), size):
        capture.feed(body[start : start + size])
    result: CaptureResult = capture.result()
    return result


@pytest.fixture(autouse=True)
def _no_errors_logged(caplog: pytest.LogCaptureFixture) -> Any:
    with caplog.at_level(logging.ERROR, logger="openrouter_proxy.capture"):
        yield
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


# --- Responses API ------------------------------------------------------------------------

RESPONSE_USAGE = (
    '{"input_tokens":1200,"input_tokens_details":{"cached_tokens":200,"cache_write_tokens":0},'
    '"output_tokens":80,"output_tokens_details":{"reasoning_tokens":30},"total_tokens":1280,'
    '"cost":3.3e-05,"is_byok":false,"cost_details":{"upstream_inference_cost":3.3e-05}}'
)


def response_object(status: str = "completed", usage: str | None = RESPONSE_USAGE) -> str:
    return (
        '{"id":"resp_abc","object":"response","created_at":1764581234,"status":"'
        + status
        + '","model":"x-ai/grok-code-fast-1","output":[{"type":"message","id":"msg_1",'
        '"role":"assistant","status":"completed","content":[{"type":"output_text",'
        '"text":"Hi","annotations":[]}]}],"error":null,"usage":' + (usage or "null") + "}"
    )


def test_responses_json_body() -> None:
    capture = capture_for("application/json", GEN, Reader.RESPONSES)
    result = feed_in_pieces(capture, b"\n\n" + response_object().encode(), 7)
    usage = result.usage
    assert usage.generation_id == GEN  # the header's id, not resp_...
    assert usage.model == "x-ai/grok-code-fast-1"
    assert (usage.prompt_tokens, usage.completion_tokens) == (1200, 80)
    assert (usage.cached_tokens, usage.cache_write_tokens, usage.reasoning_tokens) == (200, 0, 30)
    assert usage.cost == Decimal("3.3e-05")
    assert isinstance(usage.cost, Decimal)
    assert usage.finish_reason == "completed"
    assert result.finished
    assert not result.error


def _response_stream(final_type: str, status: str, usage: str | None = RESPONSE_USAGE) -> bytes:
    created = json.loads(response_object("in_progress", None))
    body = sse(
        (
            "response.created",
            {"type": "response.created", "sequence_number": 0, "response": created},
        ),
        (
            "response.output_text.delta",
            {"type": "response.output_text.delta", "sequence_number": 1, "delta": "Hi"},
        ),
    )
    final = (
        '{"type":"'
        + final_type
        + '","sequence_number":2,"response":'
        + response_object(status, usage)
        + "}"
    )
    return body + f"event: {final_type}\ndata: {final}\n\n".encode()


@pytest.mark.parametrize(
    ("final_type", "status"),
    [
        ("response.completed", "completed"),
        ("response.incomplete", "incomplete"),
        ("response.done", "completed"),
    ],
)
@pytest.mark.parametrize("piece", [1, 5, 4096])
def test_responses_stream_ends_carry_the_usage(final_type: str, status: str, piece: int) -> None:
    capture = SSECapture(GEN, reader=Reader.RESPONSES)
    result = feed_in_pieces(capture, _response_stream(final_type, status), piece)
    assert result.usage.cost == Decimal("0.000033")
    assert result.usage.prompt_tokens == 1200
    assert result.usage.finish_reason == status
    assert result.finished
    assert result.saw_usage
    assert result.malformed_events == 0
    assert not result.error


def test_responses_failed_stream_is_an_error_with_its_usage() -> None:
    body = _response_stream("response.failed", "failed")
    head, _, tail = body.rpartition(b'"error":null')
    body = head + b'"error":{"code":"server_error","message":"boom"}' + tail
    result = feed_in_pieces(SSECapture(GEN, reader=Reader.RESPONSES), body, 3)
    assert result.finished
    assert result.error
    assert result.usage.error_code == "server_error"
    assert result.usage.finish_reason == "failed"
    assert result.usage.cost == Decimal("0.000033")


def test_responses_error_event() -> None:
    body = sse(
        ("response.created", {"type": "response.created", "response": {"id": "resp_1"}}),
        ("error", {"type": "error", "code": "server_error", "message": "Provider died"}),
    )
    result = feed_in_pieces(SSECapture(GEN, reader=Reader.RESPONSES), body, 11)
    assert result.error
    assert result.usage.error_code == "server_error"
    assert result.usage.error_message == "Provider died"
    assert result.usage.cost is None
    assert not result.saw_usage


def test_responses_explicit_zero_stays_zero() -> None:
    usage = RESPONSE_USAGE.replace('"cost":3.3e-05', '"cost":0')
    result = feed_in_pieces(
        JSONCapture(GEN, reader=Reader.RESPONSES), response_object(usage=usage).encode(), 64
    )
    assert result.usage.cost == Decimal(0)
    assert result.usage.cost is not None


# --- Anthropic Messages -------------------------------------------------------------------

MESSAGE_JSON = (
    '{"id":"msg_01","type":"message","role":"assistant","model":"x-ai/grok-code-fast-1",'
    '"content":[{"type":"text","text":"Hi"}],"stop_reason":"end_turn","stop_sequence":null,'
    '"usage":{"input_tokens":100,"cache_creation_input_tokens":20,"cache_read_input_tokens":300,'
    '"output_tokens":12,"cost":0.00004512,"is_byok":false,'
    '"cost_details":{"upstream_inference_cost":0.00004512}}}'
)


def test_messages_json_body_counts_cache_in_the_prompt() -> None:
    result = feed_in_pieces(JSONCapture(GEN, reader=Reader.MESSAGES), MESSAGE_JSON.encode(), 9)
    usage = result.usage
    assert usage.generation_id == GEN
    assert usage.prompt_tokens == 420  # Anthropic's input_tokens leaves the cache out
    assert (usage.cached_tokens, usage.cache_write_tokens) == (300, 20)
    assert usage.completion_tokens == 12
    assert usage.cost == Decimal("0.00004512")
    assert usage.finish_reason == "end_turn"
    assert not usage.cost_from_stats  # the body says the cost
    assert result.finished


def messages_stream(*, error: bool = False) -> bytes:
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": "x-ai/grok-code-fast-1",
            "content": [],
            "stop_reason": None,
            "usage": {
                "input_tokens": 100,
                "cache_read_input_tokens": 300,
                "cache_creation_input_tokens": 0,
                "output_tokens": 1,
            },
        },
    }
    events: list[tuple[str | None, dict[str, Any] | str]] = [
        ("message_start", start),
        ("content_block_start", {"type": "content_block_start", "index": 0}),
        ("ping", {"type": "ping"}),
        (
            "content_block_delta",
            {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi"}},
        ),
    ]
    if error:
        events.append(
            (
                "error",
                {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            )
        )
    else:
        events += [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": 57},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
    return sse(*events)


@pytest.mark.parametrize("piece", [1, 2, 13, 65536])
def test_messages_stream_merges_start_and_delta_usage(piece: int) -> None:
    result = feed_in_pieces(SSECapture(GEN, reader=Reader.MESSAGES), messages_stream(), piece)
    usage = result.usage
    assert (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens) == (400, 300, 57)
    assert usage.cost is None  # message_delta carries no cost ...
    assert usage.cost_from_stats  # ... so it settles from the generation stats
    assert usage.generation_id == GEN
    assert usage.finish_reason == "end_turn"
    assert result.finished
    assert result.malformed_events == 0


def test_messages_stream_error_event() -> None:
    result = feed_in_pieces(
        SSECapture(GEN, reader=Reader.MESSAGES), messages_stream(error=True), 17
    )
    assert result.error
    assert result.usage.error_code == "overloaded_error"
    assert result.usage.error_message == "Overloaded"
    assert not result.finished


def test_messages_error_body_before_streaming() -> None:
    body = b'{"error":{"code":402,"message":"Insufficient credits"}}'
    result = feed_in_pieces(JSONCapture(GEN, reader=Reader.MESSAGES), body, 100)
    assert result.error
    assert result.usage.error_code == "402"


# --- Endpoints with an OpenAI-style usage ----------------------------------------------------


@pytest.mark.parametrize(
    ("body", "prompt", "completion", "cost"),
    [
        (  # embeddings
            '{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,-0.2]}],'
            '"model":"openai/text-embedding-3-small","id":"gen-emb",'
            '"usage":{"prompt_tokens":8,"total_tokens":8,"cost":1.6e-7,"is_byok":false}}',
            8,
            None,
            "1.6e-7",
        ),
        (  # rerank
            '{"id":"gen-rr","model":"cohere/rerank-v3.5","results":[{"index":0,'
            '"relevance_score":0.9,"document":{"text":"a"}}],'
            '"usage":{"search_units":1,"total_tokens":50,"cost":0.002}}',
            None,
            None,
            "0.002",
        ),
        (  # images
            '{"created":1748372400,"data":[{"b64_json":"AAAA"}],'
            '"usage":{"completion_tokens":4175,"cost":0.04,"prompt_tokens":0,"total_tokens":4175}}',
            0,
            4175,
            "0.04",
        ),
        (  # audio/transcriptions
            '{"text":"hello","usage":{"cost":0.0006,"input_tokens":40,"output_tokens":2,'
            '"seconds":6,"total_tokens":42}}',
            40,
            2,
            "0.0006",
        ),
    ],
)
def test_usage_json_bodies(
    body: str, prompt: int | None, completion: int | None, cost: str
) -> None:
    result = feed_in_pieces(JSONCapture(GEN, reader=Reader.USAGE), body.encode(), 5)
    assert result.usage.generation_id == GEN
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (prompt, completion)
    assert result.usage.cost == Decimal(cost)
    assert result.finished


def test_image_stream_ends_with_its_completed_event() -> None:
    body = sse(
        (
            "image_generation.partial_image",
            {
                "type": "image_generation.partial_image",
                "b64_json": "AAAA",
                "partial_image_index": 0,
            },
        ),
        (
            "image_generation.completed",
            {
                "type": "image_generation.completed",
                "b64_json": "BBBB",
                "usage": {"completion_tokens": 4175, "cost": 0.04, "total_tokens": 4175},
            },
        ),
        (None, "[DONE]"),
    )
    result = feed_in_pieces(SSECapture(GEN, reader=Reader.USAGE), body, 6)
    assert result.usage.cost == Decimal("0.04")
    assert result.finished
    assert result.malformed_events == 0


# --- Audio bytes ----------------------------------------------------------------------------


def test_speech_bytes_settle_from_generation_stats() -> None:
    capture = capture_for("audio/mpeg", GEN, Reader.BINARY)
    assert isinstance(capture, BinaryCapture)
    result = feed_in_pieces(capture, bytes(range(256)) * 100, 1000)
    assert result.usage.generation_id == GEN
    assert result.usage.cost is None
    assert result.usage.cost_from_stats
    assert not result.saw_usage


def test_speech_error_body_is_read_as_json() -> None:
    capture = capture_for("application/json", GEN, Reader.BINARY)
    assert isinstance(capture, JSONCapture)
    result = feed_in_pieces(capture, b'{"error":{"code":400,"message":"bad voice"}}', 8)
    assert result.error
    assert result.usage.error_message == "bad voice"


@pytest.mark.parametrize("reader", list(Reader))
@pytest.mark.parametrize(
    "junk",
    [b"\xff\xfe\x00garbage", b"data: {\n\n", b"data: [1,2]\n\ndata: null\n\n", b"\r\r\n\n\n"],
)
def test_readers_never_raise_on_junk(reader: Reader, junk: bytes) -> None:
    for capture in (SSECapture(GEN, reader=reader), JSONCapture(GEN, reader=reader)):
        result = feed_in_pieces(capture, junk * 3, 2)
        assert result.usage.generation_id == GEN
        assert result.usage.cost is None
