"""Where the proxy reports what operators watch: metrics per request.

The view calls these hooks at fixed points; they must be cheap and must never
raise into the request path. Each only updates in-memory (or memory-mapped)
Prometheus values, see ``openrouter_proxy.metrics``; a failure is logged and
swallowed.
"""

from __future__ import annotations

import logging

from billing.models import Settlement
from billing.services import Recorded, RecordResult, bill
from openrouter_proxy import metrics
from openrouter_proxy.metering import UsageDraft

logger = logging.getLogger(__name__)


def request_refused(status: int, code: str) -> None:
    """A request answered by the gateway itself with an error (401, 402, 429...)."""
    try:
        metrics.REFUSED.labels(status=str(status), code=code or "unknown").inc()
    except Exception:
        logger.warning("metrics: request_refused failed", exc_info=True)


def billed_request_started() -> None:
    """A billed request was admitted and is about to go upstream."""
    try:
        metrics.IN_FLIGHT.inc()
    except Exception:
        logger.warning("metrics: billed_request_started failed", exc_info=True)


def billed_request_finished(draft: UsageDraft, recorded: Recorded | None) -> None:
    """A billed request ended and its usage was recorded (``None``: spooled)."""
    try:
        metrics.IN_FLIGHT.dec()
        model = draft.usage.model or draft.requested_model or "unknown"
        status = str(draft.http_status) if draft.http_status is not None else "none"
        metrics.REQUESTS.labels(
            endpoint=draft.endpoint, model=model, outcome=draft.outcome, status=status
        ).inc()
        if recorded is None:
            settlement = "spooled"
        elif recorded.settlement is None:
            settlement = recorded.result.value
        else:
            settlement = recorded.settlement
        metrics.RECORDED.labels(settlement=settlement).inc()
        cost = draft.usage.provider_cost
        if (
            cost
            and recorded is not None
            and recorded.result is RecordResult.RECORDED
            and recorded.settlement == Settlement.SETTLED
        ):
            # The Decimal becomes a float only here: the metric is not the ledger.
            metrics.CHARGED.labels(model=model).inc(float(bill(cost)))
        if draft.upstream_latency_ms is not None:
            metrics.UPSTREAM_LATENCY.labels(model=model).observe(draft.upstream_latency_ms / 1000)
        if draft.ttfb_ms is not None:
            metrics.TIME_TO_FIRST_BYTE.labels(model=model).observe(draft.ttfb_ms / 1000)
    except Exception:
        logger.warning("metrics: billed_request_finished failed", exc_info=True)


def pending_settled(settled: bool) -> None:
    """An in-process settlement attempt for a pending record ended."""
    try:
        metrics.SETTLEMENTS.labels(result="settled" if settled else "not_settled").inc()
    except Exception:
        logger.warning("metrics: pending_settled failed", exc_info=True)
