"""System checks: a misconfigured proxy fails ``manage.py check``, not a request."""

from __future__ import annotations

from typing import Any

from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.utils.module_loading import import_string

from openrouter_proxy.conf import proxy_settings


@register(Tags.compatibility)
def check_proxy_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    from urllib.parse import urlsplit

    messages: list[CheckMessage] = []
    base = urlsplit(proxy_settings.BASE_URL)
    if base.scheme not in {"http", "https"} or not base.hostname or base.query or base.fragment:
        messages.append(
            Error(
                "OPENROUTER_PROXY_BASE_URL must be an http(s) URL without query or fragment.",
                hint="For example https://openrouter.ai/api",
                id="openrouter_proxy.E001",
            )
        )
    messages += _check_verifier(proxy_settings.KEY_VERIFIER)
    messages += _check_meter(proxy_settings.METER)
    models = proxy_settings.ALLOWED_MODELS
    if not models or not all(isinstance(pattern, str) and pattern for pattern in models):
        messages.append(
            Error(
                "OPENROUTER_PROXY_ALLOWED_MODELS must be a non-empty list of model patterns.",
                hint='Use ["*"] to allow every model.',
                id="openrouter_proxy.E003",
            )
        )
    try:
        numbers = {
            "CONNECT_TIMEOUT": proxy_settings.CONNECT_TIMEOUT,
            "READ_TIMEOUT": proxy_settings.READ_TIMEOUT,
            "WRITE_TIMEOUT": proxy_settings.WRITE_TIMEOUT,
            "POOL_TIMEOUT": proxy_settings.POOL_TIMEOUT,
            "MAX_BODY_BYTES": proxy_settings.MAX_BODY_BYTES,
            "MAX_CONNECTIONS": proxy_settings.MAX_CONNECTIONS,
        }
        bad = [name for name, value in numbers.items() if value <= 0]
        if proxy_settings.DB_THREADS < 1:
            bad.append("DB_THREADS")
        zero_or_more = {
            "SETTLE_DELAYS": min(proxy_settings.SETTLE_DELAYS, default=0),
            "KEY_CACHE_SECONDS": proxy_settings.KEY_CACHE_SECONDS,
            "SHUTDOWN_GRACE": proxy_settings.SHUTDOWN_GRACE,
            "CORS_MAX_AGE": proxy_settings.CORS_MAX_AGE,
        }
        negative = [name for name, value in zero_or_more.items() if value < 0]
    except (TypeError, ValueError):
        bad, negative = ["(a value that is not a number)"], []
    for name in bad:
        messages.append(
            Error(f"OPENROUTER_PROXY_{name} must be a positive number.", id="openrouter_proxy.E004")
        )
    for name in negative:
        messages.append(
            Error(f"OPENROUTER_PROXY_{name} must not be negative.", id="openrouter_proxy.E004")
        )
    if proxy_settings.TRANSPORT not in {"native", "aiohttp", "httpx"}:
        messages.append(
            Error(
                'OPENROUTER_PROXY_TRANSPORT must be "native", "aiohttp" or "httpx".',
                id="openrouter_proxy.E005",
            )
        )
    for name, value in (
        ("APP_URL", proxy_settings.APP_URL),
        ("APP_TITLE", proxy_settings.APP_TITLE),
    ):
        if not value.isascii() or any(ord(char) < 32 for char in value):
            messages.append(
                Error(
                    f"OPENROUTER_PROXY_{name} must be printable ASCII: it is sent as a header.",
                    id="openrouter_proxy.E006",
                )
            )
    if not isinstance(proxy_settings.GC_FREEZE, bool):
        messages.append(
            Error("OPENROUTER_PROXY_GC_FREEZE must be True or False.", id="openrouter_proxy.E010")
        )
    from openrouter_proxy.endpoints import entries_from_setting

    try:
        entries_from_setting(proxy_settings.ENDPOINTS)
    except (TypeError, ValueError) as error:
        messages.append(
            Error(
                f"OPENROUTER_PROXY_ENDPOINTS has an invalid entry: {error}",
                hint='Entries look like ("v1/models/user", "open"), ("v1/x", "metered", "usage")'
                ' or {"path": ..., "policy": ..., "reader": ..., "methods": [...]}.',
                id="openrouter_proxy.E007",
            )
        )
    messages += _check_metrics_access()
    if not proxy_settings.API_KEY:
        messages.append(
            Warning(
                "OPENROUTER_PROXY_API_KEY is empty: every proxied request will get a 503.",
                hint="Set OPENROUTER_API_KEY in the environment.",
                id="openrouter_proxy.W001",
            )
        )
    return messages


def _check_verifier(path: str) -> list[CheckMessage]:
    """The host's verifier: named, importable (whatever its module raises) and callable."""
    hint = (
        "Name a callable taking a token and returning an openrouter_proxy.callers.Caller "
        'or None, e.g. OPENROUTER_PROXY_KEY_VERIFIER = "mysite.auth.verify_gateway_token".'
    )
    if not path:
        message = "OPENROUTER_PROXY_KEY_VERIFIER is not set."
        return [Error(message, hint=hint, id="openrouter_proxy.E002")]
    try:
        verifier = import_string(path)
    except Exception as error:  # a module that fails to import is reported, not raised
        return [
            Error(
                f"OPENROUTER_PROXY_KEY_VERIFIER {path!r} cannot be imported: "
                f"{type(error).__name__}: {error}",
                hint=hint,
                id="openrouter_proxy.E002",
            )
        ]
    if not callable(verifier):
        return [
            Error(
                f"OPENROUTER_PROXY_KEY_VERIFIER {path!r} is not callable.",
                hint=hint,
                id="openrouter_proxy.E002",
            )
        ]
    return []


def _check_meter(path: str) -> list[CheckMessage]:
    """The host's meter, when one is named: importable and with every method of the interface."""
    if not path:
        return []
    from openrouter_proxy.metering import load_meter

    try:
        load_meter(path)
    except Exception as error:  # a module that fails to import is reported, not raised
        return [
            Error(
                f"OPENROUTER_PROXY_METER {path!r} cannot be used: {type(error).__name__}: {error}",
                hint="Name a class or factory whose instances implement "
                "openrouter_proxy.metering.Meter, or leave it unset for an unmetered proxy.",
                id="openrouter_proxy.E009",
            )
        ]
    return []


def _check_metrics_access() -> list[CheckMessage]:
    import ipaddress

    from django.conf import settings

    allowed = getattr(settings, "OPENROUTER_PROXY_METRICS_ALLOWED_IPS", ["127.0.0.1", "::1"])
    token = getattr(settings, "OPENROUTER_PROXY_METRICS_TOKEN", "")
    try:
        if isinstance(allowed, str):
            raise TypeError
        for item in allowed:
            ipaddress.ip_network(item, strict=False)
        if not isinstance(token, str):
            raise TypeError
    except (TypeError, ValueError):
        return [
            Error(
                "OPENROUTER_PROXY_METRICS_ALLOWED_IPS must be a list of addresses or networks "
                "and OPENROUTER_PROXY_METRICS_TOKEN a string.",
                hint='For example ["127.0.0.1", "::1", "10.0.0.0/8"] and "" (no token).',
                id="openrouter_proxy.E008",
            )
        ]
    return []
