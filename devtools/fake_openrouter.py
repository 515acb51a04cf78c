"""A fake OpenRouter that speaks real HTTP on loopback.

The proxy's tests, the offline demo and the benchmark all need an upstream that
behaves like OpenRouter on the wire (whitespace padding before JSON bodies,
``: OPENROUTER PROCESSING`` keep-alives, a separate usage chunk, exact decimal
costs, mid-stream errors, a generation endpoint that lags behind, connections
that die half-way) without leaving the machine. Mocking the HTTP client would
hide exactly the bugs that matter (framing, streaming, disconnects), so this is
a plain ASGI 3 application served by uvicorn on 127.0.0.1.

Every metered endpoint of OpenRouter is imitated in its real shape (chat and
legacy completions, the Responses API, Anthropic Messages, embeddings, rerank,
image generation, speech-to-text and text-to-speech), each with an
``X-Generation-Id`` header and a ``GenerationStats`` entry behind
``/v1/generation``, so a gateway's billing of each can be checked against what
the fake says it charged. The catalogue and account endpoints answer too, small
but realistic, so tests can prove which of them a gateway forwards.

It is deterministic (token counts derive from the request size, the answer text
is fixed) and cheap per request, because it is also the upstream of the
benchmark. Behaviour is chosen per request with an ``X-Fake-Mode`` header; see
``FakeMode`` for the directives.

Use ``run_fake_openrouter()`` in tests (a uvicorn server in a daemon thread) or
``manage.py fake_openrouter`` for a standalone process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import gzip
import json
import logging
import random
import re
import string
import struct
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from devtools.servers import bind_socket, serve_in_thread, url_for

__all__ = [
    "ANSWER_TEXT",
    "BYOK_FEE_RATE",
    "CATALOGUE",
    "MODELS",
    "BillCancelled",
    "FakeMode",
    "FakeModel",
    "FakeOpenRouter",
    "GenerationStats",
    "RunningFake",
    "SeenRequest",
    "Usage",
    "answer_chunks",
    "base_url_for",
    "bind_socket",
    "byok_fee",
    "compute_usage",
    "format_decimal_exp",
    "parse_mode",
    "resolve_model",
    "run_fake_openrouter",
    "usage_json",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
BillCancelled = Literal["delivered", "full"]

PROVIDER = "FakeProvider"
ANSWER_TEXT = "Hello from the fake OpenRouter."
_ANSWER_WORDS = ("Hello", " from", " the", " fake", " OpenRouter.")
MAX_GENERATIONS = 100_000
_ID_ALPHABET = string.ascii_letters + string.digits
_random = random.Random()

# Set (in the request task's own context) just before the app deliberately
# returns without finishing a response. uvicorn then closes the connection and
# logs "ASGI callable returned without completing response." from the same
# task, so the filter below can hide exactly those records and nothing else.
_DELIBERATE_CUT: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fake_openrouter_deliberate_cut", default=False
)


class _HideDeliberateCuts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _DELIBERATE_CUT.get()


def _install_log_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(existing, _HideDeliberateCuts) for existing in logger.filters):
        logger.addFilter(_HideDeliberateCuts())


# --------------------------------------------------------------------------- models


def _per_token(per_million: str) -> Decimal:
    """USD per token from USD per million tokens, exactly, without trailing zeros."""
    value = (Decimal(per_million) / 1_000_000).normalize()
    return value if value else Decimal(0)


@dataclass(frozen=True, slots=True)
class FakeModel:
    """One catalogue entry; prices are USD per token (``request``: USD per request unit)."""

    id: str
    name: str
    context_length: int
    prompt: Decimal
    completion: Decimal
    input_cache_read: Decimal
    input_cache_write: Decimal = Decimal(0)
    request: Decimal = Decimal(0)
    modality: str = "text->text"

    def pricing(self) -> dict[str, str]:
        return {
            "prompt": _plain(self.prompt),
            "completion": _plain(self.completion),
            "request": _plain(self.request),
            "image": "0",
            "input_cache_read": _plain(self.input_cache_read),
            "input_cache_write": _plain(self.input_cache_write),
            "internal_reasoning": "0",
            "web_search": "0",
        }


def _model(
    model_id: str,
    name: str,
    context: int,
    prompt: str,
    completion: str,
    cache_read: str,
    *,
    request: str = "0",
    modality: str = "text->text",
) -> FakeModel:
    return FakeModel(
        id=model_id,
        name=name,
        context_length=context,
        prompt=_per_token(prompt),
        completion=_per_token(completion),
        input_cache_read=_per_token(cache_read),
        request=Decimal(request).normalize() if Decimal(request) else Decimal(0),
        modality=modality,
    )


GROK = _model("x-ai/grok-code-fast-1", "xAI: Grok Code Fast 1", 256_000, "0.20", "1.50", "0.02")
# The text models: what ``/v1/models`` lists.
MODELS: tuple[FakeModel, ...] = (
    GROK,
    # No cache discount is published for qwen3-coder: cached tokens cost the prompt price.
    _model("qwen/qwen3-coder", "Qwen: Qwen3 Coder 480B A35B", 262_144, "0.38", "1.53", "0.38"),
    _model("moonshotai/kimi-k2-0905", "MoonshotAI: Kimi K2 0905", 262_144, "0.60", "2.50", "0.15"),
    _model("z-ai/glm-4.6", "Z.AI: GLM 4.6", 202_752, "0.55", "2.15", "0.10"),
    _model("z-ai/glm-4.5-air:free", "Z.AI: GLM 4.5 Air (free)", 131_072, "0", "0", "0"),
)
EMBEDDING_MODELS: tuple[FakeModel, ...] = (
    _model(
        "openai/text-embedding-3-small",
        "OpenAI: Text Embedding 3 Small",
        8192,
        "0.02",
        "0",
        "0",
        modality="text->embeddings",
    ),
    _model(
        "openai/text-embedding-3-large",
        "OpenAI: Text Embedding 3 Large",
        8192,
        "0.13",
        "0",
        "0",
        modality="text->embeddings",
    ),
)
# Rerank is priced per search unit (one query over up to 100 documents).
RERANK_MODEL = _model(
    "cohere/rerank-v3.5", "Cohere: Rerank v3.5", 4096, "0", "0", "0", request="0.002"
)
# An image costs IMAGE_TOKENS completion tokens: 0.04096 USD at this price.
_IMAGE = ("bytedance-seed/seedream-4.5", "ByteDance Seed: Seedream 4.5", 4096)
IMAGE_MODEL = _model(*_IMAGE, "0.50", "10", "0", modality="text->image")
STT_MODEL = _model(
    "openai/whisper-large-v3",
    "OpenAI: Whisper Large v3",
    448,
    "2.50",
    "10",
    "0",
    modality="audio->text",
)
TTS_MODEL = _model(
    "openai/gpt-4o-mini-tts",
    "OpenAI: GPT-4o mini TTS",
    2000,
    "0.60",
    "12",
    "0",
    modality="text->audio",
)
CATALOGUE: tuple[FakeModel, ...] = (
    *MODELS,
    *EMBEDDING_MODELS,
    RERANK_MODEL,
    IMAGE_MODEL,
    STT_MODEL,
    TTS_MODEL,
)
_MODELS_BY_ID = {entry.id: entry for entry in CATALOGUE}


def resolve_model(requested: str) -> tuple[str, FakeModel]:
    """The served model id and its prices.

    A full id that is in the catalogue (such as a ``:free`` model) is served
    as-is; otherwise a ``:variant`` suffix is dropped. Unknown models are served
    too, priced like grok-code-fast-1.
    """
    entry = _MODELS_BY_ID.get(requested)
    if entry is not None:
        return requested, entry
    served = requested.split(":", 1)[0]
    return served, _MODELS_BY_ID.get(served, GROK)


# --------------------------------------------------------------------------- numbers


def _plain(value: Decimal) -> str:
    """A Decimal as a plain JSON number literal, exactly (no exponent)."""
    if not value:
        return "0"
    return format(value.normalize(), "f")


def format_decimal_exp(value: Decimal) -> str:
    """A Decimal in exact scientific notation, Python style: ``3.3e-05``."""
    if not value:
        return "0e+00"
    sign, digits, exponent = value.normalize().as_tuple()
    assert isinstance(exponent, int)  # finite numbers only
    text = "".join(map(str, digits))
    mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
    power = exponent + len(text) - 1
    return f"{'-' if sign else ''}{mantissa}e{'-' if power < 0 else '+'}{abs(power):02d}"


class _Raw(str):
    """A JSON literal written as-is by ``_encode`` (exact money)."""

    __slots__ = ()


def _encode(value: Any) -> str:
    """Compact JSON in which a Decimal is an exact number literal, never a float."""
    if isinstance(value, _Raw):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, Decimal):
        return _plain(value)
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, dict):
        return (
            "{"
            + ",".join(f"{json.dumps(key)}:{_encode(item)}" for key, item in value.items())
            + "}"
        )
    if isinstance(value, list | tuple):
        return "[" + ",".join(_encode(item) for item in value) + "]"
    raise TypeError(f"cannot encode {type(value).__name__}")


def _money(value: Decimal, mode: FakeMode) -> _Raw:
    return _Raw(format_decimal_exp(value) if mode.exp_cost else _plain(value))


def _random_id(length: int = 20) -> str:
    return "".join(_random.choices(_ID_ALPHABET, k=length))


def _new_generation_id() -> str:
    return f"gen-{int(time.time())}-{_random_id()}"


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


@lru_cache(maxsize=64)
def answer_chunks(count: int) -> tuple[str, ...]:
    """The answer split over ``count`` content pieces.

    Up to five pieces split "Hello from the fake OpenRouter." on word
    boundaries; more pieces cycle through the words again.
    """
    if count <= 0:
        return ()
    words = len(_ANSWER_WORDS)
    if count <= words:
        bounds = [round(i * words / count) for i in range(count + 1)]
        return tuple("".join(_ANSWER_WORDS[bounds[i] : bounds[i + 1]]) for i in range(count))
    pieces = [_ANSWER_WORDS[i % words] for i in range(count)]
    for i in range(words, count, words):
        pieces[i] = " " + pieces[i]
    return tuple(pieces)


def _padded(pieces: tuple[str, ...], pad: int) -> tuple[str, ...]:
    return tuple(piece + " " * pad for piece in pieces) if pad else pieces


def _png_1x1() -> bytes:
    """A valid one-pixel PNG: the "image" every image generation returns."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)
    pixels = zlib.compress(b"\x00\x00\x00\x00\x00")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


