"""Key limits from text (the command line, settings): parsing and validation.

The same rules as the model's validators: caps are non-negative US dollar
amounts (``Decimal``), the rate a whole number of requests per minute from 1
to ``billing.services.MAX_REQUESTS_PER_MINUTE``.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from django.conf import settings

from billing.money import quantize
from billing.services import MAX_REQUESTS_PER_MINUTE
from openrouter_proxy.callers import KeyLimits


def parse_usd(value: Any, name: str) -> Decimal | None:
    """A non-negative dollar amount, or None for an empty value; ValueError otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, float | bool):
        raise ValueError(f"{name} must be a decimal string or Decimal, not {value!r}.")
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"{name} must be an amount in US dollars, not {value!r}.") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"{name} must be a non-negative amount in US dollars, not {value!r}.")
    return quantize(amount)


def parse_rate(value: Any, name: str) -> int | None:
    """Requests per minute, or None for an empty value; ValueError otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool | float):
        raise ValueError(f"{name} must be a whole number, not {value!r}.")
    try:
        rate = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{name} must be a whole number, not {value!r}.") from None
    if not 1 <= rate <= MAX_REQUESTS_PER_MINUTE:
        raise ValueError(f"{name} must be from 1 to {MAX_REQUESTS_PER_MINUTE}, not {rate}.")
    return rate


def daemon_token_limits() -> KeyLimits:
    """The limits of keys issued by ``/api/internal/daemon-token`` (settings)."""
    return KeyLimits(
        spend_limit=parse_usd(
            getattr(settings, "TERRAGON_DAEMON_TOKEN_SPEND_LIMIT", None),
            "TERRAGON_DAEMON_TOKEN_SPEND_LIMIT",
        ),
        daily_spend_limit=parse_usd(
            getattr(settings, "TERRAGON_DAEMON_TOKEN_DAILY_SPEND_LIMIT", None),
            "TERRAGON_DAEMON_TOKEN_DAILY_SPEND_LIMIT",
        ),
        requests_per_minute=parse_rate(
            getattr(settings, "TERRAGON_DAEMON_TOKEN_RPM", None), "TERRAGON_DAEMON_TOKEN_RPM"
        ),
    )
