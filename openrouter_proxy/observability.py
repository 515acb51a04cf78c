"""Where the proxy reports what operators watch: metrics per request.

The view calls these hooks at fixed points; they must be cheap and must never
raise into the request path. Each only updates in-memory (or memory-mapped)
Prometheus values, see ``openrouter_proxy.metrics``; a failure is logged and
swallowed.
"""

from __future__ import annotations

import logging
from typing import Any

from openrouter_proxy import metrics
from openrouter_proxy.metering import Receipt, UsageDraft

logger = logging.getLogger(__name__)
request_log = logging.getLogger("openrouter_proxy.requests")

#: Each metric's child per label values, as ``labels()`` made it; at most this many.
CHILDREN = 4096
_children: dict[tuple[Any, tuple[str, ...]], Any] = {}


def _child(metric: Any, *values: str) -> Any:
    """``metric.labels(*values)``, looked up once (``labels`` validates and locks on each call).

    The child is the very object ``labels`` keeps, so what it counts is
    exported as before.
    """
    key = (metric, values)
    child = _children.get(key)
    if child is None:
        child = metric.labels(*values)
        if len(_children) < CHILDREN:
            _children[key] = child
    return child


def request_refused(status: int, code: str) -> None:
    """A request answered by the gateway itself with an error (401, 402, 429...)."""
    try:
        _child(metrics.REFUSED, str(status), code or "unknown").inc()
    except Exception:
        logger.warning("metrics: request_refused failed", exc_info=True)


def billed_request_started() -> None:
    """A billed request was admitted and is about to go upstream."""
    try:
        metrics.IN_FLIGHT.inc()
    except Exception:
        logger.warning("metrics: billed_request_started failed", exc_info=True)


def billed_request_finished(draft: UsageDraft, receipt: Receipt) -> None:
    """A metered request ended and the meter recorded it (or spooled it)."""
    try:
        metrics.IN_FLIGHT.dec()
        model = draft.usage.model or draft.requested_model or "unknown"
        status = str(draft.http_status) if draft.http_status is not None else "none"
        # In the order of each metric's label names (see openrouter_proxy.metrics).
        _child(metrics.REQUESTS, draft.endpoint, model, draft.outcome, status).inc()
        _child(metrics.RECORDED, receipt.settlement).inc()
        if receipt.charged:
            # The Decimal becomes a float only here: the metric is not the ledger.
            _child(metrics.CHARGED, model).inc(float(receipt.charged))
        if draft.upstream_latency_ms is not None:
            _child(metrics.UPSTREAM_LATENCY, model).observe(draft.upstream_latency_ms / 1000)
        if draft.ttfb_ms is not None:
            _child(metrics.TIME_TO_FIRST_BYTE, model).observe(draft.ttfb_ms / 1000)
    except Exception:
        logger.warning("metrics: billed_request_finished failed", exc_info=True)
    if request_log.isEnabledFor(logging.INFO):
        log_request(draft, receipt)


def log_request(draft: UsageDraft, receipt: Receipt) -> None:
    """One line per metered request, ``name=value`` pairs."""
    usage = draft.usage
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
        "settlement": receipt.settlement,
    }
    request_log.info("proxied %s", " ".join(f"{name}={value}" for name, value in fields.items()))


def pending_settled(settled: bool) -> None:
    """An in-process settlement attempt for a pending record ended."""
    try:
        _child(metrics.SETTLEMENTS, "settled" if settled else "not_settled").inc()
    except Exception:
        logger.warning("metrics: pending_settled failed", exc_info=True)
