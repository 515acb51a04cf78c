"""The operators' dashboard: spend per day and model, per endpoint, top users, statuses.

Drawn on the server: the daily chart is an inline SVG whose geometry is
computed here, the other figures are HTML tables with CSS bars. No script,
no build step, and it prints. For everyone, or for one user (``?user=<id>``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse

from billing import reports
from billing.models import UsageRecord
from billing.money import format_usd

# Tableau 10, colour-blind friendly enough to tell six series apart; grey for "other".
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948")
OTHER_COLOUR = "#bab0ac"

CHART_WIDTH = 960
CHART_HEIGHT = 280
MARGIN_LEFT = 64
MARGIN_RIGHT = 8
MARGIN_TOP = 12
MARGIN_BOTTOM = 28


def nice_ceiling(amount: Decimal) -> Decimal:
    """The smallest 1, 2, 2.5 or 5 x 10ⁿ at or above ``amount`` (for the y axis)."""
    if amount <= 0:
        return Decimal(1)
    exponent = amount.adjusted()
    for _ in range(3):
        for step in (Decimal(1), Decimal(2), Decimal("2.5"), Decimal(5)):
            candidate = step.scaleb(exponent)
            if candidate >= amount:
                return candidate
        exponent += 1
    return amount


def short_usd(amount: Decimal) -> str:
    """An axis label: whole dollars when they are enough."""
    if amount == amount.to_integral_value():
        return f"${int(amount):,}"
    return f"${format_usd(amount)}"


@dataclass(frozen=True)
class Segment:
    x: float
    y: float
    width: float
    height: float
    colour: str
    title: str


@dataclass(frozen=True)
class Tick:
    y: float
    label: str


@dataclass(frozen=True)
class DayLabel:
    x: float
    label: str


@dataclass(frozen=True)
class LegendEntry:
    model: str
    colour: str
    total: str


@dataclass(frozen=True)
class StackedBars:
    width: int
    height: int
    plot_left: int
    plot_right: int
    plot_bottom: float
    segments: list[Segment]
    ticks: list[Tick]
    days: list[DayLabel]
    legend: list[LegendEntry]
    empty: bool


def stacked_bars(spend: reports.DailySpend) -> StackedBars:
    """Geometry of a stacked bar per day (one colour per model)."""
    colours = {
        model: OTHER_COLOUR if model == "other" else PALETTE[index % len(PALETTE)]
        for index, model in enumerate(spend.models)
    }
    top = nice_ceiling(max((spend.day_total(day) for day in spend.days), default=Decimal(0)))
    plot_height = CHART_HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
    plot_width = CHART_WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    slot = plot_width / max(len(spend.days), 1)
    bar_width = slot * 0.72
    bottom = MARGIN_TOP + plot_height
    segments = []
    for index, day in enumerate(spend.days):
        x = MARGIN_LEFT + index * slot + (slot - bar_width) / 2
        y = float(bottom)
        for model in spend.models:
            amount = spend.amounts.get((day, model), Decimal(0))
            if amount <= 0:
                continue
            height = float(amount / top) * plot_height
            y -= height
            segments.append(
                Segment(
                    x=round(x, 2),
                    y=round(y, 2),
                    width=round(bar_width, 2),
                    height=round(height, 2),
                    colour=colours[model],
                    title=f"{day:%a %d %b} · {model}: ${format_usd(amount)}",
                )
            )
    ticks = [
        Tick(y=round(bottom - plot_height * step / 4, 2), label=short_usd(top * step / 4))
        for step in range(5)
    ]
    labels = [
        DayLabel(x=round(MARGIN_LEFT + index * slot + slot / 2, 2), label=_day_label(day))
        for index, day in enumerate(spend.days)
        if index % 5 == 0 or index == len(spend.days) - 1
    ]
    legend = [
        LegendEntry(model, colours[model], format_usd(spend.model_total(model)))
        for model in spend.models
    ]
    return StackedBars(
        width=CHART_WIDTH,
        height=CHART_HEIGHT,
        plot_left=MARGIN_LEFT,
        plot_right=CHART_WIDTH - MARGIN_RIGHT,
        plot_bottom=bottom,
        segments=segments,
        ticks=ticks,
        days=labels,
        legend=legend,
        empty=not segments,
    )


def _day_label(day: date) -> str:
    return f"{day:%d %b}"


def _percent(part: int | Decimal, whole: int | Decimal) -> int:
    return round(100 * part / whole) if whole else 0


def _endpoint_filter(endpoint: str, chosen: Any) -> dict[str, Any]:
    return {"endpoint": endpoint, **({"user": chosen.pk} if chosen is not None else {})}


def dashboard_view(request: HttpRequest, admin_context: dict[str, Any]) -> HttpResponse:
    """The dashboard page; ``admin_context`` is the admin site's ``each_context``."""
    if not request.user.has_perm("billing.view_usagerecord"):
        raise PermissionDenied
    periods = reports.Periods.at()
    records = UsageRecord.objects.all()
    chosen = None
    raw_user = request.GET.get("user", "").strip()
    if raw_user:
        users = get_user_model().objects
        chosen = (
            users.filter(pk=int(raw_user)).first()
            if raw_user.isdigit()
            else users.filter(username=raw_user).first()
        )
        if chosen is not None:
            records = records.filter(user=chosen)
    spend = reports.daily_spend(records, periods)
    today, week = periods.today.date(), periods.week.date()
    spent_today = sum((spend.day_total(day) for day in spend.days if day >= today), Decimal(0))
    spent_week = sum((spend.day_total(day) for day in spend.days if day >= week), Decimal(0))
    requests = sum(spend.requests.values())
    breakdowns = reports.status_breakdowns(records, periods.month)
    for breakdown in breakdowns:
        breakdown.rows = [
            (value, label, count, _percent(count, breakdown.total))  # type: ignore[misc]
            for value, label, count in breakdown.rows
        ]
    by_endpoint = reports.spend_by_endpoint(records, periods.month)
    endpoint_spent = sum((row.spent for row in by_endpoint), Decimal(0))
    top_users = [] if chosen is not None else reports.top_users(periods.week)
    top_spent = max((row.spent for row in top_users), default=Decimal(0))
    dashboard = reverse("admin:billing_dashboard")
    changelist = reverse("admin:billing_usagerecord_changelist")
    context = {
        **admin_context,
        "title": f"Spend dashboard — {chosen.get_username()}" if chosen else "Spend dashboard",
        "chosen": chosen,
        "unknown_user": raw_user if raw_user and chosen is None else "",
        "periods": periods,
        "chart": stacked_bars(spend),
        "cards": [
            ("Today", f"${format_usd(spent_today)}"),
            ("Last 7 days", f"${format_usd(spent_week)}"),
            ("Last 30 days", f"${format_usd(spend.total)}"),
            ("Requests, 30 days", f"{requests:,}"),
        ],
        "top_users": [
            {
                "label": row.username,
                "href": f"{dashboard}?{urlencode({'user': row.user_id})}",
                "spent": format_usd(row.spent),
                "requests": row.requests,
                "share": _percent(row.spent, top_spent),
            }
            for row in top_users
        ],
        "endpoints": [
            {
                "label": row.endpoint,
                "href": f"{changelist}?{urlencode(_endpoint_filter(row.endpoint, chosen))}",
                "spent": format_usd(row.spent),
                "requests": row.requests,
                "share": _percent(row.spent, endpoint_spent),
            }
            for row in by_endpoint
        ],
        "breakdowns": breakdowns,
        "attention": reports.needing_attention(records),
    }
    return TemplateResponse(request, "admin/billing/dashboard.html", context)
