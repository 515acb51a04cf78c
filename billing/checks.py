"""System checks for billing's settings."""

from __future__ import annotations

from decimal import InvalidOperation
from typing import Any

from django.core.checks import CheckMessage, Error, Tags, register

from billing.conf import billing_settings


@register(Tags.compatibility)
def check_billing_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    try:
        if billing_settings.MARKUP < 0:
            raise ValueError
    except (InvalidOperation, ValueError, TypeError):
        messages.append(Error("BILLING_MARKUP must be a non-negative decimal.", id="billing.E001"))
    try:
        if billing_settings.MAX_IN_FLIGHT < 1 or billing_settings.IN_FLIGHT_LEASE < 1:
            raise ValueError
    except (ValueError, TypeError):
        messages.append(
            Error(
                "BILLING_MAX_IN_FLIGHT and BILLING_IN_FLIGHT_LEASE must be positive integers.",
                id="billing.E002",
            )
        )
    try:
        billing_settings.CREDITS_LOW_THRESHOLD  # noqa: B018  (parsing is the check)
    except (InvalidOperation, ValueError, TypeError):
        messages.append(
            Error("BILLING_CREDITS_LOW_THRESHOLD must be a decimal.", id="billing.E003")
        )
    return messages
