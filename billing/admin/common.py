"""What the billing admin's pages share: dollar cells, admin links, the read-only bases."""

from __future__ import annotations

from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse

from billing.admin_tools import EstimatedCountPaginator, with_period_probing
from billing.money import format_usd

#: The permission that lets an operator grant or adjust credits.
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


class HistoryAdmin(ReadOnlyAdmin):
    """A big table of history by ``created_at``: never counted in full, its dates probed."""

    date_hierarchy = "created_at"
    show_full_result_count = False
    paginator = EstimatedCountPaginator

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        return with_period_probing(super().get_queryset(request))
