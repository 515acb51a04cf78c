"""Operators' view of money: users' spend, the dashboard, usage records, the ledger, prices.

Read-only where the data is history: usage records and ledger rows are never
edited, and a balance changes only through the "grant / adjust credits" form,
which calls ``billing.services.grant_credits`` with the acting operator. The
pages use Django's model permissions: *view* on a model for its pages (the
dashboard needs ``view_usagerecord``, the users' page ``view_creditaccount``
too), *change* on ``CreditAccount`` to grant credits.

Built to stay fast on a million usage records: aggregates are SQL, list pages
never count a big table (see ``billing.admin_tools``), and the queries they
run are backed by indexes.
"""

from __future__ import annotations

import uuid
from datetime import UTC
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.views.main import ChangeList
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import IntegrityError
from django.db.models import Count, Exists, OuterRef, Q, QuerySet, Sum
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, StreamingHttpResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import mark_safe
from django.views.decorators.http import require_POST

from billing import reports
from billing.admin_tools import (
    EstimatedCountPaginator,
    UserFilter,
    cached_choices_filter,
    with_period_probing,
)
from billing.conf import billing_settings
from billing.dashboard import dashboard_view
from billing.exports import usage_csv_response
from billing.key_admin import key_admin_url
from billing.models import (
    CreditAccount,
    CreditLedgerEntry,
    KeyMeter,
    LedgerKind,
    ModelPrice,
    Outcome,
    Settlement,
    UsageRecord,
)
from billing.money import format_usd
from billing.services import balance_of, grant_credits

CAN_GRANT = "billing.change_creditaccount"


def usd(amount: Decimal | None) -> str:
    return "—" if amount is None else f"${format_usd(amount)}"


def admin_url(name: str, *args: Any, **query: Any) -> str:
    url = reverse(f"admin:{name}", args=args)
    return f"{url}?{urlencode(query)}" if query else url


class ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """History: viewable, never added, edited or deleted here."""

    show_facets = admin.ShowFacets.NEVER

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


# --- Granting credits -----------------------------------------------------------


class GrantCreditsForm(forms.Form):
    amount = forms.DecimalField(
        max_digits=18,
        decimal_places=6,
        help_text="US dollars. A grant or refund is positive; an adjustment may be negative.",
        widget=forms.NumberInput(attrs={"step": "0.01", "autofocus": True}),
    )
    kind = forms.ChoiceField(
        choices=[
            (LedgerKind.GRANT, "Grant (credit bought or given)"),
            (LedgerKind.ADJUSTMENT, "Adjustment (a correction, either sign)"),
            (LedgerKind.REFUND, "Refund (charges given back)"),
        ],
        initial=LedgerKind.GRANT,
    )
    note = forms.CharField(
        max_length=255,
        required=False,
        help_text="Why: it is kept on the ledger row with your name.",
        widget=forms.TextInput(attrs={"size": 60}),
    )
    # One token per rendered form: submitting it twice writes one ledger row.
    token = forms.UUIDField(widget=forms.HiddenInput)

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        amount, kind = data.get("amount"), data.get("kind")
        if amount is not None and not amount.is_finite():
            self.add_error("amount", "Enter a finite amount.")
        elif amount == 0:
            self.add_error("amount", "The amount must not be zero.")
        elif amount is not None and amount < 0 and kind != LedgerKind.ADJUSTMENT:
            self.add_error("amount", "Only an adjustment can take credit away.")
        return data


def _grant_to_users(
    request: HttpRequest, users: list[Any], form: GrantCreditsForm
) -> list[tuple[Any, Decimal]]:
    """Write one ledger row per user; returns (user, new balance). Idempotent per form."""
    data = form.cleaned_data
    done = []
    for user in users:
        try:
            grant_credits(
                user,
                data["amount"],
                note=data["note"],
                actor=request.user,
                kind=data["kind"],
                reference=f"admin:{data['token']}:{user.pk}",
            )
        except IntegrityError:
            messages.warning(
                request, f"This form was already submitted for {user.get_username()}: skipped."
            )
            continue
        done.append((user, balance_of(user)))
    return done


def grant_page(
    request: HttpRequest,
    users: list[Any],
    form: GrantCreditsForm,
    admin_context: dict[str, Any],
    action: str | None = None,
) -> TemplateResponse:
    balances = dict(CreditAccount.objects.filter(user__in=users).values_list("user_id", "balance"))
    context = {
        **admin_context,
        "title": "Grant or adjust credits",
        "form": form,
        "targets": [(user, usd(balances.get(user.pk, Decimal(0)))) for user in users],
        "action": action,
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        "cancel_url": admin_url("billing_users"),
    }
    return TemplateResponse(request, "admin/billing/grant_credits.html", context)