PNG_B64 = base64.b64encode(_png_1x1()).decode()
IMAGE_TOKENS = 4096
# One MPEG-1 Layer III frame (128 kbit/s, 44.1 kHz, 417 bytes) of silence per audio piece.
_MP3_FRAME = b"\xff\xfb\x90\x64" + bytes(413)
_PCM_CHUNK = bytes(960)  # 20 ms of 24 kHz 16-bit mono silence


# --------------------------------------------------------------------------- modes


@dataclass(frozen=True, slots=True)
class FakeMode:
    """Per-request behaviour, parsed from ``X-Fake-Mode: directive,directive=value``.

    Directives: ``status=<code>``, ``chunks=<n>``, ``keepalive=<n>``,
    ``first-byte-delay=<s>``, ``chunk-delay=<s>``, ``midstream-error``,
    ``midstream-error-usage``, ``cut``, ``no-cost``, ``zero-cost``, ``byok``,
    ``no-usage``, ``exp-cost``, ``usage-on-finish``, ``crlf``, ``gzip``,
    ``malformed``, ``set-cookie``, ``reasoning=<n>``, ``cached=<n>``, ``pad=<n>``
    (``n`` spaces appended to every content piece: a large response, for
    back-pressure tests, that costs the same as without), and:

    - ``midstream-error-openrouter``: the error event in OpenRouter's documented
      shape (``"code": "server_error"``, a ``delta`` with empty content);
    - ``keepalive-between``: a ``: OPENROUTER PROCESSING`` comment between every
      two data events of a stream, not only before the first;
    - ``headers-first``: the response headers go out at once and the
      first-byte delay is spent after them, with the whitespace padding of a
      JSON body (``keepalive`` lines) dribbled out over it, as OpenRouter does
      while a non-streamed generation runs;
    - ``incomplete``: the generation stops at its token limit (``length``,
      ``max_tokens``, ``response.incomplete``), billed in full;
    - ``response-done``: a Responses stream ends with ``response.done`` instead
      of ``response.completed``.

    Every endpoint honours ``status``, ``first-byte-delay`` and ``set-cookie``.
    JSON bodies of every metered endpoint honour ``keepalive`` (padding),
    ``headers-first``, ``cut``, ``gzip``, ``crlf`` and the cost directives
    (``no-cost``, ``zero-cost``, ``byok``, ``no-usage``, ``exp-cost``). Streams
    (chat, completions, Responses, Messages, images) honour ``chunks`` (image
    streams: partial images), ``chunk-delay``, ``keepalive``,
    ``keepalive-between``, ``cut``, ``midstream-error*``, ``malformed``,
    ``gzip`` and ``crlf``; ``reasoning``, ``cached``, ``pad`` and
    ``incomplete`` apply to the four text endpoints. Speech streams raw audio:
    ``chunks`` pieces, ``chunk-delay`` apart, ``cut`` after half of them.
    A text stream's chunks are due ``chunk-delay`` apart from its first one,
    by the clock, as a model's tokens are: one sent late because the fake's
    process was busy does not delay those after it.
    """

    status: int | None = None
    chunks: int = 3
    keepalive: int = 1
    first_byte_delay: float = 0.0
    chunk_delay: float = 0.0
    midstream_error: bool = False
    midstream_error_usage: bool = False
    midstream_error_openrouter: bool = False
    cut: bool = False
    no_cost: bool = False
    zero_cost: bool = False
    byok: bool = False
    no_usage: bool = False
    exp_cost: bool = False
    usage_on_finish: bool = False
    crlf: bool = False
    gzip: bool = False
    malformed: bool = False
    set_cookie: bool = False
    keepalive_between: bool = False
    headers_first: bool = False
    incomplete: bool = False
    response_done: bool = False
    reasoning: int = 0
    cached: int = 0
    pad: int = 0


_FLAGS = {
    "midstream-error": "midstream_error",
    "cut": "cut",
    "no-cost": "no_cost",
    "zero-cost": "zero_cost",
    "byok": "byok",
    "no-usage": "no_usage",
    "exp-cost": "exp_cost",
    "usage-on-finish": "usage_on_finish",
    "crlf": "crlf",
    "gzip": "gzip",
    "malformed": "malformed",
    "set-cookie": "set_cookie",
    "keepalive-between": "keepalive_between",
    "headers-first": "headers_first",
    "incomplete": "incomplete",
    "response-done": "response_done",
}
_COUNTS = {
    "status": "status",
    "chunks": "chunks",
    "keepalive": "keepalive",
    "reasoning": "reasoning",
    "cached": "cached",
    "pad": "pad",
}
_DELAYS = {"first-byte-delay": "first_byte_delay", "chunk-delay": "chunk_delay"}


@lru_cache(maxsize=256)
def parse_mode(text: str) -> FakeMode:
    """Parse an ``X-Fake-Mode`` value; raises ``ValueError`` on unknown directives."""
    values: dict[str, Any] = {}
    for raw in text.split(","):
        directive = raw.strip().lower()
        if not directive:
            continue
        name, has_value, value = directive.partition("=")
        name = name.strip()
        value = value.strip()
        if name in _FLAGS and not has_value:
            values[_FLAGS[name]] = True
        elif name == "midstream-error-usage" and not has_value:
            values["midstream_error"] = True
            values["midstream_error_usage"] = True
        elif name == "midstream-error-openrouter" and not has_value:
            values["midstream_error"] = True
            values["midstream_error_openrouter"] = True
        elif name in _COUNTS and has_value:
            number = int(value)
            if number < 0 or (name == "status" and not 100 <= number <= 599):
                raise ValueError(f"bad value for {name}: {value}")
            values[_COUNTS[name]] = number
        elif name in _DELAYS and has_value:
            delay = float(value)
            if not 0 <= delay < 3600:
                raise ValueError(f"bad value for {name}: {value}")
            values[_DELAYS[name]] = delay
        else:
            raise ValueError(f"unknown fake mode directive: {directive}")
    return FakeMode(**values)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class SeenRequest:
    """A request as the fake received it (raw path and query, lower-cased header names)."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class GenerationStats:
    """What ``/v1/generation`` reports once a generation has ended.

    ``api_type`` is OpenRouter's: ``completions`` (chat, legacy completions,
    Responses, Messages), ``embeddings``, ``rerank``, ``image``, ``stt`` or ``tts``.
    """

    id: str
    model: str
    total_cost: Decimal
    tokens_prompt: int
    tokens_completion: int
    tokens_reasoning: int
    tokens_cached: int
    cancelled: bool
    streamed: bool
    created_at: float
    finished_at: float
    is_byok: bool = False
    upstream_inference_cost: Decimal | None = None
    api_type: str = "completions"
    finish_reason: str | None = None

    @property
    def charged(self) -> Decimal:
        """What the generation cost whoever holds the key: OpenRouter's charge plus,
        with BYOK, the provider's price paid through the user's own key."""
        if self.is_byok and self.upstream_inference_cost is not None:
            return self.total_cost + self.upstream_inference_cost
        return self.total_cost


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens and the exact cost of one generation."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    cost: Decimal


def compute_usage(model: FakeModel, prompt_tokens: int, chunks_sent: int, mode: FakeMode) -> Usage:
    """Usage after ``chunks_sent`` content pieces: 2 tokens a piece, plus reasoning tokens.

    Cached prompt tokens are priced at the cache-read price, reasoning tokens
    (part of the completion tokens) at the completion price.
    """
    cached = min(mode.cached, prompt_tokens)
    completion = 2 * chunks_sent + mode.reasoning
    cost = (
        (prompt_tokens - cached) * model.prompt
        + cached * model.input_cache_read
        + completion * model.completion
    )
    return Usage(prompt_tokens, completion, cached, mode.reasoning, cost)


def _input_cost(model: FakeModel, usage: Usage) -> Decimal:
    """The prompt part of a token-priced usage's cost."""
    cached = usage.cached_tokens
    return (usage.prompt_tokens - cached) * model.prompt + cached * model.input_cache_read


#: OpenRouter's fee on a BYOK generation, a share of the provider's price, taken
#: from the OpenRouter credits while the provider bills the user's own key.
BYOK_FEE_RATE = Decimal("0.05")


def byok_fee(provider_price: Decimal) -> Decimal:
    """OpenRouter's fee on a BYOK generation of this provider price (exact)."""
    return provider_price * BYOK_FEE_RATE


def usage_json(usage: Usage, mode: FakeMode) -> str:
    """The ``usage`` object as JSON text; money is written as exact number literals."""
    number = format_decimal_exp if mode.exp_cost else _plain
    if mode.byok:
        cost, upstream = number(byok_fee(usage.cost)), number(usage.cost)
    elif mode.zero_cost:
        cost = upstream = "0"
    else:
        cost = upstream = number(usage.cost)
    total = usage.prompt_tokens + usage.completion_tokens
    parts = [
        f'{{"prompt_tokens":{usage.prompt_tokens},"completion_tokens":{usage.completion_tokens}',
        f',"total_tokens":{total}',
    ]
    if not mode.no_cost:
        parts.append(f',"cost":{cost}')
    parts.append(',"is_byok":true' if mode.byok else ',"is_byok":false')
    parts.append(
        f',"prompt_tokens_details":{{"cached_tokens":{usage.cached_tokens},"cache_write_tokens":0}}'
    )
    if not mode.no_cost:
        parts.append(f',"cost_details":{{"upstream_inference_cost":{upstream}}}')
    parts.append(f',"completion_tokens_details":{{"reasoning_tokens":{usage.reasoning_tokens}}}}}')
    return "".join(parts)


