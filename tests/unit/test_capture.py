"""Tests of the usage capture that runs beside the forwarding path.

Streams here are shaped like OpenRouter's real ones (see REFERENCE.md §1).
Every stream case is fed whole, one byte at a time and in 7-byte pieces, and
the property tests cut generated streams at random points (inside UTF-8
characters and between ``\\r`` and ``\\n`` included): the result must not
depend on how the network split the bytes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from decimal import Decimal
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openrouter_proxy.capture import (
    CaptureResult,
    JSONCapture,
    SSECapture,
    UsageCapture,
    capture_for,
)
from openrouter_proxy.metering import ReportedUsage
from tests.support.logs import no_errors_logged

GEN = "gen-1773323472-VEr1C0GTbU6Nk6QjBC7x"
MODEL = "x-ai/grok-code-fast-1"

PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# --- building real-shaped streams -------------------------------------------


def chunk(
    content: str | None = None,
    *,
    finish: str | None = None,
    usage: str | None = None,
    error: str | None = None,
    empty_choices: bool = False,
    legacy: bool = False,
    gen: str | None = GEN,
    model: str = MODEL,
) -> str:
    """One chunk's JSON text. ``usage`` and ``error`` are raw JSON text, so
    numbers appear exactly as written (``3.3e-05`` stays ``3.3e-05``)."""
    head: dict[str, Any] = {}
    if gen is not None:
        head["id"] = gen
    head["object"] = "text_completion" if legacy else "chat.completion.chunk"
    head["created"] = 1773323472
    head["model"] = model
    head["provider"] = "xAI"
    if empty_choices:
        choices: list[dict[str, Any]] = []
    elif legacy:
        choices = [{"text": content or "", "index": 0, "logprobs": None, "finish_reason": finish}]
    else:
        delta = {"role": "assistant", "content": content or ""}
        choices = [
            {
                "index": 0,
                "delta": delta,
                "finish_reason": finish,
                "native_finish_reason": finish,
                "logprobs": None,
            }
        ]
    head["choices"] = choices
    text = json.dumps(head, ensure_ascii=False, separators=(",", ":"))
    extra = ""
    if usage is not None:
        extra += f',"usage":{usage}'
    if error is not None:
        extra += f',"error":{error}'
    return text[:-1] + extra + "}"


def sse(*items: str, eol: str = "\n") -> bytes:
    """A stream: items starting with ``:`` are comments, others are data."""
    out = []
    for item in items:
        line = item if item.startswith(":") else f"data: {item}"
        out.append(f"{line}{eol}{eol}")
    return "".join(out).encode()


USAGE = (
    '{"prompt_tokens":213,"completion_tokens":290,"total_tokens":503,"cost":0.00044304,'
    '"is_byok":false,"prompt_tokens_details":{"cached_tokens":64,"cache_write_tokens":0},'
    '"cost_details":{"upstream_inference_cost":null,"upstream_inference_prompt_cost":0.0000426},'
    '"completion_tokens_details":{"reasoning_tokens":120,"image_tokens":0}}'
)
USAGE_REPORTED = ReportedUsage(
    generation_id=GEN,
    model=MODEL,
    prompt_tokens=213,
    completion_tokens=290,
    cached_tokens=64,
    cache_write_tokens=0,
    reasoning_tokens=120,
    cost=Decimal("0.00044304"),
    upstream_inference_cost=None,
    is_byok=False,
    finish_reason="stop",
)
HEADER_ID = "gen-from-header"
NO_USAGE = ReportedUsage(generation_id=GEN, model=MODEL)


def ok(usage: ReportedUsage = USAGE_REPORTED, **overrides: Any) -> CaptureResult:
    fields: dict[str, Any] = {
        "usage": usage,
        "saw_usage": True,
        "finished": True,
        "error": False,
        "malformed_events": 0,
    }
    fields.update(overrides)
    return CaptureResult(**fields)


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def feed_all(capture: UsageCapture, parts: Iterator[bytes] | list[bytes]) -> CaptureResult:
    for part in parts:
        capture.feed(part)
    return capture.result()


SPLITTERS: dict[str, Callable[[bytes], list[bytes]]] = {
    "whole": lambda data: [data],
    "bytewise": lambda data: list(pieces(data, 1)),
    "by7": lambda data: list(pieces(data, 7)),
}

HELLO = [chunk("Hel"), chunk("lo")]
ERROR_JSON = '{"code":502,"message":"Provider returned error"}'

STREAM_CASES: list[tuple[str, bytes, CaptureResult]] = [
    (
        "usage on a separate final chunk",
        sse(*HELLO, chunk(finish="stop"), chunk(empty_choices=True, usage=USAGE), "[DONE]"),
        ok(),
    ),
    (
        "usage on the finish chunk",
        sse(*HELLO, chunk(finish="stop", usage=USAGE), "[DONE]"),
        ok(),
    ),
    (
        "CRLF separators",
        sse(*HELLO, chunk(finish="stop"), chunk(empty_choices=True, usage=USAGE), eol="\r\n"),
        ok(),
    ),
    (
        "lone CR separators",
        sse(*HELLO, chunk(finish="stop", usage=USAGE), "[DONE]", eol="\r"),
        ok(),
    ),
    (
        "comments before the first token",
        sse(
            ": OPENROUTER PROCESSING",
            ": OPENROUTER PROCESSING",
            ": OPENROUTER PROCESSING",
            *HELLO,
            ": OPENROUTER PROCESSING",
            chunk(finish="stop"),
            chunk(empty_choices=True, usage=USAGE),
            "[DONE]",
        ),
        ok(),
    ),
    (
        "[DONE] without finish_reason or usage",
        sse(*HELLO, "[DONE]"),
        ok(NO_USAGE, saw_usage=False),
    ),
    (
        "cut before the end (client went away)",
        sse(*HELLO),
        ok(NO_USAGE, saw_usage=False, finished=False),
    ),
    (
        "mid-stream error without usage",
        sse(*HELLO, chunk(finish="error", error=ERROR_JSON)),
        ok(
            dataclasses.replace(
                NO_USAGE,
                finish_reason="error",
                error_code="502",
                error_message="Provider returned error",
            ),
            saw_usage=False,
            error=True,
        ),
    ),
    (
        "mid-stream error with usage",
        sse(*HELLO, chunk(finish="error", error=ERROR_JSON, usage=USAGE)),
        ok(
            dataclasses.replace(
                USAGE_REPORTED,
                finish_reason="error",
                error_code="502",
                error_message="Provider returned error",
            ),
            error=True,
        ),
    ),
    (
        "error without choices, string code",
        sse(*HELLO, '{"error":{"code":"server_error","message":"boom"}}'),
        ok(
            dataclasses.replace(NO_USAGE, error_code="server_error", error_message="boom"),
            saw_usage=False,
            finished=False,
            error=True,
        ),
    ),
    (
        "malformed usage event is counted and skipped",
        sse(
            *HELLO,
            chunk(finish="stop", usage=USAGE),
            '{"choices":[],"usage":{"prompt_tokens":1,',
            "[DONE]",
        ),
        ok(malformed_events=1),
    ),
    (
        "malformed first event",
        sse("{not json", *HELLO, chunk(finish="stop", usage=USAGE)),
        ok(malformed_events=1),
    ),
    (
        "cost 3.3e-05 is exact",
        sse(*HELLO, chunk(finish="stop", usage='{"prompt_tokens":10,"cost":3.3e-05}')),
        ok(
            dataclasses.replace(
                NO_USAGE, prompt_tokens=10, cost=Decimal("3.3E-5"), finish_reason="stop"
            )
        ),
    ),
    (
        "BYOK",
        sse(
            *HELLO,
            chunk(
                finish="stop",
                usage='{"prompt_tokens":5,"completion_tokens":7,"cost":0,"is_byok":true,'
                '"cost_details":{"upstream_inference_cost":0.0012}}',
            ),
        ),
        ok(
            dataclasses.replace(
                NO_USAGE,
                prompt_tokens=5,
                completion_tokens=7,
                cost=Decimal(0),
                upstream_inference_cost=Decimal("0.0012"),
                is_byok=True,
                finish_reason="stop",
            )
        ),
    ),
    (
        "explicit zero cost stays zero",
        sse(*HELLO, chunk(finish="stop", usage='{"prompt_tokens":3,"cost":0}')),
        ok(dataclasses.replace(NO_USAGE, prompt_tokens=3, cost=Decimal(0), finish_reason="stop")),
    ),
    (
        "missing cost stays None",
        sse(*HELLO, chunk(finish="stop", usage='{"prompt_tokens":3,"completion_tokens":4}')),
        ok(
            dataclasses.replace(
                NO_USAGE, prompt_tokens=3, completion_tokens=4, finish_reason="stop"
            )
        ),
    ),
    (
        "legacy text_completion chunks",
        sse(
            chunk("Once", legacy=True),
            chunk(" upon", legacy=True),
            chunk(finish="length", legacy=True),
            chunk(empty_choices=True, legacy=True, usage=USAGE),
            "[DONE]",
        ),
        ok(dataclasses.replace(USAGE_REPORTED, finish_reason="length")),
    ),
    (
        "non-ASCII content",
        sse(
            chunk("Olá 👋 ção"),
            chunk("日本語 — ñ"),
            chunk("Olá 👋 ção", finish="stop", usage=USAGE),
            "[DONE]",
        ),
        ok(),
    ),
    (
        "non-ASCII error message",
        sse(chunk("x"), chunk(finish="error", error='{"code":400,"message":"Olá 👋 ção"}')),
        ok(
            dataclasses.replace(
                NO_USAGE, finish_reason="error", error_code="400", error_message="Olá 👋 ção"
            ),
            saw_usage=False,
            error=True,
        ),
    ),
    (
        "usage twice: the last wins",
        sse(
            chunk(finish="stop", usage='{"prompt_tokens":1,"cost":1}'),
            chunk(empty_choices=True, usage=USAGE),
        ),
        ok(),
    ),
    (
        "usage: null on every chunk (OpenAI style) is not a usage object",
        sse(chunk("a", usage="null"), chunk(finish="stop", usage="null"), "[DONE]"),
        ok(dataclasses.replace(NO_USAGE, finish_reason="stop"), saw_usage=False),
    ),
    (
        "data split over several data lines, no space after the colon",
        (
            b"data:" + chunk("a").encode() + b"\n\n"
            b'data:{"id":"' + GEN.encode() + b'","choices":[{"index":0,\n'
            b'data: "finish_reason":"stop"}],\n'
            b"data: " + b'"usage":' + USAGE.encode() + b"}\n\n"
        ),
        ok(),
    ),
    (
        "event, id and retry fields are ignored",
        (
            b"retry: 3000\nid: 7\nevent: message\ndata: " + chunk("a").encode() + b"\n\n"
            b"event: message\ndata: " + chunk(finish="stop", usage=USAGE).encode() + b"\n\n"
        ),
        ok(),
    ),
    (
        "no id in events: the header id is kept",
        sse(chunk("a", gen=None), chunk(finish="stop", gen=None, usage=USAGE)),
        ok(dataclasses.replace(USAGE_REPORTED, generation_id=HEADER_ID)),
    ),
    (
        "the first event's id wins, the last model wins",
        sse(
            chunk("a"),
            chunk("b", gen="gen-other", model="other/model", finish="stop", usage=USAGE),
        ),
        ok(dataclasses.replace(USAGE_REPORTED, model="other/model")),
    ),
    (
        "whitespace after the colons of the trigger keys",
        sse(
            '{"id": "' + GEN + '", "model": "' + MODEL + '", "choices": '
            '[{"delta": {"content": "a"}, "finish_reason": null}], "usage": null}',
            '{"choices": [{"delta": {}, "finish_reason" :  "stop"}]}',
            '{"choices": [], "usage" : ' + USAGE + "}",
        ),
        ok(),
    ),
    (
        "several choices: one null finish_reason does not hide another",
        sse(
            chunk("a"),
            '{"choices":[{"index":0,"delta":{},"finish_reason":null},'
            '{"index":1,"delta":{},"finish_reason":"stop"}]}',
            "[DONE]",
        ),
        ok(dataclasses.replace(NO_USAGE, finish_reason="stop"), saw_usage=False),
    ),
    (
        "invalid UTF-8 inside a parsed event does not lose its usage",
        sse(chunk("a"))
        + b'data: {"choices":[{"delta":{"content":"\xff\xc3"},"finish_reason":"stop"}],'
        + b'"usage":'
        + USAGE.encode()
        + b"}\n\n",
        ok(),
    ),
    (
        "an empty data event is ignored",
        sse("", chunk("a"), " ", chunk(finish="stop", usage=USAGE)),
        ok(),
    ),
    (
        "nothing at all",
        b"",
        ok(ReportedUsage(generation_id=HEADER_ID), saw_usage=False, finished=False),
    ),
]


@pytest.mark.parametrize("splitter", SPLITTERS.keys())
@pytest.mark.parametrize(
    ("stream", "expected"),
    [pytest.param(stream, expected, id=name) for name, stream, expected in STREAM_CASES],
)
def test_stream_cases(stream: bytes, expected: CaptureResult, splitter: str) -> None:
    capture = SSECapture(generation_id=HEADER_ID)
    assert feed_all(capture, SPLITTERS[splitter](stream)) == expected


def test_exact_decimal_representation() -> None:
    capture = SSECapture()
    capture.feed(sse(chunk(finish="stop", usage='{"cost":3.3e-05}')))
    cost = capture.result().usage.cost
    assert isinstance(cost, Decimal)
    assert cost.as_tuple() == Decimal("3.3E-5").as_tuple()


def test_byok_provider_cost_is_upstream() -> None:
    usage = '{"cost":0,"is_byok":true,"cost_details":{"upstream_inference_cost":0.0012}}'
    capture = SSECapture()
    capture.feed(sse(chunk(finish="stop", usage=usage)))
    assert capture.result().usage.provider_cost == Decimal("0.0012")


def test_result_reports_what_was_seen_so_far() -> None:
    stream = sse(chunk("a"), chunk(finish="stop"), chunk(empty_choices=True, usage=USAGE))
    cut = len(stream) - 10  # inside the usage event
    capture = SSECapture()
    capture.feed(stream[:cut])
    partial = capture.result()
    assert partial.finished
    assert not partial.saw_usage
    assert partial.usage == dataclasses.replace(NO_USAGE, finish_reason="stop")
    capture.feed(stream[cut:])
    assert capture.result() == ok()


def test_cr_at_chunk_end_then_lf_is_one_line_ending() -> None:
    # "data: x\r" | "\n" | "\r\n": one line ending, then a blank line.
    data = b"data: " + chunk(finish="stop", usage=USAGE).encode()
    capture = SSECapture()
    for part in (data + b"\r", b"\n", b"\r\n"):
        capture.feed(part)
    assert capture.result() == ok()
    # Whereas "\r" | "\r": two line endings, which also dispatch the event.
    capture = SSECapture()
    for part in (data + b"\r", b"\r"):
        capture.feed(part)
    assert capture.result() == ok()
    # And "\r" | "\n" alone is only one line ending: nothing dispatched yet.
    capture = SSECapture()
    for part in (data + b"\r", b"\n"):
        capture.feed(part)
    assert not capture.result().saw_usage


def test_trailing_incomplete_event_is_not_parsed() -> None:
    capture = SSECapture()
    capture.feed(sse(chunk("a")) + b"data: " + chunk(finish="stop", usage=USAGE).encode() + b"\n")
    result = capture.result()
    assert not result.saw_usage
    assert not result.finished
    assert result.malformed_events == 0


# --- defensive mapping of odd shapes -------------------------------------------

ODD_USAGE_CASES: list[tuple[str, str, ReportedUsage]] = [
    (
        "negative tokens",
        '{"prompt_tokens":-1,"completion_tokens":2}',
        ReportedUsage(completion_tokens=2),
    ),
    ("bool tokens", '{"prompt_tokens":true,"completion_tokens":false}', ReportedUsage()),
    ("fractional tokens", '{"prompt_tokens":1.5,"completion_tokens":"3"}', ReportedUsage()),
    ("string cost", '{"cost":"0.001"}', ReportedUsage()),
    ("bool cost", '{"cost":true}', ReportedUsage()),
    ("negative cost", '{"cost":-0.5}', ReportedUsage()),
    (
        "NaN cost",
        '{"cost":NaN,"cost_details":{"upstream_inference_cost":Infinity}}',
        ReportedUsage(),
    ),
    ("null cost", '{"cost":null}', ReportedUsage()),
    ("integer cost", '{"cost":2}', ReportedUsage(cost=Decimal(2))),
    ("string is_byok", '{"is_byok":"true"}', ReportedUsage()),
    (
        "details that are not objects",
        '{"prompt_tokens_details":[1],"completion_tokens_details":"x","cost_details":null}',
        ReportedUsage(),
    ),
    (
        "details with odd values",
        '{"prompt_tokens_details":{"cached_tokens":-3,"cache_write_tokens":12},'
        '"completion_tokens_details":{"reasoning_tokens":{}}}',
        ReportedUsage(cache_write_tokens=12),
    ),
]


@pytest.mark.parametrize(
    ("usage", "expected"),
    [pytest.param(usage, expected, id=name) for name, usage, expected in ODD_USAGE_CASES],
)
def test_odd_usage_values_read_as_unknown(usage: str, expected: ReportedUsage) -> None:
    stream = SSECapture()
    stream.feed(sse('{"choices":[],"usage":' + usage + "}"))
    body = JSONCapture()
    body.feed(('{"choices":[],"usage":' + usage + "}").encode())
    for result in (stream.result(), body.result()):
        assert result.saw_usage
        assert result.usage == expected


@pytest.mark.parametrize(
    "event",
    [
        '{"usage":[1,2]}',
        '{"usage":"lots"}',
        '{"choices":{"finish_reason":"stop"},"usage":null}',
        '{"choices":[1,null,"x",{"finish_reason":7}],"error":null}',
        '{"id":5,"model":["m"],"error":false}',
        "[1,2,3]",
        '"usage"',
        "null",
        "[" * 100_000,
    ],
)
def test_odd_shapes_never_raise(event: str) -> None:
    # capture.py catches any exception of its own (one event's facts lost, never
    # the stream): "did not raise" proves nothing unless nothing was caught either.
    with no_errors_logged():
        capture = SSECapture()
        capture.feed(sse(event))
        result = capture.result()
        body = JSONCapture()
        body.feed(event.encode())
        body_result = body.result()
    assert not result.saw_usage
    assert not result.error
    assert not result.finished
    # Valid JSON of an odd shape is read, not dropped; only the unterminated one is lost.
    assert result.malformed_events == (1 if event.startswith("[[") else 0)
    assert not body_result.saw_usage


def test_error_message_is_truncated_and_odd_errors_count() -> None:
    capture = SSECapture()
    capture.feed(sse('{"error":{"code":429,"message":"' + "x" * 2000 + '"}}'))
    usage = capture.result().usage
    assert usage.error_code == "429"
    assert usage.error_message == "x" * 500
    capture = SSECapture()
    capture.feed(sse('{"error":"upstream exploded"}'))
    result = capture.result()
    assert result.error
    assert result.usage.error_message == "upstream exploded"


@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=10))
@PROPERTY_SETTINGS
def test_arbitrary_bytes_never_raise(noise: bytes, cuts: list[int]) -> None:
    for stream in (noise, b"data: " + noise + b"\n\n", b"data: {" + noise + b'"usage"\r\r'):
        with no_errors_logged():
            capture = SSECapture()
            for part in split_at(stream, cuts):
                capture.feed(part)
            capture.result()
            body = JSONCapture()
            for part in split_at(stream, cuts):
                body.feed(part)
            body.result()


# --- property: the result does not depend on where the bytes were cut ------------


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """Split at the given positions; repeated positions give empty pieces."""
    bounds = [0, *sorted(min(max(cut, 0), len(data)) for cut in cuts), len(data)]
    return [data[start:end] for start, end in pairwise(bounds)]


def interesting_cuts(data: bytes) -> list[int]:
    """Positions inside a UTF-8 character or between ``\\r`` and ``\\n``."""
    return [
        i
        for i in range(1, len(data))
        if data[i] & 0xC0 == 0x80 or (data[i - 1] == 0x0D and data[i] == 0x0A)
    ]


@st.composite
def real_streams(draw: st.DrawFn) -> tuple[bytes, CaptureResult]:
    legacy = draw(st.booleans())
    gen = "gen-" + draw(st.text("abcdefXYZ0123456789", min_size=1, max_size=20))
    model = draw(st.sampled_from([MODEL, "moonshotai/kimi-k2-0905", "z-ai/glm-4.6:exacto"]))
    parts: list[str] = []

    def emit(*lines: str) -> None:
        # One terminator per event, used for all of its line endings, so a
        # lone "\r" is never followed by a "\n" that would merge with it.
        eol = draw(st.sampled_from(["\n", "\r\n", "\r"]))
        parts.append("".join(line + eol for line in lines) + eol)

    def data(payload: str) -> None:
        # Vary what the grammar allows: fields we ignore before the data, no
        # space after the colon, and JSON spread over two data lines (where a
        # "\n" misread as a blank line would dispatch half an event).
        lines = list(draw(st.sampled_from([(), ("event: message",), ("id: 42", "retry: 1")])))
        prefix = draw(st.sampled_from(["data: ", "data:"]))
        if payload.startswith("{") and draw(st.booleans()):
            lines += [prefix + "{", prefix + payload[1:]]
        else:
            lines.append(prefix + payload)
        emit(*lines)

    for _ in range(draw(st.integers(0, 3))):
        emit(": OPENROUTER PROCESSING")
    for text in draw(st.lists(st.text(max_size=12), max_size=6)):
        data(chunk(text, legacy=legacy, gen=gen, model=model))
        if draw(st.booleans()):
            emit(": keep-alive")

    prompt = draw(st.integers(0, 10**6))
    completion = draw(st.integers(0, 10**6))
    cached = draw(st.integers(0, prompt))
    reasoning = draw(st.integers(0, completion))
    cost = draw(
        st.none() | st.decimals(min_value=0, max_value=100, allow_nan=False, allow_infinity=False)
    )
    usage_fields = [
        f'"prompt_tokens":{prompt}',
        f'"completion_tokens":{completion}',
        f'"total_tokens":{prompt + completion}',
    ]
    if cost is not None:
        usage_fields.append(f'"cost":{cost}')
    usage_fields += [
        '"is_byok":false',
        f'"prompt_tokens_details":{{"cached_tokens":{cached}}}',
        f'"completion_tokens_details":{{"reasoning_tokens":{reasoning}}}',
    ]
    usage = "{" + ",".join(usage_fields) + "}"
    ending = draw(st.sampled_from(["usage apart", "usage on finish", "error", "error+usage"]))
    error_message = draw(st.text(max_size=600))
    reported = ReportedUsage(
        generation_id=gen,
        model=model,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        reasoning_tokens=reasoning,
        cost=cost,
    )
    finish = draw(st.sampled_from(["stop", "length", "tool_calls"]))
    if ending == "usage apart":
        data(chunk(finish=finish, legacy=legacy, gen=gen, model=model))
        data(chunk(empty_choices=True, usage=usage, gen=gen, model=model))
    elif ending == "usage on finish":
        data(chunk(finish=finish, usage=usage, legacy=legacy, gen=gen, model=model))
    else:
        # A mid-stream error whose message is random text: non-ASCII in an
        # event that is parsed, so a cut inside a character would show.
        finish = "error"
        error = json.dumps({"code": 502, "message": error_message}, ensure_ascii=False)
        with_usage = ending == "error+usage"
        data(
            chunk(
                finish=finish,
                error=error,
                usage=usage if with_usage else None,
                legacy=legacy,
                gen=gen,
                model=model,
            )
        )
        if not with_usage:
            reported = ReportedUsage(generation_id=gen, model=model)
        reported = dataclasses.replace(
            reported, error_code="502", error_message=error_message[:500]
        )
    if draw(st.booleans()):
        data("[DONE]")

    expected = ok(
        dataclasses.replace(reported, finish_reason=finish),
        saw_usage=ending != "error",
        error=ending.startswith("error"),
    )
    return "".join(parts).encode(), expected


@st.composite
def cut_streams(draw: st.DrawFn) -> tuple[bytes, list[int], CaptureResult]:
    stream, expected = draw(real_streams())
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=40))
    tricky = interesting_cuts(stream)
    if tricky:
        cuts += draw(st.lists(st.sampled_from(tricky), max_size=15))
    return stream, cuts, expected


@given(cut_streams())
@PROPERTY_SETTINGS
def test_stream_split_anywhere_gives_the_same_result(
    case: tuple[bytes, list[int], CaptureResult],
) -> None:
    stream, cuts, expected = case
    whole = SSECapture()
    whole.feed(stream)
    cut = SSECapture()
    for part in split_at(stream, cuts):
        cut.feed(part)
    assert whole.result() == expected
    assert cut.result() == whole.result()


# --- memory bounds and linear work ------------------------------------------------


def test_oversized_event_is_dropped_and_counted() -> None:
    capture = SSECapture(max_event_bytes=1024)
    big = b"data: " + b'{"x":"' + b"a" * 5000 + b'"}\n\n'
    stream = sse(chunk("a")) + big + sse(chunk(finish="stop", usage=USAGE))
    for part in pieces(stream, 100):
        capture.feed(part)
        assert capture.buffered_bytes <= 1024 + 100
    assert capture.result() == ok(malformed_events=1)
    # The same, arriving in one piece.
    capture = SSECapture(max_event_bytes=1024)
    capture.feed(stream)
    assert capture.result() == ok(malformed_events=1)
    # An oversized event made of many data lines.
    capture = SSECapture(max_event_bytes=1024)
    capture.feed(sse(chunk("a")) + b"data: xxxxxxxxxx\n" * 200 + b"\n")
    capture.feed(sse(chunk(finish="stop", usage=USAGE)))
    assert capture.result() == ok(malformed_events=1)


def test_default_event_limit_is_eight_mebibytes() -> None:
    capture = SSECapture()
    # "data: " and the payload count: exactly the limit is still kept.
    capture.feed(b"data: " + b"a" * (8 * 1024 * 1024 - 6))
    assert capture.result().malformed_events == 0
    capture.feed(b"aaaa")
    assert capture.result().malformed_events == 1
    assert capture.buffered_bytes == 0
    capture.feed(b"\n\n" + sse(chunk(finish="stop", usage=USAGE)))
    assert capture.result() == ok(malformed_events=1)


def test_long_comment_and_other_fields_are_not_buffered() -> None:
    capture = SSECapture()
    for line_start in (b": OPENROUTER PROCESSING ", b"event: ", b"id: "):
        capture.feed(line_start)
        for _ in range(32):
            capture.feed(b"x" * 65536)
            assert capture.buffered_bytes == 0
        capture.feed(b"\n\n")
    capture.feed(sse(chunk("a"), chunk(finish="stop", usage=USAGE)))
    assert capture.result() == ok()


def test_many_small_events_in_tiny_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    # No timing: correctness over a long stream fed 7 bytes at a time, and proof
    # that content chunks are skipped without being parsed.
    from openrouter_proxy import capture as capture_module

    loads_calls = 0
    real_loads = capture_module._loads

    def counting_loads(*args: Any, **kwargs: Any) -> Any:
        nonlocal loads_calls
        loads_calls += 1
        return real_loads(*args, **kwargs)

    monkeypatch.setattr(capture_module, "_loads", counting_loads)
    content = b'data: {"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}\n\n'
    stream = (
        sse(chunk("first"))
        + content * 20_000
        + sse(chunk(finish="stop"), chunk(empty_choices=True, usage=USAGE), "[DONE]")
    )
    capture = SSECapture()
    for part in pieces(stream, 7):
        capture.feed(part)
        assert capture.buffered_bytes < 1000
    assert capture.result() == ok()
    assert loads_calls == 3  # the first event, the finish event, the usage event


# --- non-streaming bodies -------------------------------------------------------

BODY = (
    b"\n         \n\n"
    b'{"id":"gen-1773323472-VEr1C0GTbU6Nk6QjBC7x","object":"chat.completion",'
    b'"created":1773323472,"model":"moonshotai/kimi-k2-0905","provider":"Moonshot AI",'
    b'"choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant",'
    b'"content":"Ol\xc3\xa1 \xf0\x9f\x91\x8b"}}],'
    b'"usage":{"prompt_tokens":20,"completion_tokens":3,"total_tokens":23,"cost":0.0000195,'
    b'"is_byok":false,"prompt_tokens_details":{"cached_tokens":0,"cache_write_tokens":0},'
    b'"cost_details":{"upstream_inference_cost":0.0000195},'
    b'"completion_tokens_details":{"reasoning_tokens":0}}}\n'
)
BODY_RESULT = ok(
    ReportedUsage(
        generation_id=GEN,
        model="moonshotai/kimi-k2-0905",
        prompt_tokens=20,
        completion_tokens=3,
        cached_tokens=0,
        cache_write_tokens=0,
        reasoning_tokens=0,
        cost=Decimal("0.0000195"),
        upstream_inference_cost=Decimal("0.0000195"),
        finish_reason="stop",
    )
)


@pytest.mark.parametrize("splitter", SPLITTERS.keys())
def test_json_body_with_leading_whitespace(splitter: str) -> None:
    assert feed_all(JSONCapture("gen-header"), SPLITTERS[splitter](BODY)) == BODY_RESULT


@given(st.lists(st.integers(0, len(BODY)), max_size=30))
@PROPERTY_SETTINGS
def test_json_body_split_anywhere(cuts: list[int]) -> None:
    assert feed_all(JSONCapture(), split_at(BODY, cuts)) == BODY_RESULT


def test_json_legacy_completion() -> None:
    body = (
        b'{"id":"gen-1","object":"text_completion","model":"m",'
        b'"choices":[{"text":"hi","index":0,"finish_reason":"length"},'
        b'{"text":"ho","index":1,"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":1,"completion_tokens":16,"cost":3.3e-05}}'
    )
    result = feed_all(JSONCapture(), [body])
    assert result.usage == ReportedUsage(
        generation_id="gen-1",
        model="m",
        prompt_tokens=1,
        completion_tokens=16,
        cost=Decimal("3.3E-5"),
        finish_reason="length",
    )


def test_json_error_body() -> None:
    body = b'{"error":{"code":402,"message":"Insufficient credits","metadata":{"x":1}}}'
    assert feed_all(JSONCapture("gen-header"), [body]) == ok(
        ReportedUsage(
            generation_id="gen-header", error_code="402", error_message="Insufficient credits"
        ),
        saw_usage=False,
        error=True,
    )


@pytest.mark.parametrize(
    "body",
    [b"", b"   \n", b"<html>Bad Gateway</html>", b'{"id":"gen-1","usage":', b"[1,2]", b"\xff\xfe{"],
)
def test_json_garbage(body: bytes) -> None:
    assert feed_all(JSONCapture("gen-header"), [body]) == ok(
        ReportedUsage(generation_id="gen-header"), saw_usage=False, finished=False
    )


def test_json_oversized_body_is_not_parsed() -> None:
    capture = JSONCapture("gen-header", max_bytes=len(BODY) - 1)
    for part in pieces(BODY, 50):
        capture.feed(part)
    assert capture.result() == ok(
        ReportedUsage(generation_id="gen-header"), saw_usage=False, finished=False
    )
    exact = JSONCapture(max_bytes=len(BODY))
    exact.feed(BODY)
    assert exact.result() == BODY_RESULT


def test_json_result_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    capture = JSONCapture()
    capture.feed(BODY)
    first = capture.result()
    monkeypatch.setattr(json, "loads", pytest.fail)
    assert capture.result() is first


# --- choosing a capture -----------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "kind"),
    [
        ("text/event-stream", SSECapture),
        ("text/event-stream; charset=utf-8", SSECapture),
        ("  Text/Event-Stream ;charset=UTF-8", SSECapture),
        ("application/json", JSONCapture),
        ("application/json; charset=utf-8", JSONCapture),
        ("text/plain", JSONCapture),
        ("", JSONCapture),
        (None, JSONCapture),
    ],
)
def test_capture_for(content_type: str | None, kind: type) -> None:
    capture = capture_for(content_type, "gen-header")
    assert isinstance(capture, kind)
    assert isinstance(capture, UsageCapture)
    assert capture.result().usage.generation_id == "gen-header"


# --- The JSON parser under the captures -------------------------------------------------

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def _lenient(text: bytes) -> object:
    return json.loads(text.decode("utf-8-sig", "replace"), parse_float=Decimal)


@given(_json_values, st.booleans())
@settings(max_examples=300, deadline=None)
def test_the_fast_json_parser_reads_every_document_as_the_lenient_one(
    value: Any, ascii_only: bool
) -> None:
    from openrouter_proxy.capture import _loads

    # Numbers with fractions and exponents (1e-07, 2.5e+16) as an upstream writes costs.
    text = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    assert _loads(text) == _lenient(text)


@pytest.mark.parametrize(
    "text",
    [
        b'\xef\xbb\xbf{"usage": {"cost": 0.5}}',  # a byte-order mark
        b'{"usage": {"cost": 0.5}, "note": "\\ud800"}',  # a lone surrogate
        b'{"usage": {"cost": 0.5}, "note": "caf\xe9"}',  # not UTF-8
        b'{"usage": {"cost": 0.5}, "x": NaN}',  # not JSON, but Python's parser takes it
    ],
)
def test_what_the_fast_parser_refuses_is_read_leniently(text: bytes) -> None:
    from openrouter_proxy.capture import _loads

    parsed = _loads(text)
    assert isinstance(parsed, dict)
    assert parsed["usage"]["cost"] == Decimal("0.5")
    assert str(parsed) == str(_lenient(text))
