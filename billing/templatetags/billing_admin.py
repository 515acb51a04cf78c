"""Template tags of the billing admin."""

from __future__ import annotations

from typing import Any

from django import template

from billing.key_admin import can_view_keys, key_admin_url

register = template.Library()


@register.simple_tag(takes_context=True)
def billing_key_admin_url(context: dict[str, Any]) -> str:
    """The host's key admin, for the nav; empty without one or without permission."""
    request = context.get("request")
    if request is None or not can_view_keys(request.user):
        return ""
    return key_admin_url() or ""
