"""Checking the books against what the fake OpenRouter generated."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from decimal import Decimal

from billing.models import CreditLedgerEntry, LedgerKind, UsageRecord
from billing.services import bill
from devtools.fake_openrouter import GenerationStats
from tests.support.waiting import wait_for


def recorded(count: int) -> list[UsageRecord]:
    """The usage records once there are ``count`` of them.

    A server writes a request's record just after the response has ended: a
    test talking to a server in another process waits for it here.
    """

    def enough() -> list[UsageRecord] | None:
        records = list(UsageRecord.objects.all())
        return records if len(records) >= count else None

    return wait_for(enough, f"{count} usage record(s)")


def assert_each_request_charged_once(generations: Mapping[str, GenerationStats]) -> Decimal:
    """The ledger holds one usage row per charged request, and they add up to the fake's costs.

    Each usage record with a charge has exactly one ledger row, for exactly its
    charge, and no row charges anything else; the sum of the usage rows equals
    the sum, over the generations the fake recorded, of their (marked-up)
    cost. Returns that sum.
    """
    records = {record.pk: record for record in UsageRecord.objects.all()}
    entries = list(
        CreditLedgerEntry.objects.filter(kind=LedgerKind.USAGE).values_list(
            "usage_record_id", "reference", "amount"
        )
    )
    rows_per_record = Counter(record_id for record_id, _, _ in entries)
    charged = {pk for pk, record in records.items() if record.billed}
    assert set(rows_per_record) == charged, set(rows_per_record) ^ charged
    twice = {pk: n for pk, n in rows_per_record.items() if n != 1}
    assert twice == {}, twice
    for record_id, reference, amount in entries:
        record = records[record_id]
        assert reference == f"usage:{record.request_id}", (reference, record.request_id)
        assert amount == -record.billed, (amount, record.billed)
    ledger_total = -sum((amount for _, _, amount in entries), Decimal(0))
    generated = sum((bill(g.charged) for g in generations.values()), Decimal(0))
    assert ledger_total == generated, (ledger_total, generated)
    return ledger_total
