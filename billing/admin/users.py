"""The users' page: one row per user with balance, spend, failures and keys.

Everything a row shows comes with the row: the spend figures are annotations
of the page's query, the key meters are prefetched onto the page's users, and
whether the viewer may grant credits is an annotation too. The admin object
is shared by every request and thread, so it keeps nothing of any of them.
"""

from __future__ import annotations

from datetime import UTC
from decimal import Decimal
from typing import Any

from django.contrib import admin
from django.db.models import BooleanField, Exists, OuterRef, Prefetch, Q, QuerySet, Value
from django.http import HttpRequest
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.html import format_html
from django.utils.safestring import mark_safe

from billing import reports
from billing.admin.common import CAN_GRANT, admin_url, usd
from billing.admin.grants import GrantCreditsAction
from billing.admin_tools import EstimatedCountPaginator
from billing.conf import billing_settings
from billing.key_admin import key_admin_url
from billing.models import KeyMeter, UsageRecord
from billing.money import format_usd

#: Where a request keeps the instant its figures are computed for (see ``request_periods``).
PERIODS_ATTRIBUTE = "_billing_periods"
#: The annotation that tells a row whether the viewer may grant credits.
CAN_GRANT_ANNOTATION = "viewer_can_grant"
#: The attribute a row's key meters are prefetched to, most spent first.
METERS_ATTRIBUTE = "meters_by_spend"


def request_periods(request: HttpRequest) -> reports.Periods:
    """The periods of this request's figures: one instant for all its queries, kept on it."""
    periods: reports.Periods | None = getattr(request, PERIODS_ATTRIBUTE, None)
    if periods is None:
        periods = reports.Periods.at()
        setattr(request, PERIODS_ATTRIBUTE, periods)
    return periods


class ActivityFilter(admin.SimpleListFilter):
    title = "activity"
    parameter_name = "activity"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("week", "Requests in the last 7 days"), ("idle", "No request in 7 days")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() not in ("week", "idle"):
            return queryset
        recent = Exists(
            UsageRecord.objects.filter(
                user=OuterRef("pk"), created_at__gte=request_periods(request).week
            )
        )
        return queryset.filter(recent if self.value() == "week" else ~recent)


