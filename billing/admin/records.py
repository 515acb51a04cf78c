"""Usage records: the changelist with the filter's totals, its CSV export, the dashboard."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import Count, QuerySet, Sum
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html

from billing.admin.common import HistoryAdmin, usd
from billing.admin_tools import EstimatedCountPaginator, UserFilter, cached_choices_filter
from billing.dashboard import dashboard_view
from billing.exports import usage_csv_response
from billing.models import Outcome, Settlement, UsageRecord


class UsageTotalsPaginator(EstimatedCountPaginator):
    """Also sums the current filter (billed, tokens) in one aggregate query.

    The template reads ``cl.paginator.totals``: the paginator is made per
    request, so the sums are that request's.
    """

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


class UsageRecordAdmin(HistoryAdmin):
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
    list_select_related = ["user"]
    paginator = UsageTotalsPaginator
    change_list_template = "admin/billing/usage_change_list.html"

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
        """The spend dashboard (``billing.dashboard``), under the usage records' URLs."""
        return dashboard_view(request, self.admin_site.each_context(request))

    def export_csv(self, request: HttpRequest) -> StreamingHttpResponse:
        """The current filter of the changelist (same query string) as CSV."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        # The changelist this request's query string describes, and its filtered queryset.
        changelist = self.get_changelist_instance(request)
        return usage_csv_response(request, changelist.get_queryset(request))

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> Any:
        query = request.GET.urlencode()
        export = reverse("admin:billing_usagerecord_export")
        context = {"export_url": f"{export}?{query}" if query else export, **(extra_context or {})}
        return super().changelist_view(request, context)