def _cost_members(
    mode: FakeMode, cost: Decimal, details: dict[str, Decimal] | None = None
) -> dict[str, Any]:
    """``cost``, ``is_byok`` and ``cost_details`` of a usage object, as the mode wants them.

    ``details`` are the split of the upstream price (``upstream_inference_*_cost``)
    that each endpoint names its own way.
    """
    if mode.zero_cost:
        charged = upstream = Decimal(0)
        details = dict.fromkeys(details or (), Decimal(0))
    elif mode.byok:
        charged, upstream = byok_fee(cost), cost
    else:
        charged = upstream = cost
    members: dict[str, Any] = {}
    if not mode.no_cost:
        members["cost"] = _money(charged, mode)
    members["is_byok"] = mode.byok
    if not mode.no_cost:
        cost_details: dict[str, Any] = {"upstream_inference_cost": _money(upstream, mode)}
        for name, value in (details or {}).items():
            cost_details[name] = _money(value, mode)
        members["cost_details"] = cost_details
    return members


def _with_member(obj_json: str, name: str, value_json: str) -> str:
    """Append a member to a serialised JSON object."""
    return f'{obj_json[:-1]},"{name}":{value_json}}}'


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _error_body(code: int, message: str, metadata: bool = False) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message}
    if metadata:
        error["metadata"] = {}
    return _dumps({"error": error}).encode()


_MIDSTREAM_ERROR = '{"code":502,"message":"Provider disconnected"}'
# The shape OpenRouter documents for an error after streaming started.
_MIDSTREAM_ERROR_OPENROUTER = (
    '{"code":"server_error","message":"Provider disconnected unexpectedly"}'
)


def _sse(mode: FakeMode, data: str, event: str | None = None) -> str:
    """One server-sent event (with an ``event:`` line when named)."""
    if mode.crlf:
        return f"event: {event}\r\ndata: {data}\r\n\r\n" if event else f"data: {data}\r\n\r\n"
    return f"event: {event}\ndata: {data}\n\n" if event else f"data: {data}\n\n"


def _keepalive(mode: FakeMode) -> str:
    return ": OPENROUTER PROCESSING" + ("\r\n\r\n" if mode.crlf else "\n\n")


@dataclass(slots=True)
class _Plan:
    """The events of a stream, and how many content pieces each leaves delivered.

    ``progress[i]`` is the number of pieces the client has once ``events[i]``
    was written: what a cancelled stream is billed for.
    """

    events: list[str | bytes]
    progress: list[int]

    def add(self, event: str | bytes, progress: int) -> None:
        self.events.append(event)
        self.progress.append(progress)

    def interleave_keepalives(self, mode: FakeMode) -> None:
        """A keep-alive comment before every data event after the first."""
        comment = _keepalive(mode)
        events: list[str | bytes] = []
        progress: list[int] = []
        seen_data = False
        for event, delivered in zip(self.events, self.progress, strict=True):
            is_comment = isinstance(event, str) and event.startswith(":")
            if not is_comment:
                if seen_data:
                    events.append(comment)
                    progress.append(progress[-1] if progress else 0)
                seen_data = True
            events.append(event)
            progress.append(delivered)
        self.events, self.progress = events, progress


def _start_plan(mode: FakeMode) -> _Plan:
    comment = _keepalive(mode)
    return _Plan([comment] * mode.keepalive, [0] * mode.keepalive)


@dataclass(frozen=True, slots=True)
class _Job:
    """One completion request being answered, and how to render its documents."""

    chat: bool
    gen_id: str
    created: int
    served: str
    model: FakeModel
    prompt_tokens: int
    mode: FakeMode

    def head(self, object_name: str) -> str:
        """The opening members shared by the JSON document and every chunk."""
        return (
            f'{{"id":"{self.gen_id}","object":"{object_name}","created":{self.created}'
            f',"model":{_dumps(self.served)},"provider":"{PROVIDER}"'
        )

    def usage(self, chunks_sent: int) -> Usage:
        return compute_usage(self.model, self.prompt_tokens, chunks_sent, self.mode)

    @property
    def finish(self) -> str:
        mode = self.mode
        return "error" if mode.midstream_error else "length" if mode.incomplete else "stop"

    def _error(self) -> str:
        return (
            _MIDSTREAM_ERROR_OPENROUTER
            if self.mode.midstream_error_openrouter
            else _MIDSTREAM_ERROR
        )

    def document(self, pieces: Sequence[str]) -> str:
        """The non-streaming response body (without the padding)."""
        mode = self.mode
        text = _dumps("".join(pieces))
        finish = self.finish
        if self.chat:
            choice = (
                f'{{"index":0,"finish_reason":"{finish}","native_finish_reason":"{finish}"'
                f',"message":{{"role":"assistant","content":{text},"refusal":null}}}}'
            )
            head = self.head("chat.completion")
        else:
            choice = f'{{"index":0,"finish_reason":"{finish}","text":{text}}}'
            head = self.head("text_completion")
        document = f'{head},"choices":[{choice}]}}'
        if mode.midstream_error:
            document = _with_member(document, "error", self._error())
        if not mode.no_usage and (mode.midstream_error_usage or not mode.midstream_error):
            document = _with_member(document, "usage", usage_json(self.usage(len(pieces)), mode))
        return document

    def events(self, pieces: Sequence[str]) -> list[str]:
        """Every SSE event of the stream, in order, assuming the client stays."""
        mode = self.mode
        end = "\r\n\r\n" if mode.crlf else "\n\n"
        events = [": OPENROUTER PROCESSING" + end] * mode.keepalive
        if self.chat:
            head = self.head("chat.completion.chunk") + ',"choices":'
            for piece in pieces:
                events.append(
                    f'data: {head}[{{"index":0,"delta":{{"role":"assistant","content":'
                    f'{_dumps(piece)}}},"finish_reason":null}}]}}{end}'
                )
            finish = '[{"index":0,"delta":{},"finish_reason":"%s"}]}'
            if mode.midstream_error_openrouter:
                finish = '[{"index":0,"delta":{"content":""},"finish_reason":"%s"}]}'
        else:
            head = self.head("text_completion") + ',"choices":'
            for piece in pieces:
                choice = f'{{"index":0,"text":{_dumps(piece)},"finish_reason":null}}'
                events.append(f"data: {head}[{choice}]}}{end}")
            finish = '[{"index":0,"text":"","finish_reason":"%s"}]}'
        if mode.cut:
            return events
        usage = None if mode.no_usage else usage_json(self.usage(len(pieces)), mode)
        if mode.midstream_error:
            event = head.replace(',"choices":', f',"error":{self._error()},"choices":')
            event += finish.replace("%s", "error")
            if usage is not None and mode.midstream_error_usage:
                event = _with_member(event, "usage", usage)
            events.append(f"data: {event}{end}")
            return events
        if mode.malformed:
            events.append("data: {not json" + end)
        event = head + finish.replace("%s", self.finish)
        if usage is not None and mode.usage_on_finish:
            event = _with_member(event, "usage", usage)
        events.append(f"data: {event}{end}")
        if usage is not None and not mode.usage_on_finish:
            events.append(f"data: {_with_member(head + '[]}', 'usage', usage)}{end}")
        events.append("data: [DONE]" + end)
        return events

    def plan(self, pieces: Sequence[str]) -> _Plan:
        """``events()`` with what each leaves delivered: keep-alives, then one per piece."""
        events: list[str | bytes] = list(self.events(pieces))
        keepalive = self.mode.keepalive
        count = len(pieces)
        progress = [min(max(index - keepalive + 1, 0), count) for index in range(len(events))]
        return _Plan(events, progress)


# --------------------------------------------------------------------------- Responses API


def _responses_usage(job: _Job, usage: Usage) -> dict[str, Any]:
    mode = job.mode
    input_cost = _input_cost(job.model, usage)
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        **_cost_members(
            mode,
            usage.cost,
            {
                "upstream_inference_input_cost": input_cost,
                "upstream_inference_output_cost": usage.cost - input_cost,
            },
        ),
    }


