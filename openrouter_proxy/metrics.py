"""Prometheus metrics of the proxy, correct across worker processes.

uvicorn runs several worker processes; a scrape reaches one of them. With
``PROMETHEUS_MULTIPROC_DIR`` set (the Terragon site defaults it to
``var/prometheus``), prometheus-client keeps each process's values in
memory-mapped files in that directory and the scrape adds them up, so every
worker reports the whole host. Without it (a single process), the default
in-process registry is used.

Two things multiprocess mode leaves to the application:

* The in-flight gauge sums only live processes (``livesum``), but only if a
  dead process's files are removed. A worker that crashed never says so, so
  each scrape removes the live-gauge files of processes that no longer exist,
  and a process starting removes any its pid inherited from an earlier one.
  Counters and histograms of dead processes stay: their totals are history.
* Records pending settlement are a fact of the database, not of a process:
  that gauge is computed at scrape time, by the scraping process only.

The directory is per host and should be emptied when the server (all its
workers) starts.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from openrouter_proxy.metering import get_meter

logger = logging.getLogger(__name__)


def multiprocess_dir() -> Path | None:
    value = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(value) if value else None


if (_directory := multiprocess_dir()) is not None:
    # Pids are reused: before this process creates its own live-gauge files,
    # drop any that an earlier process with the same pid left behind.
    _directory.mkdir(parents=True, exist_ok=True)
    multiprocess.mark_process_dead(os.getpid(), str(_directory))  # type: ignore[no-untyped-call]

# LLM requests take from a fraction of a second to minutes.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, float("inf"))
TTFB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, float("inf"))

REQUESTS = Counter(
    "openrouter_proxy_requests",
    "Billed requests that ended, by endpoint, served model, outcome and upstream HTTP status.",
    ["endpoint", "model", "outcome", "status"],
)
RECORDED = Counter(
    "openrouter_proxy_usage_records",
    "Usage records written by the proxy, by settlement (spooled: the database was down).",
    ["settlement"],
)
IN_FLIGHT = Gauge(
    "openrouter_proxy_requests_in_flight",
    "Billed requests admitted and not yet ended.",
    multiprocess_mode="livesum",
)
UPSTREAM_LATENCY = Histogram(
    "openrouter_proxy_upstream_latency_seconds",
    "Time from sending a billed request upstream to its last byte.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
TIME_TO_FIRST_BYTE = Histogram(
    "openrouter_proxy_time_to_first_byte_seconds",
    "Time from sending a billed request upstream to the first byte of its answer.",
    ["model"],
    buckets=TTFB_BUCKETS,
)
CHARGED = Counter(
    "openrouter_proxy_charged_usd",
    "US dollars charged for provider-reported costs when requests ended "
    "(a metric, not for accounting: the ledger is the truth).",
    ["model"],
)
REFUSED = Counter(
    "openrouter_proxy_refusals",
    "Requests the gateway answered itself with an error, by HTTP status and error code.",
    ["status", "code"],
)
SETTLEMENTS = Counter(
    "openrouter_proxy_settlement_attempts",
    "In-process attempts to settle a pending record from generation stats.",
    ["result"],
)

_LIVE_GAUGE_FILE = re.compile(r"^gauge_live\w*?_(\d+)\.db$")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_dead_processes(directory: Path) -> list[int]:
    """Remove the live-gauge files of processes that have exited; returns their pids."""
    dead = set()
    for path in directory.glob("gauge_live*.db"):
        match = _LIVE_GAUGE_FILE.match(path.name)
        if match and not _process_exists(int(match.group(1))):
            dead.add(int(match.group(1)))
    for pid in dead:
        multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
    return sorted(dead)


class PendingSettlementCollector(Collector):
    """Records waiting for their cost, counted by the meter when scraped."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        meter = get_meter()
        if meter is None:
            return
        gauge = GaugeMetricFamily(
            "openrouter_proxy_records_pending_settlement",
            "Usage records whose cost is not known yet (settled by generation stats).",
        )
        try:
            gauge.add_metric([], meter.pending_count())
        except DatabaseError:
            logger.warning("metrics: could not count pending records", exc_info=True)
            return
        yield gauge


def render_metrics() -> bytes:
    """The exposition text for a scrape."""
    at_scrape = CollectorRegistry(auto_describe=True)
    at_scrape.register(PendingSettlementCollector())
    directory = multiprocess_dir()
    if directory is None:
        return generate_latest(REGISTRY) + generate_latest(at_scrape)
    reap_dead_processes(directory)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return generate_latest(registry) + generate_latest(at_scrape)


# --- Who may scrape ------------------------------------------------------------------


def _allowed_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    raw = getattr(settings, "OPENROUTER_PROXY_METRICS_ALLOWED_IPS", ["127.0.0.1", "::1"])
    return [ipaddress.ip_network(item, strict=False) for item in raw]


def scrape_allowed(request: HttpRequest) -> bool:
    """A bearer token (if one is configured) or a client address in the allowed networks."""
    token = getattr(settings, "OPENROUTER_PROXY_METRICS_TOKEN", "")
    header = request.headers.get("Authorization", "")
    if token and header.startswith("Bearer "):
        return hmac.compare_digest(header[7:].strip().encode(), token.encode())
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    return any(address in network for network in _allowed_networks())


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    """``GET /metrics``: Prometheus exposition, for allowed addresses or the token only."""
    if not scrape_allowed(request):
        return HttpResponse("Forbidden\n", status=403, content_type="text/plain")
    return HttpResponse(render_metrics(), content_type=CONTENT_TYPE_LATEST)