def _report_grants(request: HttpRequest, done: list[tuple[Any, Decimal]], form: Any) -> None:
    data = form.cleaned_data
    kind = LedgerKind(data["kind"]).label.lower()
    for user, balance in done:
        messages.success(
            request,
            format_html(
                "Wrote a {} of ${} for {}: the balance is now <strong>{}</strong>. "
                '<a href="{}">See the ledger</a>.',
                kind,
                format_usd(data["amount"]),
                user.get_username(),
                usd(balance),
                admin_url("billing_creditledgerentry_changelist", user=user.pk),
            ),
        )


# --- The users' page -----------------------------------------------------------------


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
                user=OuterRef("pk"), created_at__gte=reports.Periods.at().week
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


class UserActivityAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """One row per user with balance and spend. Not registered for the user model:

    the host site keeps its own ``UserAdmin``; this admin only serves the
    users' page at ``billing/creditaccount/users/``.
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
        periods = getattr(request, "_billing_periods", None) or reports.Periods.at()
        return reports.with_user_activity(self.model._default_manager.all(), periods)

    def get_paginator(
        self, request: HttpRequest, queryset: Any, per_page: int, *args: Any, **kwargs: Any
    ) -> Any:
        # Count users, not the aggregate: the annotations do not change the row count.
        return UserCountPaginator(queryset, per_page, *args, **kwargs)

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
            if self._can_grant
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

    # A user's keys listed on their row, most spent first; more are on the keys' page.
    KEYS_SHOWN = 4

    def get_changelist_instance(self, request: HttpRequest) -> ChangeList:
        changelist = super().get_changelist_instance(request)
        # The page's key meters in one query, not one per row.
        self._meters: dict[int, list[KeyMeter]] = {}
        users = [user.pk for user in changelist.result_list]
        for meter in KeyMeter.objects.filter(user_id__in=users).order_by("-spent", "api_key_id"):
            self._meters.setdefault(meter.user_id, []).append(meter)
        return changelist

    @admin.display(description="Keys: spent / cap, today (UTC) / cap, rate")
    def keys_display(self, user: Any) -> str:
        meters = getattr(self, "_meters", {}).get(user.pk, [])
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
        request._billing_periods = reports.Periods.at()  # type: ignore[attr-defined]
        self._can_grant = request.user.has_perm(CAN_GRANT)
        context = {
            "title": "Users' usage and billing",
            "subtitle": None,
            "low_threshold": format_usd(billing_settings.CREDITS_LOW_THRESHOLD),
            **(extra_context or {}),
        }
        return super().changelist_view(request, context)

    @admin.action(description="Grant or adjust credits", permissions=["change"])
    def grant_or_adjust(self, request: HttpRequest, queryset: QuerySet[Any]) -> HttpResponse | None:
        users = list(self.model._default_manager.filter(pk__in=queryset.values("pk")))
        if "apply" in request.POST:
            form = GrantCreditsForm(request.POST)
            if form.is_valid():
                _report_grants(request, _grant_to_users(request, users, form), form)
                return None
        else:
            form = GrantCreditsForm(initial={"token": uuid.uuid4()})
        return grant_page(
            request, users, form, self.admin_site.each_context(request), action="grant_or_adjust"
        )


def _spent_against(spent: Decimal, cap: Decimal | None) -> str:
    if cap is None:
        return usd(spent)
    css = "money-none" if spent >= cap else ""
    return format_html('<span class="money {}">{} / {}</span>', css, usd(spent), usd(cap))


def _money_cell(amount: Decimal) -> str:
    if not amount:
        return mark_safe('<span class="money quiet">$0.00</span>')
    return format_html('<span class="money">{}</span>', usd(amount))


class UserCountPaginator(EstimatedCountPaginator):
    """Counts the users matching the search and filters, without the aggregates."""

    def __init__(self, object_list: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(object_list, *args, **kwargs)
        self._count_queryset = object_list.model._default_manager.filter(
            pk__in=object_list.order_by().values("pk")
        ).order_by("pk")

    @property
    def count(self) -> int:
        if not hasattr(self, "_users_count"):
            counter = EstimatedCountPaginator(self._count_queryset, self.per_page)
            self._users_count = counter.count
            self.is_estimate = counter.is_estimate
        return self._users_count


# --- Credit accounts -----------------------------------------------------------------


@admin.register(CreditAccount)
class CreditAccountAdmin(ReadOnlyAdmin):
    list_display = ["user", "balance_usd", "in_flight", "in_flight_expires_at", "created_at"]
    search_fields = ["user__username", "user__email"]
    list_select_related = ["user"]
    actions = ["grant_or_adjust"]
    show_full_result_count = False
    paginator = EstimatedCountPaginator

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Needed for the grant action; every field stays read-only.
        return bool(request.user.has_perm(CAN_GRANT))

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return ["user", "balance", "in_flight", "in_flight_expires_at", "created_at"]

    @admin.display(description="Balance", ordering="balance")
    def balance_usd(self, account: CreditAccount) -> str:
        return usd(account.balance)

    def get_urls(self) -> list[URLPattern]:
        wrap = self.admin_site.admin_view
        return [
            path("users/", wrap(self.users_view), name="billing_users"),
            path("grant/<int:user_id>/", wrap(self.grant_view), name="billing_grant"),
            *super().get_urls(),
        ]

    def users_view(self, request: HttpRequest) -> HttpResponse:
        """The users' page (a fresh admin per request: it keeps per-request state)."""
        users_admin = UserActivityAdmin(get_user_model(), self.admin_site)
        response: HttpResponse = users_admin.changelist_view(request)
        return response

    def grant_view(self, request: HttpRequest, user_id: int) -> HttpResponse:
        """Grant or adjust one user's credits: a form, then back to the users' page."""
        if not request.user.has_perm(CAN_GRANT):
            raise PermissionDenied
        user = get_object_or_404(get_user_model(), pk=user_id)
        if request.method == "POST":
            form = GrantCreditsForm(request.POST)
            if form.is_valid():
                _report_grants(request, _grant_to_users(request, [user], form), form)
                return HttpResponseRedirect(admin_url("billing_users", q=user.get_username()))
        else:
            form = GrantCreditsForm(initial={"token": uuid.uuid4()})
        return grant_page(request, [user], form, self.admin_site.each_context(request))

    @admin.action(description="Grant or adjust credits", permissions=["change"])
    def grant_or_adjust(
        self, request: HttpRequest, queryset: QuerySet[CreditAccount]
    ) -> HttpResponse | None:
        users = [account.user for account in queryset.select_related("user")]
        if "apply" in request.POST:
            form = GrantCreditsForm(request.POST)
            if form.is_valid():
                _report_grants(request, _grant_to_users(request, users, form), form)
                return None
        else:
            form = GrantCreditsForm(initial={"token": uuid.uuid4()})
        return grant_page(
            request, users, form, self.admin_site.each_context(request), action="grant_or_adjust"
        )


