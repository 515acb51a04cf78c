"""/metrics: the hooks, who may scrape, and multiprocess mode across processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from billing.meter import BillingMeter
from billing.models import Outcome
from billing.services import record_usage
from openrouter_proxy import metrics, observability
from openrouter_proxy.metering import Receipt, ReportedUsage, UsageDraft
from tests.support.accounts import Account

GROK = "x-ai/grok-code-fast-1"


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for metric in family.samples:
            if metric.name == name and all(metric.labels.get(k) == v for k, v in labels.items()):
                return float(metric.value)
    return None


def scrape(client: Client, **headers: Any) -> str:
    response = client.get("/metrics", **headers)
    assert response.status_code == 200
    return response.content.decode()


def draft(account: Account, cost: str | None = "0.002", **kwargs: Any) -> UsageDraft:
    usage = ReportedUsage(
        model="x-ai/grok-code-fast-1",
        prompt_tokens=10,
        completion_tokens=5,
        cost=Decimal(cost) if cost is not None else None,
        generation_id=f"gen-{uuid.uuid4()}",
    )
    values: dict[str, Any] = {
        "request_id": uuid.uuid4(),
        "user_id": account.user.pk,
        "endpoint": "chat/completions",
        "streamed": True,
        "outcome": Outcome.COMPLETED,
        "usage": usage,
        "http_status": 200,
        "upstream_latency_ms": 1500,
        "ttfb_ms": 300,
        "holds_slot": False,
    }
    values.update(kwargs)
    return UsageDraft(**values)


def own(name: str, **labels: str) -> float:
    """This process's value of a sample (other test processes share the directory)."""
    for metric in (
        metrics.REQUESTS,
        metrics.RECORDED,
        metrics.IN_FLIGHT,
        metrics.UPSTREAM_LATENCY,
        metrics.TIME_TO_FIRST_BYTE,
        metrics.CHARGED,
        metrics.REFUSED,
        metrics.SETTLEMENTS,
    ):
        for family in metric.collect():
            for found in family.samples:
                if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                    return float(found.value)
    return 0.0


def test_hooks_count_requests_latency_refusals_and_charges(account: Account) -> None:
    names = [
        (
            "openrouter_proxy_requests_total",
            {
                "endpoint": "chat/completions",
                "outcome": "completed",
                "status": "200",
                "model": GROK,
            },
        ),
        ("openrouter_proxy_usage_records_total", {"settlement": "settled"}),
        ("openrouter_proxy_upstream_latency_seconds_count", {"model": GROK}),
        ("openrouter_proxy_upstream_latency_seconds_sum", {"model": GROK}),
        ("openrouter_proxy_time_to_first_byte_seconds_count", {"model": GROK}),
        ("openrouter_proxy_refusals_total", {"status": "402", "code": "insufficient_credits"}),
        ("openrouter_proxy_settlement_attempts_total", {"result": "settled"}),
        ("openrouter_proxy_charged_usd_total", {"model": GROK}),
        ("openrouter_proxy_requests_in_flight", {}),
    ]
    before = {name: own(name, **labels) for name, labels in names}
    observability.billed_request_started()
    assert (
        own("openrouter_proxy_requests_in_flight")
        == before["openrouter_proxy_requests_in_flight"] + 1
    )
    finished = draft(account)
    observability.billed_request_finished(finished, BillingMeter().record(finished))
    observability.request_refused(402, "insufficient_credits")
    observability.pending_settled(True)
    grown = {name: own(name, **labels) - before[name] for name, labels in names}
    assert grown == pytest.approx(
        {
            "openrouter_proxy_requests_total": 1,
            "openrouter_proxy_usage_records_total": 1,
            "openrouter_proxy_upstream_latency_seconds_count": 1,
            "openrouter_proxy_upstream_latency_seconds_sum": 1.5,
            "openrouter_proxy_time_to_first_byte_seconds_count": 1,
            "openrouter_proxy_refusals_total": 1,
            "openrouter_proxy_settlement_attempts_total": 1,
            "openrouter_proxy_charged_usd_total": 0.002,
            "openrouter_proxy_requests_in_flight": 0,
        }
    )
    # And the scrape shows them (summed over every process using the directory).
    text = scrape(Client())
    for name, labels in names:
        assert sample(text, name, **labels) is not None, name