def _output_message(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [_output_text(text)]
    return {
        "type": "message",
        "id": item_id,
        "role": "assistant",
        "status": status,
        "content": content,
    }


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


@dataclass(frozen=True, slots=True)
class _ResponsesJob:
    """A Responses API request: the response object and its event stream."""

    job: _Job
    item_id: str
    request: dict[str, Any]

    def response(
        self, status: str, output: list[dict[str, Any]], usage: Usage | None, error: bool = False
    ) -> dict[str, Any]:
        job, request = self.job, self.request
        finished = status in ("completed", "incomplete", "failed")
        instructions = request.get("instructions")
        max_output = request.get("max_output_tokens")
        return {
            "id": job.gen_id,
            "object": "response",
            "created_at": job.created,
            "model": job.served,
            "status": status,
            "completed_at": int(time.time()) if finished else None,
            "output": output,
            "error": (
                {"code": "server_error", "message": "Provider disconnected unexpectedly"}
                if error
                else None
            ),
            "incomplete_details": (
                {"reason": "max_output_tokens"} if status == "incomplete" else None
            ),
            "instructions": instructions if isinstance(instructions, str) else None,
            "max_output_tokens": max_output if isinstance(max_output, int) else None,
            "metadata": None,
            "temperature": None,
            "top_p": None,
            "presence_penalty": None,
            "frequency_penalty": None,
            "tools": [],
            "tool_choice": "auto",
            "parallel_tool_calls": True,
            "store": False,
            "text": {"format": {"type": "text"}},
            "usage": None if usage is None else _responses_usage(job, usage),
        }

    def _final_status(self) -> str:
        mode = self.job.mode
        return (
            "failed" if mode.midstream_error else "incomplete" if mode.incomplete else "completed"
        )

    def _final_usage(self, pieces: Sequence[str]) -> Usage | None:
        mode = self.job.mode
        if mode.no_usage or (mode.midstream_error and not mode.midstream_error_usage):
            return None
        return self.job.usage(len(pieces))

    def document(self, pieces: Sequence[str]) -> str:
        status = self._final_status()
        item_status = "completed" if status == "completed" else "incomplete"
        output = [_output_message(self.item_id, "".join(pieces), item_status)]
        document = self.response(status, output, self._final_usage(pieces), status == "failed")
        return _encode(document)

    def plan(self, pieces: Sequence[str]) -> _Plan:
        mode = self.job.mode
        plan = _start_plan(mode)
        sequence = 0

        def emit(kind: str, members: dict[str, Any], progress: int) -> None:
            nonlocal sequence
            data = {"type": kind, "sequence_number": sequence, **members}
            plan.add(_sse(mode, _encode(data), kind), progress)
            sequence += 1

        started = self.response("in_progress", [], None)
        emit("response.created", {"response": started}, 0)
        emit("response.in_progress", {"response": started}, 0)
        at = {"output_index": 0}
        opened = _output_message(self.item_id, None, "in_progress")
        emit("response.output_item.added", {**at, "item": opened}, 0)
        part = {"item_id": self.item_id, **at, "content_index": 0}
        emit("response.content_part.added", {**part, "part": _output_text("")}, 0)
        for index, piece in enumerate(pieces):
            emit("response.output_text.delta", {**part, "delta": piece, "logprobs": []}, index + 1)
        count = len(pieces)
        if mode.cut:
            return plan
        text = "".join(pieces)
        status = self._final_status()
        if status == "failed":
            output = [_output_message(self.item_id, text, "incomplete")]
            failed = self.response("failed", output, self._final_usage(pieces), error=True)
            emit("response.failed", {"response": failed}, count)
            return plan
        item_status = "completed" if status == "completed" else "incomplete"
        if mode.malformed:
            plan.add(_sse(mode, "{not json"), count)
        emit("response.output_text.done", {**part, "text": text, "logprobs": []}, count)
        emit("response.content_part.done", {**part, "part": _output_text(text)}, count)
        item = _output_message(self.item_id, text, item_status)
        emit("response.output_item.done", {**at, "item": item}, count)
        final = self.response(status, [item], self._final_usage(pieces))
        kind = f"response.{status}"
        if status == "completed" and mode.response_done:
            kind = "response.done"
        emit(kind, {"response": final}, count)
        return plan


# --------------------------------------------------------------------------- Anthropic Messages


@dataclass(frozen=True, slots=True)
class _MessagesJob:
    """An Anthropic Messages request: the message and its event stream.

    Anthropic counts ``input_tokens`` without the cached ones, which are in
    ``cache_read_input_tokens``; the cost is the same as for chat.
    """

    job: _Job
    message_id: str

    def _tokens(self, usage: Usage, output_tokens: int) -> dict[str, Any]:
        return {
            "input_tokens": usage.prompt_tokens - usage.cached_tokens,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": usage.cached_tokens,
        }

    def _message(
        self, content: list[dict[str, Any]], stop: str | None, usage: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.job.served,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": usage,
            "provider": PROVIDER,
        }

    @property
    def stop_reason(self) -> str:
        return "max_tokens" if self.job.mode.incomplete else "end_turn"

    def document(self, pieces: Sequence[str]) -> str:
        job = self.job
        usage = job.usage(len(pieces))
        input_cost = _input_cost(job.model, usage)
        members = _cost_members(
            job.mode,
            usage.cost,
            {
                "upstream_inference_prompt_cost": input_cost,
                "upstream_inference_completions_cost": usage.cost - input_cost,
            },
        )
        message = self._message(
            [{"type": "text", "text": "".join(pieces)}],
            self.stop_reason,
            {**self._tokens(usage, usage.completion_tokens), **members},
        )
        if job.mode.no_usage:
            del message["usage"]
        return _encode(message)

    def plan(self, pieces: Sequence[str]) -> _Plan:
        mode = self.job.mode
        plan = _start_plan(mode)
        start_usage = self._tokens(self.job.usage(0), 1)

        def emit(kind: str, data: dict[str, Any], progress: int) -> None:
            plan.add(_sse(mode, _encode({"type": kind, **data}), kind), progress)

        emit("message_start", {"message": self._message([], None, start_usage)}, 0)
        block = {"type": "text", "text": ""}
        emit("content_block_start", {"index": 0, "content_block": block}, 0)
        emit("ping", {}, 0)
        for index, piece in enumerate(pieces):
            text_delta = {"type": "text_delta", "text": piece}
            emit("content_block_delta", {"index": 0, "delta": text_delta}, index + 1)
        count = len(pieces)
        if mode.cut:
            return plan
        if mode.midstream_error:
            error = {"type": "api_error", "message": "Provider disconnected unexpectedly"}
            emit("error", {"error": error}, count)
            return plan
        if mode.malformed:
            plan.add(_sse(mode, "{not json", "content_block_delta"), count)
        emit("content_block_stop", {"index": 0}, count)
        usage = self.job.usage(count)
        delta = {"stop_reason": self.stop_reason, "stop_sequence": None}
        # Anthropic's usage without OpenRouter's cost: that is only in /generation.
        tokens = self._tokens(usage, usage.completion_tokens)
        emit("message_delta", {"delta": delta, "usage": tokens}, count)
        emit("message_stop", {}, count)
        return plan


# --------------------------------------------------------------------------- other endpoints


def _unit_vector(text: str, dimensions: int) -> list[float]:
    """A deterministic pseudo-embedding; every value is exact in float32."""
    state = zlib.crc32(text.encode()) or 1
    values = []
    for _ in range(dimensions):
        state = (state * 1103515245 + 12345) & 0x7FFFFFFF
        values.append(((state >> 8) % 2049 - 1024) / 1024)
    return values


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


_WORD = re.compile(r"\w+")


def _rerank_score(query: str, document: str) -> float:
    """Relevance by shared words, deterministic, in [0, 1]."""
    words = set(_WORD.findall(query.lower()))
    if not words:
        return 0.0
    shared = words & set(_WORD.findall(document.lower()))
    return round(len(shared) / len(words), 4)


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a multipart/form-data body: name -> (filename, content)."""
    boundary = None
    for parameter in content_type.split(";")[1:]:
        key, _, value = parameter.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        return {}
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in body.split(b"--" + boundary.encode("latin-1"))[1:]:
        if part.startswith(b"--"):
            break
        head, separator, content = part.partition(b"\r\n\r\n")
        if not separator:
            continue
        content = content.removesuffix(b"\r\n")
        name = filename = None
        for line in head.decode("latin-1").split("\r\n"):
            header, _, value = line.partition(":")
            if header.strip().lower() != "content-disposition":
                continue
            for item in value.split(";")[1:]:
                key, _, raw = item.strip().partition("=")
                if key == "name":
                    name = raw.strip('"')
                elif key == "filename":
                    filename = raw.strip('"')
        if name:
            fields[name] = (filename, content)
    return fields


# --------------------------------------------------------------------------- catalogue


_CREATED = 1_750_000_000
_SUPPORTED = [
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "tools",
    "tool_choice",
    "response_format",
]


def _modalities(entry: FakeModel) -> dict[str, Any]:
    source, _, target = entry.modality.partition("->")
    return {
        "modality": entry.modality,
        "input_modalities": source.split("+"),
        "output_modalities": target.split("+"),
        "tokenizer": "Other",
        "instruct_type": None,
    }


def _model_entry(entry: FakeModel) -> dict[str, Any]:
    return {
        "id": entry.id,
        "canonical_slug": entry.id,
        "hugging_face_id": None,
        "name": entry.name,
        "created": _CREATED,
        "description": f"{entry.name}, served by the fake OpenRouter.",
        "context_length": entry.context_length,
        "architecture": _modalities(entry),
        "pricing": entry.pricing(),
        "top_provider": {
            "context_length": entry.context_length,
            "max_completion_tokens": 32_768,
            "is_moderated": False,
        },
        "per_request_limits": None,
        "supported_parameters": list(_SUPPORTED) if entry.modality == "text->text" else [],
        "default_parameters": None,
        "supported_voices": ["alloy"] if entry is TTS_MODEL else None,
        "knowledge_cutoff": None,
        "expiration_date": None,
        "links": {"details": f"/api/v1/models/{entry.id}/endpoints"},
    }


def _endpoint_entry(entry: FakeModel) -> dict[str, Any]:
    percentiles = {"p50": 0.25, "p75": 0.35, "p90": 0.5, "p99": 0.9}
    return {
        "name": f"{PROVIDER} | {entry.id}",
        "model_id": entry.id,
        "model_name": entry.name,
        "context_length": entry.context_length,
        "pricing": entry.pricing(),
        "provider_name": PROVIDER,
        "tag": "fakeprovider",
        "quantization": "fp8",
        "max_completion_tokens": 32_768,
        "max_prompt_tokens": entry.context_length,
        "supported_parameters": list(_SUPPORTED),
        "status": 0,
        "uptime_last_30m": 100,
        "uptime_last_5m": 100,
        "uptime_last_1d": 100,
        "supports_implicit_caching": True,
        "latency_last_30m": percentiles,
        "throughput_last_30m": {"p50": 120, "p75": 100, "p90": 80, "p99": 40},
    }


@lru_cache(maxsize=1)
def _catalogue_bodies() -> dict[str, bytes]:
    """The static catalogue answers, rendered once."""
    models = _encode({"data": [_model_entry(entry) for entry in MODELS]}).encode()
    image = _model_entry(IMAGE_MODEL)
    image.update(
        endpoints=f"/api/v1/images/models/{IMAGE_MODEL.id}/endpoints",
        supports_streaming=True,
        supported_parameters={"resolution": {"type": "enum", "values": ["1K", "2K", "4K"]}},
    )
    provider = {
        "name": PROVIDER,
        "slug": "fakeprovider",
        "headquarters": "US",
        "datacenters": ["US"],
        "privacy_policy_url": "https://example.invalid/privacy",
        "terms_of_service_url": "https://example.invalid/terms",
        "status_page_url": None,
    }
    return {
        "models": models,
        "count": _encode({"data": {"count": len(MODELS)}}).encode(),
        "embeddings": _encode(
            {"data": [_model_entry(entry) for entry in EMBEDDING_MODELS]}
        ).encode(),
        "images": _encode({"data": [image]}).encode(),
        "videos": b'{"data":[]}',
        "providers": _encode({"data": [provider]}).encode(),
        "zdr": _encode({"data": [_endpoint_entry(entry) for entry in MODELS]}).encode(),
    }


_FILE = {
    "id": "or_file_fake00000000000000000001",
    "type": "file",
    "filename": "notes.txt",
    "mime_type": "text/plain",
    "size_bytes": 1234,
    "created_at": "2026-01-01T00:00:00Z",
    "downloadable": False,
}
_PRESET = {
    "id": "650e8400-e29b-41d4-a716-446655440001",
    "slug": "fake-preset",
    "name": "fake-preset",
    "description": None,
    "status": "active",
    "status_updated_at": None,
    "designated_version_id": "550e8400-e29b-41d4-a716-446655440000",
    "creator_user_id": "user_fake",
    "workspace_id": "750e8400-e29b-41d4-a716-446655440002",
    "created_at": "2026-01-01T00:00:00Z",
    "updated_at": "2026-01-01T00:00:00Z",
}
CREDITS = Decimal(100)


# --------------------------------------------------------------------------- the app


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _watch_disconnect(receive: Receive) -> None:
    """Return once the client has gone: the stream's watcher task is done then."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _sleep_unless_gone(watcher: asyncio.Task[None], delay: float) -> bool:
    """Sleep ``delay`` seconds; True if the client went away meanwhile.

    ``watcher`` is the stream's :func:`_watch_disconnect` task, which ends when
    the client leaves: waiting on it makes no task per pause (a fleet of
    streams pauses tens of thousands of times a second).
    """
    if watcher.done():
        return True
    if delay > 0:
        await asyncio.wait((watcher,), timeout=delay)
    return watcher.done()


_JSON = (b"content-type", b"application/json")
_METERED = {
    "/api/v1/chat/completions": "chat",
    "/api/v1/completions": "completions",
    "/api/v1/responses": "responses",
    "/api/v1/messages": "messages",
    "/api/v1/embeddings": "embeddings",
    "/api/v1/rerank": "rerank",
    "/api/v1/images": "images",
    "/api/v1/audio/transcriptions": "transcriptions",
    "/api/v1/audio/speech": "speech",
}
_ROUTES: dict[str, tuple[str, str]] = {
    **{path: ("POST", name) for path, name in _METERED.items()},
    "/api/v1/messages/count_tokens": ("POST", "count_tokens"),
    "/api/v1/generation": ("GET", "generation"),
    # catalogue
    "/api/v1/models": ("GET", "models"),
    "/api/v1/models/count": ("GET", "models_count"),
    "/api/v1/embeddings/models": ("GET", "embedding_models"),
    "/api/v1/images/models": ("GET", "image_models"),
    "/api/v1/videos/models": ("GET", "video_models"),
    "/api/v1/providers": ("GET", "providers"),
    "/api/v1/endpoints/zdr": ("GET", "zdr"),
    # account
    "/api/v1/key": ("GET", "key"),
    "/api/v1/keys": ("GET", "keys"),
    "/api/v1/credits": ("GET", "credits"),
    "/api/v1/activity": ("GET", "activity"),
    "/api/v1/generation/content": ("GET", "generation_content"),
    "/api/v1/files": ("GET", "files"),
    "/api/v1/presets": ("GET", "presets"),
    "/api/v1/auth/keys": ("POST", "auth_keys"),
    "/api/v1/auth/keys/code": ("POST", "auth_code"),
    "/api/v1/models/user": ("GET", "models_user"),
}
# Paths with parameters: (prefix, suffix, slashes in the parameter, method, handler).
_PATTERNS: tuple[tuple[str, str, int, str, str], ...] = (
    ("/api/v1/models/", "/endpoints", 1, "GET", "model_endpoints"),
    ("/api/v1/model/", "", 1, "GET", "model"),
    ("/api/v1/files/", "", 0, "GET", "file"),
)
# Anthropic clients send their key as x-api-key; OpenRouter accepts it there.
_X_API_KEY_PATHS = frozenset({"/api/v1/messages", "/api/v1/messages/count_tokens"})
_NO_AUTH_PATHS = frozenset({"/api/v1/auth/keys"})  # the PKCE exchange: the code is the secret


def _route(path: str) -> tuple[str, str, str] | None:
    """(method, handler, parameter) for a path, or None if it is not OpenRouter's."""
    exact = _ROUTES.get(path)
    if exact is not None:
        return exact[0], exact[1], ""
    for prefix, suffix, slashes, method, name in _PATTERNS:
        if path.startswith(prefix) and path.endswith(suffix) and len(path) > len(prefix + suffix):
            parameter = path[len(prefix) : len(path) - len(suffix)]
            if parameter.count("/") == slashes and all(parameter.split("/")):
                return method, name, parameter
    return None


@dataclass(frozen=True, slots=True)
class _Call:
    """One request reaching an endpoint handler."""

    seen: SeenRequest
    mode: FakeMode
    parameter: str
    receive: Receive
    send: Send


class FakeOpenRouter:
    """ASGI 3 application imitating OpenRouter under ``/api``.

    Attributes read by tests (from any thread): ``requests`` (the last 1000
    ``SeenRequest``), ``open_streams``, ``completed_streams``,
    ``disconnected_streams`` and ``generations`` (id -> ``GenerationStats``);
    ``charged_total()`` sums what every generation cost.

    ``generation_delay``: seconds during which ``/v1/generation`` still answers
    404 after a generation ended (OpenRouter lags by about that much).
    ``bill_cancelled``: what a stream the client leaves is billed for:
    ``"delivered"`` (the pieces it received) or ``"full"`` (the whole answer,
    as providers that finish the generation anyway charge).
    """

    def __init__(
        self,
        generation_delay: float = 1.0,
        api_key: str | None = None,
        default_mode: str = "",
        bill_cancelled: BillCancelled = "delivered",
    ) -> None:
        if bill_cancelled not in ("delivered", "full"):
            raise ValueError(f"bill_cancelled must be 'delivered' or 'full': {bill_cancelled!r}")
        if generation_delay < 0:
            raise ValueError("generation_delay must not be negative")
        self.generation_delay = generation_delay
        self.api_key = api_key
        self.default_mode = default_mode
        self.bill_cancelled: BillCancelled = bill_cancelled
        parse_mode(default_mode)  # fail early on a bad default
        self.requests: deque[SeenRequest] = deque(maxlen=1000)
        self.open_streams = 0
        self.completed_streams = 0
        self.disconnected_streams = 0
        self.generations: dict[str, GenerationStats] = {}
        self._handlers: dict[str, Callable[[_Call], Awaitable[None]]] = {
            "chat": self._chat,
            "completions": self._legacy_completions,
            "responses": self._responses,
            "messages": self._messages,
            "count_tokens": self._count_tokens,
            "embeddings": self._embeddings,
            "rerank": self._rerank,
            "images": self._images,
            "transcriptions": self._transcriptions,
            "speech": self._speech,
            "generation": self._generation,
            "models": self._static("models"),
            "models_user": self._static("models"),
            "models_count": self._static("count"),
            "embedding_models": self._static("embeddings"),
            "image_models": self._static("images"),
            "video_models": self._static("videos"),
            "providers": self._static("providers"),
            "zdr": self._static("zdr"),
            "model_endpoints": self._model_endpoints,
            "model": self._model,
            "key": self._key,
            "keys": self._keys,
            "credits": self._credits,
            "activity": self._activity,
            "generation_content": self._generation_content,
            "files": self._files,
            "file": self._file,
            "presets": self._presets,
            "auth_keys": self._auth_keys,
            "auth_code": self._auth_code,
        }
        _install_log_filter()

    def charged_total(self, api_type: str | None = None) -> Decimal:
        """The sum of ``GenerationStats.charged`` over the generations (of one ``api_type``)."""
        return sum(
            (
                stats.charged
                for stats in list(self.generations.values())
                if api_type is None or stats.api_type == api_type
            ),
            Decimal(0),
        )

    # ------------------------------------------------------------------ dispatch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            return
        body = await _read_body(receive)
        headers = [
            (name.decode("latin-1").lower(), value.decode("latin-1"))
            for name, value in scope["headers"]
        ]
        raw_path: bytes | None = scope.get("raw_path")
        path: str = scope["path"]
        method: str = scope["method"]
        seen = SeenRequest(
            method=method,
            path=raw_path.decode("latin-1") if raw_path else path,
            query=scope.get("query_string", b"").decode("latin-1"),
            headers=headers,
            body=body,
        )
        self.requests.append(seen)

        if path.startswith("/api/echo/"):
            await self._echo(seen, send)
            return
        route = _route(path)
        if route is None:
            await _send_json(send, 404, _error_body(404, "Not Found"))
            return
        expected_method, handler, parameter = route
        if method != expected_method:
            await _send_json(send, 405, _error_body(405, "Method Not Allowed"))
            return

        authorization = mode_text = api_key = None
        for name, value in headers:
            if name == "authorization":
                authorization = value
            elif name == "x-fake-mode":
                mode_text = value
            elif name == "x-api-key":
                api_key = value
        if authorization is None and api_key is not None and path in _X_API_KEY_PATHS:
            authorization = f"Bearer {api_key}"
        if path not in _NO_AUTH_PATHS and not self._authorized(authorization):
            message = "No auth credentials found" if authorization is None else "User not found."
            await _send_json(send, 401, _error_body(401, message))
            return
        try:
            mode = parse_mode(self.default_mode if mode_text is None else mode_text)
        except ValueError as exc:
            await _send_json(send, 400, _error_body(400, str(exc)))
            return
        if mode.status is not None:
            await self._fake_error(mode, send)
            return
        await self._handlers[handler](_Call(seen, mode, parameter, receive, send))

    def _authorized(self, authorization: str | None) -> bool:
        if authorization is None:
            return False
        if self.api_key is not None:
            return authorization == f"Bearer {self.api_key}"
        scheme, _, token = authorization.partition(" ")
        return scheme.lower() == "bearer" and bool(token.strip())

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    # ------------------------------------------------------------------ simple routes

    async def _fake_error(self, mode: FakeMode, send: Send) -> None:
        assert mode.status is not None
        extra: Headers = [(b"retry-after", b"1")] if mode.status == 429 else []
        if mode.set_cookie:
            extra.append((b"set-cookie", b"upstream=secret"))
        if mode.first_byte_delay:
            await asyncio.sleep(mode.first_byte_delay)
        body = _error_body(mode.status, f"Fake error {mode.status}", metadata=True)
        await _send_json(send, mode.status, body, extra)

    async def _echo(self, seen: SeenRequest, send: Send) -> None:
        body = _dumps(
            {
                "method": seen.method,
                "path": seen.path,
                "query": seen.query,
                "headers": [list(pair) for pair in seen.headers],
                "body": seen.body.decode("latin-1"),
            }
        ).encode()
        extra: Headers = [
            (b"set-cookie", b"fake=1"),
            (b"connection", b"keep-alive, X-Hop"),
            (b"x-hop", b"1"),
            (b"keep-alive", b"timeout=5"),
            (b"x-upstream", b"echo"),
        ]
        await _send_json(send, 200, body, extra)

    def _static(self, name: str) -> Callable[[_Call], Awaitable[None]]:
        async def answer(call: _Call) -> None:
            await _send_json(call.send, 200, _catalogue_bodies()[name])

        return answer

    async def _model_endpoints(self, call: _Call) -> None:
        entry = _MODELS_BY_ID.get(call.parameter)
        if entry is None:
            await _send_json(call.send, 404, _error_body(404, "Model not found"))
            return
        data = {
            "id": entry.id,
            "name": entry.name,
            "created": _CREATED,
            "description": f"{entry.name}, served by the fake OpenRouter.",
            "architecture": _modalities(entry),
            "endpoints": [_endpoint_entry(entry)],
        }
        await _send_json(call.send, 200, _encode({"data": data}).encode())

    async def _model(self, call: _Call) -> None:
        entry = _MODELS_BY_ID.get(call.parameter)
        if entry is None:
            await _send_json(call.send, 404, _error_body(404, "Model not found"))
            return
        await _send_json(call.send, 200, _encode({"data": _model_entry(entry)}).encode())

    def _spent(self) -> tuple[Decimal, Decimal]:
        """OpenRouter's charges and the BYOK provider prices, over every generation."""
        usage = byok = Decimal(0)
        for stats in list(self.generations.values()):
            usage += stats.total_cost
            if stats.is_byok and stats.upstream_inference_cost is not None:
                byok += stats.upstream_inference_cost
        return usage, byok

    async def _key(self, call: _Call) -> None:
        usage, byok = self._spent()
        data = {
            "label": "fake",
            "usage": usage,
            "limit": None,
            "is_free_tier": False,
            "limit_remaining": None,
            "limit_reset": None,
            "include_byok_in_limit": False,
            "usage_daily": usage,
            "usage_weekly": usage,
            "usage_monthly": usage,
            "byok_usage": byok,
            "byok_usage_daily": byok,
            "byok_usage_weekly": byok,
            "byok_usage_monthly": byok,
            "is_management_key": False,
            "is_provisioning_key": False,
            "expires_at": None,
            "creator_user_id": "user_fake",
        }
        await _send_json(call.send, 200, _encode({"data": data}).encode())

    async def _keys(self, call: _Call) -> None:
        usage, byok = self._spent()
        key = {
            "hash": "f01d52606dc8f0a8303a7b5cc3fa07109c2e346cec7c0a16b40de462992ce943",
            "name": "fake",
            "label": "sk-or-v1-fak...key",
            "disabled": False,
            "limit": None,
            "limit_remaining": None,
            "limit_reset": None,
            "include_byok_in_limit": False,
            "usage": usage,
            "usage_daily": usage,
            "usage_weekly": usage,
            "usage_monthly": usage,
            "byok_usage": byok,
            "byok_usage_daily": byok,
            "byok_usage_weekly": byok,
            "byok_usage_monthly": byok,
            "created_at": "2026-01-01T00:00:00Z",
            "updated_at": None,
            "expires_at": None,
            "creator_user_id": "user_fake",
            "workspace_id": "750e8400-e29b-41d4-a716-446655440002",
        }
        await _send_json(call.send, 200, _encode({"data": [key]}).encode())

    async def _credits(self, call: _Call) -> None:
        usage, _ = self._spent()
        data = {"total_credits": CREDITS, "total_usage": usage}
        await _send_json(call.send, 200, _encode({"data": data}).encode())

    async def _activity(self, call: _Call) -> None:
        """Today's usage by model, from the generations."""
        rows: dict[str, dict[str, Any]] = {}
        today = datetime.now(UTC).date().isoformat()
        for stats in list(self.generations.values()):
            row = rows.setdefault(
                stats.model,
                {
                    "date": today,
                    "model": stats.model,
                    "model_permaslug": stats.model,
                    "endpoint_id": "550e8400-e29b-41d4-a716-446655440000",
                    "provider_name": PROVIDER,
                    "usage": Decimal(0),
                    "byok_usage_inference": Decimal(0),
                    "requests": 0,
                    "prompt_tokens": 0,
                    "completion_tokens": 0,
                    "reasoning_tokens": 0,
                },
            )
            row["usage"] += stats.total_cost
            if stats.is_byok and stats.upstream_inference_cost is not None:
                row["byok_usage_inference"] += stats.upstream_inference_cost
            row["requests"] += 1
            row["prompt_tokens"] += stats.tokens_prompt
            row["completion_tokens"] += stats.tokens_completion
            row["reasoning_tokens"] += stats.tokens_reasoning
        await _send_json(call.send, 200, _encode({"data": list(rows.values())}).encode())

    async def _generation_content(self, call: _Call) -> None:
        stats = self._finished_generation(call.seen.query)
        if isinstance(stats, tuple):
            await _send_json(call.send, *stats)
            return
        data = {
            "input": {"messages": []},
            "output": {"completion": ANSWER_TEXT, "reasoning": None},
            "error": None,
        }
        await _send_json(call.send, 200, _encode({"data": data}).encode())

    async def _files(self, call: _Call) -> None:
        listing = {
            "data": [_FILE],
            "has_more": False,
            "first_id": _FILE["id"],
            "last_id": _FILE["id"],
            "cursor": None,
        }
        await _send_json(call.send, 200, _encode(listing).encode())

    async def _file(self, call: _Call) -> None:
        if call.parameter != _FILE["id"]:
            await _send_json(call.send, 404, _error_body(404, "File not found"))
            return
        await _send_json(call.send, 200, _encode(_FILE).encode())

    async def _presets(self, call: _Call) -> None:
        await _send_json(call.send, 200, _encode({"data": [_PRESET], "total_count": 1}).encode())

    async def _auth_keys(self, call: _Call) -> None:
        payload = _json_object(call.seen.body)
        if payload is None or not isinstance(payload.get("code"), str) or not payload["code"]:
            await _send_json(call.send, 400, _error_body(400, "code is required"))
            return
        key = "sk-or-v1-" + "".join(_random.choices("0123456789abcdef", k=64))
        await _send_json(call.send, 200, _encode({"key": key, "user_id": "user_fake"}).encode())

    async def _auth_code(self, call: _Call) -> None:
        payload = _json_object(call.seen.body)
        if payload is None or not isinstance(payload.get("callback_url"), str):
            await _send_json(call.send, 400, _error_body(400, "callback_url is required"))
            return
        data = {"id": f"auth_code_{_random_id(12)}", "app_id": 1, "created_at": _iso(time.time())}
        await _send_json(call.send, 200, _encode({"data": data}).encode())

    def _finished_generation(self, query: str) -> GenerationStats | tuple[int, bytes]:
        """The generation named by ``?id=`` once it may be reported, else (status, error body)."""
        ids = parse_qs(query).get("id")
        if not ids:
            return 400, _error_body(400, "id is required")
        stats = self.generations.get(ids[0])
        if stats is None or time.monotonic() - stats.finished_at < self.generation_delay:
            return 404, _error_body(404, "Generation not found")
        return stats

    async def _generation(self, call: _Call) -> None:
        stats = self._finished_generation(call.seen.query)
        if isinstance(stats, tuple):
            await _send_json(call.send, *stats)
            return
        data = {
            "id": stats.id,
            "model": stats.model,
            "total_cost": stats.total_cost,
            "usage": stats.total_cost,
            "upstream_inference_cost": stats.upstream_inference_cost,
            "cache_discount": None,
            "tokens_prompt": stats.tokens_prompt,
            "tokens_completion": stats.tokens_completion,
            "native_tokens_prompt": stats.tokens_prompt,
            "native_tokens_completion": stats.tokens_completion,
            "native_tokens_reasoning": stats.tokens_reasoning,
            "native_tokens_cached": stats.tokens_cached,
            "cancelled": stats.cancelled,
            "streamed": stats.streamed,
            "finish_reason": stats.finish_reason,
            "native_finish_reason": stats.finish_reason,
            "is_byok": stats.is_byok,
            "api_type": stats.api_type,
            "created_at": _iso(stats.created_at),
            "provider_name": PROVIDER,
        }
        await _send_json(call.send, 200, _encode({"data": data}).encode())

    # ------------------------------------------------------------------ recording

    def _store(
        self,
        gen_id: str,
        served: str,
        created: int,
        mode: FakeMode,
        usage: Usage,
        *,
        cancelled: bool,
        streamed: bool,
        api_type: str = "completions",
        finish_reason: str = "stop",
    ) -> None:
        generations = self.generations
        generations[gen_id] = GenerationStats(
            id=gen_id,
            model=served,
            total_cost=(
                Decimal(0) if mode.zero_cost else byok_fee(usage.cost) if mode.byok else usage.cost
            ),
            tokens_prompt=usage.prompt_tokens,
            tokens_completion=usage.completion_tokens,
            tokens_reasoning=usage.reasoning_tokens,
            tokens_cached=usage.cached_tokens,
            cancelled=cancelled,
            streamed=streamed,
            created_at=float(created),
            finished_at=time.monotonic(),
            is_byok=mode.byok,
            upstream_inference_cost=Decimal(0) if mode.zero_cost else usage.cost,
            api_type=api_type,
            finish_reason=None if cancelled else finish_reason,
        )
        while len(generations) > MAX_GENERATIONS:
            del generations[next(iter(generations))]

    def _record(self, job: _Job, chunks_sent: int, *, cancelled: bool, streamed: bool) -> None:
        self._store(
            job.gen_id,
            job.served,
            job.created,
            job.mode,
            job.usage(chunks_sent),
            cancelled=cancelled,
            streamed=streamed,
            finish_reason=job.finish,
        )

    # ------------------------------------------------------------------ text generations

    def _text_job(self, call: _Call, payload: dict[str, Any], chat: bool = True) -> _Job:
        served, model = resolve_model(payload["model"])
        return _Job(
            chat=chat,
            gen_id=_new_generation_id(),
            created=int(time.time()),
            served=served,
            model=model,
            prompt_tokens=max(1, len(call.seen.body) // 4),
            mode=call.mode,
        )

    async def _chat(self, call: _Call) -> None:
        await self._completion(True, call)

    async def _legacy_completions(self, call: _Call) -> None:
        await self._completion(False, call)

    async def _completion(self, chat: bool, call: _Call) -> None:
        payload = await self._payload(call, "messages" if chat else "prompt")
        if payload is None:
            return
        job = self._text_job(call, payload, chat)
        pieces = _padded(answer_chunks(job.mode.chunks), job.mode.pad)
        if payload.get("stream") is True:
            await self._stream_text(job, job.plan(pieces), len(pieces), call)
        else:
            await self._send_text(job, job.document(pieces), len(pieces), call)

    async def _responses(self, call: _Call) -> None:
        payload = await self._payload(call, "input")
        if payload is None:
            return
        if payload.get("store") is True or payload.get("previous_response_id"):
            message = "Only stateless requests are supported: store and previous_response_id"
            await _send_json(call.send, 400, _error_body(400, message))
            return
        job = self._text_job(call, payload)
        responses = _ResponsesJob(job, f"msg_{_random_id(24)}", payload)
        pieces = _padded(answer_chunks(job.mode.chunks), job.mode.pad)
        if payload.get("stream") is True:
            await self._stream_text(job, responses.plan(pieces), len(pieces), call)
        else:
            await self._send_text(job, responses.document(pieces), len(pieces), call)

    async def _messages(self, call: _Call) -> None:
        payload = await self._payload(call, "messages")
        if payload is None:
            return
        job = self._text_job(call, payload)
        messages = _MessagesJob(job, f"msg_{_random_id(24)}")
        pieces = _padded(answer_chunks(job.mode.chunks), job.mode.pad)
        if payload.get("stream") is True:
            await self._stream_text(job, messages.plan(pieces), len(pieces), call)
        else:
            await self._send_text(job, messages.document(pieces), len(pieces), call)

    async def _count_tokens(self, call: _Call) -> None:
        """Anthropic's token count: free, no generation."""
        payload = await self._payload(call, "messages")
        if payload is None:
            return
        tokens = max(1, len(call.seen.body) // 4)
        await _send_json(call.send, 200, _encode({"input_tokens": tokens}).encode())

    async def _payload(self, call: _Call, *required: str) -> dict[str, Any] | None:
        """The JSON body with a ``model`` and the ``required`` members, or None after a 400."""
        payload = _json_object(call.seen.body)
        problem = None
        if payload is None:
            problem = "Invalid JSON body" if not _is_json(call.seen.body) else None
            problem = problem or "Body must be a JSON object"
        elif not isinstance(payload.get("model"), str) or not payload["model"]:
            problem = "model is required"
        else:
            for name in required:
                value = payload.get(name)
                if name in ("messages", "documents"):
                    valid = isinstance(value, list)
                else:
                    valid = isinstance(value, str | list)
                if not valid or (name in ("input", "documents") and not value):
                    problem = f"{name} is required"
                    break
        if problem is not None:
            await _send_json(call.send, 400, _error_body(400, problem))
            return None
        return payload

    async def _send_text(self, job: _Job, document: str, pieces: int, call: _Call) -> None:
        def record(sent: int, cancelled: bool) -> None:
            self._record(job, sent, cancelled=cancelled, streamed=False)

        headers = self._headers(job.gen_id, job.mode, b"application/json")
        await self._send_document(job.mode, headers, document, pieces, record, call.send)

    async def _stream_text(self, job: _Job, plan: _Plan, pieces: int, call: _Call) -> None:
        def record(sent: int, cancelled: bool) -> None:
            self._record(job, sent, cancelled=cancelled, streamed=True)

        if job.mode.keepalive_between:
            plan.interleave_keepalives(job.mode)
        headers = self._headers(job.gen_id, job.mode, b"text/event-stream")
        headers.append((b"cache-control", b"no-cache"))
        await self._stream(job.mode, headers, plan, pieces, record, call)

    # ------------------------------------------------------------------ other generations

    async def _embeddings(self, call: _Call) -> None:
        payload = await self._payload(call, "input")
        if payload is None:
            return
        mode = call.mode
        raw = payload["input"]
        # One string, or one list of token ids, is a single input.
        single = isinstance(raw, str) or not isinstance(raw[0], str | dict | list)
        inputs = [raw] if single else raw
        dimensions = payload.get("dimensions")
        if not isinstance(dimensions, int) or not 1 <= dimensions <= 4096:
            dimensions = 8
        base64_format = payload.get("encoding_format") == "base64"
        served, model = resolve_model(payload["model"])
        gen_id = _new_generation_id()
        data = []
        tokens = 0
        for index, item in enumerate(inputs):
            text = _as_text(item)
            tokens += max(1, len(text) // 4)
            vector = _unit_vector(text, dimensions)
            embedding: Any = vector
            if base64_format:
                embedding = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        usage = Usage(tokens, 0, 0, 0, tokens * model.prompt)
        body: dict[str, Any] = {
            "id": gen_id,
            "object": "list",
            "data": data,
            "model": served,
            "provider": PROVIDER,
        }
        if not mode.no_usage:
            body["usage"] = {
                "prompt_tokens": tokens,
                "total_tokens": tokens,
                **_cost_members(
                    mode,
                    usage.cost,
                    {
                        "upstream_inference_prompt_cost": usage.cost,
                        "upstream_inference_completions_cost": Decimal(0),
                    },
                ),
            }
        await self._send_other(call, gen_id, served, usage, "embeddings", _encode(body))

    async def _rerank(self, call: _Call) -> None:
        payload = await self._payload(call, "documents")
        if payload is None:
            return
        query = payload.get("query")
        if not isinstance(query, str) or not query:
            await _send_json(call.send, 400, _error_body(400, "query is required"))
            return
        mode = call.mode
        documents = payload["documents"]
        served, model = resolve_model(payload["model"])
        gen_id = _new_generation_id()
        ranked: list[tuple[float, int, Any]] = []
        for index, document in enumerate(documents):
            echoed = document if isinstance(document, dict) else {"text": _as_text(document)}
            score = _rerank_score(query, _as_text(echoed.get("text", "")))
            ranked.append((-score, index, echoed))
        ranked.sort(key=lambda entry: entry[:2])
        results = [
            {"index": index, "relevance_score": -score, "document": echoed}
            for score, index, echoed in ranked
        ]
        top_n = payload.get("top_n")
        if isinstance(top_n, int) and top_n >= 1:
            results = results[:top_n]
        search_units = max(1, -(-len(documents) // 100))
        tokens = max(1, len(call.seen.body) // 4)
        cost = search_units * model.request + tokens * model.prompt
        usage = Usage(tokens, 0, 0, 0, cost)
        body: dict[str, Any] = {
            "id": gen_id,
            "model": served,
            "provider": PROVIDER,
            "results": results,
        }
        if not mode.no_usage:
            members = _cost_members(mode, cost)
            body["usage"] = {"search_units": search_units, "total_tokens": tokens}
            if "cost" in members:
                body["usage"]["cost"] = members["cost"]
        await self._send_other(call, gen_id, served, usage, "rerank", _encode(body))

    async def _images(self, call: _Call) -> None:
        payload = await self._payload(call, "prompt")
        if payload is None:
            return
        mode = call.mode
        count = payload.get("n")
        count = count if isinstance(count, int) and 1 <= count <= 10 else 1
        served, model = resolve_model(payload["model"])
        gen_id = _new_generation_id()
        created = int(time.time())
        prompt_tokens = max(1, len(payload["prompt"]) // 4)

        def meter(images: int) -> Usage:
            completion = IMAGE_TOKENS * images
            cost = prompt_tokens * model.prompt + completion * model.completion
            return Usage(prompt_tokens, completion, 0, 0, cost)

        def usage_member(images: int) -> dict[str, Any]:
            usage = meter(images)
            return {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.prompt_tokens + usage.completion_tokens,
                "completion_tokens_details": {"image_tokens": usage.completion_tokens},
                **_cost_members(mode, usage.cost),
            }

        if payload.get("stream") is not True:
            body: dict[str, Any] = {
                "created": created,
                "data": [{"b64_json": PNG_B64, "media_type": "image/png"}] * count,
            }
            if not mode.no_usage:
                body["usage"] = usage_member(count)
            await self._send_other(
                call, gen_id, served, meter(count), "image", _encode(body), created
            )
            return

        partials = mode.chunks
        plan = _start_plan(mode)
        for index in range(partials):
            partial = {
                "type": "image_generation.partial_image",
                "partial_image_index": index,
                "b64_json": PNG_B64,
            }
            plan.add(_sse(mode, _encode(partial)), 0)
        if not mode.cut:
            if mode.midstream_error:
                error = {
                    "type": "error",
                    "error": {
                        "code": "server_error",
                        "message": "Provider disconnected unexpectedly",
                        "param": None,
                        "type": "provider_error",
                    },
                }
                plan.add(_sse(mode, _encode(error)), 0)
            else:
                if mode.malformed:
                    plan.add(_sse(mode, "{not json"), 0)
                for image in range(count):
                    completed: dict[str, Any] = {
                        "type": "image_generation.completed",
                        "b64_json": PNG_B64,
                        "created": created,
                        "media_type": "image/png",
                    }
                    if image == count - 1 and not mode.no_usage:
                        completed["usage"] = usage_member(count)
                    plan.add(_sse(mode, _encode(completed)), image + 1)
                plan.add(_sse(mode, "[DONE]"), count)
        if mode.keepalive_between:
            plan.interleave_keepalives(mode)

        def record(images: int, cancelled: bool) -> None:
            usage = meter(images)
            self._store(
                gen_id,
                served,
                created,
                mode,
                usage,
                cancelled=cancelled,
                streamed=True,
                api_type="image",
            )

        headers = self._headers(gen_id, mode, b"text/event-stream")
        headers.append((b"cache-control", b"no-cache"))
        await self._stream(mode, headers, plan, count, record, call)

    async def _transcriptions(self, call: _Call) -> None:
        seen, mode = call.seen, call.mode
        content_type = seen.header("content-type") or ""
        audio: bytes | None = None
        model_name: str | None = None
        if content_type.lower().startswith("multipart/form-data"):
            fields = _multipart(content_type, seen.body)
            if "file" in fields:
                audio = fields["file"][1]
            if "model" in fields:
                model_name = fields["model"][1].decode("utf-8", "replace")
        else:
            payload = _json_object(seen.body)
            if payload is not None:
                model = payload.get("model")
                model_name = model if isinstance(model, str) else None
                source = payload.get("input_audio")
                if isinstance(source, dict) and isinstance(source.get("data"), str):
                    with contextlib.suppress(ValueError):
                        audio = base64.b64decode(source["data"], validate=True)
        if not model_name:
            await _send_json(call.send, 400, _error_body(400, "model is required"))
            return
        if not audio:
            await _send_json(call.send, 400, _error_body(400, "audio input is required"))
            return
        served, model_entry = resolve_model(model_name)
        gen_id = _new_generation_id()
        # 16 kHz, 16-bit mono: 32,000 bytes a second, 10 tokens a second.
        seconds = Decimal(len(audio)) / 32_000
        input_tokens = max(1, len(audio) // 3_200)
        pieces = answer_chunks(mode.chunks)
        output_tokens = 2 * len(pieces)
        cost = input_tokens * model_entry.prompt + output_tokens * model_entry.completion
        usage = Usage(input_tokens, output_tokens, 0, 0, cost)
        body: dict[str, Any] = {"text": "".join(pieces)}
        if not mode.no_usage:
            members = _cost_members(mode, cost)
            body["usage"] = {
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
                "seconds": _Raw(_plain(seconds)),
                **members,
            }
        await self._send_other(call, gen_id, served, usage, "stt", _encode(body))

    async def _speech(self, call: _Call) -> None:
        """Raw audio bytes, streamed piece by piece; the cost is only in /generation."""
        payload = await self._payload(call, "input")
        if payload is None:
            return
        mode = call.mode
        served, model = resolve_model(payload["model"])
        gen_id = _new_generation_id()
        created = int(time.time())
        prompt_tokens = (
            max(1, len(payload["input"]) // 4) if isinstance(payload["input"], str) else 1
        )
        mp3 = payload.get("response_format") == "mp3"
        chunk = _MP3_FRAME if mp3 else _PCM_CHUNK
        count = mode.chunks
        sent = count // 2 if mode.cut else count
        plan = _Plan([chunk] * sent, list(range(1, sent + 1)))

        def record(pieces: int, cancelled: bool) -> None:
            completion = 2 * pieces
            cost = prompt_tokens * model.prompt + completion * model.completion
            usage = Usage(prompt_tokens, completion, 0, 0, cost)
            self._store(
                gen_id,
                served,
                created,
                mode,
                usage,
                cancelled=cancelled,
                streamed=True,
                api_type="tts",
            )

        headers = self._headers(
            gen_id, mode, b"audio/mpeg" if mp3 else b"audio/pcm", compressed=False
        )
        await self._stream(mode, headers, plan, count, record, call, compress=False)

    async def _send_other(
        self,
        call: _Call,
        gen_id: str,
        served: str,
        usage: Usage,
        api_type: str,
        document: str,
        created: int | None = None,
    ) -> None:
        """A JSON answer whose usage does not depend on how much the client read."""
        mode = call.mode
        started = int(time.time()) if created is None else created

        def record(sent: int, cancelled: bool) -> None:
            self._store(
                gen_id,
                served,
                started,
                mode,
                usage,
                cancelled=cancelled,
                streamed=False,
                api_type=api_type,
            )

        headers = self._headers(gen_id, mode, b"application/json")
        await self._send_document(mode, headers, document, 1, record, call.send)

    # ------------------------------------------------------------------ transports

    @staticmethod
    def _headers(
        gen_id: str, mode: FakeMode, content_type: bytes, compressed: bool = True
    ) -> Headers:
        headers: Headers = [
            (b"content-type", content_type),
            (b"x-generation-id", gen_id.encode()),
        ]
        if mode.gzip and compressed:
            headers.append((b"content-encoding", b"gzip"))
        if mode.set_cookie:
            headers.append((b"set-cookie", b"upstream=secret"))
        return headers

    async def _send_document(
        self,
        mode: FakeMode,
        headers: Headers,
        document: str,
        pieces: int,
        record: Callable[[int, bool], None],
        send: Send,
    ) -> None:
        """A JSON body after its whitespace padding (gzipped, cut or dribbled as asked).

        A non-streamed generation runs to its end whatever the client does, so
        it is always billed in full.
        """
        padding = ("\r\n" if mode.crlf else "\n") * mode.keepalive
        payload = (padding + document).encode()
        if mode.gzip:
            payload = gzip.compress(payload, compresslevel=6, mtime=0)
        if mode.first_byte_delay and not mode.headers_first:
            await asyncio.sleep(mode.first_byte_delay)
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if mode.cut:
            half = payload[: len(payload) // 2]
            await send({"type": "http.response.body", "body": half, "more_body": True})
            record(pieces, True)
            _DELIBERATE_CUT.set(True)
            return
        dribble = bool(padding) and not mode.gzip
        if mode.headers_first:
            if not dribble:
                await asyncio.sleep(mode.first_byte_delay + mode.chunk_delay)
            else:
                # The padding spread over the wait, one line at a time.
                pause = mode.first_byte_delay / mode.keepalive + mode.chunk_delay
                width = len(padding) // mode.keepalive
                for _ in range(mode.keepalive):
                    line, payload = payload[:width], payload[width:]
                    await send({"type": "http.response.body", "body": line, "more_body": True})
                    await asyncio.sleep(pause)
        elif mode.chunk_delay and dribble:
            # Dribble the padding out, as OpenRouter does while it generates.
            width = len(padding) // mode.keepalive
            for _ in range(mode.keepalive):
                line, payload = payload[:width], payload[width:]
                await send({"type": "http.response.body", "body": line, "more_body": True})
                await asyncio.sleep(mode.chunk_delay)
        await send({"type": "http.response.body", "body": payload, "more_body": False})
        record(pieces, False)

    async def _stream(
        self,
        mode: FakeMode,
        headers: Headers,
        plan: _Plan,
        pieces: int,
        record: Callable[[int, bool], None],
        call: _Call,
        compress: bool = True,
    ) -> None:
        """Write the planned events one by one, noticing a client that leaves.

        ``record(pieces, cancelled)`` is called once at the end with the pieces
        to bill: those delivered, or all of them if the client left and the
        fake bills cancelled streams in full.
        """
        send = call.send
        events, progress = plan.events, plan.progress
        compressor = zlib.compressobj(6, zlib.DEFLATED, 31) if mode.gzip and compress else None
        watcher = asyncio.create_task(_watch_disconnect(call.receive))
        self.open_streams += 1
        delivered = 0
        try:
            if mode.headers_first:
                await send({"type": "http.response.start", "status": 200, "headers": headers})
            if mode.first_byte_delay and await _sleep_unless_gone(watcher, mode.first_byte_delay):
                return
            if not mode.headers_first:
                await send({"type": "http.response.start", "status": 200, "headers": headers})
            last = len(events) - 1
            # Paced against the clock, as a model generates: a chunk that went out
            # late (this process was busy) does not push back the ones after it.
            clock = asyncio.get_running_loop().time
            started = clock()
            for index, event in enumerate(events):
                due = started + index * mode.chunk_delay
                if index and mode.chunk_delay and await _sleep_unless_gone(watcher, due - clock()):
                    return
                if watcher.done():
                    return
                final = index == last and not mode.cut
                data = event.encode() if isinstance(event, str) else event
                if compressor is not None:
                    data = compressor.compress(data)
                    data += compressor.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)
                await send({"type": "http.response.body", "body": data, "more_body": not final})
                if not final and watcher.done():
                    return
                delivered += 1
                if index % 16 == 15:
                    # Once the client is gone uvicorn's send() returns without
                    # suspending, so without a pause now and then a stream with
                    # no chunk delay would never let the disconnect watcher run
                    # and would "generate" to its end for nobody.
                    await asyncio.sleep(0)
            if not events:
                await send({"type": "http.response.body", "body": b"", "more_body": mode.cut})
            if mode.cut:
                # Returning without the last body message makes uvicorn close the
                # connection with no chunked terminator: the client sees a
                # truncated response, as when a real connection dies.
                _DELIBERATE_CUT.set(True)
        finally:
            watcher.cancel()
            self.open_streams -= 1
            complete = delivered == len(events) and not mode.cut
            if complete:
                self.completed_streams += 1
            elif not mode.cut or delivered < len(events):
                self.disconnected_streams += 1
            billed = progress[delivered - 1] if delivered else 0
            if not complete and self.bill_cancelled == "full":
                billed = pieces
            record(billed, not complete)


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


async def _send_json(
    send: Send, status: int, body: bytes, extra: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    headers: Headers = [_JSON, (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# --------------------------------------------------------------------------- thread runner


@dataclass(frozen=True, slots=True)
class RunningFake:
    """A fake being served: its app (for assertions), base URL and port."""

    app: FakeOpenRouter
    base_url: str
    port: int


def base_url_for(host: str, port: int) -> str:
    return f"{url_for(host, port)}/api"


# Options of a fake's server: no proxy-header handling, and streams a test left
# open must not hold up its exit.
FAKE_SERVER_OPTIONS: dict[str, Any] = {
    "lifespan": "off",
    "proxy_headers": False,
    "timeout_graceful_shutdown": 1,
    # OpenRouter's edge keeps an idle connection far longer than uvicorn's 5 s.
    # With 5 s, a busy fake could close a kept connection just as the next
    # request arrived on it: 502s that real traffic does not see.
    "timeout_keep_alive": 90,
}


@contextlib.contextmanager
def run_fake_openrouter(
    app: FakeOpenRouter | None = None, host: str = "127.0.0.1", port: int = 0
) -> Iterator[RunningFake]:
    """Serve ``app`` with uvicorn in a daemon thread for the duration of the block."""
    app = app if app is not None else FakeOpenRouter()
    with serve_in_thread(app, host=host, port=port, **FAKE_SERVER_OPTIONS) as url:
        actual_port = int(urlsplit(url).port or 0)
        yield RunningFake(app=app, base_url=f"{url}/api", port=actual_port)
