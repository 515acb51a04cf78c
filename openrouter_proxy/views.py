"""The proxy view: authenticate, gate, forward, stream back, record.

Async end to end. Per request, before the upstream call: one verifier call
(one indexed lookup with the default verifier) and, for billed endpoints, one
conditional ``UPDATE`` that is both the 402 gate and the overspend bound.
After it: one transaction that writes the usage record, its ledger row and
the balance. Upstream bytes go to the client as they arrive; a capture object
reads a copy beside them for usage.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote

import httpx
from django.db import DatabaseError, transaction
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from billing.models import Outcome
from billing.recovery import Trace, close_request, mark_answered, open_request
from billing.services import admit_request, generation_belongs_to, release_request
from billing.spool import record_usage_durably
from openrouter_proxy import observability
from openrouter_proxy.callers import (
    ApiKeyRejected,
    Caller,
    KeyLimits,
    extract_token,
    verify_token,
)
from openrouter_proxy.capture import CaptureResult, UsageCapture, capture_for
from openrouter_proxy.conf import proxy_settings
from openrouter_proxy.cors import cors_headers, preflight_response
from openrouter_proxy.db import run_db
from openrouter_proxy.endpoints import Endpoint, Policy, endpoint_for
from openrouter_proxy.errors import (
    BODY_TOO_LARGE,
    DB_DOWN,
    ENDPOINT_NOT_AVAILABLE,
    GENERATION_NOT_FOUND,
    INSUFFICIENT_CREDITS,
    INVALID_API_KEY,
    INVALID_PATH,
    KEY_DAILY_SPEND_LIMIT,
    KEY_SPEND_LIMIT,
    METHOD_NOT_ALLOWED,
    MISSING_API_KEY,
    MISSING_GENERATION_ID,
    NOT_CONFIGURED,
    RATE_LIMITED,
    TOO_MANY_IN_FLIGHT,
    Refusal,
    error_body,
    error_response,
)
from openrouter_proxy.liveness import ensure_heartbeat
from openrouter_proxy.metering import Admission, AdmissionResult, ReportedUsage, UsageDraft
from openrouter_proxy.policy import BodyFacts, PolicyRefusal, inspect_body
from openrouter_proxy.routing import (
    UnsafePath,
    build_upstream_url,
    client_response_headers,
    upstream_request_headers,
    upstream_target,
)
from openrouter_proxy.settlement import run_in_background, settle_from_generation
from openrouter_proxy.upstream import get_client

logger = logging.getLogger("openrouter_proxy.requests")

SSE_CONTENT_TYPE = "text/event-stream"


ResponseT = TypeVar("ResponseT", HttpResponse, StreamingHttpResponse)


class BodyTooLarge(Exception):
    pass


def _header_lookup(request: HttpRequest) -> Callable[[str], str | None]:
    return lambda name: request.headers.get(name)


def _scope(request: HttpRequest) -> dict[str, Any] | None:
    scope = getattr(request, "scope", None)
    return scope if isinstance(scope, dict) else None


def _as_bytes(value: bytes | str) -> bytes:
    # Servers send bytes; some test clients put text in the scope.
    return value.encode("latin-1") if isinstance(value, str) else bytes(value)


def raw_remainder(request: HttpRequest, remainder: str) -> bytes:
    """The undecoded bytes of the path below the proxy's prefix.

    Checks must see what the client sent (``%2e%2e`` is not ``..`` after
    Django decoded it; ``%2F`` is not a separator), and the upstream must get
    it unchanged.
    """
    if not remainder:
        return b""
    scope = _scope(request)
    raw = scope.get("raw_path") if scope else None
    if not raw:
        return quote(remainder, safe="/!$&'()*+,;=:@~").encode("ascii")
    prefix = request.path[: len(request.path) - len(remainder)]
    parts = _as_bytes(raw).split(b"/", prefix.count("/"))
    return parts[-1] if len(parts) > prefix.count("/") else b""


def raw_query(request: HttpRequest) -> bytes:
    scope = _scope(request)
    if scope is not None and "query_string" in scope:
        return _as_bytes(scope["query_string"])
    return str(request.META.get("QUERY_STRING", "")).encode("latin-1")


def request_headers(request: HttpRequest) -> list[tuple[str, str]]:
    scope = _scope(request)
    if scope is not None and "headers" in scope:
        return [
            (name.decode("latin-1").lower(), value.decode("latin-1"))
            for name, value in scope["headers"]
        ]
    return [(name.lower(), value) for name, value in request.headers.items()]


async def read_body(request: HttpRequest, limit: int) -> bytes:
    declared = request.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    # request.read() bypasses DATA_UPLOAD_MAX_MEMORY_SIZE (2.5 MB by default,
    # far below what coding agents send); our own limit applies instead.
    body = request.read(limit + 1)
    if len(body) > limit:
        raise BodyTooLarge
    return body


def _with_cors(response: ResponseT, cors: dict[str, str]) -> ResponseT:
    for name, value in cors.items():
        response[name] = value
    return response


@dataclass(slots=True)
class Exchange:
    """The state of one billed request, from admission to its usage record."""

    caller: Caller
    endpoint: str
    requested_model: str
    streamed: bool
    request_id: uuid.UUID = field(default_factory=uuid.uuid4)
    created_at: Any = field(default_factory=timezone.now)
    started: float = field(default_factory=time.monotonic)
    first_byte: float | None = None
    status: int | None = None
    header_generation_id: str | None = None
    #: Writes the request's write-ahead trace beside the upstream call.
    trace: asyncio.Task[None] | None = None
    #: Resolved with the generation id when the upstream answers (None: it did not).
    answered: asyncio.Future[str | None] | None = None

    def trace_record(self) -> Trace:
        """The write-ahead trace, written with the admission (see ``billing.recovery``)."""
        return Trace(
            request_id=self.request_id,
            user_id=self.caller.user_id,
            endpoint=self.endpoint,
            streamed=self.streamed,
            requested_model=self.requested_model,
            api_key_id=self.caller.key_id,
            api_key_label=self.caller.key_label,
        )

    def start_trace(self) -> None:
        """Tell the trace the generation id once the upstream answers, beside the relay."""
        self.answered = asyncio.get_running_loop().create_future()
        self.trace = run_in_background(_mark_trace_answered(self.request_id, self.answered))

    def upstream_answered(self, generation_id: str | None) -> None:
        if self.answered is not None and not self.answered.done():
            self.answered.set_result(generation_id)

    async def trace_written(self) -> None:
        """Let the trace's last update land before the final record removes the trace."""
        self.upstream_answered(None)
        if self.trace is not None:
            with suppress(Exception):
                await asyncio.shield(self.trace)

    def draft(
        self,
        outcome: str,
        capture: CaptureResult | None,
        error: str = "",
        *,
        cost_unknown: bool = False,
    ) -> UsageDraft:
        usage = capture.usage if capture is not None else ReportedUsage()
        if usage.generation_id is None and self.header_generation_id:
            usage = replace(usage, generation_id=self.header_generation_id)
        now = time.monotonic()
        return UsageDraft(
            request_id=self.request_id,
            user_id=self.caller.user_id,
            api_key_id=self.caller.key_id,
            api_key_label=self.caller.key_label,
            endpoint=self.endpoint,
            streamed=self.streamed,
            outcome=outcome,
            usage=usage,
            requested_model=self.requested_model,
            http_status=self.status,
            created_at=self.created_at,
            upstream_latency_ms=int((now - self.started) * 1000),
            ttfb_ms=(
                int((self.first_byte - self.started) * 1000)
                if self.first_byte is not None
                else None
            ),
            error_message=error,
            cost_unknown=cost_unknown,
        )


