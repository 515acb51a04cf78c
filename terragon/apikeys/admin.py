"""API keys in the admin: create (the token is shown once), limit, revoke (for good).

A key's identity is never edited after it is created and the key is never
deleted (usage records keep its id): it is revoked, which is one way. Its
limits (spend caps, request rate) can be changed on its page; workers that
verified the key recently keep the old ones for up to
``OPENROUTER_PROXY_KEY_CACHE_SECONDS``. The list shows each key's state, its
spend in total and today (UTC) beside its caps, from billing's meter, and
filters by state and by owner (``?user=<id>``, as linked from the billing
users' page).
"""

from __future__ import annotations

from datetime import UTC
from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html

from billing.admin_tools import UserFilter
from billing.models import KeyMeter
from billing.money import format_usd
from openrouter_proxy.conf import proxy_settings
from terragon.apikeys.models import ApiKey
from terragon.apikeys.tokens import generate_token, hash_secret


class ApiKeyCreationForm(forms.ModelForm):  # type: ignore[type-arg]
    class Meta:
        model = ApiKey
        fields = [
            "user",
            "name",
            "expires_at",
            "spend_limit",
            "daily_spend_limit",
            "requests_per_minute",
        ]


class StateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("active", "Active"), ("expired", "Expired"), ("revoked", "Revoked")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> QuerySet[ApiKey]:
        now = timezone.now()
        if self.value() == "active":
            return queryset.filter(revoked_at__isnull=True).exclude(expires_at__lte=now)
        if self.value() == "expired":
            return queryset.filter(revoked_at__isnull=True, expires_at__lte=now)
        if self.value() == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        return queryset


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = [
        "prefix_display",
        "user",
        "name",
        "created_at",
        "last_used_at",
        "expires_at",
        "spent_display",
        "today_display",
        "rate_display",
        "state_display",
    ]
    list_filter = [StateFilter, UserFilter]
    search_fields = ["=prefix", "name", "user__username", "user__email"]
    list_select_related = ["user"]
    actions = ["revoke_keys"]
    readonly_fields = ["prefix", "created_at", "last_used_at", "revoked_at"]
    show_facets = admin.ShowFacets.NEVER

    def get_queryset(self, request: HttpRequest) -> QuerySet[ApiKey]:
        meter = KeyMeter.objects.filter(api_key_id=OuterRef("pk"))
        keys: QuerySet[ApiKey] = super().get_queryset(request)
        return keys.annotate(
            meter_spent=Subquery(meter.values("spent")[:1]),
            meter_spent_today=Subquery(meter.values("spent_today")[:1]),
            meter_spent_day=Subquery(meter.values("spent_day")[:1]),
        )

    def get_form(
        self, request: HttpRequest, obj: Any | None = None, change: bool = False, **kwargs: Any
    ) -> Any:
        if obj is None:
            kwargs["form"] = ApiKeyCreationForm
        return super().get_form(request, obj, change, **kwargs)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        if obj is not None:
            return [
                "user",
                "name",
                "prefix",
                "created_at",
                "last_used_at",
                "expires_at",
                "revoked_at",
            ]
        return list(self.readonly_fields)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Usage records keep the key's id: revoke instead.
        return False

    @admin.display(description="Spent / cap", ordering="meter_spent")
    def spent_display(self, key: ApiKey) -> str:
        return _against(getattr(key, "meter_spent", None), key.spend_limit)

    @admin.display(description="Today (UTC) / cap", ordering="meter_spent_today")
    def today_display(self, key: ApiKey) -> str:
        today = timezone.now().astimezone(UTC).date()
        on_today = getattr(key, "meter_spent_day", None) == today
        spent = getattr(key, "meter_spent_today", None) if on_today else None
        return _against(spent, key.daily_spend_limit)

    @admin.display(description="Rate", ordering="requests_per_minute")
    def rate_display(self, key: ApiKey) -> str:
        if key.requests_per_minute is None:
            return "—"
        return f"{key.requests_per_minute:,}/min"

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if not change:
            token, parts = generate_token()
            obj.prefix = parts.prefix
            obj.secret_hash = hash_secret(parts.secret)
            super().save_model(request, obj, form, change)
            self.message_user(
                request,
                format_html(
                    "New API key for {}: <code class='new-token'>{}</code> — copy it now, "
                    "it will not be shown again.",
                    obj.user,
                    token,
                ),
                messages.WARNING,
            )
            return
        super().save_model(request, obj, form, change)
        if set(form.changed_data) & {"spend_limit", "daily_spend_limit", "requests_per_minute"}:
            self.message_user(
                request,
                "The new limits apply to this key's next requests within "
                f"{proxy_settings.KEY_CACHE_SECONDS} s (workers remember verified keys "
                "that long).",
                messages.INFO,
            )

    @admin.display(description="Prefix", ordering="prefix")
    def prefix_display(self, key: ApiKey) -> str:
        return format_html("<code>tg_{}_…</code>", key.prefix)

    @admin.display(description="State")
    def state_display(self, key: ApiKey) -> str:
        colour = {"active": "#2e7d32", "expired": "#b35c00", "revoked": "#ba2121"}[key.state]
        return format_html('<strong style="color: {}">{}</strong>', colour, key.state)

    @admin.action(description="Revoke selected keys (cannot be undone)", permissions=["change"])
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        revoked = sum(1 for key in queryset.filter(revoked_at__isnull=True) if key.revoke())
        self.message_user(request, f"Revoked {revoked} key(s).", messages.SUCCESS)


def _against(spent: Decimal | None, cap: Decimal | None) -> str:
    """'$1.20 / $5.00', highlighted once the cap is reached."""
    amount = f"${format_usd(spent or Decimal(0))}"
    if cap is None:
        return amount
    reached = (spent or Decimal(0)) >= cap
    return format_html(
        '<span style="{}">{} / ${}</span>',
        "color: #ba2121; font-weight: bold" if reached else "",
        amount,
        format_usd(cap),
    )
