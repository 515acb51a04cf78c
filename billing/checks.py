"""System checks for billing's settings."""

from __future__ import annotations

from decimal import InvalidOperation
from typing import Any

from django.conf import settings
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
        connections = billing_settings.ADMISSION_CONNECTIONS
        if isinstance(getattr(settings, "BILLING_ADMISSION_CONNECTIONS", 8), bool):
            raise TypeError
        if connections < 1:
            raise ValueError
    except (ValueError, TypeError):
        messages.append(
            Error(
                "BILLING_ADMISSION_CONNECTIONS must be a positive integer (connections).",
                id="billing.E008",
            )
        )
    if not isinstance(getattr(settings, "BILLING_PREPARED_STATEMENTS", True), bool):
        messages.append(
            Error("BILLING_PREPARED_STATEMENTS must be True or False.", id="billing.E009")
        )
    try:
        billing_settings.CREDITS_LOW_THRESHOLD  # noqa: B018  (parsing is the check)
    except (InvalidOperation, ValueError, TypeError):
        messages.append(
            Error("BILLING_CREDITS_LOW_THRESHOLD must be a decimal.", id="billing.E003")
        )
    try:
        window = billing_settings.RATE_WINDOW_SECONDS
        if isinstance(getattr(settings, "BILLING_RATE_WINDOW_SECONDS", 60), bool) or window < 1:
            raise ValueError
    except (ValueError, TypeError):
        messages.append(
            Error(
                "BILLING_RATE_WINDOW_SECONDS must be a positive integer (seconds).",
                hint="Leave it unset (60) in production: key rates are requests per minute.",
                id="billing.E004",
            )
        )
    try:
        beat, stale = billing_settings.WORKER_HEARTBEAT, billing_settings.WORKER_STALE_AFTER
        if not 0 < beat < stale:
            raise ValueError
    except (ValueError, TypeError):
        messages.append(
            Error(
                "BILLING_WORKER_HEARTBEAT and BILLING_WORKER_STALE_AFTER must be positive "
                "seconds, the heartbeat shorter than the time after which a worker is stale.",
                hint="The defaults are 10 and 30.",
                id="billing.E007",
            )
        )
    messages += _check_recording()
    messages += _check_key_admin()
    return messages


def _check_recording() -> list[CheckMessage]:
    try:
        billing_settings.SPOOL_DIR  # noqa: B018  (parsing is the check)
        if billing_settings.RECORD_ATTEMPTS < 1 or billing_settings.RECORD_RETRY_DELAY < 0:
            raise ValueError
    except (ValueError, TypeError, AttributeError):
        return [
            Error(
                "BILLING_SPOOL_DIR must be a path, BILLING_RECORD_ATTEMPTS a positive integer "
                "and BILLING_RECORD_RETRY_DELAY a non-negative number of seconds.",
                hint="Without BILLING_SPOOL_DIR the spool is BASE_DIR / 'var' / 'spool'.",
                id="billing.E005",
            )
        ]
    return []


def _check_key_admin() -> list[CheckMessage]:
    from django.apps import apps

    label = billing_settings.KEY_ADMIN
    if not label:
        return []
    try:
        apps.get_model(label)
    except (LookupError, ValueError):
        return [
            Error(
                f"BILLING_KEY_ADMIN {label!r} is not an installed model.",
                hint='An "app_label.Model" label, e.g. "apikeys.ApiKey"; unset for no key links.',
                id="billing.E006",
            )
        ]
    return []
