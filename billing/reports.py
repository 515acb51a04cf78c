"""The operators' questions about spend, each answered by aggregate SQL.

"Who spent what, on which model, this week?" is a handful of ``GROUP BY``
queries over ``UsageRecord`` with ``SUM``/``COUNT ... FILTER``: one query per
figure group, never one per user or per row. Amounts come back as exact
``Decimal`` (the money field converts the integer sums); only chart geometry,
which is not money, uses floats.

The admin pages (``billing.admin``, ``billing.dashboard``) render what these
functions return.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db.models import (
    Count,
    F,
    FloatField,
    IntegerField,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Sum,
    Value,
)
from django.db.models.functions import Cast, Coalesce, TruncDate
from django.utils import timezone

from billing.models import Outcome, Settlement, UsageRecord
from billing.money import MoneyField

ZERO = Decimal(0)


@dataclass(frozen=True)
class Periods:
    """The starts of the periods spend is reported over, for one instant."""

    now: datetime
    today: datetime
    week: datetime
    month: datetime

    @classmethod
    def at(cls, now: datetime | None = None) -> Periods:
        now = now or timezone.now()
        midnight = timezone.localtime(now).replace(hour=0, minute=0, second=0, microsecond=0)
        return cls(
            now=now,
            today=midnight,
            week=midnight - timedelta(days=6),
            month=midnight - timedelta(days=29),
        )


def _per_user(**filters: Any) -> QuerySet[Any]:
    return UsageRecord.objects.filter(user=OuterRef("pk"), **filters).order_by().values("user")


def _money(queryset: QuerySet[Any]) -> Coalesce:
    return Coalesce(
        Subquery(queryset.annotate(total=Sum("billed")).values("total")),
        Value(ZERO, output_field=MoneyField()),
        output_field=MoneyField(),
    )


def _count(queryset: QuerySet[Any]) -> Coalesce:
    return Coalesce(
        Subquery(queryset.annotate(n=Count("*")).values("n")),
        Value(0),
        output_field=IntegerField(),
    )


def with_user_activity(users: QuerySet[Any], periods: Periods) -> QuerySet[Any]:
    """Annotate users with balance, spend, requests, failures and top model.

    Each figure is a correlated subquery over one user's records, answered
    from the covering index on ``(user_id, created_at)`` without touching the
    table. The database evaluates them only for the page it returns, except
    the one the page is sorted by, so a page costs in proportion to its rows
    and not to the whole usage table.
    """
    month = _per_user(created_at__gte=periods.month)
    top_model = (
        UsageRecord.objects.filter(user=OuterRef("pk"), created_at__gte=periods.month)
        .order_by()
        .values("model")
        .annotate(spent=Sum("billed"), requests=Count("*"))
        .order_by("-spent", "-requests", "model")
        .values("model")[:1]
    )
    failure_share = month.annotate(
        share=Cast(Count("created_at", filter=~Q(outcome=Outcome.COMPLETED)), FloatField())
        / Cast(Count("*"), FloatField())
    ).values("share")
    last = (
        UsageRecord.objects.filter(user=OuterRef("pk"))
        .order_by("-created_at")
        .values("created_at")[:1]
    )
    annotated: QuerySet[Any] = users.annotate(
        balance=Coalesce(
            F("credit_account__balance"),
            Value(ZERO, output_field=MoneyField()),
            output_field=MoneyField(),
        ),
        spend_today=_money(_per_user(created_at__gte=periods.today)),
        spend_week=_money(_per_user(created_at__gte=periods.week)),
        spend_month=_money(month),
        spend_total=_money(_per_user()),
        requests_month=_count(month),
        failure_share=Subquery(failure_share, output_field=FloatField()),
        last_request=Subquery(last),
        top_model=Subquery(top_model),
    )
    return annotated


# --- The dashboard ----------------------------------------------------------------


@dataclass
class DailySpend:
    """Spend per day and model over a window, zero-filled."""

    days: list[date]
    models: list[str]
    # (day, model) -> amount
    amounts: dict[tuple[date, str], Decimal]
    requests: dict[date, int]

    def day_total(self, day: date) -> Decimal:
        return sum((self.amounts.get((day, model), ZERO) for model in self.models), ZERO)

    @property
    def total(self) -> Decimal:
        return sum(self.amounts.values(), ZERO)

    def model_total(self, model: str) -> Decimal:
        return sum((self.amounts.get((day, model), ZERO) for day in self.days), ZERO)


def daily_spend(records: QuerySet[UsageRecord], periods: Periods, top: int = 6) -> DailySpend:
    """Billed per day and model for the last 30 days; models past ``top`` are "other"."""
    rows = (
        records.filter(created_at__gte=periods.month)
        .order_by()
        .annotate(day=TruncDate("created_at"))
        .values("day", "model")
        .annotate(spent=Sum("billed"), requests=Count("*"))
    )
    spent: dict[tuple[date, str], Decimal] = defaultdict(lambda: ZERO)
    requests: dict[date, int] = defaultdict(int)
    per_model: dict[str, Decimal] = defaultdict(lambda: ZERO)
    raw = list(rows)
    for row in raw:
        model = row["model"] or "(none)"
        per_model[model] += row["spent"] or ZERO
    ranked = sorted(per_model, key=lambda model: (-per_model[model], model))
    shown = [model for model in ranked[:top] if per_model[model] > 0]
    for row in raw:
        model = row["model"] or "(none)"
        key = model if model in shown else "other"
        spent[(row["day"], key)] += row["spent"] or ZERO
        requests[row["day"]] += row["requests"]
    if any(model not in shown for model in ranked if per_model[model] > 0):
        shown.append("other")
    first = periods.month.date()
    days = [first + timedelta(days=offset) for offset in range(30)]
    return DailySpend(days=days, models=shown, amounts=dict(spent), requests=dict(requests))


@dataclass(frozen=True)
class TopUser:
    user_id: int
    username: str
    spent: Decimal
    requests: int


def top_users(since: datetime, limit: int = 10) -> list[TopUser]:
    """The users who spent most since ``since``."""
    rows = (
        UsageRecord.objects.filter(created_at__gte=since)
        .order_by()
        .values("user_id", "user__username")
        .annotate(spent=Sum("billed"), requests=Count("*"))
        .order_by("-spent", "user_id")[:limit]
    )
    return [
        TopUser(row["user_id"], row["user__username"], row["spent"] or ZERO, row["requests"])
        for row in rows
    ]


@dataclass(frozen=True)
class EndpointSpend:
    endpoint: str
    spent: Decimal
    requests: int


def spend_by_endpoint(records: QuerySet[UsageRecord], since: datetime) -> list[EndpointSpend]:
    """Billed and requests per endpoint since ``since``, largest spend first."""
    rows = (
        records.filter(created_at__gte=since)
        .order_by()
        .values("endpoint")
        .annotate(spent=Sum("billed"), requests=Count("*"))
        .order_by("-spent", "endpoint")
    )
    return [EndpointSpend(row["endpoint"], row["spent"] or ZERO, row["requests"]) for row in rows]


@dataclass
class Breakdown:
    """Counts of records per value of one column, largest first."""

    label: str
    parameter: str
    rows: list[tuple[str, str, int]] = field(default_factory=list)  # (value, label, count)

    @property
    def total(self) -> int:
        return sum(count for _, _, count in self.rows)


def status_breakdowns(records: QuerySet[UsageRecord], since: datetime) -> list[Breakdown]:
    """Outcome and settlement counts since ``since``, in one ``GROUP BY``."""
    rows = (
        records.filter(created_at__gte=since)
        .order_by()
        .values("outcome", "settlement")
        .annotate(n=Count("*"))
    )
    outcomes: dict[str, int] = defaultdict(int)
    settlements: dict[str, int] = defaultdict(int)
    for row in rows:
        outcomes[row["outcome"]] += row["n"]
        settlements[row["settlement"]] += row["n"]
    outcome_labels = dict(Outcome.choices)
    settlement_labels = dict(Settlement.choices)
    return [
        Breakdown(
            "Outcome",
            "outcome__exact",
            sorted(
                ((v, outcome_labels.get(v, v), n) for v, n in outcomes.items()),
                key=lambda row: -row[2],
            ),
        ),
        Breakdown(
            "Settlement",
            "settlement__exact",
            sorted(
                ((v, settlement_labels.get(v, v), n) for v, n in settlements.items()),
                key=lambda row: -row[2],
            ),
        ),
    ]


@dataclass(frozen=True)
class Attention:
    pending: int
    unpriced: int
    oldest_pending: datetime | None
    latest: list[UsageRecord]


def needing_attention(records: QuerySet[UsageRecord], limit: int = 8) -> Attention:
    """Pending and unpriced records (all time): the partial index keeps this small."""
    waiting = records.needing_attention()  # type: ignore[attr-defined]
    counts = waiting.order_by().aggregate(
        pending=Count("id", filter=Q(settlement=Settlement.PENDING)),
        unpriced=Count("id", filter=Q(settlement=Settlement.UNPRICED)),
    )
    oldest = (
        waiting.filter(settlement=Settlement.PENDING)
        .order_by("created_at")
        .values_list("created_at", flat=True)
        .first()
    )
    latest = list(waiting.select_related("user").order_by("-created_at")[:limit])
    return Attention(counts["pending"], counts["unpriced"], oldest, latest)