async def _mark_trace_answered(request_id: uuid.UUID, answered: asyncio.Future[str | None]) -> None:
    generation_id = await answered
    if not generation_id:
        return
    try:
        await run_db(mark_answered, request_id, generation_id)
    except DatabaseError:
        # The final record does not need it; only a crash from here on would.
        logger.warning("could not give the trace of request %s its generation", request_id)


async def finish_exchange(exchange: Exchange, draft: UsageDraft) -> None:
    """Record the request's usage (durably), then settle later if needed."""
    await exchange.trace_written()
    recorded = await run_db(record_usage_durably, draft)
    if recorded is not None:
        # Recorded (or found recorded): the trace has done its job. A spooled
        # draft keeps its trace until the spool is replayed.
        with suppress(DatabaseError):
            await run_db(close_request, draft.request_id)
    observability.billed_request_finished(draft, recorded)
    usage = draft.usage
    if logger.isEnabledFor(logging.INFO):
        fields = {
            "request": draft.request_id,
            "user": draft.user_id,
            "key": draft.api_key_label or "-",
            "endpoint": draft.endpoint,
            "model": usage.model or draft.requested_model or "-",
            "outcome": draft.outcome,
            "status": draft.http_status,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "cost": usage.provider_cost,
            "latency_ms": draft.upstream_latency_ms,
            "ttfb_ms": draft.ttfb_ms,
            "settlement": recorded.settlement if recorded else "spooled",
        }
        logger.info("proxied %s", " ".join(f"{name}={value}" for name, value in fields.items()))
    if recorded is not None and recorded.awaits_cost and usage.generation_id:
        run_in_background(settle_from_generation(draft.request_id, usage.generation_id))


