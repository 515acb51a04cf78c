"""Operators' view of money: accounts, the ledger, usage records and prices.

Ledger and usage records are read-only: a balance changes only through the
"Grant or adjust credits" action, which writes a ledger row with the acting
operator.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse

from billing.models import CreditAccount, CreditLedgerEntry, LedgerKind, ModelPrice, UsageRecord
from billing.money import format_usd
from billing.services import grant_credits


class ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class GrantCreditsForm(forms.Form):
    amount = forms.DecimalField(
        max_digits=18, decimal_places=6, help_text="USD; negative to take credit away."
    )
    note = forms.CharField(max_length=255, required=False)

    def clean_amount(self) -> Decimal:
        amount: Decimal = self.cleaned_data["amount"]
        if amount == 0:
            raise forms.ValidationError("The amount must not be zero.")
        return amount


@admin.register(CreditAccount)
class CreditAccountAdmin(ReadOnlyAdmin):
    list_display = ["user", "balance_usd", "in_flight", "created_at"]
    search_fields = ["user__username", "user__email"]
    list_select_related = ["user"]
    actions = ["grant_or_adjust"]

    @admin.display(description="Balance (USD)", ordering="balance")
    def balance_usd(self, account: CreditAccount) -> str:
        return format_usd(account.balance)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Needed for the action; every field stays read-only.
        return bool(request.user.has_perm("billing.change_creditaccount"))

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return ["user", "balance", "in_flight", "in_flight_expires_at", "created_at"]

    @admin.action(description="Grant or adjust credits", permissions=["change"])
    def grant_or_adjust(
        self, request: HttpRequest, queryset: QuerySet[CreditAccount]
    ) -> HttpResponse | None:
        form = GrantCreditsForm(request.POST if "apply" in request.POST else None)
        if "apply" in request.POST and form.is_valid():
            amount = form.cleaned_data["amount"]
            kind = LedgerKind.GRANT if amount > 0 else LedgerKind.ADJUSTMENT
            for account in queryset.select_related("user"):
                grant_credits(
                    account.user,
                    amount,
                    note=form.cleaned_data["note"],
                    actor=request.user,
                    kind=kind,
                )
            self.message_user(
                request,
                f"{kind.label} of ${amount} written for {queryset.count()} account(s).",
                messages.SUCCESS,
            )
            return None
        context = {
            **self.admin_site.each_context(request),
            "title": "Grant or adjust credits",
            "form": form,
            "accounts": queryset.select_related("user"),
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/billing/grant_credits.html", context)


@admin.register(CreditLedgerEntry)
class CreditLedgerEntryAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "user", "kind", "amount_usd", "note", "actor"]
    list_filter = ["kind", "created_at"]
    search_fields = ["user__username", "reference", "note"]
    date_hierarchy = "created_at"
    list_select_related = ["user", "actor"]

    @admin.display(description="Amount (USD)", ordering="amount")
    def amount_usd(self, entry: CreditLedgerEntry) -> str:
        return format_usd(entry.amount)


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    list_display = [
        "created_at",
        "user",
        "model",
        "endpoint",
        "streamed",
        "outcome",
        "settlement",
        "prompt_tokens",
        "completion_tokens",
        "billed_usd",
        "cost_source",
    ]
    list_filter = ["settlement", "outcome", "streamed", "endpoint", "cost_source", "model"]
    search_fields = ["=generation_id", "=request_id", "user__username"]
    date_hierarchy = "created_at"
    list_select_related = ["user"]

    @admin.display(description="Billed (USD)", ordering="billed")
    def billed_usd(self, record: UsageRecord) -> str:
        return format_usd(record.billed)


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["model_id", "name", "prompt", "completion", "input_cache_read", "updated_at"]
    search_fields = ["model_id", "name"]
