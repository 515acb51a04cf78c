"""Mount with ``path("api/billing/", include("billing.urls"))``."""

from django.urls import path

from billing.api import BalanceView, KeyListView, LedgerListView, UsageListView

app_name = "billing"

urlpatterns = [
    path("balance", BalanceView.as_view(), name="balance"),
    path("usage", UsageListView.as_view(), name="usage"),
    path("ledger", LedgerListView.as_view(), name="ledger"),
    path("keys", KeyListView.as_view(), name="keys"),
]
