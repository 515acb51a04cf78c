"""Model prices: per-million-token figures and the "sync from OpenRouter" button."""

from __future__ import annotations

from io import StringIO
from typing import Any

from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.core.management import call_command
from django.core.management.base import CommandError
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import URLPattern, path, reverse
from django.views.decorators.http import require_POST

from billing.admin.common import usd
from billing.models import ModelPrice


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
