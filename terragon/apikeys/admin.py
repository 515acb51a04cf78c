"""API keys in the admin: create (the token is shown once), revoke (for good)."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from terragon.apikeys.models import ApiKey
from terragon.apikeys.tokens import generate_token, hash_secret


class ApiKeyCreationForm(forms.ModelForm):  # type: ignore[type-arg]
    class Meta:
        model = ApiKey
        fields = ["user", "name", "expires_at"]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["prefix", "user", "name", "created_at", "last_used_at", "expires_at", "state"]
    list_filter = ["revoked_at", "expires_at"]
    search_fields = ["prefix", "name", "user__username", "user__email"]
    list_select_related = ["user"]
    actions = ["revoke_keys"]
    readonly_fields = ["prefix", "created_at", "last_used_at", "revoked_at"]

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

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if not change:
            token, parts = generate_token()
            obj.prefix = parts.prefix
            obj.secret_hash = hash_secret(parts.secret)
            super().save_model(request, obj, form, change)
            self.message_user(
                request,
                f"New API key for {obj.user}: {token} — copy it now, it will not be shown again.",
                messages.WARNING,
            )
            return
        super().save_model(request, obj, form, change)

    @admin.display(description="State")
    def state(self, key: ApiKey) -> str:
        return key.state

    @admin.action(description="Revoke selected keys (cannot be undone)")
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        revoked = sum(1 for key in queryset if key.revoke())
        self.message_user(request, f"Revoked {revoked} key(s).", messages.SUCCESS)
