"""The credit ledger: every change of a balance, read-only."""

from __future__ import annotations

from django.contrib import admin
from django.urls import reverse
from django.utils.html import format_html

from billing.admin.common import HistoryAdmin, usd
from billing.admin_tools import UserFilter
from billing.models import CreditLedgerEntry


class CreditLedgerEntryAdmin(HistoryAdmin):
    list_display = ["created_at", "user", "kind", "amount_usd", "note", "actor", "record_link"]
    list_filter = ["kind", UserFilter, "created_at"]
    search_fields = ["user__username", "=reference", "note"]
    list_select_related = ["user", "actor"]
    change_list_template = "admin/billing/change_list.html"

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
