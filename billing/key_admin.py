"""Where the billing admin sends an operator to see a user's API keys, if anywhere.

Billing does not know the host's key system. A host names the model of its
keys with ``BILLING_KEY_ADMIN`` (an ``"app_label.Model"`` label, e.g.
``"apikeys.ApiKey"``); when that model is registered with the admin, the
billing pages link to its change list, filtered with ``?user=<pk>``. Unset,
or not in the admin: no links.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from django.urls import NoReverseMatch, reverse

from billing.conf import billing_settings


def _parts() -> tuple[str, str] | None:
    label = billing_settings.KEY_ADMIN
    if not label or label.count(".") != 1:
        return None
    app_label, model = label.split(".")
    return app_label, model.lower()


def key_admin_url(user_pk: Any = None) -> str | None:
    """The key admin's change list (for one user, given ``user_pk``), or ``None``."""
    parts = _parts()
    if parts is None:
        return None
    try:
        url = reverse(f"admin:{parts[0]}_{parts[1]}_changelist")
    except NoReverseMatch:
        return None
    return f"{url}?{urlencode({'user': user_pk})}" if user_pk is not None else url


def can_view_keys(user: Any) -> bool:
    parts = _parts()
    return parts is not None and bool(user.has_perm(f"{parts[0]}.view_{parts[1]}"))
