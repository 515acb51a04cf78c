"""What a client's run through the live gateway must have cost its user.

The end-to-end client tests share these checks: every request the fake
OpenRouter answered became exactly one usage record, each record settled at
the cost the fake recorded for its generation, and the user's balance went
down by exactly the sum of those costs times ``BILLING_MARKUP``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from django.conf import settings

from billing.models import CostSource, CreditAccount, Outcome, Settlement, UsageRecord
from billing.money import quantize
from billing.services import balance_of, check_ledger
from devtools.fake_openrouter import SeenRequest
from tests.support.accounts import SERVER_KEY, Gateway

#: The credit ``make_account`` grants.
STARTING_CREDIT = Decimal(10)
#: A markup that is not 1, so that a test also proves it is applied.
MARKUP = "1.25"
SETTLE_TIMEOUT = 20.0


def upstream_requests(gateway: Gateway, path: str) -> list[SeenRequest]:
    """The requests the fake received at ``/api/<path>`` (``path`` like ``v1/messages``)."""
    return [seen for seen in gateway.fake.app.requests if seen.path == f"/api/{path}"]


def assert_forwarded_with_server_key(seen: SeenRequest, token: str) -> None:
    """The caller's token was swapped for the server's key on the way out, wherever it was."""
    assert seen.header("authorization") == f"Bearer {SERVER_KEY}", seen.headers
    for name in ("x-api-key", "x-daemon-token"):
        assert seen.header(name) is None, (name, seen.headers)
    assert all(token not in value for _, value in seen.headers), seen.headers


def wait_for_settled_records(user: Any, count: int, timeout: float = SETTLE_TIMEOUT) -> list[Any]:
    """The user's ``count`` usage records, once every one of them is settled.

    A stream's record is written when its response ends; a streamed Anthropic
    message's cost is only in the generation stats, fetched after it ended.
    Fails naming what it waited for, with the records as they stood.
    """
    deadline = time.monotonic() + timeout
    while True:
        records = list(UsageRecord.objects.filter(user=user).order_by("created_at", "id"))
        if len(records) == count and all(r.settlement == Settlement.SETTLED for r in records):
            return records
        if time.monotonic() > deadline:
            seen = [(r.endpoint, r.settlement, r.outcome, r.error_message) for r in records]
            raise AssertionError(
                f"gave up after {timeout:.0f} s waiting for {count} settled usage record(s) "
                f"of {user.username}; found {seen}"
            )
        time.sleep(0.05)


def wait_for_released_slots(user: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (in_flight := CreditAccount.objects.get(user=user).in_flight) != 0:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"gave up after {timeout:.0f} s waiting for {user.username}'s in-flight "
                f"slots to be released (still {in_flight})"
            )
        time.sleep(0.05)


def assert_charged_the_fake_cost(
    gateway: Gateway,
    user: Any,
    records: Sequence[Any],
    *,
    endpoint: str,
    model: str,
    streamed: bool,
    cost_source: str = CostSource.PROVIDER,
) -> Decimal:
    """Each record is one of the fake's generations, billed at exactly its cost times the markup.

    Returns what the user was charged in all.
    """
    generations = gateway.fake.app.generations
    assert records, "no usage records"
    assert {record.generation_id for record in records} == set(generations), (
        [record.generation_id for record in records],
        list(generations),
    )
    markup = Decimal(str(settings.BILLING_MARKUP))
    expected = Decimal(0)
    for record in records:
        generation = generations[record.generation_id]
        assert generation.total_cost > 0, generation
        assert record.endpoint == endpoint
        assert record.streamed is streamed
        assert record.requested_model == model
        assert record.model == generation.model == model
        assert record.outcome == Outcome.COMPLETED, record.error_message
        assert record.settlement == Settlement.SETTLED
        assert record.cost_source == cost_source
        assert record.provider_cost == generation.total_cost
        assert (record.prompt_tokens or 0) == generation.tokens_prompt
        assert (record.completion_tokens or 0) == generation.tokens_completion
        assert record.billed == quantize(generation.total_cost * markup)
        expected += quantize(generation.total_cost * markup)
    assert balance_of(user) == STARTING_CREDIT - expected
    wait_for_released_slots(user)
    assert check_ledger() == []
    return expected
