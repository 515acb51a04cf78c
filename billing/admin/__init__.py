"""Operators' view of money: users' spend, the dashboard, usage records, the ledger, prices.

Read-only where the data is history: usage records and ledger rows are never
edited, and a balance changes only through the "grant / adjust credits" form,
which calls ``billing.services.grant_credits`` with the acting operator. The
pages use Django's model permissions: *view* on a model for its pages (the
dashboard needs ``view_usagerecord``, the users' page ``view_creditaccount``
too), *change* on ``CreditAccount`` to grant credits.

Built to stay fast on a million usage records: aggregates are SQL, list pages
never count a big table (see ``billing.admin_tools``), and the queries they
run are backed by indexes.

One module a job: ``users`` (the users' page), ``grants`` (the grant form),
``accounts`` (credit accounts, with the users' page and the grant form's
URLs), ``records`` (usage records, their CSV export and the dashboard's URL),
``ledger``, ``prices``; ``common`` holds what they share. Admin objects are
shared by every request and thread: what a request works out travels with it
(annotations of its queryset, its changelist and paginator, the request),
never on ``self``. Registered here, on the default admin site.
"""

from __future__ import annotations

from django.contrib import admin

from billing.admin.accounts import CreditAccountAdmin
from billing.admin.ledger import CreditLedgerEntryAdmin
from billing.admin.prices import ModelPriceAdmin
from billing.admin.records import UsageRecordAdmin
from billing.admin.users import UserActivityAdmin
from billing.models import CreditAccount, CreditLedgerEntry, ModelPrice, UsageRecord

admin.site.register(CreditAccount, CreditAccountAdmin)
admin.site.register(CreditLedgerEntry, CreditLedgerEntryAdmin)
admin.site.register(UsageRecord, UsageRecordAdmin)
admin.site.register(ModelPrice, ModelPriceAdmin)

__all__ = [
    "CreditAccountAdmin",
    "CreditLedgerEntryAdmin",
    "ModelPriceAdmin",
    "UsageRecordAdmin",
    "UserActivityAdmin",
]