class BalanceFilter(admin.SimpleListFilter):
    title = "balance"
    parameter_name = "balance"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        threshold = format_usd(billing_settings.CREDITS_LOW_THRESHOLD)
        return [("low", f"Below ${threshold}"), ("none", "None left (≤ $0)")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        no_account = Q(credit_account__isnull=True)
        if self.value() == "low":
            low = Q(credit_account__balance__lt=billing_settings.CREDITS_LOW_THRESHOLD)
            return queryset.filter(low | no_account)
        if self.value() == "none":
            return queryset.filter(Q(credit_account__balance__lte=0) | no_account)
        return queryset


class UserCountPaginator(EstimatedCountPaginator):
    """Counts the users matching the search and filters, without the aggregates.

    Made per request by the changelist (``get_paginator``), so what it works
    out belongs to that request alone.
    """

    @cached_property
    def count(self) -> int:
        queryset: QuerySet[Any] = self.object_list  # type: ignore[assignment]
        users = queryset.model._default_manager.filter(
            pk__in=queryset.order_by().values("pk")
        ).order_by("pk")
        counter = EstimatedCountPaginator(users, self.per_page)
        count = counter.count
        self.is_estimate = counter.is_estimate
        return count


class UserActivityAdmin(GrantCreditsAction, admin.ModelAdmin):  # type: ignore[type-arg]
    """One row per user with balance and spend. Not registered for the user model:

    the host site keeps its own ``UserAdmin``; this admin only serves the
    users' page at ``billing/creditaccount/users/`` (see ``CreditAccountAdmin``).
    """

    list_display = [
        "user_display",
        "balance_display",
        "today_display",
        "week_display",
        "month_display",
        "total_display",
        "requests_display",
        "failures_display",
        "last_request_display",
        "top_model_display",
        "keys_display",
    ]
    list_display_links = None
    search_fields = ["username", "email"]
    list_filter = [ActivityFilter, BalanceFilter]
    list_per_page = 50
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    actions = ["grant_or_adjust"]
    ordering = ["-spend_week", "username"]
    change_list_template = "admin/billing/users.html"
    paginator = UserCountPaginator

    # A user's keys listed on their row, most spent first; more are on the keys' page.
    KEYS_SHOWN = 4

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return bool(
            request.user.has_perm("billing.view_creditaccount")
            and request.user.has_perm("billing.view_usagerecord")
        )

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return bool(request.user.has_perm(CAN_GRANT))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        can_grant = Value(self.has_change_permission(request), output_field=BooleanField())
        # The page's key meters in one query, not one per row.
        meters = Prefetch(
            "key_meters",
            queryset=KeyMeter.objects.order_by("-spent", "api_key_id"),
            to_attr=METERS_ATTRIBUTE,
        )
        users = self.model._default_manager.annotate(**{CAN_GRANT_ANNOTATION: can_grant})
        return reports.with_user_activity(users.prefetch_related(meters), request_periods(request))

    @admin.display(description="User", ordering="username")
    def user_display(self, user: Any) -> str:
        keys = key_admin_url(user.pk)
        return format_html(
            '<strong>{}</strong><br><span class="quiet">{}</span>'
            '<span class="row-links"><a href="{}">records</a> · <a href="{}">ledger</a> · '
            '{}<a href="{}">chart</a></span>',
            user.get_username(),
            user.email,
            admin_url("billing_usagerecord_changelist", user=user.pk),
            admin_url("billing_creditledgerentry_changelist", user=user.pk),
            format_html('<a href="{}">keys</a> · ', keys) if keys else "",
            admin_url("billing_dashboard", user=user.pk),
        )

    @admin.display(description="Balance", ordering="balance")
    def balance_display(self, user: Any) -> str:
        state = ""
        if user.balance <= 0:
            state = "money-none"
        elif user.balance < billing_settings.CREDITS_LOW_THRESHOLD:
            state = "money-low"
        grant = (
            format_html(
                '<br><a class="button grant-button" href="{}">Grant credits</a>',
                admin_url("billing_grant", user.pk),
            )
            if getattr(user, CAN_GRANT_ANNOTATION)
            else ""
        )
        return format_html('<span class="money {}">{}</span>{}', state, usd(user.balance), grant)

    @admin.display(description="Today", ordering="spend_today")
    def today_display(self, user: Any) -> str:
        return _money_cell(user.spend_today)

    @admin.display(description="7 days", ordering="spend_week")
    def week_display(self, user: Any) -> str:
        return _money_cell(user.spend_week)

    @admin.display(description="30 days", ordering="spend_month")
    def month_display(self, user: Any) -> str:
        return _money_cell(user.spend_month)

    @admin.display(description="All time", ordering="spend_total")
    def total_display(self, user: Any) -> str:
        return _money_cell(user.spend_total)

    @admin.display(description="Requests (30 d)", ordering="requests_month")
    def requests_display(self, user: Any) -> str:
        return format_html('<span class="num">{}</span>', f"{user.requests_month:,}")

    @admin.display(description="Failed (30 d)", ordering="failure_share")
    def failures_display(self, user: Any) -> str:
        if not user.requests_month or user.failure_share is None:
            return mark_safe('<span class="num quiet">—</span>')
        failures = round(user.failure_share * user.requests_month)
        share = 100 * user.failure_share
        level = "bad" if share >= 10 else "warn" if share >= 3 else ""
        return format_html(
            '<span class="num {}" title="{} of {} requests">{}%</span>',
            level,
            f"{failures:,}",
            f"{user.requests_month:,}",
            f"{share:.1f}",
        )

    @admin.display(description="Last request", ordering="last_request")
    def last_request_display(self, user: Any) -> str:
        if user.last_request is None:
            return mark_safe('<span class="quiet">never</span>')
        local = timezone.localtime(user.last_request)
        return format_html(
            '<span title="{}">{}</span>', local.isoformat(), f"{local:%Y-%m-%d %H:%M}"
        )

    @admin.display(description="Top model (30 d)", ordering="top_model")
    def top_model_display(self, user: Any) -> str:
        return user.top_model or "—"

    @admin.display(description="Keys: spent / cap, today (UTC) / cap, rate")
    def keys_display(self, user: Any) -> str:
        meters: list[KeyMeter] = getattr(user, METERS_ATTRIBUTE, [])
        if not meters:
            return mark_safe('<span class="quiet">—</span>')
        today = timezone.now().astimezone(UTC).date()
        lines = [
            format_html(
                '<span class="key-meter"><code>{}</code> {} · today {}{}</span>',
                meter.label or f"#{meter.api_key_id}",
                _spent_against(meter.spent, meter.spend_limit),
                _spent_against(meter.spent_on(today), meter.daily_spend_limit),
                f" · {meter.requests_per_minute:,}/min" if meter.requests_per_minute else "",
            )
            for meter in meters[: self.KEYS_SHOWN]
        ]
        more = len(meters) - self.KEYS_SHOWN
        keys = key_admin_url(user.pk)
        if more > 0:
            lines.append(
                format_html('<a href="{}">{} more</a>', keys, more)
                if keys
                else format_html('<span class="quiet">{} more</span>', more)
            )
        return mark_safe("<br>".join(lines))  # noqa: S308  (each line is escaped)

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> Any:
        context = {
            "title": "Users' usage and billing",
            "subtitle": None,
            "low_threshold": format_usd(billing_settings.CREDITS_LOW_THRESHOLD),
            **(extra_context or {}),
        }
        return super().changelist_view(request, context)

    def grant_targets(self, queryset: QuerySet[Any]) -> list[Any]:
        # The users themselves, without the page's annotations and prefetches.
        return list(self.model._default_manager.filter(pk__in=queryset.values("pk")))


def _spent_against(spent: Decimal, cap: Decimal | None) -> str:
    if cap is None:
        return usd(spent)
    css = "money-none" if spent >= cap else ""
    return format_html('<span class="money {}">{} / {}</span>', css, usd(spent), usd(cap))


def _money_cell(amount: Decimal) -> str:
    if not amount:
        return mark_safe('<span class="money quiet">$0.00</span>')
    return format_html('<span class="money">{}</span>', usd(amount))