async def record_in_background(exchange: Exchange, draft: UsageDraft) -> None:
    """Record without being cut short by the caller's cancellation."""
    task = run_in_background(finish_exchange(exchange, draft))
    await asyncio.shield(task)


def _sse_error_event(message: str, code: str) -> bytes:
    return b"data: " + error_body(502, message, code) + b"\n\n"


async def relay(
    upstream: httpx.Response,
    exchange: Exchange | None,
    capture: UsageCapture | None,
    is_sse: bool,
) -> AsyncIterator[bytes]:
    """Forward the upstream body chunk by chunk; record usage when it ends."""
    outcome = Outcome.COMPLETED if upstream.status_code < 400 else Outcome.UPSTREAM_ERROR
    error = ""
    broken: BaseException | None = None
    try:
        async for chunk in upstream.aiter_bytes():
            if exchange is not None and exchange.first_byte is None:
                exchange.first_byte = time.monotonic()
            yield chunk
            if capture is not None:
                capture.feed(chunk)
    except asyncio.CancelledError:
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
            await record_in_background(
                exchange,
                exchange.draft(outcome, result, error, cost_unknown=broken is not None),
            )
    if broken is not None:
        if is_sse:
            # A clean end the SDKs understand: they raise on an error event.
            yield _sse_error_event("The upstream stream was interrupted.", "upstream_stream_error")
        else:
            # A JSON body cut short must not look complete: abort the response.
            raise broken


