"""API keys in the admin: create (the token is shown once), revoke (for good).

A key is never edited after it is created and never deleted (usage records
keep its id): it is revoked, which is one way. The list shows each key's
state, and filters by state and by owner (``?user=<id>``, as linked from the
billing users' page).
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html

from billing.admin_tools import UserFilter
from terragon.apikeys.models import ApiKey
from terragon.apikeys.tokens import generate_token, hash_secret


class ApiKeyCreationForm(forms.ModelForm):  # type: ignore[type-arg]
    class Meta:
        model = ApiKey
        fields = ["user", "name", "expires_at"]


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
        "state_display",
    ]
    list_filter = [StateFilter, UserFilter]
    search_fields = ["=prefix", "name", "user__username", "user__email"]
    list_select_related = ["user"]
    actions = ["revoke_keys"]
    readonly_fields = ["prefix", "created_at", "last_used_at", "revoked_at"]
    show_facets = admin.ShowFacets.NEVER

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
