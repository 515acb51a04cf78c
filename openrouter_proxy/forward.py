"""Sending a request upstream and relaying the answer, chunk by chunk.

Upstream bytes go to the client as they arrive; a capture object reads a
copy beside them for usage. A metered request's end, whatever it is (the last
byte, the client leaving, the upstream failing before or after its headers),
is handed to its :class:`~openrouter_proxy.exchange.Exchange` exactly once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import cast

import httpx
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse

from openrouter_proxy.capture import UsageCapture, capture_for
from openrouter_proxy.conf import proxy_settings
from openrouter_proxy.endpoints import Endpoint
from openrouter_proxy.errors import error_body
from openrouter_proxy.exchange import Exchange
from openrouter_proxy.metering import Outcome
from openrouter_proxy.routing import client_response_headers, upstream_request_headers
from openrouter_proxy.scope import request_headers
from openrouter_proxy.upstream import get_client, send

SSE_CONTENT_TYPE = "text/event-stream"


@dataclass(frozen=True, slots=True)
class UpstreamFailure:
    """How the client hears of an upstream that did not answer, and how it is recorded."""

    status: int
    message: str
    code: str
    #: Whether a retry is safe: False when the upstream may be generating (and billing).
    retry: bool
    outcome: Outcome


UNREACHABLE = UpstreamFailure(
    502, "OpenRouter is unreachable.", "upstream_unreachable", True, Outcome.UPSTREAM_UNREACHABLE
)
BUSY = UpstreamFailure(
    503, "The gateway is overloaded.", "gateway_busy", True, Outcome.UPSTREAM_UNREACHABLE
)
TIMED_OUT = UpstreamFailure(
    504, "OpenRouter did not answer in time.", "timeout", False, Outcome.UPSTREAM_ERROR
)
BROKE_OFF = UpstreamFailure(
    502, "OpenRouter's answer broke off.", "upstream_error", False, Outcome.UPSTREAM_ERROR
)


def classify(failure: httpx.HTTPError) -> UpstreamFailure:
    if isinstance(failure, httpx.ConnectError | httpx.ConnectTimeout):
        return UNREACHABLE
    if isinstance(failure, httpx.PoolTimeout):
        return BUSY
    if isinstance(failure, httpx.TimeoutException):
        return TIMED_OUT
    return BROKE_OFF


def _sse_error_event(message: str, code: str) -> bytes:
    return b"data: " + error_body(502, message, code) + b"\n\n"


async def relay(
    upstream: httpx.Response,
    exchange: Exchange | None,
    capture: UsageCapture | None,
    is_sse: bool,
) -> AsyncGenerator[bytes, None]:
    """Forward the upstream body chunk by chunk; hand the request's end to its exchange."""
    outcome = Outcome.COMPLETED if upstream.status_code < 400 else Outcome.UPSTREAM_ERROR
    error = ""
    broken: BaseException | None = None
    # An encoded body is decoded for the client (httpx's decoders); any other
    # is relayed as the transport hands it over, without httpx's layers per chunk.
    encoded = upstream.headers.get("content-encoding", "identity").lower() != "identity"
    chunks = upstream.aiter_bytes() if encoded else cast(AsyncIterator[bytes], upstream.stream)
    try:
        async for chunk in chunks:
            if exchange is not None and exchange.first_byte is None:
                exchange.first_byte = time.monotonic()
            yield chunk
            if capture is not None:
                capture.feed(chunk)
    except (asyncio.CancelledError, GeneratorExit):
        # Cancelled while reading upstream, or closed while the client was
        # being written to: either way nobody reads the rest.
        outcome = Outcome.CLIENT_DISCONNECTED
        raise
    except (httpx.HTTPError, httpx.StreamError) as failure:
        outcome = Outcome.UPSTREAM_ERROR
        error = f"upstream stream failed: {type(failure).__name__}"
        broken = failure
    finally:
        await upstream.aclose()
        if exchange is not None:
            result = capture.result() if capture is not None else None
            if result is not None and result.error and outcome == Outcome.COMPLETED:
                outcome = Outcome.UPSTREAM_ERROR
            await exchange.finish(outcome, result, error, cost_unknown=broken is not None)
    if broken is not None:
        if is_sse:
            # A clean end the SDKs understand: they raise on an error event.
            yield _sse_error_event("The upstream stream was interrupted.", "upstream_stream_error")
        else:
            # A JSON body cut short must not look complete: abort the response.
            raise broken


class RelayedResponse(StreamingHttpResponse):
    """A relayed upstream answer; its chunks stay reachable for the fast path.

    Django's handler sends it as any streaming response. The fast path
    (``asgi.py``) sends :attr:`chunks` itself: one ASGI message per upstream
    chunk, without Django's per-chunk wrappers.
    """

    def __init__(
        self,
        chunks: AsyncGenerator[bytes, None],
        status: int,
        ended: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__(chunks, status=status)
        self.chunks = chunks
        #: Whether the upstream's answer has arrived whole and been handed over
        #: (so the chunk just read is the last), where the transport can tell.
        self.ended = ended


def _attribution() -> dict[str, str]:
    return {
        "http-referer": proxy_settings.APP_URL,
        "x-openrouter-title": proxy_settings.APP_TITLE,
    }


async def forward(
    request: HttpRequest,
    url: httpx.URL,
    body: bytes,
    api_key: str,
    cors: dict[str, str],
    exchange: Exchange | None,
    entry: Endpoint,
    fail: Callable[..., HttpResponse],
) -> HttpResponse | StreamingHttpResponse:
    """Send the request upstream and stream the answer back (recording it if metered)."""
    client = get_client()
    upstream_request = client.build_request(
        request.method or "GET",
        url,
        headers=upstream_request_headers(request_headers(request), api_key, _attribution()),
        content=body or None,
    )
    try:
        upstream = await send(upstream_request)
    except asyncio.CancelledError:
        if exchange is not None:
            await exchange.finish(Outcome.CLIENT_DISCONNECTED, None, "client left before headers")
        raise
    except httpx.HTTPError as failure:
        answer = classify(failure)
        if exchange is not None:
            exchange.status = answer.status
            await exchange.finish(
                answer.outcome,
                None,
                f"{type(failure).__name__}: {answer.message}",
                cost_unknown=answer.outcome == Outcome.UPSTREAM_ERROR,
            )
        return fail(answer.status, answer.message, answer.code, retry=answer.retry)
    except Exception as failure:
        if exchange is not None:
            await exchange.finish(Outcome.UPSTREAM_ERROR, None, repr(failure)[:200])
        raise

    generation_id = upstream.headers.get("x-generation-id")
    if exchange is not None:
        exchange.upstream_answered(upstream.status_code, generation_id)
    content_type = upstream.headers.get("content-type", "")
    is_sse = content_type.lower().startswith(SSE_CONTENT_TYPE)
    capture = capture_for(content_type, generation_id, entry.reader) if exchange else None
    raw = upstream.headers.get("content-encoding", "identity").lower() == "identity"
    streaming = RelayedResponse(
        relay(upstream, exchange, capture, is_sse),
        upstream.status_code,
        # Relayed as read (not decoded): what the stream says is what the client gets.
        ended=getattr(upstream.stream, "ended", None) if raw else None,
    )
    for name, value in client_response_headers(
        (name.decode("latin-1").lower(), value.decode("latin-1"))
        for name, value in upstream.headers.raw
    ):
        streaming[name] = value
    if is_sse:
        streaming["Cache-Control"] = "no-cache"
        streaming["X-Accel-Buffering"] = "no"
    for name, value in cors.items():
        streaming[name] = value
    return streaming