# Callers authenticate by key, never by cookie: no CSRF token to ask for, with or
# without the fast path in front.
@csrf_exempt
@transaction.non_atomic_requests
async def proxy(
    request: HttpRequest, upstream_path: str = ""
) -> HttpResponse | StreamingHttpResponse:
    cors = cors_headers(request.headers.get("Origin"))
    if request.method == "OPTIONS":
        return preflight_response(request)

    def fail(status: int, message: str, code: str, **kwargs: Any) -> HttpResponse:
        observability.request_refused(status, code)
        return error_response(status, message, code, headers=cors, **kwargs)

    def refuse(refusal: Refusal, **details: Any) -> HttpResponse:
        observability.request_refused(refusal.status, refusal.code)
        return refusal.response(cors, **details)

    query = raw_query(request)
    try:
        path = raw_remainder(request, upstream_path)
        canonical, url = upstream_target(proxy_settings.BASE_URL, path, query)
    except UnsafePath as unsafe:
        return refuse(INVALID_PATH, reason=unsafe)

    token = extract_token(_header_lookup(request))
    if token is None:
        return refuse(MISSING_API_KEY)
    api_key = proxy_settings.API_KEY
    if not api_key:
        return refuse(NOT_CONFIGURED)

    try:
        caller = await verify_token(token)
    except ApiKeyRejected as rejected:
        return fail(401, str(rejected), INVALID_API_KEY.code)
    except DatabaseError:
        logger.exception("key verification failed: database unavailable")
        return refuse(DB_DOWN)
    if caller is None:
        return refuse(INVALID_API_KEY)

    method = request.method or "GET"
    entry = endpoint_for(canonical)
    if entry.policy is Policy.CLOSED:
        return refuse(ENDPOINT_NOT_AVAILABLE, path=canonical[:200])
    if not entry.allows(method):
        response = refuse(METHOD_NOT_ALLOWED, method=method[:20], path=canonical[:200])
        response["Allow"] = ", ".join(sorted(entry.methods))
        return response

    try:
        body = await read_body(request, proxy_settings.MAX_BODY_BYTES)
    except BodyTooLarge:
        return refuse(BODY_TOO_LARGE, limit=proxy_settings.MAX_BODY_BYTES)

    if entry.policy is Policy.OWN_GENERATION:
        generation_id = _single_generation_id(query)
        if generation_id is None:
            return refuse(MISSING_GENERATION_ID)
        try:
            owned = await run_db(generation_belongs_to, caller.user_id, generation_id)
        except DatabaseError:
            logger.exception("generation lookup failed: database unavailable")
            return refuse(DB_DOWN)
        if not owned:
            return refuse(GENERATION_NOT_FOUND)
        # Forward exactly the one id that was checked, however the query spelt it.
        url = build_upstream_url(
            proxy_settings.BASE_URL, path, b"id=" + quote(generation_id, safe="").encode()
        )
        return await _forward(request, url, body, api_key, cors, None, entry, fail)

    if entry.policy is Policy.OPEN:
        return await _forward(request, url, body, api_key, cors, None, entry, fail)

    facts = BodyFacts()
    inspected = inspect_body(
        body, request.META.get("CONTENT_TYPE", ""), proxy_settings.ALLOWED_MODELS, entry.body
    )
    if isinstance(inspected, PolicyRefusal):
        return fail(400, inspected.message, inspected.code)
    if inspected is not None:
        facts = inspected
    endpoint = entry.name

    # Beating before admission: a user whose slots a dead worker holds is
    # admitted again once this worker's sweep has recovered them.
    ensure_heartbeat()
    exchange = Exchange(
        caller=caller, endpoint=endpoint, requested_model=facts.model, streamed=facts.stream
    )
    try:
        admission, retry_after = await _admit(caller, exchange.trace_record())
    except DatabaseError:
        logger.exception("credit check failed: database unavailable")
        return refuse(DB_DOWN)
    refused = admission_refusal(admission, retry_after, refuse)
    if refused is not None:
        return refused
    exchange.start_trace()
    observability.billed_request_started()
    return await _forward(request, url, body, api_key, cors, exchange, entry, fail)


def _single_generation_id(raw: bytes) -> str | None:
    """The one ``id`` a generation-stats query names, or None if it is not exactly one."""
    try:
        pairs = parse_qsl(raw.decode("ascii"), keep_blank_values=True, strict_parsing=True)
    except (UnicodeDecodeError, ValueError):
        return None
    if len(pairs) != 1 or pairs[0][0] != "id" or not pairs[0][1] or len(pairs[0][1]) > 200:
        return None
    return pairs[0][1]