def test_spooled_and_odd_drafts_never_raise(account: Account) -> None:
    odd = draft(account, cost=None, http_status=None, upstream_latency_ms=None, ttfb_ms=None)
    observability.billed_request_started()
    observability.billed_request_finished(odd, Receipt("spooled"))
    observability.billed_request_finished(odd, Receipt("already_recorded"))
    observability.request_refused(400, "")
    text = scrape(Client())
    assert sample(text, "openrouter_proxy_usage_records_total", settlement="spooled")


def test_a_metrics_children_are_looked_up_once_and_are_the_ones_it_exports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(observability, "_children", {})
    child = observability._child(metrics.REQUESTS, "chat", "m/one", "ok", "200")
    assert child is metrics.REQUESTS.labels(
        endpoint="chat", model="m/one", outcome="ok", status="200"
    )
    assert observability._child(metrics.REQUESTS, "chat", "m/one", "ok", "200") is child
    # The same values of another metric are another child.
    assert observability._child(metrics.CHARGED, "m/one") is metrics.CHARGED.labels(model="m/one")
    before = child._value.get()
    observability._child(metrics.REQUESTS, "chat", "m/one", "ok", "200").inc()
    assert child._value.get() == before + 1
    # Past the bound, children are still right, only not remembered.
    monkeypatch.setattr(observability, "CHILDREN", 2)
    other = observability._child(metrics.REQUESTS, "chat", "m/two", "ok", "200")
    assert other is metrics.REQUESTS.labels(
        endpoint="chat", model="m/two", outcome="ok", status="200"
    )
    assert len(observability._children) == 2


def test_pending_records_are_counted_at_scrape(account: Account) -> None:
    client = Client()
    before = sample(scrape(client), "openrouter_proxy_records_pending_settlement")
    record_usage(draft(account, cost=None, usage=ReportedUsage(generation_id="gen-wait")))
    after = sample(scrape(client), "openrouter_proxy_records_pending_settlement")
    assert before == 0
    assert after == 1


@pytest.mark.parametrize(
    ("remote", "headers", "status"),
    [
        ("127.0.0.1", {}, 200),
        ("::1", {}, 200),
        ("10.1.2.3", {}, 403),
        ("10.1.2.3", {"HTTP_AUTHORIZATION": "Bearer s3cret-token"}, 200),
        ("10.1.2.3", {"HTTP_AUTHORIZATION": "Bearer wrong"}, 403),
        ("127.0.0.1", {"HTTP_AUTHORIZATION": "Bearer wrong"}, 403),
    ],
)
def test_metrics_are_protected(
    db: None, settings: Any, remote: str, headers: dict[str, str], status: int
) -> None:
    settings.OPENROUTER_PROXY_METRICS_TOKEN = "s3cret-token"
    response = Client().get("/metrics", REMOTE_ADDR=remote, **headers)  # type: ignore[arg-type]
    assert response.status_code == status


def test_allowed_networks_are_configurable(db: None, settings: Any) -> None:
    settings.OPENROUTER_PROXY_METRICS_ALLOWED_IPS = ["10.0.0.0/8"]
    assert Client().get("/metrics", REMOTE_ADDR="10.9.9.9").status_code == 200
    assert Client().get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 403


WORKER = textwrap.dedent(
    """
    import os, sys
    from prometheus_client import Counter, Gauge
    done = Counter("demo_requests", "requests")
    busy = Gauge("demo_in_flight", "in flight", multiprocess_mode="livesum")
    done.inc(int(sys.argv[1]))
    busy.inc(int(sys.argv[2]))
    """
)


def test_multiprocess_sums_workers_and_forgets_dead_ones_live_gauges(tmp_path: Path) -> None:
    """Two worker processes exit without cleaning up (as a crash would)."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for done, busy in ((3, 2), (4, 5)):
        subprocess.run([sys.executable, "-c", WORKER, str(done), str(busy)], env=env, check=True)
    assert len(list(tmp_path.glob("gauge_livesum_*.db"))) == 2
    assert len(metrics.reap_dead_processes(tmp_path)) == 2
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(tmp_path))
    text = generate_latest(registry).decode()
    assert sample(text, "demo_requests_total") == 7
    assert not sample(text, "demo_in_flight")
    assert not list(tmp_path.glob("gauge_livesum_*.db"))
