"""One test per system check id."""

from __future__ import annotations

from typing import Any

import pytest

from billing.checks import check_billing_settings
from openrouter_proxy.checks import check_proxy_settings


def ids(messages: list[Any]) -> list[str]:
    return [message.id for message in messages]


def test_defaults_are_clean(settings: Any) -> None:
    assert check_proxy_settings() == []
    assert check_billing_settings() == []


@pytest.mark.parametrize(
    ("name", "value", "check_id"),
    [
        ("OPENROUTER_PROXY_BASE_URL", "ftp://openrouter.ai/api", "openrouter_proxy.E001"),
        ("OPENROUTER_PROXY_BASE_URL", "https://openrouter.ai/api?x=1", "openrouter_proxy.E001"),
        ("OPENROUTER_PROXY_KEY_VERIFIER", "no.such.module.verify", "openrouter_proxy.E002"),
        (
            "OPENROUTER_PROXY_KEY_VERIFIER",
            "openrouter_proxy.conf.DEFAULT_CORS_ALLOW_HEADERS",
            "openrouter_proxy.E002",
        ),
        ("OPENROUTER_PROXY_ALLOWED_MODELS", [], "openrouter_proxy.E003"),
        ("OPENROUTER_PROXY_ALLOWED_MODELS", ["x-ai/*", ""], "openrouter_proxy.E003"),
        ("OPENROUTER_PROXY_READ_TIMEOUT", 0, "openrouter_proxy.E004"),
        ("OPENROUTER_PROXY_MAX_BODY_BYTES", -1, "openrouter_proxy.E004"),
        ("OPENROUTER_PROXY_CONNECT_TIMEOUT", "soon", "openrouter_proxy.E004"),
        ("OPENROUTER_PROXY_TRANSPORT", "curl", "openrouter_proxy.E005"),
        ("OPENROUTER_PROXY_APP_TITLE", "Terragon \u2014 gateway", "openrouter_proxy.E006"),
        ("OPENROUTER_PROXY_APP_URL", "https://x.example/\n", "openrouter_proxy.E006"),
        ("OPENROUTER_PROXY_ENDPOINTS", [("v1/x", "sometimes")], "openrouter_proxy.E007"),
        ("OPENROUTER_PROXY_ENDPOINTS", [("/v1/x", "open")], "openrouter_proxy.E007"),
        ("OPENROUTER_PROXY_ENDPOINTS", [("v1/*x", "open")], "openrouter_proxy.E007"),
        ("OPENROUTER_PROXY_ENDPOINTS", [("v1/x", "metered")], "openrouter_proxy.E007"),
        ("OPENROUTER_PROXY_ENDPOINTS", [("v1/x", "metered", "telepathy")], "openrouter_proxy.E007"),
        ("OPENROUTER_PROXY_ENDPOINTS", [("v1/x", "open", "usage")], "openrouter_proxy.E007"),
        (
            "OPENROUTER_PROXY_ENDPOINTS",
            [("v1/generation", "own_generation")],
            "openrouter_proxy.E007",
        ),
        (
            "OPENROUTER_PROXY_ENDPOINTS",
            [{"path": "v1/x", "policy": "open", "verbs": []}],
            "openrouter_proxy.E007",
        ),
        ("OPENROUTER_PROXY_ENDPOINTS", ["v1/x"], "openrouter_proxy.E007"),
        ("OPENROUTER_PROXY_API_KEY", "", "openrouter_proxy.W001"),
    ],
)
def test_proxy_checks(settings: Any, name: str, value: Any, check_id: str) -> None:
    setattr(settings, name, value)
    assert check_id in ids(check_proxy_settings())


def test_valid_endpoint_entries_pass(settings: Any) -> None:
    settings.OPENROUTER_PROXY_ENDPOINTS = [
        ("v1/models/user", "open"),
        ("v1/chat/completions", "closed"),
        ("v1/private/**", "metered", "usage"),
        {"path": "v1/tools/{name}", "policy": "open", "methods": ["GET", "POST"]},
    ]
    assert check_proxy_settings() == []


@pytest.mark.parametrize(
    ("name", "value", "check_id"),
    [
        ("BILLING_MARKUP", "-1", "billing.E001"),
        ("BILLING_MARKUP", "lots", "billing.E001"),
        ("BILLING_MAX_IN_FLIGHT", 0, "billing.E002"),
        ("BILLING_IN_FLIGHT_LEASE", "x", "billing.E002"),
        ("BILLING_CREDITS_LOW_THRESHOLD", "low", "billing.E003"),
    ],
)
def test_billing_checks(settings: Any, name: str, value: Any, check_id: str) -> None:
    setattr(settings, name, value)
    assert check_id in ids(check_billing_settings())
