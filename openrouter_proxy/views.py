"""The proxy view: authenticate, classify, gate, forward, stream back.

Async end to end. Per request, before the upstream call: one verifier call
(remembered briefly, see ``callers.py``) and, for metered endpoints, one call
to the meter's admission (``metering.py``). The relay and the meter's record
of the request's end are in ``forward.py`` and ``exchange.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, quote

from django.db import DatabaseError, transaction
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from openrouter_proxy import observability
from openrouter_proxy.callers import ApiKeyRejected, extract_token, verify_token
from openrouter_proxy.conf import proxy_settings
from openrouter_proxy.cors import cors_headers, preflight_response
from openrouter_proxy.db import run_db
from openrouter_proxy.endpoints import Policy, endpoint_for
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
    error_response,
)
from openrouter_proxy.exchange import Exchange
from openrouter_proxy.forward import forward
from openrouter_proxy.liveness import ensure_heartbeat
from openrouter_proxy.metering import Admission, AdmissionResult, get_meter
from openrouter_proxy.policy import BodyFacts, PolicyRefusal, inspect_body
from openrouter_proxy.routing import UnsafePath, build_upstream_url, upstream_target
from openrouter_proxy.scope import (
    BodyTooLarge,
    header_lookup,
    raw_query,
    raw_remainder,
    read_body,
)

logger = logging.getLogger("openrouter_proxy.requests")


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

    token = extract_token(header_lookup(request))
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
    meter = get_meter()
    if entry.policy is Policy.CLOSED or (entry.policy is Policy.OWN_GENERATION and not meter):
        # Without a meter nobody can say whose a generation is: closed too.
        return refuse(ENDPOINT_NOT_AVAILABLE, path=canonical[:200])
    if not entry.allows(method):
        response = refuse(METHOD_NOT_ALLOWED, method=method[:20], path=canonical[:200])
        response["Allow"] = ", ".join(sorted(entry.methods))
        return response

    try:
        body = await read_body(request, proxy_settings.MAX_BODY_BYTES)
    except BodyTooLarge:
        return refuse(BODY_TOO_LARGE, limit=proxy_settings.MAX_BODY_BYTES)

    if entry.policy is Policy.OWN_GENERATION and meter is not None:
        generation_id = _single_generation_id(query)
        if generation_id is None:
            return refuse(MISSING_GENERATION_ID)
        try:
            owned = await run_db(meter.owns_generation, caller.user_id, generation_id)
        except DatabaseError:
            logger.exception("generation lookup failed: database unavailable")
            return refuse(DB_DOWN)
        if not owned:
            return refuse(GENERATION_NOT_FOUND)
        # Forward exactly the one id that was checked, however the query spelt it.
        url = build_upstream_url(
            proxy_settings.BASE_URL, path, b"id=" + quote(generation_id, safe="").encode()
        )
        return await forward(request, url, body, api_key, cors, None, entry, fail)

    if entry.policy is Policy.OPEN:
        return await forward(request, url, body, api_key, cors, None, entry, fail)

    facts = BodyFacts()
    inspected = inspect_body(
        body, request.META.get("CONTENT_TYPE", ""), proxy_settings.ALLOWED_MODELS, entry.body
    )
    if isinstance(inspected, PolicyRefusal):
        return fail(400, inspected.message, inspected.code)
    if inspected is not None:
        facts = inspected
    if meter is None:
        return await forward(request, url, body, api_key, cors, None, entry, fail)

    # Beating before admission: a user whose slots a dead worker holds is
    # admitted again once this worker's sweep has recovered them.
    ensure_heartbeat(meter)
    exchange = Exchange(
        meter=meter,
        caller=caller,
        endpoint=entry.name,
        requested_model=facts.model,
        streamed=facts.stream,
    )
    try:
        admission = await exchange.admit()
    except DatabaseError:
        logger.exception("credit check failed: database unavailable")
        return refuse(DB_DOWN)
    if not admission.admitted:
        return admission_refusal(admission, refuse)
    return await forward(request, url, body, api_key, cors, exchange, entry, fail)


def _single_generation_id(raw: bytes) -> str | None:
    """The one ``id`` a generation-stats query names, or None if it is not exactly one."""
    try:
        pairs = parse_qsl(raw.decode("ascii"), keep_blank_values=True, strict_parsing=True)
    except (UnicodeDecodeError, ValueError):
        return None
    if len(pairs) != 1 or pairs[0][0] != "id" or not pairs[0][1] or len(pairs[0][1]) > 200:
        return None
    return pairs[0][1]


# Why the meter did not admit a request, as the client sees it.
ADMISSION_REFUSALS: dict[Admission, Refusal] = {
    Admission.NO_CREDIT: INSUFFICIENT_CREDITS,
    Admission.TOO_MANY_IN_FLIGHT: TOO_MANY_IN_FLIGHT,
    Admission.KEY_SPEND_LIMIT: KEY_SPEND_LIMIT,
    Admission.KEY_DAILY_SPEND_LIMIT: KEY_DAILY_SPEND_LIMIT,
    Admission.RATE_LIMITED: RATE_LIMITED,
}


def admission_refusal(result: AdmissionResult, refuse: Callable[..., HttpResponse]) -> HttpResponse:
    """The response refusing a request the meter did not admit.

    ``Retry-After`` says when the meter expects a retry to succeed: always on
    a 429, and on a daily cap (the next UTC midnight).
    """
    refusal = ADMISSION_REFUSALS[result.admission]
    retry_after = result.retry_after
    if refusal.status == 429:
        retry_after = retry_after or 1
    response = refuse(refusal, retry_after=retry_after)
    if retry_after is not None:
        response["Retry-After"] = str(retry_after)
    return response