async def _forward(
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
        upstream = await client.send(upstream_request, stream=True)
    except asyncio.CancelledError:
        if exchange is not None:
            await record_in_background(
                exchange,
                exchange.draft(Outcome.CLIENT_DISCONNECTED, None, "client left before headers"),
            )
        raise
    except httpx.HTTPError as failure:
        return await _upstream_failure(failure, exchange, fail)
    except Exception as failure:
        if exchange is not None:
            await record_in_background(
                exchange, exchange.draft(Outcome.UPSTREAM_ERROR, None, repr(failure)[:200])
            )
        raise

    if exchange is not None:
        exchange.status = upstream.status_code
        exchange.header_generation_id = upstream.headers.get("x-generation-id")
        exchange.upstream_answered(exchange.header_generation_id)
    content_type = upstream.headers.get("content-type", "")
    is_sse = content_type.lower().startswith(SSE_CONTENT_TYPE)
    capture = (
        capture_for(content_type, upstream.headers.get("x-generation-id"), entry.reader)
        if exchange is not None
        else None
    )
    streaming = StreamingHttpResponse(
        relay(upstream, exchange, capture, is_sse), status=upstream.status_code
    )
    for name, value in client_response_headers(
        (name.decode("latin-1").lower(), value.decode("latin-1"))
        for name, value in upstream.headers.raw
    ):
        streaming[name] = value
    if is_sse:
        streaming["Cache-Control"] = "no-cache"
        streaming["X-Accel-Buffering"] = "no"
    return _with_cors(streaming, cors)


async def _upstream_failure(
    failure: httpx.HTTPError,
    exchange: Exchange | None,
    fail: Callable[..., HttpResponse],
) -> HttpResponse:
    if isinstance(failure, httpx.ConnectError | httpx.ConnectTimeout):
        status, message, code, retry = (
            502,
            "OpenRouter is unreachable.",
            "upstream_unreachable",
            True,
        )
        outcome = Outcome.UPSTREAM_UNREACHABLE
    elif isinstance(failure, httpx.PoolTimeout):
        status, message, code, retry = 503, "The gateway is overloaded.", "gateway_busy", True
        outcome = Outcome.UPSTREAM_UNREACHABLE
    elif isinstance(failure, httpx.TimeoutException):
        # The upstream may still be generating, and billing, this request.
        status, message, code, retry = 504, "OpenRouter did not answer in time.", "timeout", False
        outcome = Outcome.UPSTREAM_ERROR
    else:
        status, message, code, retry = (
            502,
            "OpenRouter's answer broke off.",
            "upstream_error",
            False,
        )
        outcome = Outcome.UPSTREAM_ERROR
    if exchange is not None:
        exchange.status = status
        await record_in_background(
            exchange,
            exchange.draft(
                outcome,
                None,
                f"{type(failure).__name__}: {message}",
                cost_unknown=outcome == Outcome.UPSTREAM_ERROR,
            ),
        )
    return fail(status, message, code, retry=retry)


# Why billing did not admit a request, as the client sees it.
ADMISSION_REFUSALS: dict[Admission, Refusal] = {
    Admission.NO_CREDIT: INSUFFICIENT_CREDITS,
    Admission.TOO_MANY_IN_FLIGHT: TOO_MANY_IN_FLIGHT,
    Admission.KEY_SPEND_LIMIT: KEY_SPEND_LIMIT,
    Admission.KEY_DAILY_SPEND_LIMIT: KEY_DAILY_SPEND_LIMIT,
    Admission.RATE_LIMITED: RATE_LIMITED,
}


def admission_refusal(
    admission: Admission, retry_after: int | None, refuse: Callable[..., HttpResponse]
) -> HttpResponse | None:
    """The response refusing a request billing did not admit (None: admitted).

    ``Retry-After`` says when billing expects a retry to succeed: always on a
    429, and on a daily cap (the next UTC midnight).
    """
    if admission is Admission.ADMITTED:
        return None
    refusal = ADMISSION_REFUSALS[admission]
    if refusal.status == 429:
        retry_after = retry_after or 1
    response = refuse(refusal, retry_after=retry_after)
    if retry_after is not None:
        response["Retry-After"] = str(retry_after)
    return response


def _admit_and_trace(trace: Trace, key_id: int | None, limits: KeyLimits | None) -> AdmissionResult:
    """Admission and, for an admitted request, its write-ahead trace (one database call).

    The trace is written before the request goes upstream, so no generation
    can start that a crash of this worker would leave unbilled.
    """
    result = admit_request(trace.user_id, key_id, limits, detailed=True)
    if result.admitted:
        try:
            open_request(trace)
        except DatabaseError:
            logger.warning("could not write the trace of request %s", trace.request_id)
    return result


async def _admit(caller: Caller, trace: Trace) -> tuple[Admission, int | None]:
    """Admit the request (the user's credit and slots, the key's limits).

    Takes a slot; if the caller is cancelled meanwhile, gives it back.
    Returns the admission and, for a refusal, the seconds until a retry can
    succeed when billing knows them.
    """
    admitting = asyncio.ensure_future(run_db(_admit_and_trace, trace, caller.key_id, caller.limits))
    try:
        result = await asyncio.shield(admitting)
    except asyncio.CancelledError:
        run_in_background(_release_if_admitted(admitting, trace))
        raise
    return result.admission, result.retry_after


async def _release_if_admitted(admitting: asyncio.Future[Any], trace: Trace) -> None:
    if (await admitting).admitted:
        await run_db(release_request, trace.user_id)
        await run_db(close_request, trace.request_id)


def _attribution() -> dict[str, str]:
    return {
        "http-referer": proxy_settings.APP_URL,
        "x-openrouter-title": proxy_settings.APP_TITLE,
    }
