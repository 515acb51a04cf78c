"""Credit accounts, and the pages hung on them: the users' page and the grant form."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import URLPattern, path

from billing.admin.common import CAN_GRANT, ReadOnlyAdmin, admin_url, usd
from billing.admin.grants import GrantCreditsAction, grant_credits_form
from billing.admin.users import UserActivityAdmin
from billing.admin_tools import EstimatedCountPaginator
from billing.models import CreditAccount


class CreditAccountAdmin(GrantCreditsAction, ReadOnlyAdmin):
    list_display = ["user", "balance_usd", "in_flight", "in_flight_expires_at", "created_at"]
    search_fields = ["user__username", "user__email"]
    list_select_related = ["user"]
    actions = ["grant_or_adjust"]
    show_full_result_count = False
    paginator = EstimatedCountPaginator

    def __init__(self, model: type[CreditAccount], admin_site: admin.AdminSite) -> None:
        super().__init__(model, admin_site)
        # Serves the users' page; like every admin, one instance for all requests.
        self.users_admin = UserActivityAdmin(get_user_model(), admin_site)

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
        """The users' page (``UserActivityAdmin``'s changelist)."""
        response: HttpResponse = self.users_admin.changelist_view(request)
        return response

    def grant_view(self, request: HttpRequest, user_id: int) -> HttpResponse:
        """Grant or adjust one user's credits: a form, then back to the users' page."""
        if not request.user.has_perm(CAN_GRANT):
            raise PermissionDenied
        user = get_object_or_404(get_user_model(), pk=user_id)
        page = grant_credits_form(
            request, [user], request.method == "POST", self.admin_site.each_context(request)
        )
        if page is None:
            return HttpResponseRedirect(admin_url("billing_users", q=user.get_username()))
        return page

    def grant_targets(self, queryset: QuerySet[CreditAccount]) -> list[Any]:
        return [account.user for account in queryset.select_related("user")]