# --- The ledger -------------------------------------------------------------------------


@admin.register(CreditLedgerEntry)
class CreditLedgerEntryAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "user", "kind", "amount_usd", "note", "actor", "record_link"]
    list_filter = ["kind", UserFilter, "created_at"]
    search_fields = ["user__username", "=reference", "note"]
    date_hierarchy = "created_at"
    list_select_related = ["user", "actor"]
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    change_list_template = "admin/billing/change_list.html"

    def get_queryset(self, request: HttpRequest) -> QuerySet[CreditLedgerEntry]:
        return with_period_probing(super().get_queryset(request))

    @admin.display(description="Amount", ordering="amount")
    def amount_usd(self, entry: CreditLedgerEntry) -> str:
        css = "money-none" if entry.amount < 0 else "money-credit"
        return format_html('<span class="money {}">{}</span>', css, usd(entry.amount))

    @admin.display(description="Usage record")
    def record_link(self, entry: CreditLedgerEntry) -> str:
        if entry.usage_record_id is None:
            return "—"
        return format_html(
            '<a href="{}">#{}</a>',
            reverse("admin:billing_usagerecord_change", args=[entry.usage_record_id]),
            entry.usage_record_id,
        )


# --- Usage records ------------------------------------------------------------------------


class UsageTotalsPaginator(EstimatedCountPaginator):
    """Also sums the current filter (billed, tokens) in one aggregate query."""

    def totals(self) -> dict[str, Any]:
        queryset: QuerySet[UsageRecord] = self.object_list  # type: ignore[assignment]
        sums = queryset.order_by().aggregate(
            records=Count("id"),
            billed=Sum("billed"),
            prompt_tokens=Sum("prompt_tokens"),
            completion_tokens=Sum("completion_tokens"),
        )
        return {
            "records": f"{sums['records']:,}",
            "billed": usd(sums["billed"] or Decimal(0)),
            "prompt_tokens": f"{sums['prompt_tokens'] or 0:,}",
            "completion_tokens": f"{sums['completion_tokens'] or 0:,}",
        }


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    list_display = [
        "created_at",
        "user",
        "model",
        "endpoint",
        "streamed",
        "outcome_display",
        "settlement_display",
        "prompt_tokens",
        "completion_tokens",
        "billed_usd",
        "cost_source",
        "latency_display",
    ]
    list_filter = [
        cached_choices_filter("model", "model"),
        "outcome",
        "settlement",
        "streamed",
        cached_choices_filter("endpoint", "endpoint"),
        "cost_source",
        UserFilter,
    ]
    search_fields = ["=generation_id"]
    search_help_text = "Exact generation id (gen-…)."
    date_hierarchy = "created_at"
    list_select_related = ["user"]
    show_full_result_count = False
    paginator = UsageTotalsPaginator
    change_list_template = "admin/billing/usage_change_list.html"

    def get_queryset(self, request: HttpRequest) -> QuerySet[UsageRecord]:
        return with_period_probing(super().get_queryset(request))

    @admin.display(description="Billed", ordering="billed")
    def billed_usd(self, record: UsageRecord) -> str:
        return format_html('<span class="money">{}</span>', usd(record.billed))

    @admin.display(description="Outcome", ordering="outcome")
    def outcome_display(self, record: UsageRecord) -> str:
        css = "" if record.outcome == Outcome.COMPLETED else "bad"
        return format_html('<span class="{}">{}</span>', css, record.get_outcome_display())

    @admin.display(description="Settlement", ordering="settlement")
    def settlement_display(self, record: UsageRecord) -> str:
        css = "" if record.settlement == Settlement.SETTLED else "warn"
        return format_html('<span class="{}">{}</span>', css, record.get_settlement_display())

    @admin.display(description="Latency", ordering="upstream_latency_ms")
    def latency_display(self, record: UsageRecord) -> str:
        if record.upstream_latency_ms is None:
            return "—"
        return f"{record.upstream_latency_ms / 1000:.1f} s"

    def get_urls(self) -> list[URLPattern]:
        wrap = self.admin_site.admin_view
        return [
            path("dashboard/", wrap(self.dashboard), name="billing_dashboard"),
            path("export.csv", wrap(self.export_csv), name="billing_usagerecord_export"),
            *super().get_urls(),
        ]

    def dashboard(self, request: HttpRequest) -> HttpResponse:
        return dashboard_view(request, self.admin_site.each_context(request))

    def export_csv(self, request: HttpRequest) -> StreamingHttpResponse:
        """The current filter of the changelist (same query string) as CSV."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        changelist: ChangeList = self.get_changelist_instance(request)
        return usage_csv_response(request, changelist.get_queryset(request))

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> Any:
        query = request.GET.urlencode()
        export = reverse("admin:billing_usagerecord_export")
        context = {"export_url": f"{export}?{query}" if query else export, **(extra_context or {})}
        return super().changelist_view(request, context)


# --- Model prices ---------------------------------------------------------------------------


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = [
        "model_id",
        "name",
        "prompt_per_million",
        "completion_per_million",
        "cache_read_per_million",
        "updated_at",
    ]
    search_fields = ["model_id", "name"]
    change_list_template = "admin/billing/modelprice_change_list.html"

    @admin.display(description="Prompt / 1M tokens", ordering="prompt")
    def prompt_per_million(self, price: ModelPrice) -> str:
        return usd(price.prompt * 1_000_000)

    @admin.display(description="Completion / 1M tokens", ordering="completion")
    def completion_per_million(self, price: ModelPrice) -> str:
        return usd(price.completion * 1_000_000)

    @admin.display(description="Cache read / 1M tokens", ordering="input_cache_read")
    def cache_read_per_million(self, price: ModelPrice) -> str:
        if price.input_cache_read is None:
            return "—"
        return usd(price.input_cache_read * 1_000_000)

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "sync/",
                self.admin_site.admin_view(require_POST(self.sync_view)),
                name="billing_modelprice_sync",
            ),
            *super().get_urls(),
        ]

    def has_sync_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.has_perm("billing.change_modelprice"))

    def sync_view(self, request: HttpRequest) -> HttpResponse:
        """Fetch OpenRouter's catalogue now (``manage.py sync_model_prices``)."""
        if not self.has_sync_permission(request):
            raise PermissionDenied
        from io import StringIO

        output = StringIO()
        try:
            call_command("sync_model_prices", stdout=output, stderr=StringIO())
        except CommandError as error:
            self.message_user(request, f"Sync failed: {error}", messages.ERROR)
        else:
            self.message_user(request, output.getvalue().strip(), messages.SUCCESS)
        return HttpResponseRedirect(reverse("admin:billing_modelprice_changelist"))

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> Any:
        context = {
            "can_sync": self.has_sync_permission(request),
            "upstream": getattr(settings, "OPENROUTER_PROXY_BASE_URL", ""),
            **(extra_context or {}),
        }
        return super().changelist_view(request, context)
