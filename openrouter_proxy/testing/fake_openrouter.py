"""A fake OpenRouter that speaks real HTTP on loopback.

The proxy's tests, the offline demo and the benchmark all need an upstream that
behaves like OpenRouter on the wire (whitespace padding before JSON bodies,
``: OPENROUTER PROCESSING`` keep-alives, a separate usage chunk, exact decimal
costs, mid-stream errors, a generation endpoint that lags behind, connections
that die half-way) without leaving the machine. Mocking the HTTP client would
hide exactly the bugs that matter (framing, streaming, disconnects), so this is
a plain ASGI 3 application served by uvicorn on 127.0.0.1.

It is deterministic (token counts derive from the request size, the answer text
is fixed) and cheap per request, because it is also the upstream of the
benchmark. Behaviour is chosen per request with an ``X-Fake-Mode`` header; see
``FakeMode`` for the directives.

Use ``run_fake_openrouter()`` in tests (a uvicorn server in a daemon thread) or
``manage.py fake_openrouter`` for a standalone process.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gzip
import json
import logging
import random
import string
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qs, urlsplit

from openrouter_proxy.testing.servers import bind_socket, serve_in_thread, url_for

__all__ = [
    "ANSWER_TEXT",
    "MODELS",
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
    """One catalogue entry; prices are USD per token."""

    id: str
    name: str
    context_length: int
    prompt: Decimal
    completion: Decimal
    input_cache_read: Decimal
    input_cache_write: Decimal = Decimal(0)

    def pricing(self) -> dict[str, str]:
        return {
            "prompt": _plain(self.prompt),
            "completion": _plain(self.completion),
            "request": "0",
            "image": "0",
            "input_cache_read": _plain(self.input_cache_read),
            "input_cache_write": _plain(self.input_cache_write),
            "internal_reasoning": "0",
            "web_search": "0",
        }


def _model(
    model_id: str, name: str, context: int, prompt: str, completion: str, cache_read: str
) -> FakeModel:
    return FakeModel(
        id=model_id,
        name=name,
        context_length=context,
        prompt=_per_token(prompt),
        completion=_per_token(completion),
        input_cache_read=_per_token(cache_read),
    )


GROK = _model("x-ai/grok-code-fast-1", "xAI: Grok Code Fast 1", 256_000, "0.20", "1.50", "0.02")
MODELS: tuple[FakeModel, ...] = (
    GROK,
    # No cache discount is published for qwen3-coder: cached tokens cost the prompt price.
    _model("qwen/qwen3-coder", "Qwen: Qwen3 Coder 480B A35B", 262_144, "0.38", "1.53", "0.38"),
    _model("moonshotai/kimi-k2-0905", "MoonshotAI: Kimi K2 0905", 262_144, "0.60", "2.50", "0.15"),
    _model("z-ai/glm-4.6", "Z.AI: GLM 4.6", 202_752, "0.55", "2.15", "0.10"),
    _model("z-ai/glm-4.5-air:free", "Z.AI: GLM 4.5 Air (free)", 131_072, "0", "0", "0"),
)
_MODELS_BY_ID = {entry.id: entry for entry in MODELS}


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


def _new_generation_id() -> str:
    return f"gen-{int(time.time())}-{''.join(_random.choices(_ID_ALPHABET, k=20))}"


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
    back-pressure tests, that costs the same as without).
    """

    status: int | None = None
    chunks: int = 3
    keepalive: int = 1
    first_byte_delay: float = 0.0
    chunk_delay: float = 0.0
    midstream_error: bool = False
    midstream_error_usage: bool = False
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
    """What ``/v1/generation`` reports once a generation has ended."""

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


def usage_json(usage: Usage, mode: FakeMode) -> str:
    """The ``usage`` object as JSON text; money is written as exact number literals."""
    number = format_decimal_exp if mode.exp_cost else _plain
    if mode.byok:
        cost, upstream = "0", number(usage.cost)
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

    def document(self, pieces: Sequence[str]) -> str:
        """The non-streaming response body (without the padding)."""
        mode = self.mode
        text = _dumps("".join(pieces))
        finish = "error" if mode.midstream_error else "stop"
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
            document = _with_member(document, "error", _MIDSTREAM_ERROR)
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
            event = head.replace(',"choices":', f',"error":{_MIDSTREAM_ERROR},"choices":')
            event += finish.replace("%s", "error")
            if usage is not None and mode.midstream_error_usage:
                event = _with_member(event, "usage", usage)
            events.append(f"data: {event}{end}")
            return events
        if mode.malformed:
            events.append("data: {not json" + end)
        event = head + finish.replace("%s", "stop")
        if usage is not None and mode.usage_on_finish:
            event = _with_member(event, "usage", usage)
        events.append(f"data: {event}{end}")
        if usage is not None and not mode.usage_on_finish:
            events.append(f"data: {_with_member(head + '[]}', 'usage', usage)}{end}")
        events.append("data: [DONE]" + end)
        return events


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


