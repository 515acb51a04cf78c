"""The "grant / adjust credits" form: the only way the admin changes a balance.

It calls ``billing.services.grant_credits`` with the acting operator, one
ledger row per user, and is served both as a page of its own (one user) and as
a changelist action (the selected users).
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.db import IntegrityError
from django.db.models import QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.utils.html import format_html

from billing.admin.common import admin_url, usd
from billing.models import CreditAccount, LedgerKind
from billing.money import format_usd
from billing.services import balance_of, grant_credits


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


def grant_credits_form(
    request: HttpRequest,
    users: list[Any],
    submitted: bool,
    admin_context: dict[str, Any],
    action: str | None = None,
) -> TemplateResponse | None:
    """The form for ``users``, or ``None`` once a valid submission has been applied.

    ``submitted`` says whether ``request.POST`` holds the filled-in form; ``action``
    names the changelist action the form posts back to, if it is one.
    """
    if submitted:
        form = GrantCreditsForm(request.POST)
        if form.is_valid():
            _report_grants(request, _grant_to_users(request, users, form), form)
            return None
    else:
        form = GrantCreditsForm(initial={"token": uuid.uuid4()})
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


class GrantCreditsAction:
    """The changelist action ``grant_or_adjust``: the form for the users a selection means."""

    admin_site: admin.AdminSite

    def grant_targets(self, queryset: QuerySet[Any]) -> list[Any]:
        """The users the selected rows stand for."""
        raise NotImplementedError

    @admin.action(description="Grant or adjust credits", permissions=["change"])
    def grant_or_adjust(
        self, request: HttpRequest, queryset: QuerySet[Any]
    ) -> TemplateResponse | None:
        return grant_credits_form(
            request,
            self.grant_targets(queryset),
            "apply" in request.POST,
            self.admin_site.each_context(request),
            action="grant_or_adjust",
        )


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


def _report_grants(
    request: HttpRequest, done: list[tuple[Any, Decimal]], form: GrantCreditsForm
) -> None:
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