async def _watch_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return


async def _sleep_unless_gone(gone: asyncio.Event, delay: float) -> bool:
    """Sleep ``delay`` seconds; True if the client went away meanwhile."""
    if gone.is_set():
        return True
    try:
        await asyncio.wait_for(gone.wait(), delay)
    except TimeoutError:
        return False
    return True


_JSON = (b"content-type", b"application/json")
_ROUTES = {
    "/api/v1/chat/completions": "POST",
    "/api/v1/completions": "POST",
    "/api/v1/models": "GET",
    "/api/v1/generation": "GET",
    "/api/v1/key": "GET",
}


class FakeOpenRouter:
    """ASGI 3 application imitating OpenRouter under ``/api``.

    Attributes read by tests (from any thread): ``requests`` (the last 1000
    ``SeenRequest``), ``open_streams``, ``completed_streams``,
    ``disconnected_streams`` and ``generations`` (id -> ``GenerationStats``).
    """

    def __init__(
        self, generation_delay: float = 1.0, api_key: str | None = None, default_mode: str = ""
    ) -> None:
        self.generation_delay = generation_delay
        self.api_key = api_key
        self.default_mode = default_mode
        parse_mode(default_mode)  # fail early on a bad default
        self.requests: deque[SeenRequest] = deque(maxlen=1000)
        self.open_streams = 0
        self.completed_streams = 0
        self.disconnected_streams = 0
        self.generations: dict[str, GenerationStats] = {}
        self._models_body = _dumps(
            {
                "data": [
                    {
                        "id": entry.id,
                        "canonical_slug": entry.id,
                        "name": entry.name,
                        "created": 1_750_000_000,
                        "context_length": entry.context_length,
                        "architecture": {
                            "modality": "text->text",
                            "input_modalities": ["text"],
                            "output_modalities": ["text"],
                        },
                        "pricing": entry.pricing(),
                    }
                    for entry in MODELS
                ]
            }
        ).encode()
        self._key_body = _dumps(
            {"data": {"label": "fake", "usage": 0, "limit": None, "is_free_tier": False}}
        ).encode()
        _install_log_filter()

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
        expected_method = _ROUTES.get(path)
        if expected_method is None:
            await _send_json(send, 404, _error_body(404, "Not Found"))
            return
        if method != expected_method:
            await _send_json(send, 405, _error_body(405, "Method Not Allowed"))
            return

        authorization = mode_text = None
        for name, value in headers:
            if name == "authorization":
                authorization = value
            elif name == "x-fake-mode":
                mode_text = value
        if not self._authorized(authorization):
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

        if path == "/api/v1/chat/completions":
            await self._completion(True, body, mode, receive, send)
        elif path == "/api/v1/completions":
            await self._completion(False, body, mode, receive, send)
        elif path == "/api/v1/models":
            await _send_json(send, 200, self._models_body)
        elif path == "/api/v1/generation":
            await self._generation(seen.query, send)
        else:
            await _send_json(send, 200, self._key_body)

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

    async def _generation(self, query: str, send: Send) -> None:
        ids = parse_qs(query).get("id")
        if not ids:
            await _send_json(send, 400, _error_body(400, "id is required"))
            return
        stats = self.generations.get(ids[0])
        if stats is None or time.monotonic() - stats.finished_at < self.generation_delay:
            await _send_json(send, 404, _error_body(404, "Generation not found"))
            return
        data = _dumps(
            {
                "id": stats.id,
                "model": stats.model,
                "total_cost": 0,
                "tokens_prompt": stats.tokens_prompt,
                "tokens_completion": stats.tokens_completion,
                "native_tokens_prompt": stats.tokens_prompt,
                "native_tokens_completion": stats.tokens_completion,
                "native_tokens_reasoning": stats.tokens_reasoning,
                "native_tokens_cached": stats.tokens_cached,
                "cancelled": stats.cancelled,
                "streamed": stats.streamed,
                "is_byok": stats.is_byok,
                "upstream_inference_cost": None,
                "created_at": datetime.fromtimestamp(stats.created_at, UTC).isoformat(),
                "provider_name": PROVIDER,
            }
        )
        data = data.replace('"total_cost":0', '"total_cost":' + _plain(stats.total_cost), 1)
        if stats.upstream_inference_cost is not None:
            data = data.replace(
                '"upstream_inference_cost":null',
                '"upstream_inference_cost":' + _plain(stats.upstream_inference_cost),
                1,
            )
        await _send_json(send, 200, ('{"data":' + data + "}").encode())

    # ------------------------------------------------------------------ completions

    def _record(self, job: _Job, chunks_sent: int, *, cancelled: bool, streamed: bool) -> None:
        mode = job.mode
        usage = job.usage(chunks_sent)
        generations = self.generations
        generations[job.gen_id] = GenerationStats(
            id=job.gen_id,
            model=job.served,
            total_cost=Decimal(0) if mode.byok or mode.zero_cost else usage.cost,
            tokens_prompt=usage.prompt_tokens,
            tokens_completion=usage.completion_tokens,
            tokens_reasoning=usage.reasoning_tokens,
            tokens_cached=usage.cached_tokens,
            cancelled=cancelled,
            streamed=streamed,
            created_at=float(job.created),
            finished_at=time.monotonic(),
            is_byok=mode.byok,
            upstream_inference_cost=Decimal(0) if mode.zero_cost else usage.cost,
        )
        while len(generations) > MAX_GENERATIONS:
            del generations[next(iter(generations))]

    async def _completion(
        self, chat: bool, body: bytes, mode: FakeMode, receive: Receive, send: Send
    ) -> None:
        try:
            payload = json.loads(body)
        except ValueError:
            await _send_json(send, 400, _error_body(400, "Invalid JSON body"))
            return
        problem = None
        if not isinstance(payload, dict):
            problem = "Body must be a JSON object"
        elif not isinstance(payload.get("model"), str) or not payload["model"]:
            problem = "model is required"
        elif chat and not isinstance(payload.get("messages"), list):
            problem = "messages is required"
        elif not chat and not isinstance(payload.get("prompt"), str | list):
            problem = "prompt is required"
        if problem is not None:
            await _send_json(send, 400, _error_body(400, problem))
            return
        served, model = resolve_model(payload["model"])
        job = _Job(
            chat=chat,
            gen_id=_new_generation_id(),
            created=int(time.time()),
            served=served,
            model=model,
            prompt_tokens=max(1, len(body) // 4),
            mode=mode,
        )
        if payload.get("stream") is True:
            await self._stream(job, receive, send)
        else:
            await self._json(job, send)

    @staticmethod
    def _headers(job: _Job, content_type: bytes) -> Headers:
        headers: Headers = [
            (b"content-type", content_type),
            (b"x-generation-id", job.gen_id.encode()),
        ]
        if job.mode.gzip:
            headers.append((b"content-encoding", b"gzip"))
        if job.mode.set_cookie:
            headers.append((b"set-cookie", b"upstream=secret"))
        return headers

    async def _json(self, job: _Job, send: Send) -> None:
        mode = job.mode
        pieces = _padded(answer_chunks(mode.chunks), mode.pad)
        padding = ("\r\n" if mode.crlf else "\n") * mode.keepalive
        payload = (padding + job.document(pieces)).encode()
        if mode.gzip:
            payload = gzip.compress(payload, compresslevel=6, mtime=0)
        if mode.first_byte_delay:
            await asyncio.sleep(mode.first_byte_delay)
        headers = self._headers(job, b"application/json")
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if mode.cut:
            half = payload[: len(payload) // 2]
            await send({"type": "http.response.body", "body": half, "more_body": True})
            self._record(job, len(pieces), cancelled=True, streamed=False)
            _DELIBERATE_CUT.set(True)
            return
        if mode.chunk_delay and padding and not mode.gzip:
            # Dribble the padding out, as OpenRouter does while it generates.
            width = len(padding) // mode.keepalive
            for _ in range(mode.keepalive):
                line, payload = payload[:width], payload[width:]
                await send({"type": "http.response.body", "body": line, "more_body": True})
                await asyncio.sleep(mode.chunk_delay)
        await send({"type": "http.response.body", "body": payload, "more_body": False})
        self._record(job, len(pieces), cancelled=False, streamed=False)

    async def _stream(self, job: _Job, receive: Receive, send: Send) -> None:
        mode = job.mode
        pieces = _padded(answer_chunks(mode.chunks), mode.pad)
        events = job.events(pieces)
        compressor = zlib.compressobj(6, zlib.DEFLATED, 31) if mode.gzip else None
        gone = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, gone))
        self.open_streams += 1
        delivered = 0
        try:
            if mode.first_byte_delay and await _sleep_unless_gone(gone, mode.first_byte_delay):
                return
            headers = self._headers(job, b"text/event-stream")
            headers.append((b"cache-control", b"no-cache"))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            last = len(events) - 1
            for index, event in enumerate(events):
                if index and mode.chunk_delay and await _sleep_unless_gone(gone, mode.chunk_delay):
                    return
                if gone.is_set():
                    return
                final = index == last and not mode.cut
                data = event.encode()
                if compressor is not None:
                    data = compressor.compress(data)
                    data += compressor.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)
                await send({"type": "http.response.body", "body": data, "more_body": not final})
                if not final and gone.is_set():
                    return
                delivered += 1
                if index % 16 == 15:
                    # Once the client is gone uvicorn's send() returns without
                    # suspending, so without a pause now and then a stream with
                    # no chunk delay would never let the disconnect watcher run
                    # and would "generate" to its end for nobody.
                    await asyncio.sleep(0)
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
            chunks_sent = min(max(delivered - mode.keepalive, 0), len(pieces))
            self._record(job, chunks_sent, cancelled=not complete, streamed=True)


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
